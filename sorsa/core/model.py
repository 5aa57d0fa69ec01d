"""Model-level SORSA: inject adapters into the targeted layers (SVD initialisation, one layer at a time),
the orthonormal loss over all adapters, merge and unload, and parameter counts."""
from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import functional as SF
from .options import SORSAConfig
from .distributed import from_rank_zero, full_numel, gathered_parameters, is_partitioned, process_rank
from .layer import SORSALinear
from .svd_cache import SVDCache
from .targets import dense_weight, features, find_target_modules, linear_layers
from .errors import UserError


def sorsa_layers(model: nn.Module) -> list[tuple[str, SORSALinear]]:
    """All (name, SORSALinear) pairs of the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SORSALinear)]


def replace_module(model: nn.Module, name: str, new: nn.Module):
    """Put `new` where the submodule `name` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# ----------------------------------------------------------------------------- apply

def apply_sorsa(model: nn.Module, config: SORSAConfig, svd_cache_dir: str | os.PathLike | None = None,
                progress: bool = True, batch_init: bool | None = None,
                batch_memory: int | None = None) -> nn.Module:
    """Replace every targeted linear layer of `model` (nn.Linear, or a GPT-2 style Conv1D) by a SORSALinear,
    in place, and freeze the rest.

    Each weight is decomposed in float32 on its own device and W_res is written back in the residual dtype
    before the next weight (or batch) starts, so the peak extra memory is bounded by one weight's (or one
    batch's) float32 copy and its factors, never a float32 copy of the model (tests/test_init_memory.py).
    `batch_init`: decompose same-shaped weights together (torch.linalg.svd and the fast SVD both batch),
    at most `batch_memory` bytes of float32 weight copies at once (default: a quarter of the free GPU
    memory); None batches on a CUDA device, where it pays, and goes one weight at a time on the CPU.
    A weight partitioned by DeepSpeed ZeRO-3 is gathered whole for its decomposition, every rank
    decomposes it identically (the factors are then taken from rank 0, so they agree bit for bit),
    and W_res goes back into the partitioned parameter. With `svd_cache_dir`, decompositions are read
    from / written to an `SVDCache` there. The per-layer SVD record (seconds; for "fast" also iterations
    and the final energy change) is kept in `model.sorsa_init_log`. Returns the model.
    """
    adapted = sorsa_layers(model)
    if adapted:
        raise UserError(f"module {adapted[0][0]!r} already has a SORSA adapter; apply_sorsa runs once per model "
                         "(merge_and_unload first to adapt again)")
    targets = find_target_modules(model, config.target_modules)
    check_rank(targets, config.rank)
    cache = SVDCache(svd_cache_dir) if svd_cache_dir is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    log: list[dict] = []
    bar = tqdm(total=len(targets), desc=f"SORSA init ({config.svd} SVD, r={config.rank})", unit="layer",
               disable=not progress or process_rank() != 0, dynamic_ncols=True)
    for group in _init_groups(targets, batch_init, batch_memory, config):
        if len(group) == 1:
            layers = [adapt_linear(*group[0], config, cache, log)]
        else:
            factors = _decompose_batch(group, config, cache, log)
            layers = [_wrap(linear, config, f) for (_, linear), f in zip(group, factors)]
        for (name, _), layer in zip(group, layers):
            replace_module(model, name, layer)
        bar.update(len(group))
    bar.close()
    if config.quantize is not None:  # as QLoRA: the other linear layers (not the output head) quantized too
        quantize_linear_layers(model, config.quant_spec())
    model.sorsa_config = config
    model.sorsa_init_log = log
    if progress and process_rank() == 0 and config.svd == "fast" and log:
        print(f"[sorsa] {init_summary(log, config)}")
    return model


def check_rank(targets: list[tuple[str, nn.Module]], rank: int) -> None:
    """A ValueError naming the first target layer whose min(out, in) is below `rank`."""
    for name, linear in targets:
        out_f, in_f = features(linear)
        if rank > min(in_f, out_f):
            raise UserError(f"rank={rank} is larger than min(in, out) = {min(in_f, out_f)} of layer "
                             f"{name!r} ({out_f}x{in_f}); choose a smaller rank")


def init_summary(log: list[dict], config: SORSAConfig) -> str:
    """One line on how the fast SVD converged over all layers (iterations, worst final energy change)."""
    done = [e for e in log if "iterations" in e]
    if not done:
        return "all factors from the SVD cache"
    its = sorted(e["iterations"] for e in done)
    worst = max(done, key=lambda e: e["change"])
    capped = sum(e["change"] >= config.svd_tol for e in done)
    return (f"fast SVD of {len(done)} layers: {its[0]}-{its[-1]} iterations (median {its[len(its) // 2]}); "
            f"{len(done) - capped} reached the energy tolerance {config.svd_tol:g}, {capped} stopped at "
            f"{config.svd_max_iter} iterations; largest final change {worst['change']:.1e} ({worst['layer']})")


def _init_groups(targets, batch_init: bool | None, batch_memory: int | None, config: SORSAConfig) -> list[list]:
    """The targets in decomposition groups: one weight each, or same-shaped whole weights batched (not with a
    quantized residual, whose rounds run per weight, nor with the randomized SVD, torch.svd_lowrank, which
    takes one matrix)."""
    on_gpu = bool(targets) and targets[0][1].weight.device.type == "cuda"
    one_at_a_time = config.quantize is not None or config.svd == "randomized"
    if one_at_a_time or not (on_gpu if batch_init is None else batch_init):
        return [[t] for t in targets]
    if batch_memory is None:
        batch_memory = torch.cuda.mem_get_info()[0] // 4 if on_gpu else 2 ** 31
    groups: dict = {}
    for name, linear in targets:
        w = linear.weight
        key = (tuple(w.shape), w.device, w.dtype, is_partitioned(w))
        groups.setdefault(key, []).append((name, linear))
    out = []
    for (shape, _, _, partitioned), members in groups.items():
        size = 1 if partitioned else max(1, batch_memory // (4 * shape[0] * shape[1]))
        out += [members[i:i + size] for i in range(0, len(members), size)]
    return out


def _factors(weight: torch.Tensor, name: str, config: SORSAConfig, cache: SVDCache | None, log: list):
    """The initial adapter (U_p, S_p, Vh_p) of one weight: its top-r SVD (from the cache or computed and cached)
    split by `initial_adapter`, or, for a quantized residual, PiSSA's alternating rounds (the cache then holds
    their result, under a key with the quantization settings). The record goes to `log`."""
    options = config.svd_options()
    spec = config.quant_spec()
    if spec is not None:
        options = {**options, "scale": config.scale, "alpha_init": config.alpha_init, "quantize": spec.quant_type,
                   "quant_iters": config.quant_iters, "quant_blocksize": spec.blocksize, "quant_double": spec.double}
    key = cache.key(weight, name, config.rank, config.svd, options) if cache else None
    factors = cache.get(key, weight.device) if cache else None
    if factors is not None:
        log.append({"layer": name, "cached": True})
    else:
        info, start = {}, time.perf_counter()
        if spec is not None:
            from .quant import quantizer

            factors = SF.quantized_split(weight, config.rank, *quantizer(spec), config.quant_iters, config.scale,
                                         config.alpha_init, config.svd, info=info, **config.svd_options())
        else:
            factors = SF.svd_top(weight, config.rank, config.svd, info=info, **config.svd_options())
        log.append({"layer": name, "seconds": time.perf_counter() - start, **info})
        if cache is not None and process_rank() == 0:
            cache.put(key, *factors)
    return factors if spec is not None else SF.initial_adapter(*factors, config.scale, config.alpha_init)


def _decompose_batch(group, config: SORSAConfig, cache: SVDCache | None, log: list) -> list[tuple]:
    """Factors of a group of same-shaped weights: cached ones read, the rest decomposed in one batched call."""
    keys = [cache.key(dense_weight(linear), name, config.rank, config.svd, config.svd_options()) if cache else None
            for name, linear in group]
    found = [cache.get(k, linear.weight.device) if cache else None for k, (_, linear) in zip(keys, group)]
    todo = [i for i, f in enumerate(found) if f is None]
    if todo:
        info, start = {}, time.perf_counter()
        stacked = torch.stack([dense_weight(group[i][1]).detach() for i in todo])  # (B, out, in)
        U, S, Vh = SF.svd_top(stacked, config.rank, config.svd, info=info, **config.svd_options())
        del stacked
        seconds = (time.perf_counter() - start) / len(todo)
        for j, i in enumerate(todo):
            found[i] = (U[j], S[j], Vh[j])  # the SVD; cached as such, split below
            log.append({"layer": group[i][0], "seconds": seconds, "batch": len(todo), **info})
            if cache is not None and process_rank() == 0:
                cache.put(keys[i], *found[i])
    log.extend({"layer": group[i][0], "cached": True} for i in range(len(group)) if i not in todo)
    return [SF.initial_adapter(*f, config.scale, config.alpha_init) for f in found]


def _wrap(linear: nn.Module, config: SORSAConfig, factors) -> SORSALinear:
    """`linear` in a SORSALinear initialised with the adapter `factors` (U_p, S_p, Vh_p); its weight becomes
    W_res (quantized for a quantized config)."""
    layer = SORSALinear(linear, config.rank, config.scale, config.dropout, config.adapter_dtype)
    layer.set_factors(*factors, config.residual_dtype, quant=config.quant_spec())
    return layer


def adapt_linear(name: str, linear: nn.Module, config: SORSAConfig, cache: SVDCache | None = None,
                 log: list | None = None) -> SORSALinear:
    """One targeted layer wrapped in a SORSALinear (gathered whole while it is decomposed under ZeRO-3); its
    SVD record goes to `log`."""
    weight = linear.weight
    with gathered_parameters([weight], modifier_rank=0):  # whole on every rank while it is decomposed
        factors = _factors(dense_weight(linear), name, config, cache, log if log is not None else [])
        if is_partitioned(weight):
            factors = from_rank_zero(factors)
        layer = _wrap(linear, config, factors)
        del factors
        if is_partitioned(weight):
            # set_factors made W_res a new, whole parameter; put it into the partitioned one instead,
            # which rank 0's copy re-partitions on leaving the block (its dtype is DeepSpeed's).
            W_res = linear.weight.data
            linear.weight = weight
            weight.data.copy_(W_res)
    return layer


@torch.no_grad()
def quantize_linear_layers(model: nn.Module, spec) -> list[str]:
    """Replace every plain nn.Linear of `model` — not an adapted layer's, not the output head, not one already
    quantized — by its quantized form (`spec`: a sorsa.quant.QuantSpec), in place; returns their names."""
    from .quant import is_quantized, quantize_linear

    inside = {id(layer.base_layer) for _, layer in sorsa_layers(model)}
    names = [n for n, m in linear_layers(model, (nn.Linear,)) if id(m) not in inside and not is_quantized(m)]
    for name in names:
        module = model.get_submodule(name)
        replace_module(model, name, quantize_linear(module.weight, module.bias, spec))
        del module
    return names


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
        raise UserError("orthonormal_loss: the model has no (unmerged) SORSA layers; call apply_sorsa first")
    return torch.stack(terms).mean()


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every adapter into its weight (W_res + scale · U_p diag(S_p) Vh_p in float32, then cast to
    `dtype`; default the residual's dtype, or for a quantized residual its compute dtype, the merge being
    deq(W_q) + adapter) and put the plain layer back (nn.Linear or Conv1D, in its own layout). In place; returns
    the model, whose state-dict keys are the base model's. A model without SORSA layers is returned unchanged.
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
