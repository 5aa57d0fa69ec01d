"""Which layers an adapter method adapts: one table of default targets per architecture, and one rule that
decides whether a module is a target."""
from __future__ import annotations

import re

import torch.nn as nn

# The seven projections of Llama / Mistral / Gemma, as in the paper's runs.
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# RWKV6: time-mix receptance / key / value / gate / output and channel-mix key / value / receptance
# (the reference's ["attention", "feed_forward"]).
RWKV_TARGETS = ["attention.receptance", "attention.key", "attention.value", "attention.gate",
                "attention.output", "feed_forward.key", "feed_forward.value", "feed_forward.receptance"]
# model_type (config.json) -> default target modules.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": LLAMA_TARGETS,
    "mistral": LLAMA_TARGETS,
    "gemma": LLAMA_TARGETS,
    "rwkv6": RWKV_TARGETS,
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "output.dense", "intermediate.dense"],  # + attention.output
    "roberta": ["query", "key", "value", "output.dense", "intermediate.dense"],  # output.dense: both blocks' outputs
}


def default_targets(model_type: str | None = None, rwkv: bool = False) -> list[str]:
    """The default target modules of an architecture (`model_type` as in its config.json); the seven
    Llama projections for a model type that is not in the table."""
    if rwkv:
        model_type = "rwkv6"
    return list(DEFAULT_TARGETS.get(model_type or "llama", LLAMA_TARGETS))


def is_target(name: str, targets: list[str] | str) -> bool:
    """Whether module `name` is adapted: `targets` is a regex matched against the whole name (a str) or a
    list of name suffixes matched at a dot boundary ("q_proj" matches "model.layers.0.self_attn.q_proj")."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_modules(model: nn.Module, target_modules: list[str] | str) -> list[tuple[str, nn.Linear]]:
    """The (name, nn.Linear) pairs matched by `target_modules`: exact name suffixes or a regex."""
    from .layer import SORSALinear

    matched = []
    for name, module in model.named_modules():
        if not name or not is_target(name, target_modules):
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
