"""Settings as dataclasses with defaults and validation; YAML files map onto them.

`SORSAConfig` describes the adapter; the run settings of `run.py` are defined below it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .functional import SVD_METHODS

# The seven projections of Llama / Mistral / Gemma, as in the paper's runs.
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}


def parse_dtype(value: Any, what: str = "dtype") -> torch.dtype | None:
    """A torch dtype from a dtype or a name ("bf16", "float32", ...); None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ValueError(f"{what}={value!r} is not a dtype; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


@dataclass
class SORSAConfig:
    """How SORSA adapts a model (arXiv 2409.00055, Sec. 3).

    rank: r, the number of principal singular triplets moved into the adapter.
    alpha: scale = alpha / rank; None means scale 1, as in the paper.
    dropout: dropout on the adapter's input.
    target_modules: module-name suffixes (a list) or a regex matched against the full name (a str).
    svd: "full" (torch.linalg.svd) or "randomized" (torch.svd_lowrank, seeded, `niter` iterations).
    residual_dtype: dtype of the frozen W_res (None keeps the weight's dtype; the paper uses bf16).
    adapter_dtype: dtype of U_p, S_p, Vh_p (float32 in the paper).
    """

    rank: int = 128
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(LLAMA_TARGETS))
    svd: str = "full"
    niter: int = 4
    seed: int = 0
    residual_dtype: torch.dtype | None = None
    adapter_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} is invalid; the rank must be an integer >= 1")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"alpha={self.alpha!r} is invalid; use a positive number, or None for scale 1")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout={self.dropout!r} is invalid; it must lie in [0, 1)")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"svd={self.svd!r} is unknown; use one of {list(SVD_METHODS)}")
        if isinstance(self.niter, bool) or not isinstance(self.niter, int) or self.niter < 0:
            raise ValueError(f"niter={self.niter!r} is invalid; use an integer >= 0")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(f"target_modules={self.target_modules!r} is not a valid regex: {err}") from None
        else:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"target_modules={self.target_modules!r} must be a non-empty list of "
                                 "module-name suffixes, or a regex string")
        self.residual_dtype = parse_dtype(self.residual_dtype, "residual_dtype")
        self.adapter_dtype = parse_dtype(self.adapter_dtype, "adapter_dtype")
        if not self.adapter_dtype.is_floating_point:
            raise ValueError(f"adapter_dtype={self.adapter_dtype} must be a floating-point dtype")

    @property
    def scale(self) -> float:
        """alpha / rank, or 1 when alpha is None (the paper's setting)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["residual_dtype"] = dtype_name(self.residual_dtype)
        d["adapter_dtype"] = dtype_name(self.adapter_dtype)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SORSAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SORSAConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)
