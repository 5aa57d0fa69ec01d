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

from ..core.adapter_io import restore_trained_factors, save_adapter
from .settings import LOSS_NORMALIZATIONS
from ..core.model import orthonormal_loss, sorsa_layers
from ..core.errors import UserError


@dataclass
class SORSATrainingArguments(TrainingArguments):
    """TrainingArguments plus gamma, the orthonormal regularizer's strength (0 turns it off), and how the task
    loss is normalised over a gradient-accumulation window."""

    gamma: float = field(default=0.0, metadata={"help": "orthonormal regularizer coefficient (the paper's gamma)"})
    loss_normalization: str = field(default="tokens", metadata={
        "help": "'reference': each micro-batch's mean token loss divided by the accumulation steps (the reference "
                "trainer, through accelerate); 'tokens': the window's token sum divided by its token count "
                "(transformers 5)", "choices": LOSS_NORMALIZATIONS})

    def __post_init__(self):
        super().__post_init__()
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise UserError(f"loss_normalization={self.loss_normalization!r} is unknown; use one of "
                             f"{list(LOSS_NORMALIZATIONS)}")


def regularizer_coefficient(gamma: float, learning_rate: float, accumulation_steps: int) -> float:
    """The factor on ∇L_o added to the gradient once per optimizer step.

    The paper's update is W ← W − η ∇L_t − γ ∇L_o (Eq. 7); the reference folds it into the
    optimizer's gradient as (γ / η) ∇L_o, with η the configured (peak) learning rate, and its
    accelerate `backward` divides every loss, L_o included, by the accumulation steps.
    """
    return gamma / learning_rate / accumulation_steps  # the reference's effective coefficient


class OrthonormalRegularizer(TrainerCallback):
    """Adds coef · ∇L_o to the adapters' gradients after clipping, before `optimizer.step()`; with gamma 0
    it only records L_o, so every SORSA run logs how far U_p and Vh_p drift from orthonormal.

    `grad_scale()` gives the factor the gradients still carry at that point: under fp16 with a loss scaler
    and no clipping, the Trainer has not unscaled them yet (clipping unscales first), so the regularizer's
    gradient is scaled the same way and the scaler's unscale then treats both alike.
    """

    def __init__(self, gamma: float, grad_scale=lambda: 1.0, loss_fn=orthonormal_loss, params_fn=None):
        self.gamma = gamma
        self.grad_scale = grad_scale
        self.loss_fn = loss_fn  # L_o of a model (the DeepSpeed trainer gathers ZeRO-3 partitions)
        # the regularized tensors of a model: every SORSA layer's U_p and Vh_p (sorsa.peft: its active adapters')
        self.params_fn = params_fn or (lambda model: [p for _, layer in sorsa_layers(model)
                                                     for p in (layer.U_p, layer.Vh_p)])
        self.values: list[float] = []  # L_o at each optimizer step since the last log

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = self.params_fn(model)
        if not params:
            return
        if self.gamma == 0:
            with torch.no_grad():
                self.values.append(self.loss_fn(model).item())
            return
        # Under DDP every rank holds the same adapters and, after the all-reduce, the same gradients,
        # so every rank adds the same term and the replicas stay identical.
        coef = regularizer_coefficient(self.gamma, args.learning_rate, args.gradient_accumulation_steps)
        coef *= self.grad_scale()
        with torch.enable_grad(), torch.autocast(device_type=params[0].device.type, enabled=False):
            loss = self.loss_fn(model)
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
    ortho_loss_fn = staticmethod(orthonormal_loss)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.regularizer = None  # adds the regularizer's gradient (gamma > 0)
        self.ortho_monitor = None  # records L_o at every step, whether or not it is regularized
        if sorsa_layers(self.model):
            gamma = getattr(self.args, "gamma", 0.0)
            self.ortho_monitor = OrthonormalRegularizer(gamma, grad_scale=self._unapplied_grad_scale,
                                                        loss_fn=self.ortho_loss_fn)
            self.regularizer = self.ortho_monitor if gamma > 0 else None
            if self.regularizer_as_callback or self.regularizer is None:
                self.add_callback(self.ortho_monitor)
        if getattr(self.args, "loss_normalization", "tokens") == "reference":
            self.loss_is_scaled_for_ga = True  # compute_loss divides by the accumulation steps itself

    def _unapplied_grad_scale(self) -> float:
        """The loss scale the gradients still carry before the optimizer step: fp16's scale when nothing has
        unscaled them (the Trainer unscales only to clip), else 1."""
        scaler = getattr(self.accelerator, "scaler", None)
        clipped = self.args.max_grad_norm is not None and self.args.max_grad_norm > 0
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() and not clipped else 1.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if getattr(self.args, "loss_normalization", "tokens") != "reference" or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # The reference's normalisation (its transformers 4.44 trainer through accelerate): the model's mean
        # token loss of this micro-batch alone, divided by the configured accumulation steps, also in a last,
        # partial window. Under DDP the gradients are then averaged over the ranks, as there.
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)
        loss, outputs = out if return_outputs else (out, None)
        loss = loss / self.args.gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        monitor = self.ortho_monitor
        if monitor is not None and monitor.values and "loss" in logs:
            logs["ortho_loss"] = sum(monitor.values) / len(monitor.values)
            monitor.values.clear()
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
                save_adapter(self.accelerator.unwrap_model(self.model), output_dir, metadata=metadata)

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

