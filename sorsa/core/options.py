"""SORSAConfig: how SORSA adapts a model (the library's one settings object), with its validation."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch

from .dtypes import dtype_name, parse_dtype
from .errors import UserError
from .functional import ALPHA_INIT, FAST_MAX_ITER, FAST_OVERSAMPLE, FAST_TOL, SVD_METHODS
from .targets import LLAMA_TARGETS


def check_positive_int(name: str, value, hint: str = "") -> None:
    """A UserError unless `value` is an integer >= 1 (not a bool): the rank, quant_iters, ..."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name}={value!r} is invalid; use an integer >= 1{hint}")


@dataclass
class SORSAConfig:
    """How SORSA adapts a model (arXiv 2409.00055, Sec. 3).

    rank: r, the number of principal singular triplets moved into the adapter.
    alpha: scale = alpha / rank; None means scale 1, as in the paper.
    alpha_init: how S_p starts when scale ≠ 1: "tail" (S_p = σ / scale, W_res is the SVD tail) or
        "reference" (S_p = σ, W_res = W − scale·U σ Vh, as the authors' code); the same when alpha is None.
    quantize: None, or "nf4" / "fp4" / "int8": W_res is stored quantized (QSORSA), initialised by PiSSA's
        alternating rule with `quant_iters` rounds (functional.quantized_split), `quant_blocksize` weights per
        absmax and `quant_double` quantization; the other linear layers (not the output head) are quantized
        too, as QLoRA does. `compute_dtype`: the dtype of the quantized matmul (None: residual_dtype, else bf16).
    dropout: dropout on the adapter's input.
    target_modules: module-name suffixes (a list) or a regex matched against the full name (a str).
    svd: "full" (torch.linalg.svd), "randomized" (torch.svd_lowrank, seeded, `niter` iterations, as PEFT's
        pissa_niter_N) or "fast" (seeded subspace iteration with `svd_oversample` extra columns, stopped when the
        captured energy changes by less than `svd_tol`, at most `svd_max_iter` iterations).
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
    alpha_init: str = "tail"
    svd_tol: float = FAST_TOL
    svd_oversample: int = FAST_OVERSAMPLE
    svd_max_iter: int = FAST_MAX_ITER
    quantize: str | None = None
    quant_iters: int = 1
    quant_blocksize: int = 64
    quant_double: bool = True
    compute_dtype: torch.dtype | None = None

    def __post_init__(self):
        check_positive_int("rank", self.rank, " (the rank)")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise UserError(f"alpha={self.alpha!r} is invalid; use a positive number, or None for scale 1")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise UserError(f"dropout={self.dropout!r} is invalid; it must lie in [0, 1)")
        if self.svd not in SVD_METHODS:
            raise UserError(f"svd={self.svd!r} is unknown; use one of {list(SVD_METHODS)}")
        if self.alpha_init not in ALPHA_INIT:
            raise UserError(f"alpha_init={self.alpha_init!r} is unknown; use one of {list(ALPHA_INIT)}")
        if isinstance(self.niter, bool) or not isinstance(self.niter, int) or self.niter < 0:
            raise UserError(f"niter={self.niter!r} is invalid; use an integer >= 0")
        if not (isinstance(self.svd_tol, (int, float)) and self.svd_tol >= 0):
            raise UserError(f"svd_tol={self.svd_tol!r} is invalid; use a relative tolerance >= 0, e.g. 1e-6")
        for name in ("svd_oversample", "svd_max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "svd_oversample" else 1):
                raise UserError(f"{name}={value!r} is invalid; use an integer >= "
                                 f"{0 if name == 'svd_oversample' else 1}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise UserError(f"target_modules={self.target_modules!r} is not a valid regex: {err}") from None
        else:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise UserError(f"target_modules={self.target_modules!r} must be a non-empty list of "
                                 "module-name suffixes, or a regex string")
        if self.quantize is not None:
            self.quant_spec()  # validates quant_type and blocksize
            check_positive_int("quant_iters", self.quant_iters, " (PiSSA uses 5)")
        self.compute_dtype = parse_dtype(self.compute_dtype, "compute_dtype")
        self.residual_dtype = parse_dtype(self.residual_dtype, "residual_dtype")
        self.adapter_dtype = parse_dtype(self.adapter_dtype, "adapter_dtype")
        if not self.adapter_dtype.is_floating_point:
            raise UserError(f"adapter_dtype={self.adapter_dtype} must be a floating-point dtype")

    @property
    def scale(self) -> float:
        """alpha / rank, or 1 when alpha is None (the paper's setting)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def quant_spec(self):
        """The QuantSpec of a quantized residual (sorsa/core/quant.py), or None."""
        if self.quantize is None:
            return None
        from .quant import QuantSpec

        compute = self.compute_dtype or parse_dtype(self.residual_dtype) or torch.bfloat16
        return QuantSpec(self.quantize, self.quant_blocksize, self.quant_double, compute)

    def svd_options(self) -> dict:
        """The keyword arguments of `functional.svd_top` for this config's SVD method (beside rank and method)."""
        return dict(niter=self.niter, seed=self.seed, tol=self.svd_tol, oversample=self.svd_oversample,
                    max_iter=self.svd_max_iter)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("residual_dtype", "adapter_dtype", "compute_dtype"):
            d[key] = dtype_name(getattr(self, key))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SORSAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown SORSAConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)
