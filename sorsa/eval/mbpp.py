"""MBPP (Austin et al. 2021, arXiv 2108.07732): the 500 test problems (task_ids 11-510), code extraction,
program assembly, pass@1 in the HumanEval sandbox.

Problems come from the hub (google-research-datasets/mbpp, config "full", split "test") or a local
.jsonl/.json/.parquet file in its schema (task_id, text, code, test_list, test_setup_code); a file holding the
whole dataset (974 problems) is reduced to the test task_ids. The prompt is the "@@ Instruction" MBPP
instruction (sorsa.data.MBPP_TEST_PROMPT): the problem's text and its three asserts. Deviation from PiSSA:
PiSSA scores MBPP with evalplus (MBPP+ problems and tests); this module runs the original test split.

The completion's code is extracted as for HumanEval (first python block, else first block, else all), then a
top-level `if __name__ == "__main__":` block and top-level `assert` statements (the model's own checks of the
examples it was shown) are dropped, as PiSSA's post-processing of MBPP answers also cuts them.
Program = test_setup_code + code + the test asserts; it passes when every assert holds (eval.sandbox).
"""
from __future__ import annotations

import re
from pathlib import Path

from . import humaneval
from .data_files import Example, is_hub_id, load_hub_rows, read_rows, require_columns
from .sandbox import SandboxLimits
from ..core.errors import UserError

NAME = "mbpp"
HUB_DATASET = ("google-research-datasets/mbpp", "full", "test")
TEST_TASK_IDS = range(11, 511)  # the benchmark's test split (the dataset's README)
DEFAULT_WORKERS = humaneval.DEFAULT_WORKERS

_MAIN = re.compile(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", re.MULTILINE)
# A top-level assert statement and its indented continuation lines.
_TOP_ASSERT = re.compile(r"^assert\b.*(?:\n[ \t]+.*)*\n?", re.MULTILINE)


def extract_code(completion: str) -> str:
    """The code of a completion (eval.humaneval.extract_code), without a top-level `__main__` block and
    without top-level asserts."""
    code = humaneval.extract_code(completion)
    main = _MAIN.search(code)
    if main:
        code = code[:main.start()]
    return _TOP_ASSERT.sub("", code)


def build_program(problem: dict, code: str) -> str:
    """test_setup_code + code + the test asserts, one per line."""
    tests = "\n".join(problem["tests"])
    return f"{problem['setup']}\n{code}\n\n{tests}\n"


def load_examples(test_file: str | Path | None = None) -> list[Example]:
    """The MBPP test problems (task_ids 11-510) from the hub or a local file; `id` is the task_id."""
    if test_file is None or is_hub_id(test_file):
        name, config, split = HUB_DATASET if test_file is None else (str(test_file), None, "test")
        rows, source = load_hub_rows(name, config, split), name
    else:
        rows, source = read_rows(test_file), str(test_file)
    require_columns(rows, ("task_id", "text", "code", "test_list"), source)
    rows = [r for r in rows if r["task_id"] in TEST_TASK_IDS]
    if not rows:
        raise UserError(f"{source} holds no MBPP test problem (task_ids {TEST_TASK_IDS.start}-"
                         f"{TEST_TASK_IDS.stop - 1})")
    return [Example(id=r["task_id"], question=r["text"], gold=r["code"],
                    meta={"tests": list(r["test_list"]), "setup": r.get("test_setup_code") or ""})
            for r in sorted(rows, key=lambda r: r["task_id"])]


def prompt(example: Example) -> str:
    """The "@@ Instruction" MBPP prompt for one problem (its text and its test asserts)."""
    from ..tasks.data import mbpp_test_prompt

    return mbpp_test_prompt(example.question, example.meta["tests"])


def score(examples: list[Example], completions: list[str], workers: int = DEFAULT_WORKERS,
          limits: SandboxLimits | None = None, **_: object) -> list[dict]:
    """Verdicts for completions[i] on examples[i]: each program runs in its own sandbox, `workers` at once."""
    codes = [extract_code(c) for c in completions]
    programs = [build_program(ex.meta, code) for ex, code in zip(examples, codes, strict=True)]
    return humaneval.sandbox_verdicts(codes, programs, limits, workers)


def summarize(verdicts: list[dict]) -> dict:
    """pass@1 (= accuracy) and counts, as for HumanEval."""
    return humaneval.summarize(verdicts)
