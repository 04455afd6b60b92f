"""Synthetic dot images and their prompts.

Images are IMAGE_SIZE x IMAGE_SIZE, one channel, background -1 and dots +1. A dot is a DOT x DOT square;
two dots are at least one pixel apart (in x or in y), so with 8-connectivity the connected components
of the thresholded image count the dots exactly.
"""

from __future__ import annotations

import re

import torch

from gpo_fast.errors import InputError

IMAGE_SIZE = 16
DOT = 3
MAX_DOTS = 5
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def prompt_for(n: int, digits: bool = False) -> str:
    """'three dots' (or '3 dots' with digits=True); 'one dot' for n == 1."""
    noun = "dot" if n == 1 else "dots"
    return f"{n if digits else NUMBER_WORDS[n - 1]} {noun}"


# The prompt table of the toy model: row 0 is the empty prompt (classifier-free guidance).
PROMPTS = ("",) + tuple(prompt_for(n) for n in range(1, MAX_DOTS + 1)) + tuple(
    prompt_for(n, digits=True) for n in range(1, MAX_DOTS + 1)
)
_PROMPT_RE = re.compile(r"^\s*(\d+|" + "|".join(NUMBER_WORDS) + r")\s+dots?\s*$", re.IGNORECASE)


def count_in_prompt(prompt: str) -> int:
    """The number a toy prompt asks for; ValueError with the prompt when it is not 'N dots'."""
    m = _PROMPT_RE.match(prompt)
    if not m:
        raise InputError(f"cannot read a dot count from prompt {prompt!r}; toy prompts look like 'three dots' or '3 dots'")
    word = m.group(1).lower()
    return int(word) if word.isdigit() else NUMBER_WORDS.index(word) + 1


def _place(n: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """Top-left corners of n dots with a gap of at least one pixel, by rejection sampling."""
    span = IMAGE_SIZE - DOT + 1
    while True:
        corners: list[tuple[int, int]] = []
        for _ in range(200):
            y, x = (int(v) for v in torch.randint(0, span, (2,), generator=generator))
            if all(abs(y - yy) > DOT or abs(x - xx) > DOT for yy, xx in corners):
                corners.append((y, x))
                if len(corners) == n:
                    return corners


def render_dots(counts: torch.Tensor | list[int], generator: torch.Generator) -> torch.Tensor:
    """(B, 1, IMAGE_SIZE, IMAGE_SIZE) float32 images in {-1, +1} with counts[b] dots each."""
    counts = [int(c) for c in counts]
    images = torch.full((len(counts), 1, IMAGE_SIZE, IMAGE_SIZE), -1.0)
    for b, n in enumerate(counts):
        if not 0 <= n <= MAX_DOTS:
            raise ValueError(f"dot count must be in 0..{MAX_DOTS}; got {n}")
        for y, x in _place(n, generator) if n else []:
            images[b, 0, y : y + DOT, x : x + DOT] = 1.0
    return images
