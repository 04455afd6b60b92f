"""Prompt sets (of gpo_fast.language.Prompt records): JSONL files, generated counting and text sets, train/val/eval
splits.

A prompt file is JSONL, one object per line; blank lines and lines starting with '#' are skipped:
    {"prompt": "a photo of three cats", "task": "counting", "class": "cat", "n": 3, "split": "train"}
    {"prompt": "a sign that says \"hello\"", "task": "text", "text": "hello", "split": "eval"}
    {"prompt": "three dots", "task": "toy", "n": 3}
- task: "counting" needs "class" (a detector class: one of `classes`, by default the COCO-80 names; plurals
  and synonyms are accepted and stored as the class name) and "n" (an integer in 1..MAX_COUNT = 20), and its
  prompt text must ask for that: parse_counting_prompt's reading of it must include n of that class (in words
  or digits; other classes may be asked for too, the same class with another count may not);
  "text" needs "text" (with at least one letter or digit); "toy" may carry "n".
- split: optional, "train", "val" or "eval"; a line without one belongs to "train". "val" prompts pick the best
  adapter during training; "eval" prompts measure it. A file without "val" lines is validated on its eval prompts
  with other seeds (the loop says so).
Any other key, a wrong type or an out-of-range value is an error: PromptFileError, one sentence,
"FILE line K: reason; what to do".

Generated sets (`make_prompt_set`, behind `gpo-fast prompts counting|text --out FILE.jsonl`) are written
as ONE file whose lines carry "split". Counting prompts name COCO classes the way the detector means them
(language.PROMPT_NAMES: "two computer mice", "three remote controls") when every class is a COCO name.
Train, val and eval are disjoint by item, not only by prompt text: counting by (class, n), text by the
normalised word, so no eval word is ever trained on or validated on. The split is a seeded shuffle of the
sorted items, so it is the same on every machine; eval is the same with or without a val split.
"""

from __future__ import annotations

import difflib
import json
import random
import re
from importlib import resources
from pathlib import Path
from typing import Sequence

from gpo_fast.errors import InputError, UserError
from gpo_fast.language import (COCO_CLASSES, MAX_COUNT, PROMPT_NAMES, Prompt, canonical, noun_phrase, normalize,
                               number_word, read_number)

TASKS = ("counting", "text", "toy")
SPLITS = ("train", "val", "eval")
KEYS = ("prompt", "task", "class", "n", "text", "split")
COUNTING_TEMPLATES = ("a photo of {n_word} {noun}",)  # {n} (digits), {n_word} (one..twenty), {noun}
TEXT_TEMPLATES = ('a sign that says "{word}"',)  # {word}
_EXAMPLE = '{"prompt": "a photo of three cats", "task": "counting", "class": "cat", "n": 3}'


class PromptFileError(UserError, ValueError):
    """A prompt file that cannot be used; the message is one sentence: 'FILE line K: reason; what to do'."""


# ---------------------------------------------------------------------------------------------- reading


def _classes_hint(name: str, classes: Sequence[str]) -> str:
    """'did you mean ...' plus where the list of classes is."""
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in classes], n=3)
    guess = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    if tuple(classes) == COCO_CLASSES:
        where = ("use one of the 80 COCO class names (listed in gpo_fast.language.COCO_CLASSES) "
                 "or a plural or synonym of one")
    else:
        where = f"use one of the detector's classes: {', '.join(classes)}"
    return f"{guess}; {where}"


def _prompt_names(classes: Sequence[str]) -> dict[str, str]:
    """PROMPT_NAMES for a list of COCO names only; none for another detector (its 'mouse' may be a rodent)."""
    return PROMPT_NAMES if set(classes) <= set(COCO_CLASSES) else {}


def _check_counting_text(text: str, cls: str, n: int, classes: Sequence[str]) -> None:
    """ValueError('reason; what to do') unless the prompt text asks for n of cls (see counts_in_prompt)."""
    found = counts_in_prompt(text, classes)
    asked = list(dict.fromkeys((k, c) for k, c in found if c is not None))
    if (n, cls) in asked and all(k == n for k, c in asked if c == cls):
        return
    names = _prompt_names(classes)
    if asked:
        why = "asks for " + " and ".join(f"{k} {noun_phrase(c, k, names)}" for k, c in asked)
    elif found:
        why = "names no detector class after its number"
    else:
        why = "names no count (write it as a word or digits)"
    example = COUNTING_TEMPLATES[0].format(n=n, n_word=number_word(n), noun=noun_phrase(cls, n, names))
    raise ValueError(f"the prompt {text!r} {why}, but 'class' and 'n' say {n} {noun_phrase(cls, n, names)}; make "
                     f"the text and the fields agree, e.g. {json.dumps(example)}")


def _parse_line(obj, classes: Sequence[str]) -> tuple[Prompt, str]:
    """(Prompt, split) from one decoded line; ValueError('reason; what to do') when it is unusable."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}; write one object per line, "
                         f"e.g. {_EXAMPLE}")
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; the keys are {', '.join(KEYS)}")

    def get(key, typ, required):
        if key not in obj:
            if required:
                raise ValueError(f"missing {key!r}; add it, e.g. {_EXAMPLE}")
            return None
        v = obj[key]
        if not isinstance(v, typ) or isinstance(v, bool):  # bool is an int in Python, not in prompt files
            kind = "an integer" if typ is int else "a string"
            raise ValueError(f"{key!r} must be {kind}, got {json.dumps(v)}; write it as {kind}, e.g. {_EXAMPLE}")
        return v

    text = get("prompt", str, True)
    if not text.strip():
        raise ValueError("'prompt' is empty; give the text the model is prompted with")
    task = get("task", str, True)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    cls = get("class", str, task == "counting")
    n = get("n", int, task == "counting")
    target = get("text", str, task == "text")
    split = get("split", str, False) or "train"
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use 'train', 'val' or 'eval'")
    if n is not None and not 1 <= n <= MAX_COUNT:
        raise ValueError(f"'n' is {n}, outside 1..{MAX_COUNT}; ask for 1 to {MAX_COUNT} objects")
    if cls is not None:
        name = canonical(cls, classes)
        if name is None:
            raise ValueError(f"class {cls!r} is not a detector class{_classes_hint(cls, classes)}")
        cls = name
    if task == "counting":
        _check_counting_text(text, cls, n, classes)
    if target is not None and not normalize(target):
        raise ValueError(f"'text' is {json.dumps(target)}, which has no letters or digits; give the word to render")
    return Prompt(text=text, task=task, cls=cls, n=n, target=target), split


def load_prompts(path: str | Path, *, split: str | None = None, classes: Sequence[str] | None = None) -> list[Prompt]:
    """The prompts of a JSONL file (all, or one split); PromptFileError naming the line on any bad line."""
    path = Path(path)
    classes = COCO_CLASSES if classes is None else tuple(classes)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be 'train', 'val', 'eval' or None; got {split!r}")
    if not path.is_file():
        raise PromptFileError(
            f"{path}: no such prompt file; create one with `gpo-fast prompts counting --out {path}` "
            f"(or `text`) or give the path of an existing JSONL file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 JSONL") from e
    prompts, seen = [], 0
    for k, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(
                f"{path} line {k}: not valid JSON ({e.msg} at column {e.colno}); write one JSON object per line, "
                f"e.g. {_EXAMPLE}") from e
        try:
            prompt, line_split = _parse_line(obj, classes)
        except ValueError as e:
            raise PromptFileError(f"{path} line {k}: {e}") from e
        seen += 1
        if split is None or line_split == split:
            prompts.append(prompt)
    if not seen:
        raise PromptFileError(f"{path}: no prompts (only blank lines and comments); add lines like {_EXAMPLE}")
    if not prompts:
        raise PromptFileError(
            f"{path}: no prompts in split {split!r}; mark lines with \"split\": \"{split}\" "
            f"or make a split set with `gpo-fast prompts`")
    return prompts


_TOKEN = re.compile(r"[^\W\d_]+|\d+")  # words (any script) and digit runs; 'twenty-one' -> 'twenty', 'one'
# words a noun phrase after a number does not run past ('three cats on a sofa': the count is of cats)
_STOP_WORDS = frozenset(
    "a an the and or but nor with without on in at of off near next beside by under over behind above below "
    "from to for into onto inside outside around between among against along across through while than".split())
MAX_ADJECTIVES = 4  # words allowed between a number and its noun: 'three small shiny red cars'


def _class_at(tokens: list[str], j: int, classes: Sequence[str]) -> tuple[str, int] | None:
    """(class, words) of the longest class name (up to four words) starting at tokens[j], or None."""
    for length in (4, 3, 2, 1):
        if j + length <= len(tokens) and (name := canonical(" ".join(tokens[j : j + length]), classes)) is not None:
            return name, length
    return None


def _noun_after(tokens: list[str], j: int, classes: Sequence[str]) -> str | None:
    """The class counted by a number that ends before tokens[j]: the first class name within MAX_ADJECTIVES
    other words, not past a stop word or another number; of a run of class names the last ('orange cats')."""
    for k in range(j, min(len(tokens), j + MAX_ADJECTIVES + 1)):
        hit = _class_at(tokens, k, classes)
        if hit is None:
            if tokens[k].lower() in _STOP_WORDS or read_number(tokens, k) is not None:
                return None
            continue  # an adjective
        name, length = hit
        while (more := _class_at(tokens, k + length, classes)) is not None:  # the head noun is the last one
            k += length
            name, length = more
        return name
    return None


def counts_in_prompt(text: str, classes: Sequence[str] | None = None) -> list[tuple[int, str | None]]:
    """Every (count, class) the text asks for, in order; class None where no class follows the number.

    A number is a whole number phrase (language.read_number: 'one hundred cats' is 100 cats, 'twenty-one' is
    21); its class is the noun after it (see _noun_after). 'a'/'an' count as one only in a text with no number:
    'a photo of a cat' asks for one cat, 'three cats on a sofa' for three cats only.
    """
    classes = COCO_CLASSES if classes is None else tuple(classes)
    tokens = _TOKEN.findall(text)
    found, j = [], 0
    while j < len(tokens):
        got = read_number(tokens, j)
        if got is None:
            j += 1
            continue
        found.append((got[0], _noun_after(tokens, j + got[1], classes)))
        j += got[1]
    if not found:
        found = [(1, c) for j, tok in enumerate(tokens)
                 if tok.lower() in ("a", "an") and (c := _noun_after(tokens, j + 1, classes)) is not None]
    return found


def parse_counting_prompt(text: str, classes: Sequence[str] | None = None) -> tuple[int, str]:
    """(n, class) from 'a photo of three cats', '3 puppies', 'two pairs of skis', 'a photo of a cat';
    InputError (a ValueError) saying why not.

    Read by counts_in_prompt: numbers followed by no class are ignored when another is; a prompt asking for
    two different counts is refused, and so is a count outside 1..MAX_COUNT ('twenty-one cats').
    """
    classes = COCO_CLASSES if classes is None else tuple(classes)
    found = counts_in_prompt(text, classes)
    asked = list(dict.fromkeys((n, c) for n, c in found if c is not None))
    if not found:
        raise InputError(f"no count in {text!r}; write the number as a word (one..twenty) or digits, "
                         f"e.g. 'a photo of three cats'")
    if not asked:
        tokens = _TOKEN.findall(text)
        first = next(j for j in range(len(tokens)) if read_number(tokens, j) is not None)
        after = " ".join(tokens[first + read_number(tokens, first)[1] :][:2])  # what was probably meant
        raise InputError(f"no detector class after the number in {text!r}{_classes_hint(after, classes)}")
    if len(asked) > 1:
        raise InputError(f"{text!r} asks for several counts ({asked}); a counting prompt asks for one class "
                         f"and one number")
    n, name = asked[0]
    if not 1 <= n <= MAX_COUNT:
        raise InputError(f"{text!r} asks for {n} objects; counts must be in 1..{MAX_COUNT}")
    return n, name


# ---------------------------------------------------------------------------------------------- generating


def counting_prompts(classes: Sequence[str] = COCO_CLASSES, n_range: tuple[int, int] = (1, 6),
                     templates: Sequence[str] = COUNTING_TEMPLATES) -> list[Prompt]:
    """Every class x every n in n_range (inclusive) x every template: 'a photo of three cats', 'one cat'; COCO
    classes by their PROMPT_NAMES ('two computer mice') when every class is a COCO name."""
    lo, hi = n_range
    if not 1 <= lo <= hi <= MAX_COUNT:
        raise InputError(f"n_range must satisfy 1 <= min <= max <= {MAX_COUNT}; got {n_range}")
    for t in templates:
        if "{noun}" not in t or ("{n}" not in t and "{n_word}" not in t):
            raise ValueError(f"counting template {t!r} needs {{noun}} and {{n}} or {{n_word}}")
    names = _prompt_names(classes)
    return [
        Prompt(text=t.format(n=n, n_word=number_word(n), noun=noun_phrase(c, n, names)), task="counting", cls=c, n=n)
        for c in classes for n in range(lo, hi + 1) for t in templates
    ]


def load_words(path: str | Path | None = None) -> list[str]:
    """Words from a file (one per line, '#' comments), default the shipped gpo_fast/data/words.txt; deduplicated."""
    if path is None:
        text, name = resources.files("gpo_fast").joinpath("data/words.txt").read_text(encoding="utf-8"), "words.txt"
    else:
        if not Path(path).is_file():
            raise PromptFileError(f"{path}: no such word file; give a text file with one word per line")
        text, name = Path(path).read_text(encoding="utf-8"), str(path)
    words, seen = [], set()
    for k, line in enumerate(text.splitlines(), 1):
        w = line.strip()
        if not w or w.startswith("#"):
            continue
        if not normalize(w):
            raise PromptFileError(f"{name} line {k}: {w!r} has no letters or digits; give one word per line")
        if normalize(w) not in seen:  # 'Hello' and 'hello' are the same item
            seen.add(normalize(w))
            words.append(w)
    if not words:
        raise PromptFileError(f"{name}: no words; give one word per line")
    return words


def text_prompts(words: Sequence[str] | None = None, templates: Sequence[str] = TEXT_TEMPLATES) -> list[Prompt]:
    """Every word x every template: 'a sign that says "hello"' with target 'hello'; default the shipped words."""
    words = load_words() if words is None else list(words)
    for t in templates:
        if "{word}" not in t:
            raise ValueError(f"text template {t!r} needs {{word}}")
    return [Prompt(text=t.format(word=w), task="text", target=w) for w in words for t in templates]


def item_key(p: Prompt) -> tuple:
    """What train and eval must not share: (class, n) for counting, the normalised word for text."""
    if p.task == "counting":
        return ("counting", p.cls, p.n)
    if p.task == "text":
        return ("text", normalize(p.target or ""))
    return (p.task, p.n if p.n is not None else p.text)


def split_prompts(prompts: Sequence[Prompt], eval_fraction: float, seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """(train, eval), disjoint by item_key; round(eval_fraction * items) items go to eval (at least one, and
    at least one stays in train, when there are two or more items and eval_fraction > 0); order is kept."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1); got {eval_fraction}")
    keys = sorted({item_key(p) for p in prompts}, key=repr)  # sorted first: independent of input order and hashing
    random.Random(seed).shuffle(keys)
    n_eval = round(eval_fraction * len(keys))
    if eval_fraction > 0 and len(keys) >= 2:
        n_eval = min(max(n_eval, 1), len(keys) - 1)
    eval_keys = set(keys[:n_eval])
    train = [p for p in prompts if item_key(p) not in eval_keys]
    held = [p for p in prompts if item_key(p) in eval_keys]
    return train, held


def split_three(prompts: Sequence[Prompt], eval_fraction: float, val_fraction: float,
                seed: int = 0) -> tuple[list[Prompt], list[Prompt], list[Prompt]]:
    """(train, val, eval), disjoint by item_key. Eval is split_prompts(prompts, eval_fraction, seed)'s held-out part,
    whatever val_fraction is; val is then about val_fraction of all items, taken from the rest (none at 0)."""
    rest, held = split_prompts(prompts, eval_fraction, seed)
    if val_fraction <= 0:
        return rest, [], held
    n_all, n_rest = len({item_key(p) for p in prompts}), len({item_key(p) for p in rest})
    train, val = split_prompts(rest, min(val_fraction * n_all / max(n_rest, 1), 0.99), seed + 1)
    return train, val, held


def to_json(p: Prompt, split: str | None = None) -> dict:
    """The JSONL object of a prompt (keys as in the file format)."""
    obj = {"prompt": p.text, "task": p.task}
    for key, value in (("class", p.cls), ("n", p.n), ("text", p.target), ("split", split)):
        if value is not None:
            obj[key] = value
    return obj


def write_jsonl(prompts: Sequence[Prompt], path: str | Path, split: str | Sequence[str] | None = None) -> None:
    """One JSON object per prompt; split is None (no field), one split for all, or one per prompt."""
    splits = [split] * len(prompts) if split is None or isinstance(split, str) else list(split)
    if len(splits) != len(prompts):
        raise ValueError(f"{len(splits)} splits for {len(prompts)} prompts")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p, s in zip(prompts, splits):
            f.write(json.dumps(to_json(p, s), ensure_ascii=False) + "\n")


def make_prompt_set(kind: str, out: str | Path, *, eval_fraction: float = 0.2, val_fraction: float = 0.1,
                    seed: int = 0, n_min: int = 1, n_max: int = 6, classes: Sequence[str] | None = None,
                    words_file: str | Path | None = None,
                    templates: Sequence[str] | None = None) -> tuple[int, int, int]:
    """Write a generated set with a "split" on every line to `out`; returns (n_train, n_val, n_eval) prompts."""
    if kind == "counting":
        classes = COCO_CLASSES if classes is None else tuple(classes)
        prompts = counting_prompts(classes, (n_min, n_max), templates or COUNTING_TEMPLATES)
    elif kind == "text":
        prompts = text_prompts(load_words(words_file), templates or TEXT_TEMPLATES)
    else:
        raise InputError(f"unknown prompt set kind {kind!r}; use 'counting' or 'text'")
    train, val, held = split_three(prompts, eval_fraction, val_fraction, seed)
    write_jsonl(train + val + held, out, ["train"] * len(train) + ["val"] * len(val) + ["eval"] * len(held))
    return len(train), len(val), len(held)
