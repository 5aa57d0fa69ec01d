"""Model-level SORSA: inject adapters into the targeted layers (SVD initialisation, one layer at a time),
the orthonormal loss over all adapters, merge and unload, and parameter counts."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import functional as SF
from .config import SORSAConfig
from .distributed import from_rank_zero, full_numel, gathered_parameters, is_partitioned, process_rank
from .layer import SORSALinear
from .svd_cache import SVDCache
from .targets import find_target_modules


def sorsa_layers(model: nn.Module) -> list[tuple[str, SORSALinear]]:
    """All (name, SORSALinear) pairs of the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SORSALinear)]


def replace_module(model: nn.Module, name: str, new: nn.Module):
    """Put `new` where the submodule `name` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


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
    bar = tqdm(targets, desc=f"SORSA init ({config.svd} SVD, r={config.rank})", unit="layer",
               disable=not progress or process_rank() != 0, dynamic_ncols=True)
    for name, linear in bar:
        layer = _adapt_layer(name, linear, config, cache)
        replace_module(model, name, layer)
        del linear, layer  # the original weight is freed here, before the next layer is decomposed
    model.sorsa_config = config
    return model


def _adapt_layer(name: str, linear: nn.Linear, config: SORSAConfig, cache: SVDCache | None) -> SORSALinear:
    """One targeted layer wrapped in a SORSALinear: the top-r SVD of its weight (or the cached one) gives the
    initial adapter, and the weight becomes W_res."""
    weight = linear.weight
    with gathered_parameters([weight], modifier_rank=0):  # whole on every rank while it is decomposed
        key = cache.key(weight, name, config.rank, config.svd, config.niter, config.seed) if cache else None
        factors = cache.get(key) if cache else None
        if factors is None:
            factors = SF.svd_top(weight, config.rank, config.svd, config.niter, config.seed)
            if cache is not None and process_rank() == 0:
                cache.put(key, *factors)
        if is_partitioned(weight):
            factors = from_rank_zero(factors)
        layer = SORSALinear(linear, config.rank, config.scale, config.dropout, config.adapter_dtype)
        layer.set_factors(*SF.initial_adapter(*factors, config.scale, config.alpha_init), config.residual_dtype)
        del factors
        if is_partitioned(weight):
            # set_factors made W_res a new, whole parameter; put it into the partitioned one instead,
            # which rank 0's copy re-partitions on leaving the block (its dtype is DeepSpeed's).
            W_res = linear.weight.data
            linear.weight = weight
            weight.data.copy_(W_res)
    return layer


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
        replace_module(model, name, layer.base_layer)
    if hasattr(model, "sorsa_config"):
        del model.sorsa_config
    return model


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight in place, keeping the SORSA layers (and W_res aside), so that
    `unmerge_adapter` restores the unmerged model exactly. Generation then costs one matmul per layer."""
    for _, layer in sorsa_layers(model):
        layer.merge(keep_residual=True)
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Undo `merge_adapter` in place: every W_res comes back bit for bit."""
    for _, layer in sorsa_layers(model):
        layer.unmerge()
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Inside the block the model computes the base model's output, W = W_res + scale · U_0 diag(S_0) Vh_0
    (the original weight up to the residual's rounding), while the adapters stay in place; merged layers are
    unmerged for the block and merged again after it."""
    layers = [layer for _, layer in sorsa_layers(model)]
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for layer in merged:
            layer.merge(keep_residual=True)


# ----------------------------------------------------------------------------- summary

def parameter_summary(model: nn.Module) -> dict:
    """Trainable and total parameter counts; for SORSA the trainable count is Σ r(in + out + 1)."""
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(full_numel(p) for p in model.parameters())
    return {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / max(total, 1)}


def format_parameter_summary(model: nn.Module) -> str:
    s = parameter_summary(model)
    return (f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || "
            f"trainable%: {s['trainable_percent']:.4f}")
