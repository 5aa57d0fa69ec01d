"""Settings as dataclasses with defaults and validation; YAML files map onto them.

`SORSAConfig` describes the adapter; the run settings of `run.py` are defined below it.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
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


# ----------------------------------------------------------------------------- run settings

PEFT_METHODS = ("sorsa", "lora", "pissa", "full")
TRAIN_DATASETS = ("metamath", "code")
TEST_DATASETS = ("gsm-8k", "math", "humaneval")
PRECISIONS = ("bf16", "fp16", "fp32", "tf32")


@dataclass
class RunConfig:
    """Every setting of `run.py`; a YAML file holds the same keys, and command-line flags override it.

    Defaults are the paper's SORSA recipe (../shared/PAPER.md): lr 3e-5, gamma 4e-4, rank 128,
    2 per device x 64 accumulation, 1 epoch, cosine with 3 % warmup, no weight decay, clip 1.0,
    bf16 + tf32 with a bf16 residual and float32 adapters, seed 42, length 512.
    """

    # what to run
    name: str | None = None
    train: bool = False
    merge: bool = False
    test: bool = False
    # model and method
    model: str = "meta-llama/Llama-2-7b-hf"
    tokenizer: str | None = None
    peft: str = "sorsa"
    rwkv: bool = False
    rank: int = 128
    alpha: float | None = None
    gamma: float = 4e-4
    dropout: float = 0.0
    target_modules: list[str] | str | None = None  # None: the seven projections (or RWKV's layers)
    svd: str = "full"
    svd_niter: int = 4
    # data
    train_dataset: str = "metamath"
    split: str | None = "[:100000]"
    train_file: str | None = None
    length: int = 512
    # optimisation
    seed: int = 42
    lr: float = 3e-5
    wd: float = 0.0
    scheduler: str = "cosine"
    warmup: float = 0.03  # < 1: a ratio of the steps; >= 1: a number of steps
    batch_size: int = 2
    accum_steps: int = 64
    epochs: float = 1.0
    max_steps: int = -1
    max_grad_norm: float = 1.0
    mix_precision: list[str] = field(default_factory=lambda: ["bf16", "tf32"])
    grad_cp: bool = False
    save_steps: int = 500
    logging_steps: int = 1
    resume: bool = False
    overwrite: bool = False
    report_to: str = "none"
    deepspeed: str | None = None
    # evaluation
    test_dataset: str = "gsm-8k"
    test_file: str | None = None
    test_precision: str = "bf16"
    valid_batch_size: int = 8
    max_new_tokens: int | None = None
    limit: int | None = None
    backend: str = "auto"
    export_lora: bool = False
    # paths
    run_path: str = "./runs"
    cache_path: str | None = None
    svd_cache_path: str | None = None
    local: bool = False
    trust_remote_code: bool = False

    def __post_init__(self):
        def check(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        check(self.peft in PEFT_METHODS, f"peft={self.peft!r} is unknown; use one of {list(PEFT_METHODS)}")
        check(self.train_dataset in TRAIN_DATASETS,
              f"train_dataset={self.train_dataset!r} is unknown; use one of {list(TRAIN_DATASETS)}")
        check(self.test_dataset in TEST_DATASETS,
              f"test_dataset={self.test_dataset!r} is unknown; use one of {list(TEST_DATASETS)}")
        check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1,
              f"rank={self.rank!r} is invalid; the rank must be an integer >= 1")
        check(self.length >= 1, f"length={self.length!r} is invalid; use a positive number of tokens")
        check(self.lr > 0, f"lr={self.lr!r} is invalid; the learning rate must be > 0")
        check(self.gamma >= 0, f"gamma={self.gamma!r} is invalid; use a number >= 0")
        check(self.batch_size >= 1 and self.accum_steps >= 1,
              f"batch_size={self.batch_size!r} and accum_steps={self.accum_steps!r} must be >= 1")
        check(self.warmup >= 0, f"warmup={self.warmup!r} must be >= 0")
        check(self.svd in SVD_METHODS, f"svd={self.svd!r} is unknown; use one of {list(SVD_METHODS)}")
        if isinstance(self.mix_precision, str):
            self.mix_precision = [self.mix_precision]
        bad = [p for p in self.mix_precision if p not in PRECISIONS]
        check(not bad, f"mix_precision {bad} unknown; use any of {list(PRECISIONS)}")
        check(not ("bf16" in self.mix_precision and "fp16" in self.mix_precision),
              "mix_precision cannot hold both bf16 and fp16")
        check(self.test_precision in ("bf16", "fp16", "fp32"),
              f"test_precision={self.test_precision!r} is unknown; use bf16, fp16 or fp32")
        check(self.backend in ("auto", "hf", "vllm"), f"backend={self.backend!r} is unknown; use auto, hf or vllm")
        check(self.limit is None or self.limit >= 1, f"limit={self.limit!r} must be >= 1")
        bad = [n for n in str(self.report_to).split(",") if n.strip() not in ("none", "all", "tensorboard", "wandb")]
        check(not bad, f"report_to {bad} is not supported here; use none, tensorboard or wandb (comma-separated)")

    @property
    def precision(self) -> str:
        """The training compute precision: bf16, fp16 or fp32 (tf32 only switches matmul mode)."""
        return next((p for p in ("bf16", "fp16") if p in self.mix_precision), "fp32")

    def sorsa_config(self, default_targets: list[str]) -> SORSAConfig:
        """The adapter settings of this run (residual in the compute precision, adapters float32)."""
        residual = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return SORSAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                           target_modules=self.target_modules or default_targets, svd=self.svd,
                           niter=self.svd_niter, seed=self.seed, residual_dtype=residual)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: dict, source: str = "config") -> "RunConfig":
        """A RunConfig from a dict (a YAML file); an unknown key is an error naming it."""
        known = set(cls.keys())
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known keys are: {', '.join(sorted(known))}")
        return cls(**values)


def load_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML file, with a clear error if it is missing or not a mapping."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    return data
