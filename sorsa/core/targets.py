"""Which layers an adapter method adapts: one table of default targets per architecture, and one rule that
decides whether a module is a target."""
from __future__ import annotations

import re

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D
from .errors import UserError

# The layers an adapter can wrap: nn.Linear (weight (out, in)) and transformers' Conv1D of the GPT-2 family
# (weight stored transposed, (in, out)).
LINEAR_TYPES = (nn.Linear, Conv1D)
ALL_LINEAR = "all-linear"  # every linear layer except the output head (PEFT's meaning)
# The seven projections of Llama / Mistral / Gemma, as in the paper's runs.
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# RWKV6: time-mix receptance / key / value / gate / output and channel-mix key / value / receptance
# (the reference's ["attention", "feed_forward"]).
RWKV_TARGETS = ["attention.receptance", "attention.key", "attention.value", "attention.gate",
                "attention.output", "feed_forward.key", "feed_forward.value", "feed_forward.receptance"]
# model_type (config.json) -> default target modules: every linear layer of the blocks, as the paper adapts
# Llama's. Fused projections (Phi-3's qkv_proj and gate_up_proj, GPT-2's c_attn) are one weight: one SVD.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": LLAMA_TARGETS,
    "mistral": LLAMA_TARGETS,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],
    "gemma": LLAMA_TARGETS,
    "gemma2": LLAMA_TARGETS,
    "qwen2": LLAMA_TARGETS,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D; c_proj is both the attention and the MLP output
    "rwkv6": RWKV_TARGETS,
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "output.dense", "intermediate.dense"],  # + attention.output
    "roberta": ["query", "key", "value", "output.dense", "intermediate.dense"],  # output.dense: both blocks' outputs
}


def features(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a Conv1D."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an nn.Linear or a Conv1D as the (out, in) matrix of y = W x (a view for Conv1D;
    float32 deq(W_q) for a bitsandbytes 4-bit / 8-bit layer)."""
    from .quant import dequantize_linear, is_quantized

    if is_quantized(module):
        return dequantize_linear(module)
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def default_targets(model_type: str | None = None, rwkv: bool = False) -> list[str]:
    """The default target modules of an architecture (`model_type` as in its config.json); the seven
    Llama projections for a model type that is not in the table."""
    if rwkv:
        model_type = "rwkv6"
    return list(DEFAULT_TARGETS.get(model_type or "llama", LLAMA_TARGETS))


def targets_of(cfg, model_type: str | None = None) -> list[str] | str:
    """A run's target modules (cfg: a RunConfig): as given ("all-linear" included, as the string ALL_LINEAR),
    else the architecture's defaults (by the model's config.model_type)."""
    if cfg.target_modules:
        return ALL_LINEAR if cfg.target_modules == [ALL_LINEAR] else cfg.target_modules
    return default_targets(model_type, rwkv=cfg.rwkv)


def is_target(name: str, targets: list[str] | str) -> bool:
    """Whether module `name` is adapted: `targets` is a regex matched against the whole name (a str) or a
    list of name suffixes matched at a dot boundary ("q_proj" matches "model.layers.0.self_attn.q_proj")."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_modules(model: nn.Module, target_modules: list[str] | str,
                        exclude: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs matched by `target_modules`: exact name suffixes, a regex, or "all-linear" (every
    nn.Linear / Conv1D except the output head and the modules under `exclude`)."""
    if target_modules == ALL_LINEAR or target_modules == [ALL_LINEAR]:
        return _all_linear(model, exclude)
    matched = []
    for name, module in model.named_modules():
        if not name or not is_target(name, target_modules):
            continue
        if isinstance(module, LINEAR_TYPES):
            matched.append((name, module))
        elif isinstance(target_modules, list) and not any(True for _ in module.children()):
            raise UserError(f"target {name!r} is a {type(module).__name__}; SORSA adapts nn.Linear (and Conv1D) "
                             "layers only: remove it from target_modules")
    if not matched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)})
        raise UserError(f"target_modules={target_modules!r} matched no nn.Linear layer (nor Conv1D) of "
                         f"{type(model).__name__}; its linear layers are named {linear} (or use all-linear)")
    return matched


def linear_layers(model: nn.Module, types: tuple = LINEAR_TYPES) -> list[tuple[str, nn.Module]]:
    """Every (name, layer) of `types` except the output head (the model's output embeddings): what all-linear
    adapts, what --quantize stores quantized, what the planner counts."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules() if n and isinstance(m, types) and m is not head]


def _all_linear(model: nn.Module, exclude: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """Every linear layer except the output head (the output embeddings) and those under `exclude`."""
    found = [(n, m) for n, m in linear_layers(model) if not any(n == e or n.startswith(e + ".") for e in exclude)]
    if not found:
        raise UserError(f"target_modules=all-linear: {type(model).__name__} has no linear layer besides its head")
    return found
