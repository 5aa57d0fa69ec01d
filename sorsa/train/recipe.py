"""The jobs as library calls on a `RunConfig`: train, merge, test and validate a run.

    from sorsa.train import recipe
    cfg = recipe.resolve_config({"model": "builtin:tiny-llama", "name": "demo", "train": True})
    recipe.train(cfg); recipe.merge(cfg); recipe.test(cfg)

Each job works on the run directory RUN_PATH/NAME (sorsa/train/runs.py), holds its lock while it writes there, and
leaves earlier files as they were when it stops with an error. The recipe orchestrates: what a method does (prepare,
save, reload, merge) is the method's (sorsa/methods/), what a task does (data, model class, measurement) is the
task's (sorsa/train/task.py). The command line (sorsa/cli.py) only parses flags and calls these.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
from pathlib import Path

import torch

from ..core.distributed import is_partitioned
from ..core.dtypes import precision_dtype
from ..core.errors import UserError
from ..core.targets import default_targets, targets_of
from ..eval.measurement import RESULTS
from ..methods import get_method
from ..tasks.glue import is_glue
from .loading import hub_error, load_model, load_tokenizer, resolve_data_file, resolve_model_name
from .runs import CONFIG, RunDir, run_dir
from .settings import RunConfig, load_yaml
from .task import measurement_of, test_task, training_task

ACTIONS = ("train", "merge", "test")


def resolve_config(overrides: dict, config_file: str | None = None, require_action: bool = True) -> RunConfig:
    """The RunConfig of a call: defaults < the run's saved config (merge/test of an existing run) <
    `config_file` < `overrides` (the flags given)."""
    from_file = load_yaml(config_file) if config_file else {}
    unknown = sorted(set(from_file) - set(RunConfig.keys()))
    if unknown:
        raise UserError(f"{config_file}: unknown key(s) {unknown}; known keys: {', '.join(RunConfig.keys())}")
    merged = {**from_file, **overrides}
    if require_action and not any(merged.get(a) for a in ACTIONS):
        raise UserError("nothing to do: give at least one of --train, --merge, --test, --analyze, --report, "
                        "--dry-run (or a --config that sets them)")
    if merged.get("name") and not merged.get("train"):  # merge/test start from the settings the run was trained with
        run = run_dir(merged.get("run_path", RunConfig.run_path), merged["name"])
        if run.is_run():
            saved = {k: v for k, v in run.read_config().items() if k not in ACTIONS and k in RunConfig.keys()}
            merged = {**saved, **merged}
    if merged.get("rwkv") and "target_modules" not in merged:
        merged["target_modules"] = default_targets(rwkv=True)
    if is_glue(merged.get("train_dataset")) and "test_dataset" not in merged:
        merged["test_dataset"] = merged["train_dataset"]  # a GLUE classifier is scored on its own task
    cfg = RunConfig.from_mapping(merged, source=config_file or "command line")
    if cfg.test and not cfg.name:  # scoring --model directly: a run named after the model
        cfg.name = "eval-" + re.sub(r"[^A-Za-z0-9._-]+", "_", cfg.model.strip("/")).strip("._")[-80:]
    return cfg


# ----------------------------------------------------------------------------- train

def train(cfg: RunConfig) -> dict:
    """Fine-tune and save the adapter (or model) into RUN/, in one process or under torchrun / accelerate /
    deepspeed. Returns the summary that the completion marker records."""
    from transformers import set_seed

    from .launch import init_distributed

    run = run_dir(cfg.run_path, cfg.name)
    state = init_distributed(cfg.deepspeed)
    main_first = state.main_process_first if state is not None else contextlib.nullcontext
    is_main = state is None or state.is_main_process
    with run.locked("train") if is_main else contextlib.nullcontext():
        set_seed(cfg.seed)
        with main_first():  # a builtin model and the tokenized data are built once and then read by all
            resume_from = _check_train_dir(cfg, run)
            # Cheap checks first: a mistyped path or an unreachable hub model (through its tokenizer) fails
            # here, and a broken data file fails in a second, before a 7B model is loaded.
            tokenizer, dataset = _training_data(cfg)
            if cfg.overwrite and is_main:  # only now that the new run's inputs are known to be good
                run.clear_training()
        # The arguments before the model: under ZeRO-3 they make from_pretrained load the weights partitioned.
        args = build_training_arguments(cfg, run, configured_state=state is not None)
        model = _load_for_training(cfg, state)
        if is_main:
            run.write_records(cfg.to_dict())
        trainer = _build_trainer(cfg, run, model, args, tokenizer, dataset, is_main and resume_from is None)
        trainer.train(resume_from_checkpoint=resume_from)
        get_method(cfg.peft).save(trainer, run, cfg, tokenizer)
        if cfg.deepspeed:  # a merge or test in this process loads plain, whole models again
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        return _finish_training(cfg, run, trainer) if trainer.is_world_process_zero() else {}


def _check_train_dir(cfg: RunConfig, run: RunDir) -> str | None:
    """Check the run directory's state; returns the checkpoint to resume from, if any."""
    if cfg.overwrite:
        return None
    checkpoints = run.checkpoints()
    if run.is_done():
        raise UserError(f"run {cfg.name!r} has finished training ({run.path}); pass --overwrite to train it again "
                        "or choose another --name")
    if checkpoints and not cfg.resume:
        raise UserError(f"run {cfg.name!r} has checkpoints up to {checkpoints[-1][1].name}; pass --resume to "
                        "continue it or --overwrite to start again")
    changed = _changed_training_settings(cfg, run) if checkpoints else []
    if changed:  # its checkpoints were trained otherwise: continuing them would mix two runs
        raise UserError(f"run {cfg.name!r} has checkpoints trained with other settings ({', '.join(changed)} "
                        f"differ from its {CONFIG}); resume with the same settings (e.g. the same --config and "
                        "flags) or pass --overwrite to start again")
    if cfg.resume and not checkpoints:
        print(f"[run] --resume: no checkpoint in {run.checkpoints_dir} yet, starting from the beginning")
    return str(checkpoints[-1][1]) if cfg.resume and checkpoints else None


def _changed_training_settings(cfg: RunConfig, run: RunDir) -> list[str]:
    """The settings that decide training (RunConfig.training_settings) in which `cfg` differs from the run's
    saved config.yaml; [] when it has none."""
    if not run.is_run():
        return []
    saved = run.read_run_config().training_settings()
    return sorted(k for k, v in cfg.training_settings().items() if saved.get(k) != v)


def _training_data(cfg: RunConfig, validation: bool = False):
    """The tokenizer and the tokenized training rows (`validation`: the rows --val-size held out instead)."""
    tokenizer = load_tokenizer(cfg)
    return tokenizer, training_task(cfg).tokenize(training_rows(cfg, validation), tokenizer, cfg)


def training_rows(cfg: RunConfig, validation: bool = False):
    """The run's training rows, untokenized: the dataset (or file) and slice it names, less the --val-size rows
    held out (`validation`: those rows instead; a GLUE task has none)."""
    train_file = resolve_data_file(cfg.train_file, cfg.cache_path, cfg.run_path, "train")
    return training_task(cfg).rows(cfg, train_file, validation)


def _load_for_training(cfg: RunConfig, state):
    """The base model with the method's trainable parts. The base loads in the method's dtype (the adapter methods:
    the compute precision, the paper's bf16 residual, adapters float32; full fine-tuning: float32 masters); with
    --quantize the base streams in layer by layer and only its quantized form is kept (sorsa/core/quant_model.py)."""
    if cfg.quantize:
        model = _quantized_model(cfg)
    else:
        model = load_model(cfg, get_method(cfg.peft).base_dtype(cfg))
        partitioned = any(is_partitioned(p) for p in model.parameters())
        if cfg.deepspeed and torch.cuda.is_available() and not partitioned:
            model = model.to(state.device)  # ZeRO-1/2: decompose on the GPU; DeepSpeed would move it there anyway
        if partitioned and state.is_main_process:
            print(f"[run] ZeRO-3: the base weights were loaded partitioned over {state.num_processes} ranks; "
                  "each weight is gathered whole only while it is decomposed")
        model = prepare_model_for_training(cfg, model)
    if cfg.grad_cp and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    return model


def _quantized_model(cfg: RunConfig, run: RunDir | None = None):
    """The method over the streamed quantized base (QSORSA, QPiSSA, QLoRA); with `run`, the run's trained model
    rebuilt from what it saved, as at training."""
    from transformers import AutoConfig

    from ..core.quant import bitsandbytes
    from .loading import local_snapshot

    bitsandbytes()  # one clear error when it is missing
    model_dir = Path(local_snapshot(resolve_model_name(cfg.model, cfg.cache_path, cfg.run_path), cfg.cache_path,
                                    cfg.local))
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    targets = targets_of(cfg, getattr(config, "model_type", None))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return get_method(cfg.peft).load_quantized(model_dir, cfg, targets, device, run=run)


def prepare_model_for_training(cfg: RunConfig, model):
    """The method's trainable parts on the run's targets (a GLUE classifier: on the encoder, its head trained fully)."""
    targets = targets_of(cfg, getattr(model.config, "model_type", None))
    return training_task(cfg).prepare(get_method(cfg.peft), model, cfg, targets)


def _build_trainer(cfg: RunConfig, run: RunDir, model, args, tokenizer, dataset, fresh_main: bool):
    from ..core.model import format_parameter_summary
    from .trainer import SORSATrainer

    if fresh_main:
        print(f"[run] {cfg.peft} on {cfg.model}: {format_parameter_summary(model)}")
        get_method(cfg.peft).on_fresh_start(model, run)
    trainer_class = SORSATrainer
    if cfg.deepspeed:  # the regularizer through the loss, and the float32 masters saved (trainer_deepspeed.py)
        from .trainer_deepspeed import DeepSpeedSORSATrainer as trainer_class
    return trainer_class(model=model, args=args, train_dataset=dataset,
                         data_collator=training_task(cfg).collator(tokenizer))


def _finish_training(cfg: RunConfig, run: RunDir, trainer) -> dict:
    """The training log and the completion marker (main process)."""
    from ..core.model import parameter_summary

    history = trainer.state.log_history
    run.write_train_log(history)
    # per-step losses as logged; a run shorter than --logging-steps has only the Trainer's mean
    losses = [r["loss"] for r in history if "loss" in r] or [r["train_loss"] for r in history if "train_loss" in r]
    method = get_method(cfg.peft)
    summary = {"steps": trainer.state.global_step,
               "trainable_params": parameter_summary(trainer.model)["trainable"],
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "world_size": trainer.args.world_size, "deepspeed": cfg.deepspeed, **_efficiency(run, method, trainer)}
    run.mark_done(summary, cfg.training_settings())
    print(f"[run] trained {summary['steps']} steps: loss {summary['first_loss']} -> {summary['last_loss']}; "
          f"{method.describe_result()} in {run.trained_dir(method)}")
    return summary


def _efficiency(run: RunDir, method, trainer) -> dict:
    """PEFT's efficiency columns for the completion marker: peak memory (CUDA's peak allocation on a GPU, else the
    process's resident high-water mark), input tokens per second of training, and the size of what training saved."""
    runtime = next((r["train_runtime"] for r in reversed(trainer.state.log_history) if "train_runtime" in r), None)
    tokens = trainer.state.num_input_tokens_seen
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    saved = run.trained_dir(method)
    # the weights' size (PEFT's "file size"): the JSON beside them records the run's history, not its result
    size = sum(f.stat().st_size for f in saved.rglob("*.safetensors")) if saved.is_dir() else None
    return {"peak_memory_mib": round(peak, 1), "tokens_per_second": tokens / runtime if tokens and runtime else None,
            "saved_bytes": size}


def _check_report_to(report_to: str):
    """--report-to none (default), tensorboard or wandb (also comma-separated), when installed."""
    for name in filter(None, (n.strip() for n in report_to.split(","))):
        if name not in ("none", "all") and importlib.util.find_spec(name) is None:
            raise UserError(f"--report-to {name}: the {name} package is not installed (pip install {name})")


def build_training_arguments(cfg: RunConfig, run: RunDir, configured_state: bool = False):
    """The Trainer's arguments. With --deepspeed they also install DeepSpeed's config process-wide, which
    under ZeRO-3 makes a later `from_pretrained` load every weight already partitioned: build them
    before the model. `configured_state`: reuse the state made by `init_distributed`."""
    from .trainer import SORSATrainingArguments

    _check_report_to(cfg.report_to)
    on_gpu = torch.cuda.is_available()
    return SORSATrainingArguments(
        output_dir=str(run.checkpoints_dir), gamma=get_method(cfg.peft).training_gamma(cfg),
        loss_normalization=cfg.loss_normalization,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.accum_steps,
        learning_rate=cfg.lr, weight_decay=cfg.wd, lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup if cfg.warmup < 1 else int(cfg.warmup),  # < 1: a ratio of the steps
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16", tf32=("tf32" in cfg.mix_precision) and on_gpu,
        activation_checkpointing=cfg.grad_cp, save_strategy="steps", save_steps=cfg.save_steps,
        logging_steps=cfg.logging_steps, report_to=cfg.report_to, seed=cfg.seed, data_seed=cfg.seed,
        use_cpu=not on_gpu, deepspeed=cfg.deepspeed, remove_unused_columns=False, disable_tqdm=False,
        dataloader_num_workers=0, save_only_model=False, include_num_input_tokens_seen=True,
        ddp_find_unused_parameters=False,  # every adapter (and, for full, every weight) gets a gradient
        accelerator_config={"use_configured_state": True} if configured_state else None)


# ----------------------------------------------------------------------------- merge

def merge(cfg: RunConfig) -> Path:
    """Fold the run's adapter into its base model and write RUN/merged/ (a plain HF checkpoint)."""
    run = run_dir(cfg.run_path, cfg.name)
    if not run.is_done():
        raise UserError(f"run {cfg.name!r} has no finished training in {run.path}; run --train first")
    with run.locked("merge"):
        tmp = run.path / "merged.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = load_tokenizer(cfg)
        model = merged_model(cfg, run)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cfg.rwkv:  # also the official layout, which the `rwkv` inference package reads
            model.save_rwkv_checkpoint(tmp / "model.pth")
        shutil.rmtree(run.merged_dir, ignore_errors=True)
        os.replace(tmp, run.merged_dir)
    print(f"[run] merged model written to {run.merged_dir}")
    return run.merged_dir


def merged_model(cfg: RunConfig, run: RunDir):
    """The trained model of a run with its adapter folded in (and, with --export-lora, the LoRA form written).

    The base is loaded in the dtype it was trained in, so a residual is re-derived bit for bit; the merge itself is
    computed in float32 and cast back to that dtype. A quantized run is rebuilt as at training and merged into
    deq(W_q) + adapter."""
    method = get_method(cfg.peft)
    if cfg.quantize:
        model = _quantized_model(cfg, run)
    else:
        source = method.trained_weights_dir(run)
        model = method.load_trained(load_model(cfg, method.base_dtype(cfg), name=source and str(source)), run)
    if cfg.export_lora:
        if method.export_lora(model, run.lora_export_dir, cfg.model):
            print(f"[run] wrote the PEFT LoRA form (rank {2 * cfg.rank}) to {run.lora_export_dir}")
        else:
            print(f"[run] --export-lora: {method.label} has no LoRA form beside what it saved in "
                  f"{run.trained_dir(method)}")
    return method.dequantize(model, precision_dtype(cfg.precision)) if cfg.quantize else method.merge(model)


def _trained_model(cfg: RunConfig, run: RunDir):
    """The run's trained model with its adapter folded in: read from RUN/merged when --merge wrote it (in the
    dtype merge wrote it in), else merged in memory (`merged_model`)."""
    if not run.merged_dir.is_dir():
        return merged_model(cfg, run)
    return load_model(cfg, get_method(cfg.peft).base_dtype(cfg), name=str(run.merged_dir))


# ----------------------------------------------------------------------------- test

def test(cfg: RunConfig) -> dict:
    """Generate greedily on cfg.test_dataset (or, for a GLUE task, classify) and score it into
    RUN/eval/<dataset>/ (resumable); a measurement with other settings (another test file, length,
    precision...) gets its own folder beside it."""
    from ..eval.benchmarks import get_benchmark
    from ..eval.runner import evaluate

    run = run_dir(cfg.run_path, cfg.name)
    model_path = _model_to_score(cfg, run)  # the run is checked first: cheap, and it names the run
    dataset = cfg.test_dataset
    task = test_task(cfg, trained=run.is_done())
    test_file = resolve_data_file(cfg.test_file, cfg.cache_path, cfg.run_path, "test")
    get_benchmark(dataset).load_examples(test_file)  # a broken test file fails here, before a model is loaded
    measure = task.measurement(cfg, dataset, model_path, test_file)
    make_predictor = task.predictor(cfg, measure)
    with run.locked("test"):
        out_dir = run.eval_dir(dataset, measure.settings)
        try:
            predict = make_predictor()
        except OSError as err:
            raise hub_error(model_path, err) from None
        results = evaluate(dataset, out_dir, predict, test_file=test_file, limit=cfg.limit, settings=measure.settings)
    shown = results.get("metric") != "accuracy" and results.get("score") is not None  # CoLA's MCC, STS-B's Pearson
    headline = f"{results['metric']} {100 * results['score']:.2f}, " if shown else ""
    print(f"[run] {dataset}: {headline}accuracy {100 * results['accuracy']:.2f}% ({results['correct']}/"
          f"{results['total']}); results in {out_dir / RESULTS}")
    return results


def _model_to_score(cfg: RunConfig, run: RunDir) -> str:
    """The model a --test scores: the run's merged model; without a trained run of this name, --model itself
    (which must exist locally or be reachable)."""
    if run.merged_dir.is_dir():
        return str(run.merged_dir)
    if run.is_done():
        raise UserError(f"run {cfg.name!r} is trained but not merged; run --merge first (or add --merge)")
    name = resolve_model_name(cfg.model, cfg.cache_path, cfg.run_path)
    if not Path(name).exists():  # a hub id: reachable (or cached)? One line now, not after the test data
        from .loading import local_snapshot

        try:
            local_snapshot(name, cfg.cache_path, cfg.local, allow_patterns=["config.json"])
        except UserError as err:
            raise type(err)(f"no trained run {cfg.name!r} in {cfg.run_path}, and {err}") from None
    return name


def measurement_settings(cfg: RunConfig, dataset: str, model_path: str, test_file: str | None) -> dict:
    """What a measurement of `dataset` depends on: the settings its results.json records and its eval folder
    (RunDir.eval_dir) is keyed by (sorsa.eval.measurement; sorsa.train.task says which for a run)."""
    return measurement_of(cfg, dataset, model_path, test_file).settings


# ----------------------------------------------------------------------------- validation

def validation_loss(cfg: RunConfig) -> dict:
    """The trained run's mean cross-entropy per response token on its validation rows (the --val-size rows held
    out of the training data, tokenized as for training), with the adapter folded in, in the training
    precision. Returns {"val_loss", "val_rows", "val_tokens"}."""
    import torch.nn.functional as F

    from ..tasks.data import IGNORE_INDEX, CausalLMCollator

    run = run_dir(cfg.run_path, cfg.name)
    if not cfg.val_size:
        raise UserError(f"run {cfg.name!r} has no validation split; set --val-size (rows or a fraction)")
    if not run.is_done():
        raise UserError(f"run {cfg.name!r} has no finished training in {run.path}; run --train first")
    tokenizer, rows = _training_data(cfg, validation=True)
    collate = CausalLMCollator(tokenizer.pad_token_id)
    total, tokens = 0.0, 0
    with run.locked("validate"):
        model = _trained_model(cfg, run).eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            for start in range(0, len(rows), cfg.valid_batch_size):
                batch = collate([rows[i] for i in range(start, min(start + cfg.valid_batch_size, len(rows)))])
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits.float()  # (B, T, V)
                labels = batch["labels"][:, 1:].to(device)  # position t predicts token t + 1
                total += F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                         reduction="sum").item()
                tokens += int((labels != IGNORE_INDEX).sum())
    return {"val_loss": total / max(tokens, 1), "val_rows": len(rows), "val_tokens": tokens}


# ----------------------------------------------------------------------------- forgetting on general text

def text_loss(cfg: RunConfig, text_file: str, tokens: int, length: int, trained: bool = True) -> dict:
    """The mean cross-entropy (nats per token) of the run's trained model (merged), or with `trained=False` of the
    base model cfg.model, on the first `tokens` tokens of `text_file` in rows of `length` (sorsa.eval.text_loss);
    recorded in RUN/text_loss/ and reused when asked again with the same settings."""
    import json

    from ..core.fileio import atomic_write_text
    from ..eval.text_loss import mean_cross_entropy, text_rows

    run = run_dir(cfg.run_path, cfg.name)
    record, settings, text = text_loss_record(cfg, text_file, tokens, length, trained)
    if record.is_file():
        return json.loads(record.read_text())
    with run.locked("text-loss"):
        model = (_trained_model(cfg, run) if trained else load_model(cfg, precision_dtype(cfg.test_precision))).eval()
        rows = text_rows(load_tokenizer(cfg), text, tokens, length)
        loss, count = mean_cross_entropy(model, rows, cfg.valid_batch_size)
    result = {"cross_entropy": loss, "tokens": count, "settings": settings}
    atomic_write_text(record, json.dumps(result, indent=2) + "\n")
    return result


def text_loss_record(cfg: RunConfig, text_file: str, tokens: int, length: int, trained: bool = True):
    """(the record file, its settings, the text) of a `text_loss` measurement; the record may not exist yet."""
    import hashlib

    from ..core.records import settings_hash

    run = run_dir(cfg.run_path, cfg.name)
    if trained and not run.is_done():
        raise UserError(f"run {cfg.name!r} has no finished training in {run.path}; run --train first")
    text = Path(resolve_data_file(text_file, cfg.cache_path, cfg.run_path, "test")).read_text(encoding="utf-8")
    model_id = str(run.merged_dir) if trained else resolve_model_name(cfg.model, cfg.cache_path, cfg.run_path)
    # a record belongs to one training of the run: its completion marker (settings and summary) is in the key
    settings = {"model": model_id, "trained": settings_hash(run.read_done()) if trained else None,
                "text": text_file, "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "tokens": tokens,
                "length": length, "precision": cfg.test_precision}
    return run.text_loss_file(settings), settings, text
