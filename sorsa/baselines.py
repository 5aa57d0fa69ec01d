"""The paper's baselines through the `peft` library: LoRA (Hu et al., 2021) and PiSSA (arXiv 2404.02948).

Both use alpha = r (scale 1) as the reference does. A trained PiSSA adapter is saved converted to a
rank-2r LoRA of the untouched base model, so LoRA and PiSSA runs merge and export alike.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from . import functional as SF
from .targets import dense_weight


def peft_init(method: str, svd: str = "full", niter: int = 4):
    """peft's `init_lora_weights` for a method: True (LoRA), "pissa" or "pissa_niter_N" (its randomized
    SVD); False for svd="fast", which peft does not have: `pissa_from_svd` then initialises the layers."""
    if method == "lora":
        return True
    if method == "pissa":
        return {"full": "pissa", "randomized": f"pissa_niter_{niter}"}.get(svd, False)
    raise ValueError(f"peft baseline {method!r} is unknown; use 'lora' or 'pissa'")


def apply_peft_baseline(model: nn.Module, method: str, rank: int, target_modules: list[str] | str,
                        dropout: float = 0.0, svd: str = "full", niter: int = 4, task_type: str = "CAUSAL_LM",
                        modules_to_save: list[str] | None = None, svd_options: dict | None = None):
    """Wrap `model` in a peft LoRA/PiSSA model with rank r, alpha r and the given targets; `task_type`
    "SEQ_CLS" with `modules_to_save` (peft's own: trained fully, saved with the adapter) for a classifier.
    PiSSA with svd="fast" is initialised by `pissa_from_svd` with `svd_options` (svd_top's keywords)."""
    from peft import LoraConfig, get_peft_model

    from transformers.pytorch_utils import Conv1D

    from .targets import ALL_LINEAR, find_target_modules

    if target_modules == [ALL_LINEAR]:
        target_modules = ALL_LINEAR  # peft's own spelling
    conv1d = any(isinstance(m, Conv1D) for _, m in find_target_modules(model, target_modules))  # GPT-2
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, target_modules=target_modules,
                        bias="none", task_type=task_type, init_lora_weights=peft_init(method, svd, niter),
                        modules_to_save=modules_to_save, fan_in_fan_out=conv1d)
    peft_model = get_peft_model(model, config)
    if method == "pissa" and svd == "fast":
        pissa_from_svd(peft_model, svd, svd_options or {})
    return peft_model


@torch.no_grad()
def pissa_from_svd(peft_model, svd: str, options: dict) -> None:
    """PiSSA's initialisation (arXiv 2404.02948, Sec. 3) from this project's SVD: per LoRA layer, the top-r
    triplets (U, S, Vh) of W give A = √(S/s) Vh (r, in) and B = U √(S/s) (out, r), and the base weight
    becomes W_res = W − s · B A (s = lora_alpha / r). The config then says "pissa", as peft's own would."""
    from peft.tuners.lora import LoraLayer

    for _, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        base = module.get_base_layer()
        r, s = module.r["default"], module.scaling["default"]
        W = dense_weight(base)  # (out, in), also for GPT-2's Conv1D
        U, S, Vh = SF.svd_top(W, r, svd, **options)  # (out, r), (r,), (r, in)
        A, B = SF.pissa_factors(U, S, Vh, s)  # (r, in), (out, r)
        module.lora_A["default"].weight.copy_(A)
        module.lora_B["default"].weight.copy_(B)
        W_res = SF.lora_residual(W, A, B, s, W.dtype)
        base.weight.data = W_res if isinstance(base, nn.Linear) else W_res.T.contiguous()
    peft_model.peft_config["default"].init_lora_weights = "pissa"


def save_initial_pissa(peft_model, init_dir: str | os.PathLike):
    """Save a freshly initialised PiSSA adapter, needed later to convert the trained one to LoRA."""
    config = peft_model.peft_config["default"]
    init_value = config.init_lora_weights
    config.init_lora_weights = True  # so that loading this file does not run PiSSA again
    try:
        peft_model.save_pretrained(str(init_dir))
    finally:
        config.init_lora_weights = init_value


def save_peft_adapter(peft_model, adapter_dir: str | os.PathLike, init_dir: str | os.PathLike | None = None):
    """Save the trained adapter; a PiSSA adapter (with `init_dir`) is converted to a rank-2r LoRA."""
    kwargs = {}
    if init_dir is not None and Path(init_dir).is_dir():
        kwargs["path_initial_model_for_weight_conversion"] = str(init_dir)
    peft_model.save_pretrained(str(adapter_dir), **kwargs)
    if kwargs:
        _restore_modules_to_save(peft_model, adapter_dir)


def _restore_modules_to_save(peft_model, adapter_dir: str | os.PathLike):
    """Put the trained `modules_to_save` (a classifier's head) into a converted PiSSA adapter: peft's PiSSA-to-LoRA
    conversion (0.21) writes the LoRA tensors only, and the adapter would not load (or would lose the head)."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
    from safetensors.torch import load_file

    from .fileio import atomic_save_safetensors

    extra = {k: v for k, v in get_peft_model_state_dict(peft_model).items() if ".lora_" not in k}
    if extra:
        path = Path(adapter_dir) / SAFETENSORS_WEIGHTS_NAME
        tensors = {**load_file(str(path)), **{k: v.detach().cpu().contiguous() for k, v in extra.items()}}
        atomic_save_safetensors(tensors, path, metadata={"format": "pt"})
