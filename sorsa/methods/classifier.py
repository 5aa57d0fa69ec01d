"""Sequence classifiers (AutoModelForSequenceClassification: DeBERTa-v3, RoBERTa, ...): which modules are the
new task head, and the method's adapters on the encoder with the head (and `modules_to_save`) trained fully."""
from __future__ import annotations

import torch.nn as nn

from ..core.errors import UserError
from ..core.targets import ALL_LINEAR, find_target_modules, targets_of


def head_modules(model: nn.Module) -> list[str]:
    """The task head of a Hugging Face sequence classifier: every top-level module with parameters outside the
    pre-trained backbone (`base_model_prefix`), e.g. DeBERTa-v2's `pooler` and `classifier`, RoBERTa's
    `classifier`. These are newly initialised when a pre-trained encoder is loaded, so they must be trained
    fully and saved with the adapter."""
    prefix = getattr(model, "base_model_prefix", "")
    heads = [name for name, module in model.named_children()
             if name != prefix and any(True for _ in module.parameters())]
    if not heads or not prefix or not hasattr(model, prefix):
        raise UserError(f"{type(model).__name__} has no task head outside its backbone {prefix!r}; a sequence "
                         "classifier (AutoModelForSequenceClassification) is needed for GLUE")
    return heads


def modules_to_train_fully(model: nn.Module, extra: list[str] | None) -> list[str]:
    """The head plus the user's `modules_to_save` (module names of `model`), each once, checked to exist."""
    names = head_modules(model)
    for name in extra or []:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise UserError(f"modules_to_save: {type(model).__name__} has no module {name!r}") from None
        if name not in names:
            names.append(name)
    return names


def prepare_classifier(cfg, model: nn.Module, targets: list[str] | str | None = None) -> nn.Module:
    """The method's adapters on a sequence classifier (cfg: a RunConfig), on the encoder's linear layers `targets`
    (default targets.targets_of: the run's, else the architecture's defaults; all-linear: every linear layer but
    the ones trained fully), with the head and cfg.modules_to_save trained fully in float32 (the master copy; the
    base may be bf16) and saved with the adapter. A method that trains every weight takes the model as it is."""
    from . import SEQ_CLS, get_method

    method = get_method(cfg.peft)
    if method.trains_all_weights:
        return method.prepare(model, cfg, targets, task_type=SEQ_CLS)
    keep = modules_to_train_fully(model, cfg.modules_to_save)
    for name in keep:
        model.get_submodule(name).float()
    targets = targets or targets_of(cfg, getattr(model.config, "model_type", None))
    if targets == ALL_LINEAR:  # every linear layer of the encoder, not the head trained fully
        targets = [name for name, _ in find_target_modules(model, ALL_LINEAR, exclude=tuple(keep))]
    return method.prepare(model, cfg, targets, task_type=SEQ_CLS, train_fully=tuple(keep))
