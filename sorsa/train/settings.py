"""The run settings of the command line and of experiments: RunConfig (one field per flag, with its help, choices and
whether it decides the training result), JobOptions (reports, analysis, planning), and YAML loading.
The adapter's own settings are sorsa.core.options.SORSAConfig."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.options import SORSAConfig, check_positive_int
from ..core.dtypes import PRECISIONS, parse_dtype
from ..core.errors import MissingFileError, UserError
from ..core.functional import ALPHA_INIT, FAST_MAX_ITER, FAST_TOL, SVD_METHODS
from ..core.quant import QUANT_TYPES
from ..methods import METHODS, get_method
from ..tasks.glue import GLUE_TASKS, GLUE_TRAIN_TASKS, is_glue

# ----------------------------------------------------------------------------- run settings

# GLUE tasks ("glue-sst2", ...) train and score a sequence classifier (sorsa/glue.py); the rest generate.
TRAIN_DATASETS = ("metamath", "code") + GLUE_TRAIN_TASKS
TEST_DATASETS = ("gsm-8k", "math", "humaneval", "mbpp") + tuple(GLUE_TASKS)
TEST_PRECISIONS = ("bf16", "fp16", "fp32")
BACKENDS = ("auto", "hf", "vllm")
LOSS_NORMALIZATIONS = ("reference", "tokens")
REPORTERS = ("none", "all", "tensorboard", "wandb")


def setting(default=dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] = (), choices=None,
            group: str = "", training: bool = True, metavar: str | None = None, append: bool = False,
            nargs: str = "+", default_factory=dataclasses.MISSING):
    """A settings field with what the command line needs: help, extra flag spellings, choices, the help
    group, and whether the value decides the result of training (`training`; hashed into the completion
    marker). `run.py` builds every flag from these, so a flag, its choices and its default are declared
    once. `append`: the flag is repeatable (each use adds one value); `nargs`: for list-valued settings."""
    meta = {"help": help, "flags": flags, "choices": choices, "group": group, "training": training,
            "metavar": metavar, "append": append, "nargs": nargs}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


JOBS, MODEL, OPTIM, EVAL, PATHS = ("jobs (several run in the order train, merge, test)", "model and method",
                                   "training data and optimisation", "evaluation", "paths")


@dataclass
class RunConfig:
    """Every setting of `run.py`; a YAML file holds the same keys, and command-line flags override it.

    Defaults are the paper's SORSA recipe (../shared/PAPER.md): lr 3e-5, gamma 4e-4, rank 128,
    2 per device x 64 accumulation, 1 epoch, cosine with 3 % warmup, no weight decay, clip 1.0,
    bf16 + tf32 with a bf16 residual and float32 adapters, seed 42, length 512.
    """

    # what to run
    name: str | None = setting(None, "the run's name: its directory is RUN_PATH/NAME", flags=("-n",), group=MODEL,
                               training=False)
    train: bool = setting(False, "fine-tune and save the adapter", flags=("-t",), group=JOBS, training=False)
    merge: bool = setting(False, "fold the adapter into the base model", flags=("-m",), group=JOBS, training=False)
    test: bool = setting(False, "generate and score a benchmark", flags=("-T",), group=JOBS, training=False)
    # model and method
    model: str = setting("meta-llama/Llama-2-7b-hf", "hub id, local directory or builtin: name of the base model",
                         group=MODEL)
    tokenizer: str | None = setting(None, "hub id or directory of the tokenizer (none: the model's)", group=MODEL)
    peft: str = setting("sorsa", "method", flags=("-p",), choices=tuple(METHODS), group=MODEL)
    rwkv: bool = setting(False, "the model is RWKV6 (Finch)", group=MODEL)
    rank: int = setting(128, "adapter rank r", flags=("-r",), group=MODEL)
    alpha: float | None = setting(None, "scale = alpha / r (none: scale 1)", flags=("-a",), group=MODEL)
    alpha_init: str = setting("tail", "with alpha set: 'tail' starts S_p = sigma / scale (W_res is the SVD tail); "
                              "'reference' starts S_p = sigma as the authors' code", choices=ALPHA_INIT, group=MODEL)
    gamma: float = setting(4e-4, "orthonormal regularizer gamma", flags=("-g",), group=MODEL)
    dropout: float = setting(0.0, "adapter dropout", flags=("-d",), group=MODEL)
    target_modules: list[str] | str | None = setting(
        None, "module-name suffixes to adapt (none: the architecture's defaults, e.g. Llama's seven projections)",
        group=MODEL)
    svd: str = setting("full", "SVD for the initialisation", choices=SVD_METHODS, group=MODEL)
    svd_niter: int = setting(4, "subspace iterations of the randomized SVD", group=MODEL)
    svd_tol: float = setting(FAST_TOL, "fast SVD: stop when the captured energy changes by less than this "
                             f"(relative; at most {FAST_MAX_ITER} iterations)", group=MODEL)
    quantize: str | None = setting(None, "store the frozen weights quantized (bitsandbytes): QSORSA, QPiSSA, QLoRA",
                                   choices=QUANT_TYPES, group=MODEL)
    quant_iters: int = setting(1, "rounds of PiSSA's alternating initialisation of a quantized residual (PiSSA: 5)",
                               group=MODEL)
    modules_to_save: list[str] | None = setting(
        None, "modules trained fully and saved with the adapter (a sequence classifier's new head always is)",
        group=MODEL)
    # data
    train_dataset: str = setting("metamath", "training set", choices=TRAIN_DATASETS, group=OPTIM)
    split: str | None = setting("[:100000]", "slice of the train split, e.g. '[:100000]'", group=OPTIM)
    train_file: str | None = setting(None, "local json/jsonl/parquet (or builtin:) instead of the hub dataset",
                                     group=OPTIM)
    length: int = setting(512, "max tokens of the prompt and of the response, each", flags=("-l",), group=OPTIM)
    val_size: float = setting(0, "hold out this many training rows (>= 1), or this fraction (< 1), as a validation "
                              "split; the same rows for every seed and method (experiments select on it)", group=OPTIM)
    # optimisation
    seed: int = setting(42, "random seed (data order, initialisation, dropout)", group=OPTIM)
    lr: float = setting(3e-5, "peak learning rate", group=OPTIM)
    wd: float = setting(0.0, "weight decay", group=OPTIM)
    scheduler: str = setting("cosine", "learning-rate schedule", group=OPTIM)
    warmup: float = setting(0.03, "warmup: a ratio (< 1) or a number of steps (>= 1)", group=OPTIM)
    batch_size: int = setting(2, "per-device batch", group=OPTIM)
    accum_steps: int = setting(64, "gradient-accumulation steps", flags=("--accum-step",), group=OPTIM)
    epochs: float = setting(1.0, "training epochs", group=OPTIM)
    max_steps: int = setting(-1, "stop after this many optimizer steps (-1: the epochs decide)", group=OPTIM)
    max_grad_norm: float = setting(1.0, "gradient clipping (0: off)", group=OPTIM)
    loss_normalization: str = setting(
        "reference", "task loss over an accumulation window: 'reference' (each micro-batch's mean token loss / "
        "accumulation steps, as the paper's runs) or 'tokens' (transformers 5: the window's token sum / its token "
        "count)", choices=LOSS_NORMALIZATIONS, group=OPTIM)
    mix_precision: list[str] = setting(help="precision, repeatable: bf16 + tf32 is a bf16 residual with float32 "
                                       "adapters", choices=PRECISIONS, group=OPTIM, append=True,
                                       default_factory=lambda: ["bf16", "tf32"])
    grad_cp: bool = setting(False, "gradient checkpointing", group=OPTIM)
    save_steps: int = setting(500, "checkpoint every N steps", group=OPTIM, training=False)
    logging_steps: int = setting(1, "log every N steps", group=OPTIM, training=False)
    resume: bool = setting(False, "continue from the run's last checkpoint", group=OPTIM, training=False)
    overwrite: bool = setting(False, "replace a finished run of the same name", group=OPTIM, training=False)
    report_to: str = setting("none", "none, tensorboard or wandb (comma-separated)", group=OPTIM, training=False)
    deepspeed: str | None = setting(None, "DeepSpeed JSON config", group=OPTIM, metavar="CONFIG")
    # evaluation
    test_dataset: str = setting("gsm-8k", "benchmark", choices=TEST_DATASETS, group=EVAL, training=False)
    test_file: str | None = setting(None, "local test data (or builtin:) instead of the hub dataset", group=EVAL,
                                    training=False)
    test_precision: str = setting("bf16", "generation precision", choices=TEST_PRECISIONS, group=EVAL,
                                  training=False)
    valid_batch_size: int = setting(8, "generation batch", group=EVAL, training=False)
    max_new_tokens: int | None = setting(None, "none: 1024 (gsm-8k), 2048 (math, humaneval, mbpp)", group=EVAL,
                                         training=False)
    limit: int | None = setting(None, "score the first N examples only", group=EVAL, training=False)
    backend: str = setting("auto", "generation backend", choices=BACKENDS, group=EVAL, training=False)
    export_lora: bool = setting(False, "with --merge: also write the PEFT LoRA form", group=EVAL, training=False)
    # paths
    run_path: str = setting("./runs", "where runs live", group=PATHS, training=False)
    cache_path: str | None = setting(None, "Hugging Face download cache (none: HF_HOME)", group=PATHS,
                                     training=False)
    svd_cache_path: str | None = setting(None, "reuse SVD initialisations saved here", group=PATHS, training=False)
    local: bool = setting(False, "load models and data from local files only", group=PATHS, training=False)
    trust_remote_code: bool = setting(False, "allow a model's own code", group=PATHS, training=False)

    def __post_init__(self):
        def check(ok: bool, msg: str):
            if not ok:
                raise UserError(msg)

        for f in dataclasses.fields(self):  # every field with choices: one check, one message
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and not f.metadata.get("append") and not (value is None and f.default is None):
                check(value in choices, f"{f.name}={value!r} is unknown; use one of {list(choices)}")
        check_positive_int("rank", self.rank, " (the rank)")
        check(self.length >= 1, f"length={self.length!r} is invalid; use a positive number of tokens")
        check(self.lr > 0, f"lr={self.lr!r} is invalid; the learning rate must be > 0")
        check(self.gamma >= 0, f"gamma={self.gamma!r} is invalid; use a number >= 0")
        check(self.batch_size >= 1 and self.accum_steps >= 1,
              f"batch_size={self.batch_size!r} and accum_steps={self.accum_steps!r} must be >= 1")
        check(self.warmup >= 0, f"warmup={self.warmup!r} must be >= 0")
        check(isinstance(self.val_size, (int, float)) and not isinstance(self.val_size, bool) and self.val_size >= 0
              and (self.val_size < 1 or float(self.val_size).is_integer()),
              f"val_size={self.val_size!r} is invalid; give a number of rows (>= 1) or a fraction in [0, 1)")
        if self.val_size >= 1:  # one spelling, so 400 from a YAML file and 400.0 from a flag hash the same
            self.val_size = int(self.val_size)
        if isinstance(self.mix_precision, str):
            self.mix_precision = [self.mix_precision]
        bad = [p for p in self.mix_precision if p not in PRECISIONS]
        check(not bad, f"mix_precision {bad} unknown; use any of {list(PRECISIONS)}")
        check(not ("bf16" in self.mix_precision and "fp16" in self.mix_precision),
              "mix_precision cannot hold both bf16 and fp16")
        check(self.limit is None or self.limit >= 1, f"limit={self.limit!r} must be >= 1")
        bad = [n for n in str(self.report_to).split(",") if n.strip() not in REPORTERS]
        check(not bad, f"report_to {bad} is not supported here; use none, tensorboard or wandb (comma-separated)")
        check(not (self.rwkv and is_glue(self.train_dataset)),
              f"train_dataset={self.train_dataset!r} trains a sequence classifier; RWKV6 has no classification head")
        check(not (self.val_size and is_glue(self.train_dataset)),
              f"val_size holds rows out of a generation task's training data; {self.train_dataset} is validated on its "
              "own validation split (--test), so leave val_size unset")
        get_method(self.peft).check(self)  # the method's own refusals (e.g. --quantize with full fine-tuning)
        if self.quantize is not None:
            check_positive_int("quant_iters", self.quant_iters, " (PiSSA uses 5)")
            unsupported = [(self.deepspeed, "--deepspeed (ZeRO cannot partition 4-bit weights; use DDP through "
                            "torchrun)"), (self.rwkv, "--rwkv (RWKV6 is not quantized here)"),
                           (is_glue(self.train_dataset), "a GLUE classifier")]
            bad = [what for hit, what in unsupported if hit]
            check(not bad, f"--quantize {self.quantize} does not work with {bad[0] if bad else ''}")

    @property
    def precision(self) -> str:
        """The training compute precision: bf16, fp16 or fp32 (tf32 only switches matmul mode)."""
        return next((p for p in ("bf16", "fp16") if p in self.mix_precision), "fp32")

    def sorsa_config(self, default_targets: list[str]) -> SORSAConfig:
        """The adapter settings of this run (residual in the compute precision, adapters float32)."""
        residual = None if self.precision == "fp32" else parse_dtype(self.precision)
        return SORSAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                           target_modules=self.target_modules or default_targets, svd=self.svd,
                           niter=self.svd_niter, seed=self.seed, residual_dtype=residual,
                           alpha_init=self.alpha_init, svd_tol=self.svd_tol, quantize=self.quantize,
                           quant_iters=self.quant_iters, compute_dtype=parse_dtype(self.precision))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def training_settings(self) -> dict:
        """The settings that decide the result of training (the fields marked `training`), for the
        completion marker: a finished run is reused only when these are unchanged."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("training", True)}

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: dict, source: str = "config") -> "RunConfig":
        """A RunConfig from a dict (a YAML file); an unknown key is an error naming it."""
        known = set(cls.keys())
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{source}: unknown key(s) {unknown}; known keys are: {', '.join(sorted(known))}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{key: _number(key, value, types[key], source) for key, value in values.items()})


def _number(key: str, value, type_name: str, source: str):
    """A numeric setting as a number: YAML 1.1 reads `3e-5` (no dot) as a string, which is converted; a value
    that is no number (or None where one is required) is a ValueError naming the key."""
    kind, optional = type_name.split(" | ")[0], type_name.endswith("| None")
    if kind not in ("int", "float") or isinstance(value, (bool, int, float)) or (value is None and optional):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {key}={value!r} is not a number") from None
    if kind == "int":
        if not number.is_integer():
            raise UserError(f"{source}: {key}={value!r} is not an integer")
        return int(number)
    return number


@dataclass
class JobOptions:
    """What `run.py` does besides the run's own jobs: reports, analysis and plans. Not saved with a run."""

    config: str | None = setting(None, "settings from a YAML file (the same keys as the flags, with _)",
                                 metavar="FILE.yaml")
    analyze: list[str] | None = setting(
        None, "SVD variation analysis of each run's checkpoints against the base: RUN/analysis.csv and .png "
        "(no RUN: the run of --name)", group="analysis and reporting (after any train/merge/test of this call)",
        metavar="RUN", nargs="*")
    report: list[str] | None = setting(
        None, "a table of runs next to the paper's numbers, and their training curves: OUT/report.md, report.csv, "
        "training_curves.png", group="analysis and reporting (after any train/merge/test of this call)",
        metavar="RUN", nargs="*")
    out: str | None = setting(None, "where --report (none: RUN_PATH/report) and a side-by-side --analyze of several "
                              "runs write", group="analysis and reporting (after any train/merge/test of this call)",
                              metavar="DIR")
    analysis_top_k: int | None = setting(None, "analyse only the top-K singular triplets", metavar="K",
                                         group="analysis and reporting (after any train/merge/test of this call)")
    dry_run: bool = setting(False, "print the run's plan without loading weights: target layers, trainable "
                            "parameters, memory per GPU (the paper's 7B models work offline)",
                            group="planning (nothing is trained)")
    gpus: int | None = setting(None, "with --dry-run: plan for N GPUs (none: WORLD_SIZE or 1)", metavar="N",
                               group="planning (nothing is trained)")
    experiment: str | None = setting(
        None, "run an experiment: a grid of runs, per-method selection on a validation split, seeds, tests, and "
        "RUN_PATH/NAME/report.md (see README, Experiments); other run flags override its base settings",
        metavar="FILE.yaml", group="experiments (sweeps, seeds, statistics)")
    max_parallel: int | None = setting(
        None, "with --experiment: runs side by side, one per GPU when there are GPUs, else N processes sharing the "
        "CPU cores (none: the experiment file's max_parallel, else 1)", metavar="N",
        group="experiments (sweeps, seeds, statistics)")


def load_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML file, with a clear error if it is missing or not a mapping."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    return data
