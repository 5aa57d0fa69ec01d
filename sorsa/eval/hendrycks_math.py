"""MATH (Hendrycks et al. 2021, arXiv 2103.03874): test data in the common schemas, answer extraction and
an equivalence check (string normalization, then math-verify's sympy comparison in a killable worker).

Prediction: the answer after the last "The answer is:" (the prompt's cue, `sorsa.data.ANSWER_CUE`;
a `\\boxed{}` inside that answer wins), else the last `\\boxed{}` / `\\fbox{}` of the completion.
Gold: the `answer` field when the row has one, else the last `\\boxed{}` of the solution.
Equivalence: equal after `normalize_answer` (the Hendrycks `is_equiv` idea, rewritten and extended),
or equal under math-verify (parse + verify) within a timeout. A timeout or an exception is WRONG, never
right. Deviation from the reference: it compared normalized strings only (so `0.5` vs `\\frac12` was
wrong) and counted a grader exception as correct.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from .data_files import Example, is_hub_id, load_hub_rows, read_rows
from ..core.errors import MissingPackageError, UserError

NAME = "math"
# lm-evaluation-harness's copy of the MATH test set: one config per subject, 5000 test rows in all.
HUB_DATASET = "EleutherAI/hendrycks_math"
HUB_CONFIGS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
               "prealgebra", "precalculus")
DEFAULT_TIMEOUT_S = 5

_CUE = re.compile(r"the answer is\s*:?", re.IGNORECASE)
_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


# ---------------------------------------------------------------------------------------------- extraction
def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the {...} group opening at text[start] and the index after it; None if unbalanced.
    Escaped braces (\\{ \\}) are literal characters in LaTeX, not group delimiters."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` or `\\fbox{...}` (also `\\boxed 5`); None if none."""
    for match in reversed(list(_BOX.finditer(text))):
        i = match.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            group = _braced(text, i)
            if group is not None:
                return group[0].strip()
        else:  # "\boxed 5": the argument runs to the next "$" or whitespace
            arg = re.match(r"[^\s$]+", text[i:])
            if arg:
                return arg.group(0)
    return None


def _after_cue(segment: str) -> str | None:
    """The answer written after the cue: its boxed content if any, else the first display/line of text."""
    boxed = last_boxed(segment)
    if boxed is not None:
        return boxed
    s = segment.strip()
    for opening, closing in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if s.startswith(opening):
            end = s.find(closing, len(opening))
            s = s[len(opening):end] if end != -1 else s[len(opening):]
            break
    else:
        s = s.split("\n", 1)[0]
    # A sentence that goes on after the answer ("5. I hope it is correct."): a period, spaces, a capital.
    s = re.split(r"\.\s+(?=[A-Z])", s, maxsplit=1)[0]
    s = s.strip().rstrip(".").strip().strip("$").strip()
    return s or None


def extract_answer(completion: str) -> str | None:
    """The model's final answer: after the last "The answer is:" cue, else the last boxed; None if neither."""
    cues = list(_CUE.finditer(completion))
    if cues:
        answer = _after_cue(completion[cues[-1].end():])
        if answer is not None:
            return answer
    return last_boxed(completion)


def extract_gold(row: dict) -> str:
    """The gold answer of a MATH row: its `answer` field (boxed content if boxed), else the last boxed
    of `solution`, else `output` (boxed, after the cue, or the whole field)."""
    for key in ("answer", "solution", "output"):
        if row.get(key) in (None, ""):
            continue
        text = str(row[key])
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed
        if _CUE.search(text):  # MetaMath-style outputs end in "The answer is: X"
            answer = extract_answer(text)
            if answer is not None:
                return answer
        if key != "solution":  # a bare answer ("21022")
            return text.strip()
    raise UserError(f"no gold answer in a row with keys {sorted(row)}: expected an 'answer' field, a "
                     f"solution with a \\boxed{{}} answer, or an 'output' field")


# ------------------------------------------------------------------------------------------- normalization
_UNIT_WORDS = (
    "square units", "sq units", "units", "unit", "square feet", "square inches", "square meters",
    "square centimeters", "cubic feet", "cubic inches", "cubic meters", "cubic centimeters", "feet", "foot",
    "inches", "inch", "centimeters", "centimeter", "meters", "meter", "kilometers", "miles", "mile", "yards",
    "cm", "mm", "km", "ft", "mph", "hours", "hour", "minutes", "minute", "seconds", "second", "days", "day",
    "weeks", "years", "degrees", "degree", "dollars", "dollar", "cents", "cent", "pounds", "ounces", "grams",
    "people", "students", "ways", "points", "games", "cups", "gallons", "liters", "sq ft", "sq in",
)
_UNITS = "|".join(re.escape(u) for u in sorted(_UNIT_WORDS, key=len, reverse=True))
_TEXT_UNIT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{\s*(?:" + _UNITS + r")\s*\}(?:\^\{?[23]\}?)?")
_PLAIN_UNIT = re.compile(r"(?<=[\d}])\s+(?:" + _UNITS + r")(?:\^\{?[23]\}?)?\s*$")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")


def normalize_answer(answer: str) -> str:
    """A canonical string for a MATH answer: spacing, `\\left`/`\\right`, `\\dfrac`, `\\frac12`, `\\text{}`,
    units, `\\%`, degrees, `$`, a trailing period, a leading `x =`, thousands commas, ".5"; see the tests."""
    s = str(answer).strip()
    if s.startswith(("\\boxed", "\\fbox")):
        s = last_boxed(s) or s
    s = s.replace("\n", " ").replace("\\!", "").replace("\\displaystyle", "")
    s = re.sub(r"(?<!\\)\\[,;: ]|\\q?quad|~", " ", s)  # spacing commands, but not the "\\" row break
    s = re.sub(r"\\(?:left|right|bigg|Bigg|big|Big)[lr]?(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = s.replace("bmatrix", "pmatrix").replace("\\varnothing", "\\emptyset")
    s = re.sub(r"\\le(?:q|qslant)?(?![a-zA-Z])", r"\\le", s)
    s = re.sub(r"\\ge(?:q|qslant)?(?![a-zA-Z])", r"\\ge", s)
    # degrees, percent, dollars
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    # units: "\text{ cm}^2" anywhere, "5 inches" at the end; then unwrap the remaining \text{...}
    s = _TEXT_UNIT.sub("", s)
    s = _PLAIN_UNIT.sub("", s)
    for _ in range(3):  # nested wrappers
        s = _TEXT_WRAP.sub(r"\1", s)
    s = s.replace("{,}", "")  # LaTeX thousands separator "1{,}000"
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    # a leading "x=" (or "\theta=", "x\in") for a single variable; "y=2x+3" becomes "2x+3" on both sides
    s = re.sub(r"^(?:[a-zA-Z](?:_\{?\w+\}?)?|\\[a-zA-Z]+)(?:=|\\in)(?=.)", "", s) if s.count("=") <= 1 else s
    # \frac12 -> \frac{1}{2}, \frac{a}2 -> \frac{a}{2}, \frac1{b} -> \frac{1}{b}, \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\{[^{}]*\})(\d)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # "18,107" is a number, "(1,2)" is not
        s = s.replace(",", "")
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)  # ".5" -> "0.5"
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    if re.fullmatch(r"-?\d+/\d+", s):
        num, den = s.split("/")
        s = f"{'-' if num.startswith('-') else ''}\\frac{{{num.lstrip('-')}}}{{{den}}}"
    choice = re.fullmatch(r"\(?([A-Ea-e])\)?", s)  # multiple choice "(C)"
    if choice:
        s = choice.group(1).upper()
    if "\\" not in s and re.fullmatch(r"[A-Za-z]{3,}", s):
        s = s.lower()
    return s


def _is_text_answer(s: str) -> bool:
    # A word such as "even" or "neither": math-verify would read it as a product of symbols, and then
    # "on" would equal "no". Words are compared as strings only.
    return "\\" not in s and re.fullmatch(r"[a-z]{2,}", s) is not None


# ---------------------------------------------------------------------------------- symbolic worker process
class _SymbolicChecker:
    """One long-lived math-verify worker process; a comparison that overruns its timeout kills it."""

    def __init__(self, command: list[str] | None = None, hard_limit_s: float | None = None) -> None:
        # `command` (the worker's argv before the timeout argument) and `hard_limit_s` are for tests.
        self._hard_limit_s = hard_limit_s
        self._command = command or [sys.executable, str(Path(__file__).with_name("math_verify_worker.py"))]
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self._lock = threading.Lock()
        self._timeout_s: int | None = None

    def _start(self, timeout_s: int) -> None:
        self._proc = subprocess.Popen([*self._command, str(timeout_s)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        self._buffer, self._timeout_s = b"", timeout_s
        if self._read_line(deadline=time.monotonic() + 120) is None:  # importing sympy takes seconds
            self.close()
            raise MissingPackageError("the math-verify worker did not start; check that `math-verify` is installed "
                                      "(pip install 'math-verify>=0.7')")

    def _read_line(self, deadline: float) -> dict | None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # the worker died
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def equal(self, gold: str, pred: str, timeout_s: int) -> tuple[bool, str | None]:
        """(equal?, error) for one comparison; a timeout or a dead worker is (False, reason)."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None or self._timeout_s != timeout_s:
                self.close()
                self._start(timeout_s)
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write((json.dumps({"gold": gold, "pred": pred}) + "\n").encode())
                self._proc.stdin.flush()
            except BrokenPipeError:
                self.close()
                return False, "worker died"
            # The worker's own signal timeouts cover two parses and a verify (timeout_s each); beyond
            # that plus a margin it is stuck where signals do not reach, so it is killed.
            limit = self._hard_limit_s or 3 * timeout_s + 2
            reply = self._read_line(deadline=time.monotonic() + limit)
            if reply is None:
                self.close()
                return False, f"timeout after {limit} s"
            return bool(reply["equal"]), reply.get("error")

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                try:
                    os.killpg(self._proc.pid, 9)
                except ProcessLookupError:
                    pass
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    stream.close()
            self._proc = None


_checker = _SymbolicChecker()
atexit.register(_checker.close)


def is_equiv(pred: str | None, gold: str | None, timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """True when `pred` and `gold` are the same answer: equal after `normalize_answer`, or equivalent under
    math-verify within `timeout_s` seconds per step. No answer, an error or a timeout is False."""
    return equivalence(pred, gold, timeout_s)[0]


def equivalence(pred: str | None, gold: str | None, timeout_s: int = DEFAULT_TIMEOUT_S) -> tuple[bool, str]:
    """(equivalent?, how): how is "string", "symbolic", "different", "no answer" or an error/timeout text."""
    if pred is None or gold is None or not str(pred).strip():
        return False, "no answer"
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p or not g:
        return False, "no answer"
    if p == g:
        return True, "string"
    if _is_text_answer(p) or _is_text_answer(g):
        return False, "different"
    equal, error = _checker.equal(g, p, timeout_s)
    if error:
        return False, error
    return equal, "symbolic" if equal else "different"


# ------------------------------------------------------------------------------------------- the benchmark
def load_examples(test_file: str | Path | None = None) -> list[Example]:
    """MATH test rows from a local file or hub id (default: the 5000-problem test set on the hub).

    Accepted schemas: {problem, solution} with the answer boxed in the solution (or an `answer` field),
    {question, answer}, and {instruction, output} (MetaMath's MATH_test.jsonl)."""
    if test_file is None or is_hub_id(test_file):
        name = HUB_DATASET if test_file is None else str(test_file)
        configs = HUB_CONFIGS if name == HUB_DATASET else (None,)
        rows = [row for config in configs for row in load_hub_rows(name, config, "test")]
        source = name
    else:
        rows, source = read_rows(test_file), str(test_file)
    examples = []
    for i, row in enumerate(rows):
        question = next((row[k] for k in ("problem", "question", "instruction") if row.get(k)), None)
        if question is None:
            raise UserError(f"{source}: row {i} has no question (keys {sorted(row)}); expected one of the "
                             f"columns 'problem', 'question' or 'instruction'")
        try:
            gold = extract_gold(row)
        except ValueError as e:
            raise UserError(f"{source}: row {i}: {e}") from None
        meta = {k: row[k] for k in ("level", "type", "id", "unique_id") if k in row}
        examples.append(Example(id=i, question=str(question), gold=gold, meta=meta))
    return examples


def prompt(example: Example) -> str:
    """The paper's test prompt (Alpaca template + "Let's think step by step.")."""
    from ..tasks.data import math_test_prompt

    return math_test_prompt(example.question)


def score_completion(completion: str, gold: str, timeout_s: int = DEFAULT_TIMEOUT_S) -> dict:
    """The verdict on one completion: the extracted answer, correct?, and how it was decided."""
    extracted = extract_answer(completion)
    correct, how = equivalence(extracted, gold, timeout_s)
    return {"extracted": extracted, "correct": correct, "match": how}


def score(examples: list[Example], completions: list[str], timeout_s: int = DEFAULT_TIMEOUT_S,
          **_: object) -> list[dict]:
    """Verdicts for completions[i] against examples[i]."""
    return [score_completion(c, ex.gold, timeout_s) for ex, c in zip(examples, completions, strict=True)]


def summarize(verdicts: list[dict]) -> dict:
    """accuracy = correct / scored."""
    n, correct = len(verdicts), sum(v["correct"] for v in verdicts)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "total": n}
