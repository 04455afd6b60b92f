"""The words prompts and rewards share, below both: the Prompt record, text normalization, and the
counting vocabulary.

- Prompt: what one image was asked to show (its text, task, and the class and count or the word).
- normalize(s): how text is compared: Unicode NFKD with accents dropped, case-folded, letters and digits only.
- COCO_CLASSES: the 80 COCO class names in ultralytics' order (id 0 "person" ... id 79 "toothbrush").
- plural(name) / singular(word): English plurals. Regular rules (+es after s, x, z, ch, sh; consonant+y ->
  ies; else +s) on the last word of a phrase, plus a table of irregulars. Class names that are already
  plural ("skis", "scissors") and mass nouns ("sheep", "broccoli") are their own plural, so
  singular(plural(c)) == c for every COCO class.
  A phrase "X of Y" is inflected on X: "pair of skis" -> "pairs of skis".
- PROMPT_NAMES: how a prompt says a COCO class whose bare name asks for something else ("mouse" -> "computer
  mouse", so "two computer mice", not rodents); noun_phrase(cls, n) uses them, canonical maps them back.
- SYNONYMS: other words people use for a class ("man" -> person, "sofa" -> couch, "phone" -> cell phone).
- canonical(phrase): the class a noun phrase names (singular or plural, synonym or not), or None.
- NUMBER_WORDS / number_word(n): one..twenty; counts run 1..MAX_COUNT. read_number reads longer number
  phrases ("twenty-one", "one hundred and five", "a dozen", "30") so that they are not misread as "one".
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence


@dataclass(frozen=True)
class Prompt:
    text: str
    task: str  # "counting" | "text" | "toy"
    cls: str | None = None  # detector class name, counting
    n: int | None = None  # wanted count
    target: str | None = None  # text to render


def normalize(s: str) -> str:
    """Case-folded letters and digits without accents: 'Hello, World!' -> 'helloworld', 'Café' -> 'cafe',
    'Straße' -> 'strasse' (casefold, then NFKD, dropping combining marks and everything not alphanumeric)."""
    s = unicodedata.normalize("NFKD", s.casefold())
    return "".join(ch for ch in s if ch.isalnum() and not unicodedata.combining(ch))


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
# A pair noun reads "one pair of scissors", "three pairs of scissors" in generated prompts (any class list).
PAIR_NOUNS = frozenset({"skis", "scissors"})

# COCO class -> what a prompt calls it, where the bare name would ask for something else or read badly.
# Checked for all 80; kept as they are: "orange" (a fruit after a number), "kite", "bear" (the toy is "teddy
# bear"), "hot dog", "sports ball", "cell phone", "dining table", "potted plant" (already unambiguous).
PROMPT_NAMES = {
    "tie": "necktie",  # not a knot, a cable tie or a drawn game
    "skis": "pair of skis", "scissors": "pair of scissors",
    "broccoli": "head of broccoli",  # "six broccoli" counts nothing
    "tv": "television",  # COCO's tv/monitor; "tvs" is no word
    "mouse": "computer mouse",  # "two mice" are rodents
    "remote": "remote control",  # "remote" alone is an adjective
    "keyboard": "computer keyboard",  # not a piano keyboard
    "microwave": "microwave oven",  # not the radiation
    "hair drier": "hair dryer",  # "drier" is the comparative of dry
}

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
    "tv remote": "remote", "necktie": "tie", "computer keyboard": "keyboard", "microwave oven": "microwave",
    "head of broccoli": "broccoli", "pair of skis": "skis", "pair of scissors": "scissors",
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


def _head(words: list[str]) -> int:
    """Index of the word that takes the number: the last, or the one before 'of' ('pair of skis' -> 0)."""
    return words.index("of", 1) - 1 if "of" in words[1:-1] else len(words) - 1


def plural(name: str) -> str:
    """The plural of a noun or noun phrase: 'cat' -> 'cats', 'wine glass' -> 'wine glasses', 'person' -> 'people',
    'pair of skis' -> 'pairs of skis'."""
    words = _words(name)
    if not words:
        raise ValueError("plural() of an empty name")
    k = _head(words)
    return " ".join(words[:k] + [_plural_word(words[k])] + words[k + 1 :])


def singular(word: str) -> str:
    """The singular of a noun or noun phrase (identity on singulars): 'knives' -> 'knife', 'buses' -> 'bus'."""
    words = _words(word)
    if not words:
        raise ValueError("singular() of an empty word")
    k = _head(words)
    return " ".join(words[:k] + [_singular_word(words[k])] + words[k + 1 :])


def number_word(n: int) -> str:
    """'one'..'twenty' for 1..MAX_COUNT."""
    if not 1 <= n <= MAX_COUNT:
        raise ValueError(f"count must be in 1..{MAX_COUNT}; got {n}")
    return NUMBER_WORDS[n - 1]


_UNITS = {w: v for v, w in enumerate(("zero", *NUMBER_WORDS[:9]))}  # zero..nine
_TEENS = {w: v for v, w in enumerate(NUMBER_WORDS[9:19], 10)}  # ten..nineteen
_TENS = {w: 10 * v for v, w in enumerate(("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty",
                                           "ninety"), 2)}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
_SMALL = ("digits", "a", "unit", "teen", "tens")  # what 'hundred', 'dozen' and a scale may follow


def read_number(tokens: Sequence[str], i: int = 0) -> tuple[int, int] | None:
    """(value, tokens used) of the number phrase at tokens[i], or None: '3', 'three', 'twenty one' (the words of
    'twenty-one'), 'one hundred and five', 'a hundred', 'two dozen', '3 thousand'. A phrase stops where the next
    word cannot continue it, so 'one two' is two numbers."""
    total = group = 0
    last = None  # the kind of the previous word of the phrase
    j = i
    while j < len(tokens):
        tok = tokens[j].lower()
        nxt = tokens[j + 1].lower() if j + 1 < len(tokens) else ""
        if tok.isdigit() and last is None:
            group, last = int(tok), "digits"
        elif tok in ("a", "an") and last is None and (nxt in ("hundred", "dozen") or nxt in _SCALES):
            group, last = 1, "a"
        elif tok in _UNITS and (last in ("tens", "hundred", "scale", "and") and _UNITS[tok] or last is None):
            group, last = group + _UNITS[tok], "unit"
        elif (tok in _TEENS or tok in _TENS) and last in (None, "hundred", "scale", "and"):
            group, last = group + _TEENS.get(tok, _TENS.get(tok, 0)), "teen" if tok in _TEENS else "tens"
        elif tok in ("hundred", "dozen") and last in _SMALL:
            group, last = group * (100 if tok == "hundred" else 12), "hundred" if tok == "hundred" else "dozen"
        elif tok in _SCALES and last in (*_SMALL, "hundred"):
            total, group, last = total + group * _SCALES[tok], 0, "scale"
        elif tok == "and" and last in ("hundred", "scale") and (nxt in _UNITS or nxt in _TEENS or nxt in _TENS):
            last = "and"
        else:
            break
        j += 1
    return None if j == i else (total + group, j - i)


def parse_number(token: str) -> int | None:
    """3 for '3', 'three' or 'Three'; 21 for 'twenty-one'; None for anything that is not one whole number."""
    tokens = re.findall(r"[^\W\d_]+|\d+", token.lower())
    got = read_number(tokens)
    return got[0] if got is not None and got[1] == len(tokens) else None


def noun_phrase(name: str, n: int, names: dict[str, str] | None = PROMPT_NAMES) -> str:
    """What follows the number in a prompt: 'cat' / 'cats', 'pair of skis' / 'pairs of skis', and a class's
    prompt name from `names` (default PROMPT_NAMES; {} for a non-COCO detector): 'computer mouse' / 'computer mice'."""
    name = " ".join(_words(name))
    phrase = (names or {}).get(name) or (f"pair of {name}" if name in PAIR_NOUNS else name)
    return phrase if n == 1 else plural(phrase)


@lru_cache(maxsize=64)
def _lookup(classes: tuple[str, ...]) -> dict[str, str]:
    return {" ".join(_words(c)): c for c in classes}


def canonical(phrase: str, classes: Sequence[str] = COCO_CLASSES) -> str | None:
    """The class in `classes` a noun phrase names: exact, singular of a plural, 'pair(s) of X', or a synonym
    (which includes every PROMPT_NAMES phrase: 'computer mice' -> 'mouse')."""
    words = _words(phrase)
    if words[:2] in (["pair", "of"], ["pairs", "of"]):
        words = words[2:]  # 'pairs of scissors' -> 'scissors'
    if not words:
        return None
    lookup = _lookup(tuple(classes))
    text = " ".join(words)
    for cand in (text, singular(text)):
        if cand in lookup:
            return lookup[cand]
        syn = SYNONYMS.get(cand)
        if syn is not None and syn in lookup:
            return lookup[syn]
    return None
