"""GSM-8K: golden tables for the gold / strict / flexible extractors and the numeric comparison, and the
whole shared test set scored against its own gold answers (1319/1319) and against gold + 1 (0)."""
import json
from fractions import Fraction
from pathlib import Path

import pytest

from sorsa.eval import gsm8k

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

STRICT = [  # completion -> number after the last "The answer is"
    ("... The answer is: 18", "18"),
    ("The answer is: $1,234.50.", "1234.50"),
    ("The answer is: -3/4", "-3/4"),
    ("The answer is: -$5", "-5"),
    ("The answer is: \u22127", "-7"),  # unicode minus
    ("The answer is: \\frac{3}{4}", "3/4"),
    ("The answer is: 18.", "18"),
    ("The answer is: .5", ".5"),
    ("the answer is 42 apples", "42"),  # case and colon optional
    ("The answer is: 5. Then 7 more", "5"),
    ("First guess. The answer is: 3\nWait. The answer is: 4", "4"),  # the LAST cue
    ("The answer is: 1,000,000", "1000000"),
    ("The answer is: 50%", "50"),
    ("The answer is: 8-3", "8"),
    ("It costs 5 dollars.", None),  # no cue
    ("The answer is: five", None),  # no number after the cue
]
FLEXIBLE = [  # the strict answer, else the last number anywhere
    ("The answer is: 18", "18"),
    ("It costs 5 dollars, then 7.", "7"),
    ("Profit: $70,000", "70000"),
    ("so 8-3 = 5", "5"),
    ("we get -12", "-12"),
    ("The answer is: five, from 2 + 3", "2"),  # strict wins even when it is an odd read
    ("no numbers here", None),
]
GOLD = [
    ("Janet sells 9 eggs.\n#### 18", "18"),
    ("... #### 1,000", "1000"),
    ("#### -3", "-3"),
    ("#### 0.5", "1/2"),
    ("42", "42"),
]
MATCH = [  # (prediction, gold, equal?)
    ("18", "18", True), ("18.0", "18", True), ("18.00", "18", True), ("1,234", "1234", True),
    ("$18", "18", True), ("3/4", "0.75", True), ("-5", "-5", True),
    ("17.6", "18", False), ("18.4", "18", False), ("17.9999", "18", False),  # no rounding
    ("18.0000001", "18", True),  # within the 1e-6 tolerance
    ("1450001", "1450000", False),  # absolute, not relative: a large answer off by one is wrong
    ("-18", "18", False), ("1/0", "0", False), (None, "18", False), ("", "18", False),
]


@pytest.mark.parametrize("text,expected", STRICT)
def test_strict_extraction(text, expected):
    assert gsm8k.extract_strict(text) == expected


@pytest.mark.parametrize("text,expected", FLEXIBLE)
def test_flexible_extraction(text, expected):
    assert gsm8k.extract_flexible(text) == expected


@pytest.mark.parametrize("answer,expected", GOLD)
def test_gold_extraction(answer, expected):
    assert gsm8k.extract_gold(answer) == expected


@pytest.mark.parametrize("pred,gold,equal", MATCH)
def test_numeric_match(pred, gold, equal):
    assert gsm8k.answers_match(pred, gold) is equal


def test_parse_number_is_exact():
    assert gsm8k.parse_number("$1,234.50") == Fraction(2469, 2)
    assert gsm8k.parse_number("3/4") == Fraction(3, 4)
    assert gsm8k.parse_number("12 and 13") is None  # two numbers: not one value


def test_verdict_reports_strict_and_flexible():
    v = gsm8k.score_completion("She has 7 left, so 3 more. Total 10", "10")
    assert (v["strict"], v["strict_correct"], v["flexible"], v["flexible_correct"], v["correct"]) == \
        (None, False, "10", True, True)
    s = gsm8k.summarize([v, gsm8k.score_completion("The answer is: 10", "10"),
                         gsm8k.score_completion("The answer is: 9", "10")])
    assert (s["correct"], s["total"], s["strict_correct"], s["flexible_correct"]) == (2, 3, 1, 2)
    assert s["accuracy"] == pytest.approx(2 / 3) and s["strict_accuracy"] == pytest.approx(1 / 3)


def test_bad_gold_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no number #### none"}) + "\n")
    with pytest.raises(ValueError, match="row 0"):
        gsm8k.load_examples(bad)
    missing = tmp_path / "cols.jsonl"
    missing.write_text(json.dumps({"q": "x"}) + "\n")
    with pytest.raises(ValueError, match="question"):
        gsm8k.load_examples(missing)


def _shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


@pytest.mark.parametrize("name", ["gsm8k_test.jsonl", "gsm8k_test.parquet"])
def test_gold_solutions_score_all_and_gold_plus_one_scores_none(name):
    examples = gsm8k.load_examples(_shared(name))
    assert len(examples) == 1319
    rows = [json.loads(line) for line in _shared("gsm8k_test.jsonl").open()]
    # The gold solution's reasoning (without "#### N"), then the cue, like a model trained on MetaMathQA.
    right = [row["answer"].rsplit("####", 1)[0] + f"The answer is: {ex.gold}" for row, ex in zip(rows, examples)]
    wrong = [row["answer"].rsplit("####", 1)[0] + f"The answer is: {gsm8k.parse_number(ex.gold) + 1}"
             for row, ex in zip(rows, examples)]
    good, bad = gsm8k.summarize(gsm8k.score(examples, right)), gsm8k.summarize(gsm8k.score(examples, wrong))
    assert (good["correct"], good["strict_correct"], good["total"]) == (1319, 1319, 1319)
    assert (bad["correct"], bad["strict_correct"]) == (0, 0)
