"""The jobs as library calls on a `RunConfig`: train, merge, test, analyze, report and plan (dry run).

    from sorsa.config import RunConfig
    from sorsa import recipe
    cfg = recipe.resolve_config({"model": "builtin:tiny-llama", "name": "demo", "train": True})
    recipe.train(cfg); recipe.merge(cfg); recipe.test(cfg)

Each job works on the run directory RUN_PATH/NAME (sorsa/runs.py), holds its lock while it writes there,
and leaves earlier files as they were when it stops with an error. `run.py` only parses flags and calls these.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
from pathlib import Path

import torch

from .config import RunConfig, dtype_name, load_yaml
from .distributed import is_partitioned
from .glue import glue_task, is_glue
from .loading import hub_error, load_model, load_tokenizer, precision_dtype, resolve_data_file, resolve_model_name
from .runs import CONFIG, RESULTS, RunDir, run_dir
from .targets import default_targets, targets_of

ACTIONS = ("train", "merge", "test")


def resolve_config(overrides: dict, config_file: str | None = None, require_action: bool = True) -> RunConfig:
    """The RunConfig of a call: defaults < the run's saved config (merge/test of an existing run) <
    `config_file` < `overrides` (the flags given)."""
    from_file = load_yaml(config_file) if config_file else {}
    unknown = sorted(set(from_file) - set(RunConfig.keys()))
    if unknown:
        raise ValueError(f"{config_file}: unknown key(s) {unknown}; known keys: {', '.join(RunConfig.keys())}")
    merged = {**from_file, **overrides}
    if require_action and not any(merged.get(a) for a in ACTIONS):
        raise ValueError("nothing to do: give at least one of --train, --merge, --test, --analyze, --report, "
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

    from .distributed import init_distributed

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
        save_trained(cfg, run, trainer, tokenizer)
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
        raise ValueError(f"run {cfg.name!r} has finished training ({run.path}); pass --overwrite to train it again "
                         "or choose another --name")
    if checkpoints and not cfg.resume:
        raise ValueError(f"run {cfg.name!r} has checkpoints up to {checkpoints[-1][1].name}; pass --resume to "
                         "continue it or --overwrite to start again")
    changed = _changed_training_settings(cfg, run) if checkpoints else []
    if changed:  # its checkpoints were trained otherwise: continuing them would mix two runs
        raise ValueError(f"run {cfg.name!r} has checkpoints trained with other settings ({', '.join(changed)} "
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
    from .data import tokenize_train_dataset

    tokenizer = load_tokenizer(cfg)
    rows = training_rows(cfg, validation)
    if is_glue(cfg.train_dataset):  # sequence classification (sorsa/glue.py)
        from .glue import tokenize_glue

        return tokenizer, tokenize_glue(rows, tokenizer, cfg.train_dataset, cfg.length)
    return tokenizer, tokenize_train_dataset(rows, tokenizer, cfg.train_dataset, cfg.length)


def training_rows(cfg: RunConfig, validation: bool = False):
    """The run's training rows, untokenized: the dataset (or file) and slice it names, less the --val-size rows
    held out (`validation`: those rows instead; a GLUE task has none)."""
    from .data import load_train_dataset, split_validation

    train_file = resolve_data_file(cfg.train_file, cfg.cache_path, cfg.run_path, "train")
    if is_glue(cfg.train_dataset):
        from .glue import load_glue_train

        return load_glue_train(cfg.train_dataset, cfg.split, train_file, cfg.cache_path)
    dataset = load_train_dataset(cfg.train_dataset, cfg.split, train_file, cfg.cache_path)
    return split_validation(dataset, cfg.val_size)[1 if validation else 0]


def _load_for_training(cfg: RunConfig, state):
    """The base model with the method's adapters. Full fine-tuning keeps float32 master weights; the adapter
    methods load the frozen base in the compute precision (the paper: bf16 residual), adapters float32; with
    --quantize the base streams in layer by layer and only its quantized form is kept (sorsa/quant_model.py)."""
    if cfg.quantize:
        model = _quantized_model(cfg)
        if cfg.grad_cp and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        return model
    model = load_model(cfg, torch.float32 if cfg.peft == "full" else precision_dtype(cfg.precision))
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


def _quantized_source(cfg: RunConfig) -> tuple[Path, list[str] | str]:
    """The local checkpoint directory of cfg.model and the run's target modules (by its config's model_type)."""
    from transformers import AutoConfig

    from .loading import local_snapshot
    from .quant import bitsandbytes

    bitsandbytes()  # one clear error when it is missing
    model_dir = Path(local_snapshot(resolve_model_name(cfg.model, cfg.cache_path, cfg.run_path), cfg.cache_path,
                                    cfg.local))
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    return model_dir, targets_of(cfg, getattr(config, "model_type", None))


def _quantized_model(cfg: RunConfig, run: RunDir | None = None):
    """QSORSA, QPiSSA or QLoRA over the streamed quantized base; with `run`, the run's trained model rebuilt from
    its saved adapter (and, for QPiSSA, its initial adapter), as at training."""
    from . import quant_model as QM

    model_dir, targets = _quantized_source(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sorsa_cfg = cfg.sorsa_config(targets)
    if cfg.peft == "sorsa" and run is None:
        return QM.load_qsorsa(model_dir, sorsa_cfg, targets, cfg.svd_cache_path, device=device)
    if cfg.peft == "sorsa":
        return QM.rebuild_qsorsa(model_dir, run.adapter_dir, device=device)
    init = QM.read_peft_factors(run.pissa_init_dir) if run is not None and cfg.peft == "pissa" else None
    return QM.load_qpeft(model_dir, cfg.peft, cfg.rank, targets, sorsa_cfg.quant_spec(), cfg.quant_iters, cfg.svd,
                         sorsa_cfg.svd_options(), init_factors=init, dropout=cfg.dropout, device=device,
                         adapter_dir=run.adapter_dir if run is not None else None)


def prepare_model_for_training(cfg: RunConfig, model):
    """Inject the method's adapters (or leave every weight trainable for full fine-tuning)."""
    from .baselines import apply_peft_baseline
    from .model import apply_sorsa

    targets = targets_of(cfg, getattr(model.config, "model_type", None))
    if is_glue(cfg.train_dataset):  # adapters on the encoder, the new head trained fully (sorsa/classifier.py)
        from .classifier import prepare_classifier

        return prepare_classifier(cfg, model, targets, svd_cache_dir=cfg.svd_cache_path)
    if cfg.peft == "sorsa":
        return apply_sorsa(model, cfg.sorsa_config(targets), svd_cache_dir=cfg.svd_cache_path)
    if cfg.peft in ("lora", "pissa"):
        return apply_peft_baseline(model, cfg.peft, cfg.rank, targets, cfg.dropout, cfg.svd, cfg.svd_niter,
                                   svd_options=cfg.sorsa_config(targets).svd_options())
    return model


def _build_trainer(cfg: RunConfig, run: RunDir, model, args, tokenizer, dataset, fresh_main: bool):
    from .baselines import save_initial_pissa
    from .data import CausalLMCollator
    from .model import format_parameter_summary
    from .trainer import SORSATrainer

    if fresh_main:
        print(f"[run] {cfg.peft} on {cfg.model}: {format_parameter_summary(model)}")
        if cfg.peft == "pissa":
            save_initial_pissa(model, run.pissa_init_dir)
    trainer_class = SORSATrainer
    if cfg.deepspeed:  # the regularizer through the loss, and the float32 masters saved (sorsa/trainer_deepspeed.py)
        from .trainer_deepspeed import DeepSpeedSORSATrainer as trainer_class
    if is_glue(cfg.train_dataset):  # pads input_ids / attention_mask (/ token_type_ids); labels as given
        from transformers import DataCollatorWithPadding

        collator = DataCollatorWithPadding(tokenizer)
    else:
        collator = CausalLMCollator(tokenizer.pad_token_id)
    return trainer_class(model=model, args=args, train_dataset=dataset, data_collator=collator)


def _finish_training(cfg: RunConfig, run: RunDir, trainer) -> dict:
    """The training log and the completion marker (main process)."""
    from .model import parameter_summary

    history = trainer.state.log_history
    run.write_train_log(history)
    # per-step losses as logged; a run shorter than --logging-steps has only the Trainer's mean
    losses = [r["loss"] for r in history if "loss" in r] or [r["train_loss"] for r in history if "train_loss" in r]
    summary = {"steps": trainer.state.global_step,
               "trainable_params": parameter_summary(trainer.model)["trainable"],
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "world_size": trainer.args.world_size, "deepspeed": cfg.deepspeed}
    run.mark_done(summary, cfg.training_settings())
    print(f"[run] trained {summary['steps']} steps: loss {summary['first_loss']} -> {summary['last_loss']}; "
          f"{'model' if cfg.peft == 'full' else 'adapter'} in {run.trained_dir(cfg.peft)}")
    return summary


def _check_report_to(report_to: str):
    """--report-to none (default), tensorboard or wandb (also comma-separated), when installed."""
    for name in filter(None, (n.strip() for n in report_to.split(","))):
        if name not in ("none", "all") and importlib.util.find_spec(name) is None:
            raise ValueError(f"--report-to {name}: the {name} package is not installed (pip install {name})")


def build_training_arguments(cfg: RunConfig, run: RunDir, configured_state: bool = False):
    """The Trainer's arguments. With --deepspeed they also install DeepSpeed's config process-wide, which
    under ZeRO-3 makes a later `from_pretrained` load every weight already partitioned: build them
    before the model. `configured_state`: reuse the state made by `init_distributed`."""
    from .trainer import SORSATrainingArguments

    _check_report_to(cfg.report_to)
    on_gpu = torch.cuda.is_available()
    return SORSATrainingArguments(
        output_dir=str(run.checkpoints_dir), gamma=cfg.gamma if cfg.peft == "sorsa" else 0.0,
        loss_normalization=cfg.loss_normalization,
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


def save_trained(cfg: RunConfig, run: RunDir, trainer, tokenizer):
    """The trained adapter (or model) into RUN/adapter (RUN/model); every rank calls this (under DeepSpeed
    the float32 master weights are gathered collectively), the main process writes."""
    from .baselines import save_peft_adapter

    if cfg.peft == "sorsa":
        # the per-layer SVD record (for "fast": iterations and final energy change) goes with the adapter
        init_log = getattr(trainer.accelerator.unwrap_model(trainer.model), "sorsa_init_log", None)
        trainer.save_sorsa_adapter(str(run.adapter_dir), metadata={"base_model": cfg.model, "svd_init": init_log})
    elif cfg.peft in ("lora", "pissa"):
        # PiSSA is saved converted to a LoRA of the untouched base, except over a quantized residual, where
        # W − B₀A₀ is not the base: there the adapter is saved as trained, beside its initial adapter.
        convert = cfg.peft == "pissa" and not cfg.quantize
        with trainer.full_trainable_parameters():
            if trainer.is_world_process_zero():
                save_peft_adapter(trainer.model, run.adapter_dir, run.pissa_init_dir if convert else None)
    else:
        trainer.save_model(str(run.model_dir))  # DeepSpeed: its 16-bit consolidation (ZeRO-3 config)
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(run.model_dir)


# ----------------------------------------------------------------------------- merge

def merge(cfg: RunConfig) -> Path:
    """Fold the run's adapter into its base model and write RUN/merged/ (a plain HF checkpoint)."""
    run = run_dir(cfg.run_path, cfg.name)
    if not run.is_done():
        raise ValueError(f"run {cfg.name!r} has no finished training in {run.path}; run --train first")
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
    """The trained model of a run with its adapter folded in (and, with --export-lora, the LoRA form written)."""
    from .adapter_io import export_lora, load_adapter
    from .model import merge_and_unload

    if cfg.peft == "full":
        return load_model(cfg, torch.float32, name=str(run.model_dir))
    if cfg.quantize:  # the quantized model rebuilt as at training, merged into deq(W_q) + adapter
        from .quant_model import dequantized

        model = _quantized_model(cfg, run)
        if cfg.export_lora and cfg.peft == "sorsa":
            export_lora(model, run.lora_export_dir, base_model_name_or_path=cfg.model)
        return dequantized(model, precision_dtype(cfg.precision))
    # The base is loaded in the dtype it was trained in, so W_res is re-derived bit for bit;
    # the merge itself is computed in float32 and cast back to that dtype.
    model = load_model(cfg, precision_dtype(cfg.precision))
    if cfg.peft != "sorsa":
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(run.adapter_dir)).merge_and_unload()
    model = load_adapter(model, run.adapter_dir)
    if cfg.export_lora:
        export_lora(model, run.lora_export_dir, base_model_name_or_path=cfg.model)
        print(f"[run] wrote the PEFT LoRA form (rank {2 * cfg.rank}) to {run.lora_export_dir}")
    return merge_and_unload(model)


def _trained_model(cfg: RunConfig, run: RunDir):
    """The run's trained model with its adapter folded in: read from RUN/merged when --merge wrote it (in the
    dtype merge wrote it in), else merged in memory (`merged_model`)."""
    if not run.merged_dir.is_dir():
        return merged_model(cfg, run)
    return load_model(cfg, torch.float32 if cfg.peft == "full" else precision_dtype(cfg.precision),
                      name=str(run.merged_dir))


# ----------------------------------------------------------------------------- test

def test(cfg: RunConfig) -> dict:
    """Generate greedily on cfg.test_dataset (or, for a GLUE task, classify) and score it into
    RUN/eval/<dataset>/ (resumable); a measurement with other settings (another test file, length,
    precision...) gets its own folder beside it."""
    from eval.benchmarks import get_benchmark
    from eval.generate import make_generator
    from eval.runner import STOP_STRINGS, evaluate

    run = run_dir(cfg.run_path, cfg.name)
    if run.merged_dir.is_dir():
        model_path = str(run.merged_dir)
    elif run.is_done():
        raise ValueError(f"run {cfg.name!r} is trained but not merged; run --merge first (or add --merge)")
    else:  # no trained run of this name: score --model itself
        model_path = resolve_model_name(cfg.model, cfg.cache_path, cfg.run_path)
    dataset = cfg.test_dataset
    test_file = resolve_data_file(cfg.test_file, cfg.cache_path, cfg.run_path, "test")
    get_benchmark(dataset).load_examples(test_file)  # a broken test file fails here, before a model is loaded
    if is_glue(dataset) or (run.is_done() and is_glue(cfg.train_dataset)):
        measure, make_predictor = _classifier_measure(cfg, run, model_path, test_file)
    else:
        measure = measurement_settings(cfg, dataset, model_path, test_file)
        backend, max_new_tokens = measure["backend"], measure["max_new_tokens"]

        def make_predictor():
            return make_generator(model_path, backend=backend, max_new_tokens=max_new_tokens,
                                  batch_size=cfg.valid_batch_size, stop=STOP_STRINGS[dataset],
                                  dtype=dtype_name(precision_dtype(cfg.test_precision)),
                                  trust_remote_code=cfg.trust_remote_code)
    with run.locked("test"):
        out_dir = run.eval_dir(dataset, measure)
        try:
            predict = make_predictor()
        except OSError as err:
            raise hub_error(model_path, err) from None
        results = evaluate(dataset, out_dir, predict, test_file=test_file, limit=cfg.limit, settings=measure)
    shown = results.get("metric") != "accuracy" and results.get("score") is not None  # CoLA's MCC, STS-B's Pearson
    headline = f"{results['metric']} {100 * results['score']:.2f}, " if shown else ""
    print(f"[run] {dataset}: {headline}accuracy {100 * results['accuracy']:.2f}% ({results['correct']}/"
          f"{results['total']}); results in {out_dir / RESULTS}")
    return results


def measurement_settings(cfg: RunConfig, dataset: str, model_path: str, test_file: str | None) -> dict:
    """What a measurement of `dataset` depends on: the settings its results.json records and its eval folder
    (RunDir.eval_dir) is keyed by. A GLUE task: the classifier's input length and precision; a generation
    benchmark: the backend, the max new tokens (the benchmark's default unless given) and the precision."""
    from eval.benchmarks import default_max_new_tokens
    from eval.generate import resolve_backend

    if is_glue(dataset):
        return {"model": model_path, "classifier": True, "max_length": cfg.length, "precision": cfg.test_precision,
                "test_file": test_file}
    return {"model": model_path, "backend": "rwkv" if cfg.rwkv else resolve_backend(cfg.backend),
            "max_new_tokens": cfg.max_new_tokens or default_max_new_tokens(dataset),
            "precision": cfg.test_precision, "test_file": test_file, "greedy": True}


def _classifier_measure(cfg: RunConfig, run: RunDir, model_path: str, test_file: str | None):
    """The settings of a GLUE measurement and the factory of its classifier (eval/classify.py). A trained run
    is scored only on a GLUE task with its own label count (MNLI's model on MNLI-mm, not SST-2's on MNLI)."""
    from eval.classify import make_classifier

    if not is_glue(cfg.test_dataset):
        raise ValueError(f"run {cfg.name!r} is a sequence classifier trained on {cfg.train_dataset}; score it on "
                         f"a GLUE task (--test-dataset {cfg.train_dataset}), not {cfg.test_dataset}")
    task = glue_task(cfg.test_dataset)
    trained_labels = glue_task(cfg.train_dataset).num_labels if is_glue(cfg.train_dataset) else None
    if run.is_done() and trained_labels != task.num_labels:
        raise ValueError(f"run {cfg.name!r} was trained on {cfg.train_dataset}, which cannot be scored as "
                         f"{task.name} ({task.num_labels} label(s)); score a run trained on that task")
    measure = measurement_settings(cfg, cfg.test_dataset, model_path, test_file)

    def make_predictor():
        return make_classifier(model_path, num_labels=task.num_labels, max_length=cfg.length,
                               batch_size=cfg.valid_batch_size, dtype=dtype_name(precision_dtype(cfg.test_precision)),
                               trust_remote_code=cfg.trust_remote_code)
    return measure, make_predictor


# ----------------------------------------------------------------------------- validation

def validation_loss(cfg: RunConfig) -> dict:
    """The trained run's mean cross-entropy per response token on its validation rows (the --val-size rows held
    out of the training data, tokenized as for training), with the adapter folded in, in the training
    precision. Returns {"val_loss", "val_rows", "val_tokens"}."""
    import torch.nn.functional as F

    from .data import IGNORE_INDEX, CausalLMCollator

    run = run_dir(cfg.run_path, cfg.name)
    if not cfg.val_size:
        raise ValueError(f"run {cfg.name!r} has no validation split; set --val-size (rows or a fraction)")
    if not run.is_done():
        raise ValueError(f"run {cfg.name!r} has no finished training in {run.path}; run --train first")
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


# ----------------------------------------------------------------------------- analysis, report, plan

def run_dirs(names: list[str], cfg: RunConfig) -> list[RunDir]:
    """Run directories from names under RUN_PATH or paths; no names: the run of cfg.name."""
    if not names:
        if not cfg.name:
            raise ValueError("--analyze / --report without a RUN need --name (or give run names or directories)")
        names = [cfg.name]
    found = []
    for name in names:
        run = RunDir(name) if Path(name).is_dir() else run_dir(cfg.run_path, name)
        run.read_config()  # not a run directory: one error saying so
        found.append(run)
    return found


def analyze(cfg: RunConfig, names: list[str], out: str | None = None, top_k: int | None = None) -> list[Path]:
    """The SVD variation analysis (sorsa/analysis.py) of the runs named; several runs also side by side in `out`."""
    from .analysis import analyze_main

    runs = run_dirs(names, cfg)
    files = analyze_main([r.path for r in runs], out_dir=out if len(runs) > 1 else None, top_k=top_k)
    print("[run] analysis written: " + ", ".join(map(str, files)))
    return files


def report(cfg: RunConfig, names: list[str], out: str | None = None) -> list[Path]:
    """The results table and training curves (sorsa/report.py) of the runs named, into `out` (RUN_PATH/report)."""
    from .report import report_main

    files = report_main([r.path for r in run_dirs(names, cfg)], out or Path(cfg.run_path) / "report")
    print("[run] report written: " + ", ".join(map(str, files)))
    return files


def dry_run(cfg: RunConfig, gpus: int = 1):
    """Print the plan of cfg's training run (sorsa/planner.py): built on the meta device, no weights read."""
    from .planner import format_plan

    plan = plan_of(cfg, gpus)
    print(format_plan(plan))
    return plan


def plan_of(cfg: RunConfig, gpus: int = 1):
    """The planner's RunPlan of cfg's training run (targets, parameter counts, memory), without weights."""
    from .planner import plan_run

    model = cfg.model if cfg.model.startswith("builtin:") or not Path(cfg.model).expanduser().exists() \
        else str(Path(cfg.model).expanduser())
    return plan_run(model, method=cfg.peft, rank=cfg.rank, target_modules=cfg.target_modules, rwkv=cfg.rwkv,
                    quantize=cfg.quantize, batch_size=cfg.batch_size, accum_steps=cfg.accum_steps, length=cfg.length,
                    precision=cfg.precision, grad_cp=cfg.grad_cp, deepspeed=cfg.deepspeed, gpus=gpus,
                    trust_remote_code=cfg.trust_remote_code)
