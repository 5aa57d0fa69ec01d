"""The benchmark registry: one module per benchmark, each with the same five functions.

`load_examples(test_file) -> list[Example]`, `prompt(example) -> str`,
`score(examples, completions, **options) -> list[verdict dict]` (every verdict has `extracted` and
`correct`), `summarize(verdicts) -> dict` (at least `accuracy`, `correct`, `total`), and `NAME`.
Generation (`eval.runner`) and scoring alone (`eval.score`) both go through these, so they agree.
"""
from __future__ import annotations

from types import ModuleType

from . import gsm8k, hendrycks_math, humaneval

BENCHMARKS: dict[str, ModuleType] = {m.NAME: m for m in (gsm8k, hendrycks_math, humaneval)}
# Paper protocol (../shared/PAPER.md, "Evaluation protocol"): max new tokens per benchmark.
MAX_NEW_TOKENS = {"gsm-8k": 1024, "math": 2048, "humaneval": 2048}
# Where a completion ends: the start of a new instruction in the benchmark's prompt format.
STOP_STRINGS = {"gsm-8k": ("### Instruction",), "math": ("### Instruction",),
                "humaneval": ("### Instruction", "@@ Instruction")}


def get_benchmark(name: str) -> ModuleType:
    """The benchmark module for "gsm-8k", "math" or "humaneval"."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown test dataset {name!r}; expected one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
