"""GSM-8K (Cobbe et al. 2021, arXiv 2110.14168): test data, gold and answer extraction, numeric scoring.

Two extractions are reported, as lm-evaluation-harness does for GSM-8K:
- `strict`: the first number after the LAST "The answer is" (the cue the prompt trains for, see
  `sorsa.data.ANSWER_CUE`; case-insensitive, the colon optional). No cue, or no number after it: no answer.
  This is what the reference SORSA/MetaMath evaluation reads.
- `flexible`: the strict answer when there is one, else the last number anywhere in the completion.
`accuracy` (the headline number, `correct` in each verdict) is the flexible one: strict answers take
priority and a completion that never says the cue still gets its last number read. Deviation from the
reference: the reference scores a completion without the cue as wrong; `strict_accuracy` is that number.

Numbers: thousands commas, "$", unicode minus, decimals, fractions ("3/4", "\\frac{3}{4}") and a trailing
period are handled; values are parsed exactly (as fractions) and compare with an absolute tolerance of 1e-6,
never rounded (17.6 is not 18; and a relative tolerance would let 1450001 equal 1450000).
"""
from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

from .data_files import Example, is_hub_id, load_hub_rows, read_rows, require_columns
from ..core.errors import UserError

NAME = "gsm-8k"
HUB_DATASET = ("openai/gsm8k", "main", "test")
ABS_TOLERANCE = 1e-6

_CUE = re.compile(r"the answer is\s*:?", re.IGNORECASE)
# A thousands separator: a comma between a digit and exactly three digits ("1,234,567" -> "1234567").
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.]+)\s*\}\s*\{\s*(-?[\d.]+)\s*\}")
# A minus sign counts only when it does not follow a digit, letter or ")" ("8-3" is 8 and 3, not 8 and -3).
_NUMBER = re.compile(r"(?<![\w).])-?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+(?:\.\d+)?)?|(?<=[\w)])(?:\d+(?:\.\d+)?)(?:/\d+)?")


def _clean(text: str) -> str:
    text = text.replace("\u2212", "-").replace("\\$", "").replace("$", "").replace("\\!", "")
    text = _LATEX_FRAC.sub(r"\1/\2", text)
    text = re.sub(r"(?<=-)\s+(?=\d)", "", text)  # "- 5" after removing "$" in "-$5"
    return _THOUSANDS.sub("", text)


def _numbers(text: str) -> list[str]:
    return [m.group(0) for m in _NUMBER.finditer(_clean(text))]


def parse_number(text: str | None) -> Fraction | None:
    """The exact value of a number string ("-1,234.5", "$18", "3/4", "18."); None if it is not one."""
    if text is None:
        return None
    found = _numbers(text.strip())
    if len(found) != 1:
        return None
    s = found[0]
    try:
        if "/" in s:
            num, den = s.split("/")
            return Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_gold(answer: str) -> str:
    """The gold number of a GSM-8K solution: the text after the last "####" (or the whole field)."""
    text = answer.rsplit("####", 1)[-1] if "####" in answer else answer
    value = parse_number(text)
    if value is None:
        raise UserError(f"cannot read a number from the gold answer {text.strip()[:80]!r}; GSM-8K answers end "
                         f"in '#### N'")
    return _format(value)


def _format(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(value)


def extract_strict(completion: str) -> str | None:
    """The first number after the last "The answer is" cue; None without a cue or a number after it."""
    cues = list(_CUE.finditer(completion))
    if not cues:
        return None
    found = _numbers(completion[cues[-1].end():])
    return found[0] if found else None


def extract_flexible(completion: str) -> str | None:
    """The strict answer if there is one, else the last number in the completion; None if it has none."""
    strict = extract_strict(completion)
    if strict is not None:
        return strict
    found = _numbers(completion)
    return found[-1] if found else None


def answers_match(predicted: str | None, gold: str) -> bool:
    """Numeric equality within 1e-6 (absolute; no rounding); an unreadable prediction is wrong."""
    p, g = parse_number(predicted), parse_number(gold)
    if p is None or g is None:
        return False
    return abs(p - g) <= ABS_TOLERANCE


def score_completion(completion: str, gold: str) -> dict:
    """The verdict on one completion: both extractions, both verdicts; `correct` is the flexible one."""
    strict, flexible = extract_strict(completion), extract_flexible(completion)
    flexible_correct = answers_match(flexible, gold)
    return {"extracted": flexible, "correct": flexible_correct,
            "strict": strict, "strict_correct": answers_match(strict, gold),
            "flexible": flexible, "flexible_correct": flexible_correct}


def load_examples(test_file: str | Path | None = None) -> list[Example]:
    """GSM-8K test rows ({question, answer}) from a local file or a hub id (default: openai/gsm8k, main, test)."""
    if test_file is None:
        rows, source = load_hub_rows(*HUB_DATASET), "/".join(HUB_DATASET)
    elif is_hub_id(test_file):
        config = HUB_DATASET[1] if str(test_file) == HUB_DATASET[0] else None
        rows, source = load_hub_rows(str(test_file), config, "test"), str(test_file)
    else:
        rows, source = read_rows(test_file), str(test_file)
    require_columns(rows, ("question", "answer"), source)
    examples = []
    for i, row in enumerate(rows):
        try:
            gold = extract_gold(str(row["answer"]))
        except ValueError as e:
            raise UserError(f"{source}: row {i}: {e}") from None
        examples.append(Example(id=i, question=row["question"], gold=gold))
    return examples


def prompt(example: Example) -> str:
    """The paper's test prompt (Alpaca template + "Let's think step by step.")."""
    from ..tasks.data import math_test_prompt

    return math_test_prompt(example.question)


def score(examples: list[Example], completions: list[str], **_: object) -> list[dict]:
    """Verdicts for completions[i] against examples[i]."""
    return [score_completion(c, ex.gold) for ex, c in zip(examples, completions, strict=True)]


def summarize(verdicts: list[dict]) -> dict:
    """accuracy (= flexible), strict and flexible accuracies and counts over the scored verdicts."""
    n = len(verdicts)
    strict = sum(v["strict_correct"] for v in verdicts)
    flexible = sum(v["flexible_correct"] for v in verdicts)
    return {"accuracy": flexible / n if n else 0.0, "correct": flexible, "total": n,
            "strict_accuracy": strict / n if n else 0.0, "strict_correct": strict,
            "flexible_accuracy": flexible / n if n else 0.0, "flexible_correct": flexible}
