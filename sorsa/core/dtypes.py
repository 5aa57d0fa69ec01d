"""Precision names and torch dtypes, converted in one place: "bf16" <-> torch.bfloat16, ..."""
from __future__ import annotations

from typing import Any

import torch

from .errors import UserError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}
# The precision flags of a run (tf32 is float32 with TensorFloat-32 matmuls on a GPU).
PRECISIONS = ("bf16", "fp16", "fp32", "tf32")


def parse_dtype(value: Any, what: str = "dtype") -> torch.dtype | None:
    """A torch dtype from a dtype or a name ("bf16", "float32", ...); None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise UserError(f"{what}={value!r} is not a dtype; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """"float32" for torch.float32; None stays None."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name ("bf16", "fp16", "fp32", "tf32" -> float32)."""
    return torch.float32 if precision == "tf32" else parse_dtype(precision)


def precision_name(dtype: torch.dtype | None) -> str:
    """The precision flag of a dtype: "bf16", "fp16", else "fp32" (the inverse of precision_dtype)."""
    return next((p for p in ("bf16", "fp16") if _DTYPES[p] == dtype), "fp32")
