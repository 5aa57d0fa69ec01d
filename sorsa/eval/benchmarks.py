"""The benchmark registry: one module per benchmark (GLUE: one object per task), each with the same five functions.

`load_examples(test_file) -> list[Example]`, `prompt(example) -> str`,
`score(examples, completions, **options) -> list[verdict dict]` (every verdict has `extracted` and
`correct`), `summarize(verdicts) -> dict` (at least `accuracy`, `correct`, `total`), and `NAME`.
Generation (`eval.runner`) and scoring alone (`eval.score`) both go through these, so they agree.
"""
from __future__ import annotations

from types import ModuleType

from . import glue, gsm8k, hendrycks_math, humaneval, mbpp
from ..core.errors import UserError

BENCHMARKS: dict[str, ModuleType | glue.GlueBenchmark] = {
    m.NAME: m for m in (gsm8k, hendrycks_math, humaneval, mbpp)}
BENCHMARKS.update(glue.BENCHMARKS)  # "glue-sst2", ...: a classifier's predictions (eval/classify.py), not generations
# Paper protocol (../shared/PAPER.md, "Evaluation protocol"): max new tokens per benchmark.
MAX_NEW_TOKENS = {"gsm-8k": 1024, "math": 2048, "humaneval": 2048}
# Generation benchmarks beyond the paper's table: MBPP generates code as HumanEval does.
MORE_MAX_NEW_TOKENS = {"mbpp": 2048}
# Where a completion ends: the start of a new instruction in the benchmark's prompt format.
STOP_STRINGS = {"gsm-8k": ("### Instruction",), "math": ("### Instruction",),
                "humaneval": ("### Instruction", "@@ Instruction"), "mbpp": ("### Instruction", "@@ Instruction")}


def get_benchmark(name: str) -> ModuleType:
    """The benchmark for "gsm-8k", "math", "humaneval", "mbpp" or a GLUE task ("glue-sst2", ...)."""
    if name not in BENCHMARKS:
        raise UserError(f"unknown test dataset {name!r}; expected one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def default_max_new_tokens(name: str) -> int:
    """The max new tokens of a generation benchmark when --max-new-tokens is not given."""
    return {**MAX_NEW_TOKENS, **MORE_MAX_NEW_TOKENS}[name]
