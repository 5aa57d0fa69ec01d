"""Sequence classifiers (AutoModelForSequenceClassification: DeBERTa-v3, RoBERTa, ...): which modules are the
new task head, and the method's adapters on the encoder with the head (and `modules_to_save`) trained fully."""
from __future__ import annotations

import torch.nn as nn

from .targets import ALL_LINEAR, find_target_modules, targets_of


def head_modules(model: nn.Module) -> list[str]:
    """The task head of a Hugging Face sequence classifier: every top-level module with parameters outside the
    pre-trained backbone (`base_model_prefix`), e.g. DeBERTa-v2's `pooler` and `classifier`, RoBERTa's
    `classifier`. These are newly initialised when a pre-trained encoder is loaded, so they must be trained
    fully and saved with the adapter."""
    prefix = getattr(model, "base_model_prefix", "")
    heads = [name for name, module in model.named_children()
             if name != prefix and any(True for _ in module.parameters())]
    if not heads or not prefix or not hasattr(model, prefix):
        raise ValueError(f"{type(model).__name__} has no task head outside its backbone {prefix!r}; a sequence "
                         "classifier (AutoModelForSequenceClassification) is needed for GLUE")
    return heads


def modules_to_train_fully(model: nn.Module, extra: list[str] | None) -> list[str]:
    """The head plus the user's `modules_to_save` (module names of `model`), each once, checked to exist."""
    names = head_modules(model)
    for name in extra or []:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"modules_to_save: {type(model).__name__} has no module {name!r}") from None
        if name not in names:
            names.append(name)
    return names


def prepare_classifier(cfg, model: nn.Module, targets: list[str] | str | None = None, svd_cache_dir=None) -> nn.Module:
    """The method's adapters on a sequence classifier (cfg: a RunConfig): SORSA, or LoRA / PiSSA through peft
    (task SEQ_CLS), on the encoder's linear layers `targets` (default targets.targets_of: the run's, else the
    architecture's defaults; all-linear: every linear layer but the ones trained fully), with
    the head and cfg.modules_to_save trained fully in float32 (the master copy; the base may be bf16) and saved
    with the adapter. Full fine-tuning trains everything as it is."""
    if cfg.peft == "full":
        return model
    keep = modules_to_train_fully(model, cfg.modules_to_save)
    for name in keep:
        model.get_submodule(name).float()
    targets = targets or targets_of(cfg, getattr(model.config, "model_type", None))
    if targets == ALL_LINEAR:  # every linear layer of the encoder, not the head trained fully
        targets = [name for name, _ in find_target_modules(model, ALL_LINEAR, exclude=tuple(keep))]
    if cfg.peft == "sorsa":
        from .adapter_io import set_modules_to_save
        from .model import apply_sorsa

        model = apply_sorsa(model, cfg.sorsa_config(targets), svd_cache_dir=svd_cache_dir)
        return set_modules_to_save(model, keep)
    from .baselines import apply_peft_baseline

    return apply_peft_baseline(model, cfg.peft, cfg.rank, targets, cfg.dropout, cfg.svd, cfg.svd_niter,
                               task_type="SEQ_CLS", modules_to_save=keep,
                               svd_options=cfg.sorsa_config(targets).svd_options())
