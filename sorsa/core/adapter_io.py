"""The SORSA adapter file format, its only writer and reader: save, load (onto a fresh base model), resume a
checkpoint, read one layer's factors (analysis), and export as a PEFT LoRA.

A saved adapter is a directory with `adapter_model.safetensors` (per adapted layer `<layer>.U_p`, `.S_p`,
`.Vh_p`, the trained factors, and `.U_0`, `.S_0`, `.Vh_0`, the initial ones) and `adapter_config.json`
(format, format_version, the SORSAConfig, the layer names, and any metadata such as the base model).
Modules trained fully beside the adapters (a classification head, `modules_to_save`) add their whole state
as `modules_to_save.<module>.<tensor>` and their names under "modules_to_save" in the JSON.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from . import functional as SF
from .options import SORSAConfig
from .fileio import atomic_save_safetensors, atomic_write_text
from .layer import SORSALinear
from .model import quantize_linear_layers, replace_module, sorsa_layers
from .targets import LINEAR_TYPES, features
from .errors import MissingFileError, UserError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "sorsa-adapter"
ADAPTER_FORMAT_VERSION = 1
TRAINED = ("U_p", "S_p", "Vh_p")
INITIAL = ("U_0", "S_0", "Vh_0")
FACTORS = TRAINED + INITIAL
# Modules trained fully and saved whole: the JSON key, the tensor-name prefix, and the model attribute naming them.
MODULES_TO_SAVE = "modules_to_save"
MODULES_TO_SAVE_ATTR = "sorsa_modules_to_save"


def set_modules_to_save(model: nn.Module, names: list[str]) -> nn.Module:
    """Train the modules `names` (e.g. a new classification head) fully next to the SORSA adapters, in place:
    their parameters become trainable and `save_adapter` stores them whole. A module that holds a SORSA
    layer is refused (its weights would be both adapted and saved)."""
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"modules_to_save: {type(model).__name__} has no module {name!r}") from None
        inner = [n for n, m in module.named_modules() if isinstance(m, SORSALinear)]
        if inner:
            raise UserError(f"modules_to_save: {name!r} holds SORSA layer(s) {inner}; remove it from "
                             "modules_to_save or its layers from target_modules")
        for p in module.parameters():
            p.requires_grad_(True)
    setattr(model, MODULES_TO_SAVE_ATTR, list(names))
    return model


def _module_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state of every module to save, under `modules_to_save.<module>.<tensor>`."""
    tensors = {}
    for name in getattr(model, MODULES_TO_SAVE_ATTR, []):
        for key, value in model.get_submodule(name).state_dict().items():
            if value.numel() == 0:  # a ZeRO-3 placeholder
                raise UserError(f"save_adapter: {name}.{key} is partitioned (DeepSpeed ZeRO-3); modules_to_save "
                                 "are saved from whole parameters only")
            tensors[f"{MODULES_TO_SAVE}.{name}.{key}"] = value.detach().cpu().contiguous()
    return tensors


@torch.no_grad()
def _restore_modules(model: nn.Module, tensors: dict[str, torch.Tensor], names: list[str]) -> None:
    """Load the saved state of each module to save, in the dtype it was trained in (float32 over a bf16 base)."""
    for name in names:
        prefix = f"{MODULES_TO_SAVE}.{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module = model.get_submodule(name)
        floating = [v.dtype for v in state.values() if v.is_floating_point()]
        if floating:
            module.to(dtype=floating[0])
        module.load_state_dict(state, strict=True)
    setattr(model, MODULES_TO_SAVE_ATTR, list(names))


def save_adapter(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None,
                 factors: dict[str, torch.Tensor] | None = None):
    """Write the adapter alone to directory `path`: adapter_model.safetensors + adapter_config.json.

    The file holds, per adapted layer, the trained U_p, S_p, Vh_p and the initial U_0, S_0, Vh_0.
    The initial factors define W_res = W − scale · U_0 diag(S_0) Vh_0, so `load_adapter` rebuilds the
    trained model exactly from the base weights without running an SVD. `factors` ("<layer>.U_p" ->
    tensor, "<layer>.U_0" -> ...) replaces some of the layers' own tensors, e.g. by float32 copies where
    DeepSpeed holds partitioned or bf16 ones.
    """
    layers = sorsa_layers(model)
    config = getattr(model, "sorsa_config", None)
    if not layers or config is None:
        raise UserError("save_adapter: the model has no SORSA adapters (apply_sorsa or load_adapter first)")
    if any(layer.merged for _, layer in layers):
        raise UserError("save_adapter: the adapters are merged into the weights; save before merging")
    factors = factors or {}
    tensors = {}
    for name, layer in layers:
        for f in FACTORS:
            value = factors.get(f"{name}.{f}", getattr(layer, f))
            if value.numel() == 0:  # a ZeRO-3 placeholder: the caller must gather or pass `factors`
                raise UserError(f"save_adapter: {name}.{f} is partitioned (DeepSpeed ZeRO-3); save inside "
                                 "gathered_parameters(...) or pass the gathered tensors as `factors`")
            tensors[f"{name}.{f}"] = value
    tensors.update(_module_tensors(model))
    write_adapter(path, config, tensors, [name for name, _ in layers], metadata,
                  modules_to_save=list(getattr(model, MODULES_TO_SAVE_ATTR, None) or []))


def write_adapter(path: str | os.PathLike, config: SORSAConfig, tensors: dict[str, torch.Tensor], layers: list[str],
                  metadata: dict | None = None, modules_to_save: list[str] | None = None) -> None:
    """Write an adapter directory from its tensors ("<layer>.U_p", ... for every layer in `layers`, and the
    whole state of each module in `modules_to_save` under "modules_to_save.<module>.")."""
    missing = [f"{name}.{f}" for name in layers for f in FACTORS if f"{name}.{f}" not in tensors]
    if missing:
        raise UserError(f"write_adapter: missing tensors {missing[:3]}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    path = Path(path)
    atomic_save_safetensors(tensors, path / ADAPTER_WEIGHTS, metadata={"format": ADAPTER_FORMAT})
    info = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION, "config": config.to_dict(),
            "layers": list(layers), **(metadata or {})}
    if modules_to_save:
        info[MODULES_TO_SAVE] = list(modules_to_save)
    atomic_write_text(path / ADAPTER_CONFIG, json.dumps(info, indent=2) + "\n")


def read_adapter_config(path: str | os.PathLike) -> tuple[SORSAConfig, dict]:
    """The SORSAConfig and the whole JSON record of a saved adapter directory."""
    cfg_path = Path(path) / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise MissingFileError(f"{cfg_path} does not exist: {path} is not a saved SORSA adapter")
    info = json.loads(cfg_path.read_text())
    if info.get("format") != ADAPTER_FORMAT:
        raise UserError(f"{cfg_path} is not a SORSA adapter (format={info.get('format')!r})")
    return SORSAConfig.from_dict(info["config"]), info


class AdapterFile:
    """A saved adapter opened for reading one layer at a time (the whole file is never loaded at once)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config, self.info = read_adapter_config(self.path)
        self.layers: list[str] = list(self.info["layers"])

    def factors(self, layer: str, device=None) -> dict[str, torch.Tensor]:
        """{"U_p", "S_p", "Vh_p", "U_0", "S_0", "Vh_0"} of one layer, as stored (float32)."""
        with safe_open(str(self.path / ADAPTER_WEIGHTS), framework="pt") as handle:
            return {f: handle.get_tensor(f"{layer}.{f}").to(device) for f in FACTORS}

    def weight(self, layer: str, W0: torch.Tensor) -> torch.Tensor:
        """The trained weight W_t = W_0 − scale·U_0 diag(S_0) Vh_0 + scale·U_p diag(S_p) Vh_p, float32 (out, in),
        from the original weight W_0 (so the residual's low-precision rounding is not counted as training)."""
        t = self.factors(layer, W0.device)
        scale = self.config.scale
        return (W0.to(torch.float32) - SF.adapter_delta(t["U_0"], t["S_0"], t["Vh_0"], scale)
                + SF.adapter_delta(t["U_p"], t["S_p"], t["Vh_p"], scale))


@torch.no_grad()
def load_adapter(base: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put a saved adapter onto a freshly loaded base model, in place: the trained model, exactly.

    W_res is recomputed from the base weights and the stored initial factors with the same float32
    arithmetic as the initialisation, so no SVD runs and the result does not depend on any seed; a quantized
    residual (the adapter's `quantize` setting) is rebuilt byte for byte from a full-precision base.
    """
    config, info = read_adapter_config(path)
    tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    modules = dict(base.named_modules())
    for p in base.parameters():
        p.requires_grad_(False)
    for name in info["layers"]:
        replace_module(base, name, adapter_layer(name, modules.get(name), config, tensors, path))
    if config.quantize is not None:  # the other linear layers as at training (QLoRA-style)
        quantize_linear_layers(base, config.quant_spec())
    if info.get(MODULES_TO_SAVE):
        _restore_modules(base, tensors, info[MODULES_TO_SAVE])
    base.sorsa_config = config
    return base


@torch.no_grad()
def adapter_layer(name: str, linear: nn.Module | None, config: SORSAConfig, tensors: dict[str, torch.Tensor],
                  path="the adapter") -> SORSALinear:
    """The trained SORSALinear of layer `name` from a saved adapter's `tensors`, over its base layer `linear`:
    W_res rebuilt from the stored initial factors (a quantized residual as Q(W − scale · U_0 diag(S_0) Vh_0), the
    same bytes as at training), then the trained factors."""
    if not isinstance(linear, LINEAR_TYPES):
        raise UserError(f"adapter {path} adapts {name!r}, which is "
                         f"{'missing from' if linear is None else 'not a linear layer in'} "
                         "the base model: load it onto the base model it was trained from")
    t = {f: tensors[f"{name}.{f}"] for f in FACTORS}
    out_f, in_f = features(linear)
    if t["U_0"].shape != (out_f, config.rank) or t["Vh_0"].shape != (config.rank, in_f):
        raise UserError(f"adapter {path}: layer {name!r} has shape {out_f}x{in_f} in the base model but the "
                         f"adapter was made for {t['U_0'].shape[0]}x{t['Vh_0'].shape[1]}")
    layer = SORSALinear(linear, config.rank, config.scale, config.dropout, config.adapter_dtype)
    layer.set_factors(t["U_0"], t["S_0"], t["Vh_0"], config.residual_dtype, quant=config.quant_spec())
    layer.U_p.copy_(t["U_p"]), layer.S_p.copy_(t["S_p"]), layer.Vh_p.copy_(t["Vh_p"])
    return layer


@torch.no_grad()
def restore_trained_factors(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy the trained U_p, S_p, Vh_p of a saved adapter (a checkpoint) into the model's SORSA layers, whose
    W_res and initial factors already are those of the same run (resuming training)."""
    tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    for name, layer in sorsa_layers(model):
        for f in TRAINED:
            getattr(layer, f).copy_(tensors[f"{name}.{f}"])
    for name in getattr(model, MODULES_TO_SAVE_ATTR, []):  # the head trained beside the adapters
        prefix = f"{MODULES_TO_SAVE}.{name}."
        for key, value in model.get_submodule(name).state_dict(keep_vars=True).items():
            value.copy_(tensors[prefix + key])


def export_lora(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None):
    """Write the trained adapter as a PEFT LoRA adapter (rank 2r, scaling 1) for the untouched base.

    ΔW = scale · (U_p S_p Vh_p − U_0 S_0 Vh_0): the change from the original weight, so
    `peft.PeftModel.from_pretrained(base, path)` gives the trained model's outputs (up to the rounding
    of a low-precision residual; over a quantized residual, of the model without its quantization error).
    """
    from peft import LoraConfig
    from peft.utils import SAFETENSORS_WEIGHTS_NAME

    layers = sorsa_layers(model)
    if not layers:
        raise UserError("export_lora: the model has no SORSA adapters")
    if getattr(model, MODULES_TO_SAVE_ATTR, None):
        raise UserError("export_lora: the model trains modules besides its adapters (modules_to_save, e.g. a "
                         "classification head), which a LoRA file does not hold; use the merged checkpoint")
    tensors = {}
    for name, layer in layers:
        trained = [t.detach().cpu() for t in (layer.U_p, layer.S_p, layer.Vh_p)]  # beside U_0, S_0, Vh_0 (CPU)
        B, A = SF.lora_factors(*trained, layer.U_0, layer.S_0, layer.Vh_0, layer.scale)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().cpu().contiguous()  # (2r, in)
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().cpu().contiguous()  # (out, 2r)
    rank2 = 2 * layers[0][1].rank
    lora_config = LoraConfig(r=rank2, lora_alpha=rank2, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                             target_modules=[name for name, _ in layers],
                             fan_in_fan_out=any(layer.transposed for _, layer in layers),  # GPT-2's Conv1D
                             base_model_name_or_path=base_model_name_or_path)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, path / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
    lora_config.save_pretrained(str(path))
