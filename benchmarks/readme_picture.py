"""The README's picture: a finished toy run's before_after.png, copied to docs/images/ as a small PNG.

    gpo-fast train --out runs/readme            # the default toy run, seed 0
    python benchmarks/readme_picture.py runs/readme

The picture is the run's own (the base model's held-out samples on the left, the kept adapter's on the right,
the same prompt and seed at the same place); this only narrows it to at most --width pixels and writes it with
PNG's optimizer, so the repository holds a few tens of KB.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished run folder of `gpo-fast train`")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "before_after.png")
    ap.add_argument("--width", type=int, default=900, help="the widest the picture may be, in pixels")
    args = ap.parse_args(argv)
    from PIL import Image

    source, summary = args.run / "before_after.png", args.run / "summary.json"
    if not (source.is_file() and summary.is_file()):
        print(f"error: {args.run} is not a finished run of `gpo-fast train` (no before_after.png and summary.json); "
              "run `gpo-fast train --out runs/readme` first", file=sys.stderr)
        return 2
    image = Image.open(source).convert("RGB")
    if image.width > args.width:
        image = image.resize((args.width, round(image.height * args.width / image.width)), Image.Resampling.LANCZOS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    s = json.loads(summary.read_text())
    print(f"wrote {args.out} ({image.width} x {image.height}, {args.out.stat().st_size // 1024} KB) from {args.run}: "
          f"accuracy {100 * s['accuracy_before']:.1f}% -> {100 * s['accuracy_after']:.1f}%, seed {s['seed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
