"""The manual stays true to the code: docs/config.md is what `gpo-fast config --markdown` prints, every key has a
meaning, every preset value a reason, and every relative link in README.md and docs/ reaches a file."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from gpo_fast.config import PRESET_WHY, PRESETS, Config, _flatten

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.slow
def test_docs_config_md_is_what_the_command_prints():
    printed = subprocess.run([str(Path(sys.executable).with_name("gpo-fast")), "config", "--markdown"],
                             capture_output=True, text=True, check=True).stdout
    assert (ROOT / "docs" / "config.md").read_text() == printed, (
        "docs/config.md is stale: run `gpo-fast config --markdown > docs/config.md`")
    for key in ("train.reference_decay", "log.report_to", "reward.partial_credit"):  # keys of every section
        assert f"`{key}`" in printed


def test_every_key_has_a_meaning():
    missing = []
    for name, field in Config.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            missing += [f"{name}.{k}" for k, f in field.annotation.model_fields.items() if not f.description]
        elif not field.description:
            missing.append(name)
    assert not missing


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_value_a_preset_sets_has_its_reason(preset):
    assert set(_flatten(PRESETS[preset])) == set(PRESET_WHY[preset])


def _relative_links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links in code blocks are code
    for target in LINK.findall(text):
        if not re.match(r"^[a-z]+:|^#", target):
            yield target.split("#")[0]


def test_pages_are_found():
    assert {p.name for p in PAGES} >= {"README.md", "config.md", "tracking.md", "method.md"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file(page):
    broken = [t for t in _relative_links(page) if not (page.parent / t).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to missing {broken}"


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [web](https://example.org) [gone](missing.md#part)\n```\n[code](nowhere.md)\n```\n")
    assert list(_relative_links(page)) == ["page.md", "missing.md"]
