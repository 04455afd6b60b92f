"""The words prompts and rewards share, below both: the Prompt record, text normalization, and the
counting vocabulary.

- Prompt: what one image was asked to show (its text, task, and the class and count or the word).
- normalize(s): how text is compared: lower-case, letters and digits only.
- COCO_CLASSES: the 80 COCO class names in ultralytics' order (id 0 "person" ... id 79 "toothbrush").
- plural(name) / singular(word): English plurals. Regular rules (+es after s, x, z, ch, sh; consonant+y ->
  ies; else +s) on the last word of a phrase, plus a table of irregulars. Class names that are already
  plural ("skis", "scissors") and mass nouns ("sheep", "broccoli") are their own plural, so
  singular(plural(c)) == c for every COCO class.
- SYNONYMS: other words people use for a class ("man" -> person, "sofa" -> couch, "phone" -> cell phone).
- canonical(phrase): the class a noun phrase names (singular or plural, synonym or not), or None.
- NUMBER_WORDS / number_word(n): one..twenty; counts run 1..MAX_COUNT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    text: str
    task: str  # "counting" | "text" | "toy"
    cls: str | None = None  # detector class name, counting
    n: int | None = None  # wanted count
    target: str | None = None  # text to render


def normalize(s: str) -> str:
    """Lower-case letters and digits only: 'Hello, World!' -> 'helloworld'."""
    return "".join(ch for ch in s.lower() if ch.isalnum())


COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

# Counts a prompt may ask for: number words exist up to twenty, and detectors miscount crowds anyway.
MAX_COUNT = 20
NUMBER_WORDS = (
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)

# singular -> plural where the rules are wrong (last word of a phrase); the same word means no change
_IRREGULAR = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice", "knife": "knives",
    "sheep": "sheep", "skis": "skis", "scissors": "scissors", "broccoli": "broccoli", "fish": "fish",
    "deer": "deer", "goose": "geese", "foot": "feet", "tooth": "teeth", "calf": "calves",
}
_IRREGULAR_INV = {p: s for s, p in _IRREGULAR.items()}
# A pair noun reads "one pair of scissors", "three pairs of scissors" in generated prompts.
PAIR_NOUNS = frozenset({"skis", "scissors"})

# other word -> COCO class (singular forms; plurals are derived)
SYNONYMS = {
    "man": "person", "woman": "person", "child": "person", "kid": "person", "boy": "person", "girl": "person",
    "adult": "person", "human": "person", "pedestrian": "person",
    "bike": "bicycle", "motorbike": "motorcycle", "aeroplane": "airplane", "plane": "airplane",
    "jet": "airplane", "ship": "boat", "lorry": "truck", "hydrant": "fire hydrant", "ski": "skis",
    "ball": "sports ball", "football": "sports ball", "soccer ball": "sports ball", "racket": "tennis racket",
    "racquet": "tennis racket", "tennis racquet": "tennis racket", "doughnut": "donut", "sofa": "couch",
    "plant": "potted plant", "houseplant": "potted plant", "table": "dining table", "television": "tv",
    "tv set": "tv", "television set": "tv", "computer mouse": "mouse", "remote control": "remote",
    "cellphone": "cell phone", "phone": "cell phone", "mobile phone": "cell phone", "smartphone": "cell phone",
    "fridge": "refrigerator", "teddy": "teddy bear", "hair dryer": "hair drier", "hairdryer": "hair drier",
    "puppy": "dog", "kitten": "cat", "calf": "cow", "pony": "horse", "lamb": "sheep",
}

# last words of every class and synonym: a word ending in s that is one of these is not a plural ('bus')
_KNOWN_SINGULARS = frozenset(name.split()[-1] for name in (*COCO_CLASSES, *SYNONYMS))


def _plural_word(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


def _singular_word(word: str) -> str:
    if word in _IRREGULAR_INV:
        return _IRREGULAR_INV[word]
    if word in _IRREGULAR or word in _KNOWN_SINGULARS or not word.endswith("s") or word.endswith("ss"):
        return word  # already singular (or a pair/mass noun)
    for suffix, add in (("ies", "y"), ("es", ""), ("s", "")):  # a known noun decides: 'buses' -> 'bus'
        if word.endswith(suffix) and word[: -len(suffix)] + add in _KNOWN_SINGULARS:
            return word[: -len(suffix)] + add
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if re.search(r"(ss|x|z|ch|sh)es$", word):
        return word[:-2]  # benches, glasses, boxes
    return word[:-1]


def _words(phrase: str) -> list[str]:
    return phrase.replace("_", " ").strip().lower().split()  # 'Traffic_Light' -> ['traffic', 'light']


def plural(name: str) -> str:
    """The plural of a noun or noun phrase: 'cat' -> 'cats', 'wine glass' -> 'wine glasses', 'person' -> 'people'."""
    words = _words(name)
    if not words:
        raise ValueError("plural() of an empty name")
    return " ".join(words[:-1] + [_plural_word(words[-1])])


def singular(word: str) -> str:
    """The singular of a noun or noun phrase (identity on singulars): 'knives' -> 'knife', 'buses' -> 'bus'."""
    words = _words(word)
    if not words:
        raise ValueError("singular() of an empty word")
    return " ".join(words[:-1] + [_singular_word(words[-1])])


def number_word(n: int) -> str:
    """'one'..'twenty' for 1..MAX_COUNT."""
    if not 1 <= n <= MAX_COUNT:
        raise ValueError(f"count must be in 1..{MAX_COUNT}; got {n}")
    return NUMBER_WORDS[n - 1]


def parse_number(token: str) -> int | None:
    """3 for '3' or 'three' (case-insensitive); None for anything else."""
    token = token.strip().lower()
    if token.isdigit():
        return int(token)
    return NUMBER_WORDS.index(token) + 1 if token in NUMBER_WORDS else None


def noun_phrase(name: str, n: int) -> str:
    """What follows the number in a prompt: 'cat' / 'cats', 'pair of skis' / 'pairs of skis'."""
    name = " ".join(_words(name))
    if name in PAIR_NOUNS:
        return ("pair of " if n == 1 else "pairs of ") + name
    return name if n == 1 else plural(name)


def canonical(phrase: str, classes=COCO_CLASSES) -> str | None:
    """The class in `classes` a noun phrase names: exact, singular of a plural, 'pair(s) of X', or a synonym."""
    words = _words(phrase)
    if words[:2] in (["pair", "of"], ["pairs", "of"]):
        words = words[2:]  # 'pairs of scissors' -> 'scissors'
    if not words:
        return None
    lookup = {" ".join(_words(c)): c for c in classes}
    text = " ".join(words)
    for cand in (text, singular(text)):
        if cand in lookup:
            return lookup[cand]
        syn = SYNONYMS.get(cand)
        if syn is not None and syn in lookup:
            return lookup[syn]
    return None
