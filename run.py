"""SORSA toolkit command line: train, merge and test a named run under --run-path (default ./runs).

    python run.py --config configs/quickstart.yaml                 # the offline default: train, merge, test
    python run.py -n llama2_sorsa -p sorsa --model meta-llama/Llama-2-7b-hf -r 128 --train --merge --test
    python run.py -n llama2_sorsa --test --test-dataset math         # score a finished run on another benchmark
    python run.py --test --model path/to/any/model --test-dataset gsm-8k

Settings resolve as: defaults (the paper's SORSA recipe) < the run's saved config (merge/test of an
existing run) < --config FILE.yaml < command-line flags. See README.md for every flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ACTIONS = ("train", "merge", "test")
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RWKV_TARGETS = ["attention.receptance", "attention.key", "attention.value", "attention.gate",
                "attention.output", "feed_forward.key", "feed_forward.value", "feed_forward.receptance"]


class UserError(Exception):
    """Bad input: reported as one line, without a traceback."""


# ----------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS  # a flag that was not given does not override the config file
    B = argparse.BooleanOptionalAction  # --x / --no-x, so a flag can also switch off a config's setting
    p = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0], argument_default=S,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", metavar="FILE.yaml", help="settings from a YAML file (same keys as the flags, with _)")
    g = p.add_argument_group("jobs (several run in the order train, merge, test)")
    g.add_argument("-t", "--train", action=B, help="fine-tune and save the adapter")
    g.add_argument("-m", "--merge", action=B, help="fold the adapter into the base model")
    g.add_argument("-T", "--test", action=B, help="generate and score a benchmark")
    g = p.add_argument_group("model and method")
    g.add_argument("-n", "--name", help="the run's name: its directory is RUN_PATH/NAME")
    g.add_argument("-p", "--peft", choices=["sorsa", "lora", "pissa", "full"], help="method (default sorsa)")
    g.add_argument("--model", help="hub id or local directory of the base model (default meta-llama/Llama-2-7b-hf)")
    g.add_argument("--tokenizer", help="hub id or directory of the tokenizer (default: the model's)")
    g.add_argument("--rwkv", action=B, help="the model is RWKV6 (Finch)")
    g.add_argument("-r", "--rank", type=int, help="adapter rank r (default 128)")
    g.add_argument("-a", "--alpha", type=float, help="scale = alpha / r (default: none, scale 1)")
    g.add_argument("-g", "--gamma", type=float, help="orthonormal regularizer gamma (default 4e-4)")
    g.add_argument("-d", "--dropout", type=float, help="adapter dropout (default 0)")
    g.add_argument("--target-modules", nargs="+", help="module-name suffixes to adapt (default: the 7 projections)")
    g.add_argument("--svd", choices=["full", "randomized"], help="SVD for the init (default full)")
    g.add_argument("--svd-niter", type=int, help="subspace iterations of the randomized SVD (default 4)")
    g = p.add_argument_group("training data and optimisation")
    g.add_argument("--train-dataset", choices=["metamath", "code"], help="default metamath")
    g.add_argument("--split", help="slice of the train split, e.g. '[:100000]' (default)")
    g.add_argument("--train-file", help="local json/jsonl/parquet instead of the hub dataset")
    g.add_argument("-l", "--length", type=int, help="max tokens of the prompt and of the response, each (default 512)")
    g.add_argument("--seed", type=int, help="default 42")
    g.add_argument("--lr", type=float, help="peak learning rate (default 3e-5)")
    g.add_argument("--wd", type=float, help="weight decay (default 0)")
    g.add_argument("--scheduler", help="learning-rate schedule (default cosine)")
    g.add_argument("--warmup", type=float, help="warmup: a ratio (< 1) or a number of steps (default 0.03)")
    g.add_argument("--batch-size", type=int, help="per-device batch (default 2)")
    g.add_argument("--accum-steps", "--accum-step", dest="accum_steps", type=int,
                   help="gradient-accumulation steps (default 64)")
    g.add_argument("--epochs", type=float, help="default 1")
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping (default 1.0)")
    g.add_argument("--mix-precision", action="append", choices=["bf16", "fp16", "fp32", "tf32"],
                   help="repeatable; default bf16 + tf32 (bf16 residual, float32 adapters)")
    g.add_argument("--grad-cp", action=B, help="gradient checkpointing")
    g.add_argument("--save-steps", type=int, help="checkpoint every N steps (default 500)")
    g.add_argument("--logging-steps", type=int, help="log every N steps (default 1)")
    g.add_argument("--resume", action=B, help="continue from the run's last checkpoint")
    g.add_argument("--overwrite", action=B, help="replace a finished run of the same name")
    g.add_argument("--report-to", help="none (default), tensorboard or wandb")
    g.add_argument("--deepspeed", metavar="CONFIG", help="DeepSpeed JSON config")
    g = p.add_argument_group("evaluation")
    g.add_argument("--test-dataset", choices=["gsm-8k", "math", "humaneval"], help="default gsm-8k")
    g.add_argument("--test-file", help="local test data instead of the hub dataset")
    g.add_argument("--test-precision", choices=["bf16", "fp16", "fp32"], help="default bf16")
    g.add_argument("--valid-batch-size", type=int, help="generation batch (default 8)")
    g.add_argument("--max-new-tokens", type=int, help="default 1024 (gsm-8k), 2048 (math, humaneval)")
    g.add_argument("--limit", type=int, help="score the first N examples only")
    g.add_argument("--backend", choices=["auto", "hf", "vllm"], help="generation backend (default auto)")
    g.add_argument("--export-lora", action=B, help="with --merge: also write the PEFT LoRA form")
    g = p.add_argument_group("paths")
    g.add_argument("--run-path", help="where runs live (default ./runs)")
    g.add_argument("--cache-path", help="Hugging Face download cache (default: HF_HOME)")
    g.add_argument("--svd-cache-path", help="reuse SVD initialisations saved here")
    g.add_argument("--local", action=B, help="load models and data from local files only")
    g.add_argument("--trust-remote-code", action=B, help="allow a model's own code (off by default)")
    g = p.add_argument_group("analysis and reporting (after any train/merge/test of this call)")
    g.add_argument("--analyze", nargs="*", metavar="RUN", help="SVD variation analysis of each run's checkpoints "
                   "against the base: RUN/analysis.csv and .png (no RUN: the run of --name)")
    g.add_argument("--report", nargs="*", metavar="RUN", help="a table of runs next to the paper's numbers, and "
                   "their training curves: OUT/report.md, report.csv, training_curves.png")
    g.add_argument("--out", metavar="DIR", help="where --report (default RUN_PATH/report) and a side-by-side "
                   "--analyze of several runs write")
    g.add_argument("--analysis-top-k", type=int, metavar="K", help="analyse only the top-K singular triplets")
    g = p.add_argument_group("planning (nothing is trained)")
    g.add_argument("--dry-run", action="store_true", help="print the run's plan without loading weights: target "
                   "layers, trainable parameters, memory per GPU (the four 7B models of the paper work offline)")
    g.add_argument("--gpus", type=int, metavar="N", help="with --dry-run: plan for N GPUs (default: WORLD_SIZE or 1)")
    return p


def resolve_config(argv: list[str] | None = None, require_action: bool = True):
    """The RunConfig of this call: defaults < saved run config < --config file < flags."""
    from sorsa.config import RunConfig, load_yaml

    cli = vars(build_parser().parse_args(argv))
    config_file = cli.pop("config", None)
    from_file = load_yaml(config_file) if config_file else {}
    unknown = sorted(set(from_file) - set(RunConfig.keys()))
    if unknown:
        raise UserError(f"{config_file}: unknown key(s) {unknown}; known keys: {', '.join(RunConfig.keys())}")
    merged = {**from_file, **cli}
    if require_action and not any(merged.get(a) for a in ACTIONS):
        raise UserError("nothing to do: give at least one of --train, --merge, --test, --analyze, --report, "
                        "--dry-run (or a --config that sets them)")
    # merge/test of an existing run start from the settings it was trained with
    run_path = merged.get("run_path", RunConfig.run_path)
    if merged.get("name") and not merged.get("train"):
        saved = Path(run_path) / merged["name"] / "config.yaml"
        if saved.is_file():
            base = {k: v for k, v in load_yaml(saved).items() if k not in ACTIONS and k in RunConfig.keys()}
            merged = {**base, **merged}
    if merged.get("rwkv") and "target_modules" not in merged:
        merged["target_modules"] = RWKV_TARGETS
    return RunConfig.from_mapping(merged, source=config_file or "command line")


def run_dir_of(cfg) -> Path:
    """RUN_PATH/NAME, refusing names that escape RUN_PATH."""
    if not cfg.name:
        raise UserError("--name is required (the run directory is RUN_PATH/NAME)")
    root = Path(cfg.run_path).resolve()
    path = (root / cfg.name).resolve()
    if path == root or root not in path.parents:
        raise UserError(f"--name {cfg.name!r} must stay inside --run-path {cfg.run_path}; use a plain name")
    return path


# ----------------------------------------------------------------------------- loading

def resolve_model_name(name: str, cfg) -> str:
    """A builtin name, an existing directory, or a hub id (checked for obvious path mistakes)."""
    if name.startswith("builtin:"):
        from sorsa.builtin import resolve_builtin

        return resolve_builtin(name, builtin_cache(cfg))
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep == "\\" and "\\" in name
    if looks_like_path and not Path(name).expanduser().exists():
        raise UserError(f"model path {name} does not exist; give an existing directory or a hub id like "
                        "meta-llama/Llama-2-7b-hf")
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def builtin_cache(cfg) -> Path:
    return Path(cfg.cache_path) if cfg.cache_path else Path(cfg.run_path) / ".builtin"


def resolve_data_file(path: str | None, cfg, split: str) -> str | None:
    """A local data file, or the file behind a builtin: name (materialised on first use)."""
    if path and path.startswith("builtin:"):
        from sorsa.builtin import resolve_builtin

        return resolve_builtin(path, builtin_cache(cfg), split=split)
    return path


def _hub_error(name: str, err: Exception) -> UserError:
    if Path(name).exists():
        return UserError(f"could not load {name}: {str(err).splitlines()[0]}")
    return UserError(f"could not reach model {name!r}: it is not a local directory and the Hugging Face Hub "
                     "could not be reached (offline?) or does not have it; download it where there is network "
                     f"(`huggingface-cli download {name} --local-dir DIR`) and pass --model DIR "
                     "(gated models also need HF_TOKEN)")


def _rwkv_local_path(name: str, cfg) -> str:
    """A local RWKV6 checkpoint (.pth or "-HF" directory); a hub id is downloaded (or found in the cache)."""
    if Path(name).exists():
        return name
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, cache_dir=cfg.cache_path, local_files_only=cfg.local)
    except Exception as err:  # offline, missing or gated: one line
        raise _hub_error(name, err) from None


def load_tokenizer(cfg, name: str | None = None):
    from transformers import AutoTokenizer

    name = resolve_model_name(name or cfg.tokenizer or cfg.model, cfg)
    if cfg.rwkv:
        from sorsa.rwkv6 import load_rwkv_tokenizer

        return load_rwkv_tokenizer(_rwkv_local_path(name, cfg))
    try:
        tok = AutoTokenizer.from_pretrained(name, cache_dir=cfg.cache_path, local_files_only=cfg.local,
                                            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(name, err) from None
    if tok.pad_token is None:  # Llama 2 has none; padding is masked out of loss and attention
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def load_model(cfg, dtype, name: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    name = resolve_model_name(name or cfg.model, cfg)
    if cfg.rwkv:
        from sorsa.rwkv6 import load_rwkv6

        model = load_rwkv6(_rwkv_local_path(name, cfg), dtype=dtype)
        return model.to("cuda") if torch.cuda.is_available() and not cfg.deepspeed else model
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, cache_dir=cfg.cache_path,
                                                     local_files_only=cfg.local,
                                                     trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(name, err) from None
    if torch.cuda.is_available() and not cfg.deepspeed:
        model = model.to("cuda")
    return model


def _dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


# ----------------------------------------------------------------------------- run records

def write_run_record(cfg, run_dir: Path):
    """The resolved config (config.yaml), package versions and the git commit (env.json)."""
    import importlib.metadata as md

    import yaml

    from sorsa.fileio import atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "datasets", "deepspeed", "sorsa"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    env = {"versions": versions, "git_commit": commit, "python": sys.version.split()[0], "argv": sys.argv}
    atomic_write_text(run_dir / "env.json", json.dumps(env, indent=2) + "\n")


# ----------------------------------------------------------------------------- train

TRAIN_DONE = "train_done.json"


def _prepare_train_dir(cfg, run_dir: Path) -> str | None:
    """Check the run directory's state; returns the checkpoint to resume from, if any."""
    ckpt_dir = run_dir / "checkpoints"
    checkpoints = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) \
        if ckpt_dir.is_dir() else []
    if cfg.overwrite:
        for sub in ("checkpoints", "adapter", "pissa_init", "merged", "eval", "lora_export", "model"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        (run_dir / TRAIN_DONE).unlink(missing_ok=True)
        return None
    if (run_dir / TRAIN_DONE).exists():
        raise UserError(f"run {cfg.name!r} has finished training ({run_dir}); pass --overwrite to train it again "
                        "or choose another --name")
    if checkpoints and not cfg.resume:
        raise UserError(f"run {cfg.name!r} has checkpoints up to {checkpoints[-1].name}; pass --resume to continue "
                        "it or --overwrite to start again")
    if cfg.resume and not checkpoints:
        print(f"[run] --resume: no checkpoint in {ckpt_dir} yet, starting from the beginning")
    return str(checkpoints[-1]) if cfg.resume and checkpoints else None


def init_distributed(cfg):
    """The accelerate state of a multi-process launch (torchrun, accelerate launch, deepspeed) or of a
    DeepSpeed run, created before anything else so the Trainer reuses it; None for one plain process.

    On a machine without CUDA the processes talk over gloo: the Trainer's `use_cpu` path would pick a
    CPU backend without DeepSpeed, so the state is made here, DeepSpeed-aware when --deepspeed is given.
    """
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not cfg.deepspeed:
        return None
    from accelerate import PartialState

    if cfg.deepspeed:
        if not Path(cfg.deepspeed).is_file():
            raise UserError(f"--deepspeed {cfg.deepspeed}: no such file; use one of configs/deepspeed/"
                            "zero2.json, zero3.json, zero3_offload.json or your own DeepSpeed JSON")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError("--deepspeed needs the deepspeed package: pip install -e '.[deepspeed]' "
                            "(DS_BUILD_OPS=0 builds its ops on first use)") from None
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        # one process without a launcher: DeepSpeed still wants a process group of one
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)
    if torch.cuda.is_available():
        return PartialState()
    # Without CUDA: gloo. DeepSpeed's CPU path wants cpu=False (accelerate then starts DeepSpeed's
    # process group); plain DDP wants cpu=True (otherwise accelerate leaves the processes unconnected).
    return PartialState(backend="gloo") if cfg.deepspeed else PartialState(cpu=True, backend="gloo")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_report_to(report_to: str):
    """--report-to none (default), tensorboard or wandb (also comma-separated), when installed."""
    import importlib.util

    for name in filter(None, (n.strip() for n in report_to.split(","))):
        if name not in ("none", "all") and importlib.util.find_spec(name) is None:
            raise UserError(f"--report-to {name}: the {name} package is not installed (pip install {name})")


def build_training_arguments(cfg, run_dir: Path, configured_state: bool = False):
    """The Trainer's arguments. With --deepspeed they also install DeepSpeed's config process-wide, which
    under ZeRO-3 makes a later `from_pretrained` load every weight already partitioned: build them
    before the model. `configured_state`: reuse the state made by `init_distributed`."""
    import torch

    from sorsa.trainer import SORSATrainingArguments

    _check_report_to(cfg.report_to)

    on_gpu = torch.cuda.is_available()
    return SORSATrainingArguments(
        output_dir=str(run_dir / "checkpoints"), gamma=cfg.gamma if cfg.peft == "sorsa" else 0.0,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.accum_steps,
        learning_rate=cfg.lr, weight_decay=cfg.wd, lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup if cfg.warmup < 1 else int(cfg.warmup),  # < 1: a ratio of the steps
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16", tf32=("tf32" in cfg.mix_precision) and on_gpu,
        activation_checkpointing=cfg.grad_cp, save_strategy="steps", save_steps=cfg.save_steps,
        logging_steps=cfg.logging_steps, report_to=cfg.report_to, seed=cfg.seed, data_seed=cfg.seed,
        use_cpu=not on_gpu, deepspeed=cfg.deepspeed, remove_unused_columns=False, disable_tqdm=False,
        dataloader_num_workers=0, save_only_model=False,
        ddp_find_unused_parameters=False,  # every adapter (and, for full, every weight) gets a gradient
        accelerator_config={"use_configured_state": True} if configured_state else None)


def prepare_model_for_training(cfg, model):
    """Inject the method's adapters (or leave every weight trainable for full fine-tuning)."""
    from sorsa import apply_sorsa
    from sorsa.baselines import apply_peft_baseline

    targets = cfg.target_modules or (RWKV_TARGETS if cfg.rwkv else DEFAULT_TARGETS)
    if cfg.peft == "sorsa":
        return apply_sorsa(model, cfg.sorsa_config(targets), svd_cache_dir=cfg.svd_cache_path)
    if cfg.peft in ("lora", "pissa"):
        return apply_peft_baseline(model, cfg.peft, cfg.rank, targets, cfg.dropout, cfg.svd, cfg.svd_niter)
    return model


def train(cfg, run_dir: Path):
    """Fine-tune and save the adapter, in one process or under torchrun / accelerate / deepspeed."""
    import contextlib

    import torch
    from transformers import set_seed

    from sorsa import format_parameter_summary, parameter_summary
    from sorsa.fileio import atomic_write_text, jsonl_text
    from sorsa.baselines import save_initial_pissa
    from sorsa.data import CausalLMCollator, load_train_dataset, tokenize_train_dataset
    from sorsa.trainer import SORSATrainer

    state = init_distributed(cfg)
    main_first = state.main_process_first if state is not None else contextlib.nullcontext
    is_main = state is None or state.is_main_process
    with main_first():  # the main process clears or checks the run directory before the others look
        resume_from = _prepare_train_dir(cfg, run_dir)
    set_seed(cfg.seed)
    with main_first():  # a builtin model and the tokenized data are built once and then read by all
        # Cheap checks first: a mistyped path or an unreachable hub model (through its tokenizer) fails
        # here, and a broken data file fails in a second, before a 7B model is loaded.
        tokenizer = load_tokenizer(cfg)
        dataset = load_train_dataset(cfg.train_dataset, cfg.split, resolve_data_file(cfg.train_file, cfg, "train"),
                                     cfg.cache_path)
        dataset = tokenize_train_dataset(dataset, tokenizer, cfg.train_dataset, cfg.length)
    # The arguments before the model: under ZeRO-3 they make from_pretrained load the weights partitioned.
    args = build_training_arguments(cfg, run_dir, configured_state=state is not None)
    # Full fine-tuning keeps float32 master weights; the adapter methods load the frozen base in the
    # compute precision (the paper: bf16 residual) and keep their adapters in float32.
    model = load_model(cfg, torch.float32 if cfg.peft == "full" else _dtype(cfg.precision))
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    if cfg.deepspeed and torch.cuda.is_available() and not partitioned:
        model = model.to(state.device)  # ZeRO-1/2: decompose on the GPU; DeepSpeed would move it there anyway
    if is_main:
        write_run_record(cfg, run_dir)
        if partitioned:
            print(f"[run] ZeRO-3: the base weights were loaded partitioned over {state.num_processes} ranks; "
                  "each weight is gathered whole only while it is decomposed")
    model = prepare_model_for_training(cfg, model)
    if cfg.grad_cp and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    trainable = parameter_summary(model)["trainable"]
    if is_main:
        print(f"[run] {cfg.peft} on {cfg.model}: {format_parameter_summary(model)}")
        if cfg.peft == "pissa" and resume_from is None:
            save_initial_pissa(model, run_dir / "pissa_init")
    trainer = SORSATrainer(model=model, args=args, train_dataset=dataset,
                           data_collator=CausalLMCollator(tokenizer.pad_token_id))
    trainer.train(resume_from_checkpoint=resume_from)
    save_trained(cfg, run_dir, trainer, tokenizer)
    if cfg.deepspeed:  # a merge or test in this process loads plain, whole models again
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    if trainer.is_world_process_zero():
        history = trainer.state.log_history
        atomic_write_text(run_dir / "train_log.jsonl", jsonl_text(history))
        # per-step losses as logged; a run shorter than --logging-steps has only the Trainer's mean
        losses = [r["loss"] for r in history if "loss" in r] or [r["train_loss"] for r in history if "train_loss" in r]
        summary = {"steps": trainer.state.global_step, "trainable_params": trainable,
                   "first_loss": losses[0] if losses else None,
                   "last_loss": losses[-1] if losses else None, "world_size": trainer.args.world_size,
                   "deepspeed": cfg.deepspeed}
        atomic_write_text(run_dir / TRAIN_DONE, json.dumps(summary, indent=2) + "\n")
        print(f"[run] trained {summary['steps']} steps: loss {summary['first_loss']} -> {summary['last_loss']}; "
              f"adapter in {run_dir / ('model' if cfg.peft == 'full' else 'adapter')}")
    return model


def save_trained(cfg, run_dir: Path, trainer, tokenizer):
    """The trained adapter (or model) into RUN/adapter (RUN/model); every rank calls this (under DeepSpeed
    the float32 master weights are gathered collectively), the main process writes."""
    from sorsa.baselines import save_peft_adapter

    if cfg.peft == "sorsa":
        trainer.save_sorsa_adapter(str(run_dir / "adapter"), metadata={"base_model": cfg.model})
    elif cfg.peft in ("lora", "pissa"):
        with trainer.full_trainable_parameters():
            if trainer.is_world_process_zero():
                save_peft_adapter(trainer.model, run_dir / "adapter",
                                  run_dir / "pissa_init" if cfg.peft == "pissa" else None)
    else:
        trainer.save_model(str(run_dir / "model"))  # DeepSpeed: its 16-bit consolidation (ZeRO-3 config)
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(run_dir / "model")


# ----------------------------------------------------------------------------- merge

def merge(cfg, run_dir: Path):
    """Fold the run's adapter into its base model and write RUN/merged/ (a plain HF checkpoint)."""
    import torch

    from sorsa import export_lora, load_adapter, merge_and_unload

    if not (run_dir / TRAIN_DONE).exists():
        raise UserError(f"run {cfg.name!r} has no finished training in {run_dir}; run --train first")
    out = run_dir / "merged"
    tmp = run_dir / "merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = load_tokenizer(cfg)
    if cfg.peft == "full":
        model = load_model(cfg, torch.float32, name=str(run_dir / "model"))
    else:
        # The base is loaded in the dtype it was trained in, so W_res is re-derived bit for bit;
        # the merge itself is computed in float32 and cast back to that dtype.
        model = load_model(cfg, _dtype(cfg.precision))
        if cfg.peft == "sorsa":
            model = load_adapter(model, run_dir / "adapter")
            if cfg.export_lora:
                export_lora(model, run_dir / "lora_export", base_model_name_or_path=cfg.model)
                print(f"[run] wrote the PEFT LoRA form (rank {2 * cfg.rank}) to {run_dir / 'lora_export'}")
            model = merge_and_unload(model)
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(run_dir / "adapter")).merge_and_unload()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if cfg.rwkv:  # also the official layout, which the `rwkv` inference package reads
        model.save_rwkv_checkpoint(tmp / "model.pth")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"[run] merged model written to {out}")
    return out


# ----------------------------------------------------------------------------- test

def test(cfg, run_dir: Path):
    """Generate greedily on cfg.test_dataset and score it into RUN/eval/<dataset>/ (resumable)."""
    from eval.generate import make_generator, resolve_backend
    from eval.runner import MAX_NEW_TOKENS, STOP_STRINGS, evaluate

    if (run_dir / "merged").is_dir():
        model_path = str(run_dir / "merged")
    elif (run_dir / TRAIN_DONE).exists():
        raise UserError(f"run {cfg.name!r} is trained but not merged; run --merge first (or add --merge)")
    else:  # no trained run of this name: score --model itself
        model_path = resolve_model_name(cfg.model, cfg)
    dataset = cfg.test_dataset
    test_file = resolve_data_file(cfg.test_file, cfg, "test")
    max_new_tokens = cfg.max_new_tokens or MAX_NEW_TOKENS[dataset]
    backend = "rwkv" if cfg.rwkv else resolve_backend(cfg.backend)
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[cfg.test_precision]
    try:
        generate = make_generator(model_path, backend=backend, max_new_tokens=max_new_tokens,
                                  batch_size=cfg.valid_batch_size, stop=STOP_STRINGS[dataset], dtype=dtype,
                                  trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise _hub_error(model_path, err) from None
    settings = {"model": model_path, "backend": backend, "max_new_tokens": max_new_tokens,
                "precision": cfg.test_precision, "test_file": test_file, "greedy": True}
    results = evaluate(dataset, run_dir / "eval" / dataset, generate, test_file=test_file, limit=cfg.limit,
                       settings=settings)
    print(f"[run] {dataset}: accuracy {100 * results['accuracy']:.2f}% ({results['correct']}/{results['total']}); "
          f"results in {run_dir / 'eval' / dataset / 'results.json'}")
    return results


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    try:
        jobs, argv = _split_job_flags(sys.argv[1:] if argv is None else list(argv))
        if jobs.dry_run:  # a plan of the training run: --train is implied
            cfg = resolve_config(argv if any(a in argv for a in ("-t", "--train")) else argv + ["--train"])
            dry_run(cfg, jobs.gpus)
            return 0
        reporting = jobs.analyze is not None or jobs.report is not None
        cfg = resolve_config(argv, require_action=not reporting)
        if cfg.test and not cfg.name:  # scoring --model directly: a run named after the model
            cfg.name = "eval-" + re.sub(r"[^A-Za-z0-9._-]+", "_", cfg.model.strip("/")).strip("._")[-80:]
        run_dir = run_dir_of(cfg) if (cfg.train or cfg.merge or cfg.test) else None
        if cfg.train:
            train(cfg, run_dir)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0  # under a multi-process launcher, merge, test and reports run once, on the main process
        if cfg.merge:
            merge(cfg, run_dir)
        if cfg.test:
            test(cfg, run_dir)
        if reporting:
            analyze_and_report(cfg, jobs)
    except Exception as err:  # bad input is one readable line; set SORSA_DEBUG=1 for the traceback
        if os.environ.get("SORSA_DEBUG") or not _is_user_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _split_job_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The flags that are jobs rather than run settings (--dry-run, --gpus, --analyze, --report, --out,
    --analysis-top-k), and the remaining arguments; the `deepspeed` launcher's --local_rank=N is dropped
    (LOCAL_RANK in the environment says the same)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--gpus", type=int, default=None)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)
    parser.add_argument("--analyze", nargs="*", default=None)
    parser.add_argument("--report", nargs="*", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--analysis-top-k", type=int, default=None)
    jobs, rest = parser.parse_known_args(argv)
    if jobs.gpus is not None and jobs.gpus < 1:
        raise UserError(f"--gpus {jobs.gpus}: give a number of GPUs >= 1")
    jobs.gpus = jobs.gpus or int(os.environ.get("WORLD_SIZE", "1"))
    return jobs, rest


def _run_dirs(names: list[str], cfg) -> list[Path]:
    """Run directories from names under --run-path or paths; no names: the run of --name."""
    if not names:
        if not cfg.name:
            raise UserError("--analyze / --report without a RUN need --name (or give run names or directories)")
        names = [cfg.name]
    dirs = []
    for name in names:
        path = Path(name) if Path(name).is_dir() else run_dir_of(dataclasses.replace(cfg, name=name))
        if not (path / "config.yaml").is_file():
            raise UserError(f"{path} is not a run directory (no config.yaml); train it with run.py first")
        dirs.append(path)
    return dirs


def analyze_and_report(cfg, jobs):
    """--analyze and --report (sorsa/analysis.py, sorsa/report.py) on the runs named."""
    if jobs.analyze is not None:
        from sorsa.analysis import analyze_main

        runs = _run_dirs(jobs.analyze, cfg)
        out = jobs.out if len(runs) > 1 else None
        files = analyze_main(runs, out_dir=out, top_k=jobs.analysis_top_k)
        print("[run] analysis written: " + ", ".join(map(str, files)))
    if jobs.report is not None:
        from sorsa.report import report_main

        runs = _run_dirs(jobs.report, cfg)
        files = report_main(runs, jobs.out or Path(cfg.run_path) / "report")
        print("[run] report written: " + ", ".join(map(str, files)))


def dry_run(cfg, gpus: int = 1):
    """Print the plan of cfg's training run (sorsa/planner.py): built on the meta device, no weights read."""
    from sorsa.planner import format_plan, plan_run

    targets = cfg.target_modules or (RWKV_TARGETS if cfg.rwkv else DEFAULT_TARGETS)
    model = cfg.model if cfg.model.startswith("builtin:") or not Path(cfg.model).expanduser().exists() \
        else str(Path(cfg.model).expanduser())
    plan = plan_run(model, method=cfg.peft, rank=cfg.rank, target_modules=targets, rwkv=cfg.rwkv,
                    batch_size=cfg.batch_size, accum_steps=cfg.accum_steps, length=cfg.length,
                    precision=cfg.precision, grad_cp=cfg.grad_cp, deepspeed=cfg.deepspeed, gpus=gpus,
                    trust_remote_code=cfg.trust_remote_code)
    print(format_plan(plan))
    return plan


def _is_user_error(err: Exception) -> bool:
    from sorsa.data import DataError

    return isinstance(err, (UserError, DataError, ValueError, FileNotFoundError))


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Two-rank gloo runs sometimes abort at interpreter exit ("terminate called without an
        # active exception"); flushing and leaving at once avoids it.
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
