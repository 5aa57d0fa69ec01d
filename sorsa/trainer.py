"""The Hugging Face Trainer plus SORSA's orthonormal regularizer (arXiv 2409.00055, Eq. 7).

No Trainer code is copied: a callback adds the regularizer's gradient between gradient clipping and
the optimizer step, and three short overrides log L_o and keep checkpoints adapter-only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from .model import ADAPTER_WEIGHTS, orthonormal_loss, save_adapter, sorsa_layers


@dataclass
class SORSATrainingArguments(TrainingArguments):
    """TrainingArguments plus gamma, the orthonormal regularizer's strength (0 turns it off)."""

    gamma: float = field(default=0.0, metadata={"help": "orthonormal regularizer coefficient (the paper's gamma)"})


def regularizer_coefficient(gamma: float, learning_rate: float, accumulation_steps: int) -> float:
    """The factor on ∇L_o added to the gradient once per optimizer step.

    The paper's update is W ← W − η ∇L_t − γ ∇L_o (Eq. 7); the reference folds it into the
    optimizer's gradient as (γ / η) ∇L_o, with η the configured (peak) learning rate, and its
    accelerate `backward` divides every loss, L_o included, by the accumulation steps.
    """
    return gamma / learning_rate / accumulation_steps  # the reference's effective coefficient


class OrthonormalRegularizer(TrainerCallback):
    """Adds coef · ∇L_o to the adapters' gradients after clipping, before `optimizer.step()`."""

    def __init__(self, gamma: float):
        self.gamma = gamma
        self.values: list[float] = []  # L_o at each optimizer step since the last log

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        layers = sorsa_layers(model)
        if not layers:
            return
        coef = regularizer_coefficient(self.gamma, args.learning_rate, args.gradient_accumulation_steps)
        params = [p for _, layer in layers for p in (layer.U_p, layer.Vh_p)]
        with torch.enable_grad(), torch.autocast(device_type=params[0].device.type, enabled=False):
            loss = orthonormal_loss(model)
            grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if p.grad is None:
                    p.grad = coef * g.to(p.dtype)
                else:
                    p.grad.add_(g.to(p.grad.dtype), alpha=coef)
        self.values.append(loss.item())


class SORSATrainer(Trainer):
    """Trainer that, for a model with SORSA layers, applies the orthonormal regularizer, logs
    `ortho_loss` next to the task loss, and writes checkpoints holding the adapter only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.regularizer = None
        if sorsa_layers(self.model) and getattr(self.args, "gamma", 0.0) > 0:
            self.regularizer = OrthonormalRegularizer(self.args.gamma)
            self.add_callback(self.regularizer)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.regularizer is not None and self.regularizer.values and "loss" in logs:
            logs["ortho_loss"] = sum(self.regularizer.values) / len(self.regularizer.values)
            self.regularizer.values.clear()
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not sorsa_layers(self.model):
            return super()._save(output_dir, state_dict)
        if self.args.should_save:  # adapter only: the residual is re-derived from the base model
            save_adapter(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        layers = sorsa_layers(model)
        if not layers:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        tensors = load_file(os.path.join(resume_from_checkpoint, ADAPTER_WEIGHTS))
        with torch.no_grad():
            for name, layer in layers:
                for f in ("U_p", "S_p", "Vh_p"):
                    getattr(layer, f).copy_(tensors[f"{name}.{f}"])
