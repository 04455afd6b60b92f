"""Prompt sets: generation, the counting vocabulary, splits, JSONL files and their errors, prompt parsing."""

import json
import re

import pytest

from gpo_fast.prompts import (
    Prompt, PromptFileError, counting_prompts, item_key, load_prompts, load_words, make_prompt_set,
    counts_in_prompt, parse_counting_prompt, split_prompts, split_three, text_prompts, write_jsonl,
)
from gpo_fast.language import (COCO_CLASSES, MAX_COUNT, PROMPT_NAMES, SYNONYMS, canonical, noun_phrase, parse_number,
                               plural, singular)
from gpo_fast.rewards.counting import detector_class_ids

# ------------------------------------------------------------------------------------------- vocabulary


def test_coco_classes_in_ultralytics_order():
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    assert COCO_CLASSES[0] == "person" and COCO_CLASSES[15] == "cat" and COCO_CLASSES[79] == "toothbrush"


@pytest.mark.parametrize("name", COCO_CLASSES)
def test_every_class_round_trips_through_its_plural(name):
    assert singular(name) == name  # identity on the class name itself (also 'bus', 'skis', 'scissors')
    assert singular(plural(name)) == name
    assert canonical(plural(name)) == name and canonical(name) == name


@pytest.mark.parametrize("name, want", [
    ("person", "people"), ("mouse", "mice"), ("knife", "knives"), ("bus", "buses"), ("sheep", "sheep"),
    ("skis", "skis"), ("scissors", "scissors"), ("broccoli", "broccoli"), ("wine glass", "wine glasses"),
    ("bench", "benches"), ("sandwich", "sandwiches"), ("couch", "couches"), ("toothbrush", "toothbrushes"),
    ("tv", "tvs"), ("teddy bear", "teddy bears"), ("hair drier", "hair driers"), ("cat", "cats"),
    ("puppy", "puppies"), ("man", "men"), ("child", "children"), ("computer mouse", "computer mice"),
    ("remote control", "remote controls"), ("hair dryer", "hair dryers"), ("necktie", "neckties"),
    ("pair of skis", "pairs of skis"), ("head of broccoli", "heads of broccoli"),
])
def test_plural_forms(name, want):
    assert plural(name) == want
    assert singular(want) == name


@pytest.mark.parametrize("word, cls", [
    ("man", "person"), ("women", "person"), ("children", "person"), ("motorbikes", "motorcycle"),
    ("aeroplane", "airplane"), ("planes", "airplane"), ("sofa", "couch"), ("television", "tv"),
    ("cellphone", "cell phone"), ("phones", "cell phone"), ("doughnuts", "donut"), ("puppies", "dog"),
    ("Traffic_Lights", "traffic light"), ("pairs of skis", "skis"), ("unicorn", None),
    ("mouse", "mouse"), ("mice", "mouse"), ("computer mouse", "mouse"), ("Computer Mice", "mouse"),
    ("remote", "remote"), ("remote controls", "remote"), ("tv remotes", "remote"), ("tie", "tie"),
    ("neckties", "tie"), ("keyboards", "keyboard"), ("computer keyboards", "keyboard"), ("tvs", "tv"),
    ("televisions", "tv"), ("microwave ovens", "microwave"), ("hair driers", "hair drier"),
    ("hair dryers", "hair drier"), ("heads of broccoli", "broccoli"), ("broccoli", "broccoli"),
])
def test_canonical_synonyms(word, cls):
    assert canonical(word) == cls


# ------------------------------------------------------------------------------------------- generation


def test_counting_prompts_cover_classes_and_counts():
    ps = counting_prompts()
    assert len(ps) == 80 * 6
    texts = {(p.cls, p.n): p.text for p in ps}
    assert texts["cat", 1] == "a photo of one cat"
    assert texts["cat", 3] == "a photo of three cats"
    assert texts["person", 2] == "a photo of two people"
    assert texts["mouse", 6] == "a photo of six computer mice"
    assert texts["skis", 1] == "a photo of one pair of skis"
    assert all(p.task == "counting" and p.target is None for p in ps)


def test_counting_prompts_templates_and_range():
    ps = counting_prompts(["dog", "bus"], n_range=(2, 4), templates=("{n} {noun}", "exactly {n_word} {noun}"))
    assert len(ps) == 2 * 3 * 2
    assert ps[0].text == "2 dogs" and ps[1].text == "exactly two dogs"
    assert "4 buses" in {p.text for p in ps}
    with pytest.raises(ValueError, match="needs"):
        counting_prompts(["dog"], templates=("a photo of {noun}",))
    with pytest.raises(ValueError, match="n_range"):
        counting_prompts(["dog"], n_range=(0, 3))
    with pytest.raises(ValueError, match="n_range"):
        counting_prompts(["dog"], n_range=(1, MAX_COUNT + 1))


def test_every_generated_counting_prompt_parses_back():
    for p in counting_prompts(n_range=(1, MAX_COUNT)):
        assert parse_counting_prompt(p.text) == (p.n, p.cls), p.text


@pytest.mark.parametrize("cls, n, text", [
    ("mouse", 1, "a photo of one computer mouse"), ("mouse", 2, "a photo of two computer mice"),
    ("remote", 3, "a photo of three remote controls"), ("keyboard", 2, "a photo of two computer keyboards"),
    ("tie", 1, "a photo of one necktie"), ("tie", 4, "a photo of four neckties"),
    ("tv", 2, "a photo of two televisions"), ("microwave", 2, "a photo of two microwave ovens"),
    ("hair drier", 5, "a photo of five hair dryers"), ("broccoli", 2, "a photo of two heads of broccoli"),
    ("scissors", 3, "a photo of three pairs of scissors"), ("cell phone", 2, "a photo of two cell phones"),
    ("dining table", 1, "a photo of one dining table"), ("potted plant", 6, "a photo of six potted plants"),
    ("sports ball", 2, "a photo of two sports balls"),
])
def test_counting_prompts_say_what_the_detector_means(cls, n, text):
    ps = {(p.cls, p.n): p.text for p in counting_prompts(n_range=(1, 6))}
    assert ps[cls, n] == text


# bare names that ask for something else than the COCO class: the word, and what must stand next to it
AMBIGUOUS = [
    (r"mouse|mice", r"computer (mouse|mice)"),  # a rodent
    (r"remotes?", r"remote controls?"),  # an adjective
    (r"keyboards?", r"computer keyboards?"),  # a piano keyboard
    (r"ties?", r"neckties?"),  # a knot, a cable tie, a draw
    (r"tvs?", r"televisions?"),
    (r"microwaves?", r"microwave ovens?"),  # the radiation
    (r"driers?", r"hair dryers?"),  # 'drier' is 'more dry'
    (r"broccoli", r"heads? of broccoli"),  # 'six broccoli'
    (r"skis|scissors", r"pairs? of (skis|scissors)"),
]


def test_no_generated_counting_prompt_uses_an_ambiguous_bare_name():
    ps = counting_prompts(n_range=(1, MAX_COUNT))
    for p in ps:
        for bare, phrase in AMBIGUOUS:
            rest = re.sub(phrase, "", p.text)  # the phrases themselves are fine
            assert not re.search(rf"\b({bare})\b", rest), (p.text, bare)
    texts = " ".join(p.text for p in ps)
    for _, phrase in AMBIGUOUS:
        assert re.search(phrase, texts), phrase  # and each one is used


@pytest.mark.parametrize("cls", COCO_CLASSES)
def test_every_prompt_phrase_maps_back_to_its_coco_class(cls):
    for n in (1, 2, 7):
        phrase = noun_phrase(cls, n)
        assert canonical(phrase) == cls, phrase
        assert detector_class_ids(phrase, dict(enumerate(COCO_CLASSES))) == {COCO_CLASSES.index(cls)}, phrase
    assert canonical(cls) == cls and canonical(plural(cls)) == cls  # the short names still map
    if cls in PROMPT_NAMES:
        assert SYNONYMS[PROMPT_NAMES[cls]] == cls and noun_phrase(cls, 1) == PROMPT_NAMES[cls]


def test_prompt_names_only_for_coco_class_lists():
    assert counting_prompts(["mouse", "dog"], n_range=(2, 2))[0].text == "a photo of two computer mice"
    custom = counting_prompts(["mouse", "hamster"], n_range=(2, 2))  # another detector: its mouse may be a rodent
    assert custom[0].text == "a photo of two mice"
    assert noun_phrase("mouse", 2, names={}) == "mice"


def test_shipped_word_list_is_plain():
    words = load_words()
    assert len(words) >= 200 and len(set(words)) == len(words)
    assert all(re.fullmatch(r"[a-z]{3,8}", w) for w in words)


def test_text_prompts():
    ps = text_prompts(["hello", "river"], templates=('a sign that says "{word}"', "the word {word} on a wall"))
    assert [p.text for p in ps] == ['a sign that says "hello"', "the word hello on a wall",
                                    'a sign that says "river"', "the word river on a wall"]
    assert all(p.task == "text" and p.cls is None for p in ps) and ps[2].target == "river"
    assert len(text_prompts()) == len(load_words())
    with pytest.raises(ValueError, match="word"):
        text_prompts(["a"], templates=("no placeholder",))


def test_words_file(tmp_path):
    f = tmp_path / "w.txt"
    f.write_text("# mine\nHello\n\nhello\nriver\n")
    assert load_words(f) == ["Hello", "river"]  # 'hello' repeats 'Hello' after normalisation
    f.write_text("ok\n!!!\n")
    with pytest.raises(PromptFileError, match="line 2"):
        load_words(f)


# ------------------------------------------------------------------------------------------- splits


def test_counting_split_disjoint_by_item_and_deterministic():
    ps = counting_prompts(COCO_CLASSES[:10], n_range=(1, 4), templates=("{n} {noun}", "a photo of {n_word} {noun}"))
    train, held = split_prompts(ps, 0.25, seed=3)
    assert len(train) + len(held) == len(ps)
    assert {item_key(p) for p in train}.isdisjoint({item_key(p) for p in held})
    assert len({item_key(p) for p in held}) == 10  # round(0.25 * 40) items, both templates of each
    assert len(held) == 20
    assert split_prompts(ps, 0.25, seed=3) == (train, held)
    assert split_prompts(list(reversed(ps)), 0.25, seed=3)[1] == list(reversed(held))  # order-independent choice
    assert split_prompts(ps, 0.25, seed=4)[1] != held


def test_text_split_never_trains_on_an_eval_word():
    ps = text_prompts(load_words()[:50], templates=('a sign that says "{word}"', "{word} written in chalk"))
    ps.append(Prompt(text='a sign that says "ABLE"', task="text", target="ABLE"))  # same word, other case
    train, held = split_prompts(ps, 0.2, seed=0)
    train_words = {p.target.lower() for p in train}
    assert held and not train_words & {p.target.lower() for p in held}
    assert len({p.target.lower() for p in held}) == 10


def test_split_edge_cases():
    ps = text_prompts(["one", "two"])
    assert split_prompts(ps, 0.0) == (ps, [])
    train, held = split_prompts(ps, 0.01)
    assert len(train) == 1 and len(held) == 1  # at least one item on each side
    with pytest.raises(ValueError):
        split_prompts(ps, 1.0)


# ------------------------------------------------------------------------------------------- files


def test_jsonl_round_trip(tmp_path):
    ps = counting_prompts(["cat", "sheep"], n_range=(1, 2)) + text_prompts(["hello"]) + [
        Prompt(text="three dots", task="toy", n=3)]
    write_jsonl(ps, tmp_path / "sub" / "p.jsonl")
    assert load_prompts(tmp_path / "sub" / "p.jsonl") == ps
    write_jsonl(ps, tmp_path / "q.jsonl", split="eval")
    assert load_prompts(tmp_path / "q.jsonl", split="eval") == ps
    first = json.loads((tmp_path / "q.jsonl").read_text().splitlines()[0])
    assert first == {"prompt": "a photo of one cat", "task": "counting", "class": "cat", "n": 1, "split": "eval"}


@pytest.mark.parametrize("kind", ["counting", "text"])
def test_make_prompt_set(tmp_path, kind):
    out = tmp_path / f"{kind}.jsonl"
    n_train, n_val, n_eval = make_prompt_set(kind, out, eval_fraction=0.2, val_fraction=0.1, seed=1, n_max=3)
    train, val, held = (load_prompts(out, split=s) for s in ("train", "val", "eval"))
    assert (len(train), len(val), len(held)) == (n_train, n_val, n_eval) and n_eval > 0 and n_val > 0
    assert len(load_prompts(out)) == n_train + n_val + n_eval
    keys = [{item_key(p) for p in part} for part in (train, val, held)]
    assert keys[0].isdisjoint(keys[1]) and keys[0].isdisjoint(keys[2]) and keys[1].isdisjoint(keys[2])
    total = n_train + n_val + n_eval
    assert abs(n_eval / total - 0.2) < 0.01 and abs(n_val / total - 0.1) < 0.02
    assert {json.loads(line)["split"] for line in out.read_text().splitlines()} == {"train", "val", "eval"}
    out2 = tmp_path / "again.jsonl"
    make_prompt_set(kind, out2, eval_fraction=0.2, val_fraction=0.1, seed=1, n_max=3)
    assert out2.read_text() == out.read_text()  # deterministic
    with pytest.raises(ValueError, match="kind"):
        make_prompt_set("colour", out)


def test_the_eval_split_does_not_move_with_the_val_split():
    ps = counting_prompts(n_range=(1, 4))
    _, held = split_prompts(ps, 0.2, seed=0)
    for val_fraction in (0.0, 0.1, 0.3):
        train, val, held3 = split_three(ps, 0.2, val_fraction, seed=0)
        assert held3 == held and (val == []) == (val_fraction == 0)
        assert len(train) + len(val) + len(held) == len(ps)


def test_make_prompt_set_custom_words(tmp_path):
    (tmp_path / "w.txt").write_text("alpha\nbeta\ngamma\ndelta\nepsilon\n")
    assert make_prompt_set("text", tmp_path / "t.jsonl", words_file=tmp_path / "w.txt", val_fraction=0) == (4, 0, 1)
    assert make_prompt_set("text", tmp_path / "v.jsonl", words_file=tmp_path / "w.txt") == (3, 1, 1)


def test_plural_and_synonym_classes_are_stored_canonical(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "three cats", "task": "counting", "class": "cats", "n": 3}\n'
                 '{"prompt": "two sofas", "task": "counting", "class": "sofa", "n": 2}\n')
    assert [p.cls for p in load_prompts(f)] == ["cat", "couch"]


def test_loading_checks_counting_text_against_its_fields(tmp_path):
    f = tmp_path / "p.jsonl"
    lines = [
        ("a photo of three cats", "cat", 3), ("3 kittens", "cat", 3), ("a photo of a cat", "cat", 1),
        ("three cats on a sofa", "cat", 3), ("three cats and two dogs", "cat", 3),
        ("three small red cars", "car", 3), ("three small shiny red cars", "cars", 3),
        ("three orange cats", "cat", 3), ("two computer mice", "mouse", 2), ("six mice", "computer mouse", 6),
        ("two heads of broccoli", "broccoli", 2), ("twenty people", "person", 20),
    ]
    f.write_text("".join(json.dumps({"prompt": t, "task": "counting", "class": c, "n": n}) + "\n"
                         for t, c, n in lines))
    assert [(p.n, p.cls) for p in load_prompts(f)] == [(n, canonical(c)) for _, c, n in lines]


@pytest.mark.parametrize("prompt, cls, n, reason", [
    ("a photo of two dogs", "cat", 3, "asks for 2 dogs, but 'class' and 'n' say 3 cats"),
    ("a photo of two cats", "cat", 3, "asks for 2 cats, but"),
    ("a photo of three cats", "dog", 3, "asks for 3 cats, but 'class' and 'n' say 3 dogs"),
    ("a photo of cats", "cat", 3, "names no count"),
    ("a photo of three unicorns", "cat", 3, "names no detector class after its number"),
    ("one hundred cats", "cat", 1, "asks for 100 cats"),
    ("a hundred cats", "cat", 1, "asks for 100 cats"),
    ("twenty-one cats", "cat", 1, "asks for 21 cats"),
    ("twenty-one cats", "cat", 20, "asks for 21 cats"),
    ("thirty cats", "cat", 3, "asks for 30 cats"),
    ("one cat and two cats", "cat", 1, "asks for 1 cat and 2 cats"),
    ("two mice", "mouse", 3, "say 3 computer mice; make the text and the fields agree, "
                             "e.g. \"a photo of three computer mice\""),
])
def test_counting_text_that_disagrees_with_its_fields_is_rejected(tmp_path, prompt, cls, n, reason):
    f, msg = _error_at_line_4(tmp_path, json.dumps({"prompt": prompt, "task": "counting", "class": cls, "n": n}))
    assert msg.startswith(f"{f} line 4: the prompt {prompt!r} ")
    assert reason in msg


def test_custom_classes(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "two widgets", "task": "counting", "class": "widgets", "n": 2}\n')
    assert load_prompts(f, classes=["widget", "gadget"])[0].cls == "widget"
    with pytest.raises(PromptFileError, match="widget, gadget"):
        f.write_text('{"prompt": "two cats", "task": "counting", "class": "cat", "n": 2}\n')
        load_prompts(f, classes=["widget", "gadget"])


GOOD = '{"prompt": "a photo of two cats", "task": "counting", "class": "cat", "n": 2}'


def _error_at_line_4(tmp_path, bad: str):
    """(file, message) of loading a file whose 4th line is `bad` among a comment, a blank and good lines; the
    message is one sentence: 'FILE line 4: reason; what to do'."""
    f = tmp_path / "p.jsonl"
    f.write_text(f"# a comment\n{GOOD}\n\n{bad}\n{GOOD}\n")
    with pytest.raises(PromptFileError) as e:
        load_prompts(f)
    msg = str(e.value)
    assert "; " in msg and "\n" not in msg
    return f, msg


@pytest.mark.parametrize("bad, reason", [
    ('{"prompt": "x", "task": "counting", "class": "cat", "n": 2', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"task": "counting", "class": "cat", "n": 2}', "missing 'prompt'"),
    ('{"prompt": "  ", "task": "counting", "class": "cat", "n": 2}', "'prompt' is empty"),
    ('{"prompt": "two cats", "class": "cat", "n": 2}', "missing 'task'"),
    ('{"prompt": "two cats", "task": "count", "class": "cat", "n": 2}', "unknown task 'count'"),
    ('{"prompt": "two cats", "task": "counting", "n": 2}', "missing 'class'"),
    ('{"prompt": "two cats", "task": "counting", "class": "cat"}', "missing 'n'"),
    ('{"prompt": "two cats", "task": "counting", "class": "cat", "n": "2"}', "'n' must be an integer"),
    ('{"prompt": "two cats", "task": "counting", "class": "cat", "n": 2.0}', "'n' must be an integer"),
    ('{"prompt": "two cats", "task": "counting", "class": "cat", "n": true}', "'n' must be an integer"),
    ('{"prompt": "two cats", "task": "counting", "class": 3, "n": 2}', "'class' must be a string"),
    ('{"prompt": "no cats", "task": "counting", "class": "cat", "n": 0}', "outside 1..20"),
    ('{"prompt": "many cats", "task": "counting", "class": "cat", "n": 21}', "outside 1..20"),
    ('{"prompt": "two unicorns", "task": "counting", "class": "unicorn", "n": 2}', "COCO_CLASSES"),
    ('{"prompt": "two catts", "task": "counting", "class": "catt", "n": 2}', "did you mean 'cat'"),
    ('{"prompt": "a sign", "task": "text"}', "missing 'text'"),
    ('{"prompt": "a sign", "task": "text", "text": ""}', "no letters or digits"),
    ('{"prompt": "a sign", "task": "text", "text": "!?"}', "no letters or digits"),
    ('{"prompt": "two cats", "task": "counting", "class": "cat", "n": 2, "cls": "cat"}', "unknown key(s) 'cls'"),
    ('{"prompt": "two cats", "task": "counting", "class": "cat", "n": 2, "split": "test"}', "unknown split"),
])
def test_bad_line_names_line_and_reason(tmp_path, bad, reason):
    f, msg = _error_at_line_4(tmp_path, bad)
    assert msg.startswith(f"{f} line 4: ")
    assert reason in msg


def test_file_level_errors(tmp_path):
    with pytest.raises(PromptFileError, match="no such prompt file.*gpo-fast prompts"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("# nothing\n\n")
    with pytest.raises(PromptFileError, match="no prompts"):
        load_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "train.jsonl").write_text(GOOD + "\n")  # no split field: train
    assert len(load_prompts(tmp_path / "train.jsonl", split="train")) == 1
    with pytest.raises(PromptFileError, match="no prompts in split 'eval'"):
        load_prompts(tmp_path / "train.jsonl", split="eval")


# ------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, want", [
    ("a photo of three cats", (3, "cat")),
    ("3 cats", (3, "cat")),
    ("A photo of One Cat.", (1, "cat")),
    ("twelve people on a beach", (12, "person")),
    ("two men", (2, "person")),
    ("5 puppies playing", (5, "dog")),
    ("four motorbikes", (4, "motorcycle")),
    ("two wine glasses on a table", (2, "wine glass")),
    ("three red apples", (3, "apple")),
    ("two pairs of scissors", (2, "scissors")),
    ("six mice", (6, "mouse")),
    ("a photo of 20 knives", (20, "knife")),
    ("two computer mice", (2, "mouse")),
    ("three remote controls", (3, "remote")),
    ("two tv remotes", (2, "remote")),
    ("four heads of broccoli", (4, "broccoli")),
    ("three small red cars", (3, "car")),
    ("three small shiny red cars", (3, "car")),
    ("three orange cats", (3, "cat")),  # 'orange' is a class, but the head noun is the last
    ("one orange on a plate", (1, "orange")),
    ("three cats on a sofa", (3, "cat")),  # 'a' is no count where a number is
    ("a photo of a cat", (1, "cat")),
    ("three people riding bicycles", (3, "person")),
    ("one of the three cats", (3, "cat")),
    ("a photo of twenty people", (20, "person")),
    ("Café with TWO dogs", (2, "dog")),
])
def test_parse_counting_prompt(text, want):
    assert parse_counting_prompt(text) == want


@pytest.mark.parametrize("text, reason", [
    ("a photo of cats", "no count"),
    ("three unicorns", "no detector class"),
    ("one cat and two dogs", "several counts"),
    ("a photo of 25 cats", "1..20"),
    ("one hundred cats", "asks for 100 objects"),  # not one cat
    ("a hundred cats", "asks for 100 objects"),
    ("twenty-one cats", "asks for 21 objects"),  # not twenty cats and one cat
    ("thirty-three dogs", "asks for 33 objects"),
    ("one cat and three cats", "several counts"),
])
def test_parse_counting_prompt_failures(text, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_counting_prompt(text)


@pytest.mark.parametrize("tokens, want", [
    ("3", 3), ("three", 3), ("Twenty", 20), ("twenty-one", 21), ("twenty one", 21), ("thirty", 30),
    ("ninety-nine", 99), ("one hundred", 100), ("one hundred and five", 105), ("a hundred", 100),
    ("two dozen", 24), ("one thousand two hundred and thirty-four", 1234), ("zero", 0),
    ("one two", None), ("twenty twenty", None), ("a", None), ("cat", None), ("", None),
])
def test_parse_number(tokens, want):
    assert parse_number(tokens) == want


def test_counts_in_prompt():
    assert counts_in_prompt("one cat and two dogs") == [(1, "cat"), (2, "dog")]
    assert counts_in_prompt("a photo from 1990 of three cats") == [(1990, None), (3, "cat")]
    assert counts_in_prompt("a cat on a sofa") == [(1, "cat"), (1, "couch")]
    assert counts_in_prompt("a photo of cats") == []
    assert counts_in_prompt("two widgets", classes=["widget"]) == [(2, "widget")]


def test_noun_phrase():
    assert noun_phrase("cat", 1) == "cat" and noun_phrase("cat", 2) == "cats"
    assert noun_phrase("scissors", 1) == "pair of scissors" and noun_phrase("scissors", 3) == "pairs of scissors"
