"""The Hugging Face Trainer plus SORSA's orthonormal regularizer (arXiv 2409.00055, Eq. 7).

No Trainer code is copied: a callback adds the regularizer's gradient between gradient clipping and the
optimizer step, and short overrides log L_o and keep checkpoints adapter-only. DeepSpeed, whose engine
clips and steps inside `backward`, needs another route: `sorsa/trainer_deepspeed.py`. The private Trainer methods overridden here (`_save`, `_load_from_checkpoint`) are
checked by tests/test_trainer.py, so a transformers upgrade that changes them fails loudly.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .adapter_io import restore_trained_factors, save_adapter
from .model import orthonormal_loss, sorsa_layers


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
        # Under DDP every rank holds the same adapters and, after the all-reduce, the same gradients,
        # so every rank adds the same term and the replicas stay identical.
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
    `ortho_loss` next to the task loss, and writes checkpoints holding the adapter only.
    Models without SORSA layers (LoRA, PiSSA, full fine-tuning) train as with the plain Trainer."""

    regularizer_as_callback = True  # False where the regularizer takes another route (DeepSpeed)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.regularizer = None
        if sorsa_layers(self.model) and getattr(self.args, "gamma", 0.0) > 0:
            self.regularizer = OrthonormalRegularizer(self.args.gamma)
            if self.regularizer_as_callback:
                self.add_callback(self.regularizer)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.regularizer is not None and self.regularizer.values and "loss" in logs:
            logs["ortho_loss"] = sum(self.regularizer.values) / len(self.regularizer.values)
            self.regularizer.values.clear()
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ saving

    @contextlib.contextmanager
    def full_trainable_parameters(self):
        """Inside the block every trainable parameter holds its whole float32 value on the main process
        (already so without DeepSpeed; see the DeepSpeed trainer)."""
        yield

    def save_sorsa_adapter(self, output_dir: str, metadata: dict | None = None) -> None:
        """Write the adapter (float32 factors) from the main process."""
        with self.full_trainable_parameters():
            if self.args.should_save:
                save_adapter(self.accelerator.unwrap_model(self.model), output_dir, metadata=metadata,
                             factors=self.initial_factors())

    def initial_factors(self) -> dict | None:
        """Float32 copies of U_0, S_0, Vh_0 to save instead of the layers' own buffers, or None (use those)."""
        return None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not sorsa_layers(self.model):
            return super()._save(output_dir, state_dict)
        if self.args.should_save:  # adapter only: the residual is re-derived from the base model
            save_adapter(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        if not sorsa_layers(model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_trained_factors(model, resume_from_checkpoint)

