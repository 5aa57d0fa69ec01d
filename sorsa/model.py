"""Model-level SORSA: inject adapters by target name, the orthonormal loss, merge and unload,
adapter save/load (safetensors + JSON), export as a PEFT LoRA, and the on-disk SVD cache.
Weights partitioned by DeepSpeed ZeRO-3 are gathered one at a time while they are decomposed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import functional as SF
from .config import SORSAConfig, dtype_name
from .fileio import atomic_save_safetensors, atomic_write_text
from .layer import SORSALinear

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "sorsa-adapter"
ADAPTER_FORMAT_VERSION = 1
_FACTORS = ("U_p", "S_p", "Vh_p", "U_0", "S_0", "Vh_0")


# ----------------------------------------------------------------------------- targets

def _is_target(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_modules(model: nn.Module, target_modules: list[str] | str) -> list[tuple[str, nn.Linear]]:
    """The (name, nn.Linear) pairs matched by `target_modules`: exact name suffixes or a regex."""
    matched = []
    for name, module in model.named_modules():
        if not name or not _is_target(name, target_modules):
            continue
        if isinstance(module, SORSALinear):
            raise ValueError(f"module {name!r} already has a SORSA adapter; apply_sorsa runs once per "
                             "model (merge_and_unload first to adapt again)")
        if isinstance(module, nn.Linear):
            matched.append((name, module))
        elif isinstance(target_modules, list) and not any(True for _ in module.children()):
            raise ValueError(f"target {name!r} is a {type(module).__name__}; SORSA adapts nn.Linear layers "
                             "only: remove it from target_modules")
    if not matched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear layer of "
                         f"{type(model).__name__}; its linear layers are named {linear}")
    return matched


def sorsa_layers(model: nn.Module) -> list[tuple[str, SORSALinear]]:
    """All (name, SORSALinear) pairs of the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SORSALinear)]


def _replace_module(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# ----------------------------------------------------------------------------- SVD cache

class SVDCache:
    """Top-r SVD factors on disk, one safetensors file per (weight, layer, rank, method) key.

    The key hashes the weight's bytes, shape and dtype together with the layer name, rank, method,
    and (for randomized SVD) niter and seed, so a changed weight or setting never reuses a stale
    entry. Files are written to a temporary name and renamed, so an interrupted write is never read.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(weight: torch.Tensor, name: str, rank: int, method: str, niter: int, seed: int) -> str:
        h = hashlib.sha256()
        w = weight.detach().contiguous().cpu()
        h.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
        settings = {"name": name, "shape": list(w.shape), "dtype": dtype_name(w.dtype), "rank": rank,
                    "method": method}
        if method == "randomized":
            settings.update(niter=niter, seed=seed)
        h.update(json.dumps(settings, sort_keys=True).encode())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        path = self._path(key)
        if not path.exists():
            return None
        t = load_file(str(path))
        return t["U"], t["S"], t["Vh"]

    def put(self, key: str, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor):
        tensors = {"U": U.detach().cpu().contiguous(), "S": S.detach().cpu().contiguous(),
                   "Vh": Vh.detach().cpu().contiguous()}
        atomic_save_safetensors(tensors, self._path(key))


# ----------------------------------------------------------------------------- apply

def apply_sorsa(model: nn.Module, config: SORSAConfig, svd_cache_dir: str | os.PathLike | None = None,
                progress: bool = True) -> nn.Module:
    """Replace every targeted nn.Linear of `model` by a SORSALinear, in place, and freeze the rest.

    Each weight is decomposed in float32 on its own device, one layer at a time, and W_res is written
    back in the residual dtype before the next layer starts, so the peak extra memory is one weight's
    float32 copy and its SVD factors, never a float32 copy of the model (tests/test_init_memory.py).
    A weight partitioned by DeepSpeed ZeRO-3 is gathered whole for its decomposition, every rank
    decomposes it identically (the factors are then taken from rank 0, so they agree bit for bit),
    and W_res goes back into the partitioned parameter. With `svd_cache_dir`, decompositions are read
    from / written to an `SVDCache` there. Returns the model.
    """
    targets = find_target_modules(model, config.target_modules)
    for name, linear in targets:
        if config.rank > min(linear.in_features, linear.out_features):
            raise ValueError(f"rank={config.rank} is larger than min(in, out) = "
                             f"{min(linear.in_features, linear.out_features)} of layer {name!r} "
                             f"({linear.out_features}x{linear.in_features}); choose a smaller rank")
    cache = SVDCache(svd_cache_dir) if svd_cache_dir is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    main_rank = _rank() == 0
    bar = tqdm(targets, desc=f"SORSA init ({config.svd} SVD, r={config.rank})", unit="layer",
               disable=not progress or not main_rank, dynamic_ncols=True)
    for name, linear in bar:
        weight = linear.weight
        with _whole_weight(weight):
            factors = None
            if cache is not None:
                key = cache.key(weight, name, config.rank, config.svd, config.niter, config.seed)
                factors = cache.get(key)
            if factors is None:
                factors = SF.svd_top(weight, config.rank, config.svd, config.niter, config.seed)
                if cache is not None and main_rank:
                    cache.put(key, *factors)
            if _is_partitioned(weight):
                factors = _from_rank_zero(factors)
            U, S, Vh = factors
            layer = SORSALinear(linear, config.rank, config.scale, config.dropout, config.adapter_dtype)
            layer.set_factors(U, S / config.scale, Vh, config.residual_dtype)
            del factors, U, S, Vh
            if _is_partitioned(weight):
                # set_factors made W_res a new, whole parameter; put it into the partitioned one instead,
                # which rank 0's copy re-partitions on leaving the block (its dtype is DeepSpeed's).
                W_res = linear.weight.data
                linear.weight = weight
                weight.data.copy_(W_res)
                del W_res
        _replace_module(model, name, layer)
        del weight, layer  # the replaced weight is freed here, before the next layer is decomposed
    model.sorsa_config = config
    return model


# ----------------------------------------------------------------------------- DeepSpeed ZeRO-3

def _is_partitioned(p: torch.Tensor) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 partitions across ranks (its .data is a placeholder)."""
    return hasattr(p, "ds_id")


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _whole_weight(param: torch.Tensor):
    """Inside the block `param` is whole on every rank; rank 0's changes are kept and re-partitioned on
    exit. A parameter that is not partitioned passes through untouched."""
    return gathered_parameters([param], modifier_rank=0)


def _from_rank_zero(tensors):
    """The same tensors on every rank: rank 0's values, broadcast in place (a no-op for one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        tensors = tuple(t.contiguous() for t in tensors)
        for t in tensors:
            torch.distributed.broadcast(t, src=0)
    return tensors


@contextlib.contextmanager
def gathered_parameters(params, modifier_rank: int | None = None):
    """Whole ZeRO-3 parameters inside the block (read-only unless `modifier_rank`); others pass through.

    Collective under ZeRO-3: every rank must enter it with the same parameters in the same order.
    """
    params = [p for p in params if _is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


# ----------------------------------------------------------------------------- loss / merge

def orthonormal_loss(model: nn.Module) -> torch.Tensor:
    """L_o: the mean over all adapter matrices (two per layer) of ‖U_pᵀU_p − I‖_F and ‖Vh_p Vh_pᵀ − I‖_F.

    Unsquared Frobenius norms averaged as in the reference implementation, so the paper's gamma
    means the same here (arXiv 2409.00055, Eq. 6). A 0-dim differentiable float32 tensor.
    """
    terms = []
    for _, layer in sorsa_layers(model):
        if not layer.merged:
            terms.extend(SF.orthonormal_loss_pair(layer.U_p, layer.Vh_p))
    if not terms:
        raise ValueError("orthonormal_loss: the model has no (unmerged) SORSA layers; call apply_sorsa first")
    return torch.stack(terms).mean()


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every adapter into its weight (W_res + scale · U_p diag(S_p) Vh_p in float32, then cast to
    `dtype`, default the residual's dtype) and put the plain nn.Linear back. In place; returns the model,
    whose state-dict keys are the base model's. A model without SORSA layers is returned unchanged.
    """
    for name, layer in sorsa_layers(model):
        layer.merge(dtype)
        _replace_module(model, name, layer.base_layer)
    if hasattr(model, "sorsa_config"):
        del model.sorsa_config
    return model


# ----------------------------------------------------------------------------- save / load

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
        raise ValueError("save_adapter: the model has no SORSA adapters (apply_sorsa or load_adapter first)")
    if any(layer.merged for _, layer in layers):
        raise ValueError("save_adapter: the adapters are merged into the weights; save before merging")
    factors = factors or {}
    tensors = {}
    for name, layer in layers:
        for f in _FACTORS:
            value = factors.get(f"{name}.{f}", getattr(layer, f))
            if value.numel() == 0:  # a ZeRO-3 placeholder: the caller must gather or pass `factors`
                raise ValueError(f"save_adapter: {name}.{f} is partitioned (DeepSpeed ZeRO-3); save inside "
                                 "gathered_parameters(...) or pass the gathered tensors as `factors`")
            tensors[f"{name}.{f}"] = value.detach().cpu().contiguous()
    path = Path(path)
    atomic_save_safetensors(tensors, path / ADAPTER_WEIGHTS, metadata={"format": ADAPTER_FORMAT})
    info = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION, "config": config.to_dict(),
            "layers": [name for name, _ in layers], **(metadata or {})}
    atomic_write_text(path / ADAPTER_CONFIG, json.dumps(info, indent=2) + "\n")


def read_adapter_config(path: str | os.PathLike) -> tuple[SORSAConfig, dict]:
    """The SORSAConfig and the whole JSON record of a saved adapter directory."""
    cfg_path = Path(path) / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} does not exist: {path} is not a saved SORSA adapter")
    info = json.loads(cfg_path.read_text())
    if info.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{cfg_path} is not a SORSA adapter (format={info.get('format')!r})")
    return SORSAConfig.from_dict(info["config"]), info


@torch.no_grad()
def load_adapter(base: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put a saved adapter onto a freshly loaded base model, in place: the trained model, exactly.

    W_res is recomputed from the base weights and the stored initial factors with the same float32
    arithmetic as the initialisation, so no SVD runs and the result does not depend on any seed.
    """
    config, info = read_adapter_config(path)
    tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    modules = dict(base.named_modules())
    for p in base.parameters():
        p.requires_grad_(False)
    for name in info["layers"]:
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"adapter {path} adapts {name!r}, which is "
                             f"{'missing from' if linear is None else 'not an nn.Linear in'} "
                             f"{type(base).__name__}: load it onto the base model it was trained from")
        t = {f: tensors[f"{name}.{f}"] for f in _FACTORS}
        if t["U_0"].shape != (linear.out_features, config.rank) or t["Vh_0"].shape != (config.rank, linear.in_features):
            raise ValueError(f"adapter {path}: layer {name!r} has shape {linear.out_features}x{linear.in_features} "
                             f"in the base model but the adapter was made for {t['U_0'].shape[0]}x{t['Vh_0'].shape[1]}")
        layer = SORSALinear(linear, config.rank, config.scale, config.dropout, config.adapter_dtype)
        layer.set_factors(t["U_0"], t["S_0"], t["Vh_0"], config.residual_dtype)
        layer.U_p.copy_(t["U_p"]), layer.S_p.copy_(t["S_p"]), layer.Vh_p.copy_(t["Vh_p"])
        _replace_module(base, name, layer)
    base.sorsa_config = config
    return base


def export_lora(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None):
    """Write the trained adapter as a PEFT LoRA adapter (rank 2r, scaling 1) for the untouched base.

    ΔW = scale · (U_p S_p Vh_p − U_0 S_0 Vh_0): the change from the original weight, so
    `peft.PeftModel.from_pretrained(base, path)` gives the trained model's outputs (up to the rounding
    of a low-precision residual).
    """
    from peft import LoraConfig

    layers = sorsa_layers(model)
    if not layers:
        raise ValueError("export_lora: the model has no SORSA adapters")
    tensors = {}
    for name, layer in layers:
        B, A = SF.lora_factors(layer.U_p, layer.S_p, layer.Vh_p, layer.U_0, layer.S_0, layer.Vh_0, layer.scale)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().cpu().contiguous()  # (2r, in)
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().cpu().contiguous()  # (out, 2r)
    rank2 = 2 * layers[0][1].rank
    lora_config = LoraConfig(r=rank2, lora_alpha=rank2, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                             target_modules=[name for name, _ in layers],
                             base_model_name_or_path=base_model_name_or_path)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    lora_config.save_pretrained(str(path))


# ----------------------------------------------------------------------------- summary

def _numel(p: torch.Tensor) -> int:
    return p.ds_numel if _is_partitioned(p) else p.numel()  # ZeRO-3: the whole parameter's size


def parameter_summary(model: nn.Module) -> dict:
    """Trainable and total parameter counts; for SORSA the trainable count is Σ r(in + out + 1)."""
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / max(total, 1)}


def format_parameter_summary(model: nn.Module) -> str:
    s = parameter_summary(model)
    return (f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || "
            f"trainable%: {s['trainable_percent']:.4f}")
