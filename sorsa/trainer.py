"""The Hugging Face Trainer plus SORSA's orthonormal regularizer (arXiv 2409.00055, Eq. 7).

No Trainer code is copied: a callback adds the regularizer's gradient between gradient clipping and
the optimizer step, and short overrides log L_o and keep checkpoints adapter-only. Under DeepSpeed
(ZeRO-2/3), where the engine clips and steps inside `backward`, the regularizer enters the loss instead
(see `SORSATrainer.compute_loss` for the one deviation that follows).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from .functional import orthonormal_loss_pair
from .model import ADAPTER_WEIGHTS, gathered_parameters, orthonormal_loss, save_adapter, sorsa_layers


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


def orthonormal_loss_gathered(model) -> torch.Tensor:
    """L_o of `model` with each layer's U_p, Vh_p gathered while its terms are built (ZeRO-3-safe).

    The terms use copies made inside the gather, so their backward never reads the partitioned
    parameters; the gradient still flows into U_p / Vh_p, where DeepSpeed's hooks reduce it with
    the task gradient of the same backward pass. Without ZeRO-3 this equals `orthonormal_loss`.
    """
    terms = []
    for _, layer in sorsa_layers(model):
        with gathered_parameters([layer.U_p, layer.Vh_p]):
            U, Vh = layer.U_p.clone(), layer.Vh_p.clone()  # (out, r), (r, in)
        terms.extend(orthonormal_loss_pair(U, Vh))
    return torch.stack(terms).mean()


class SORSATrainer(Trainer):
    """Trainer that, for a model with SORSA layers, applies the orthonormal regularizer, logs
    `ortho_loss` next to the task loss, and writes checkpoints holding the adapter only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.regularizer = None
        self._regularizer_in_loss = None  # under DeepSpeed: coef · L_o added to this micro-batch's loss
        layers = sorsa_layers(self.model)
        if layers and getattr(self.args, "gamma", 0.0) > 0:
            self.regularizer = OrthonormalRegularizer(self.args.gamma)
            if not self.is_deepspeed_enabled:
                self.add_callback(self.regularizer)
        # The initial factors define W_res, so the saved ones must be the float32 values used at
        # initialisation; DeepSpeed before 0.19 casts every buffer to bf16 with the model. The main
        # process (the one that saves) keeps a CPU copy.
        self._initial_factors = None
        if layers and self.is_deepspeed_enabled and self.args.process_index == 0:
            self._initial_factors = {f"{name}.{f}": getattr(layer, f).detach().to("cpu", copy=True)
                                     for name, layer in layers for f in ("U_0", "S_0", "Vh_0")}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        if not (self.is_deepspeed_enabled and self.regularizer is not None and model.training
                and self.accelerator.sync_gradients):
            return out
        # DeepSpeed clips and steps inside `backward`, so no callback can reach the gradient between
        # the two; instead coef · L_o joins the loss of the last micro-batch of each accumulation window,
        # on every rank, so that after DeepSpeed averages over the ranks the optimizer sees the same
        # task gradient + coef · ∇L_o as without DeepSpeed.
        # Deviation from the single-process order (and the reference): the regularizer's gradient is
        # now inside the clipped sum, so the reported grad norm includes it and, on steps where clipping
        # is active (norm > max_grad_norm), it is scaled down with the task gradient by the same factor
        # instead of being added unclipped. Without clipping the update is the same (tests/test_distributed.py).
        loss, outputs = out if return_outputs else (out, None)
        coef = regularizer_coefficient(self.args.gamma, self.args.learning_rate, self.args.gradient_accumulation_steps)
        with torch.autocast(device_type=loss.device.type, enabled=False):
            ortho = orthonormal_loss_gathered(self.accelerator.unwrap_model(model))
        term = coef * ortho
        # training_step divides a loss that is not already normalised over the accumulation window by the
        # window's length; pre-multiply so that exactly coef · L_o reaches backward.
        scaled_for_ga = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else (
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)
        loss = loss + (term if scaled_for_ga else term * self.current_gradient_accumulation_steps)
        self._regularizer_in_loss = term.detach()
        self.regularizer.values.append(ortho.item())
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._regularizer_in_loss is not None:  # log the task loss alone, as without DeepSpeed
            loss = loss - self._regularizer_in_loss.to(loss.device)
            self._regularizer_in_loss = None
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.regularizer is not None and self.regularizer.values and "loss" in logs:
            logs["ortho_loss"] = sum(self.regularizer.values) / len(self.regularizer.values)
            self.regularizer.values.clear()
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ saving

    @contextlib.contextmanager
    def full_trainable_parameters(self):
        """Inside the block, on the main process, every trainable parameter holds its whole float32
        value: under DeepSpeed the optimizer's master copy (ZeRO-2/3 keep a bf16 working copy, ZeRO-3
        only a shard of it). Collective under DeepSpeed: every rank must enter it. Without DeepSpeed
        the parameters already are whole and pass through."""
        if not self.is_deepspeed_enabled:
            yield
            return
        from deepspeed.utils import safe_get_full_fp32_param

        model = self.accelerator.unwrap_model(self.model)
        main = self.args.process_index == 0
        saved = []
        try:
            for p in model.parameters():
                if not p.requires_grad:
                    continue
                full = safe_get_full_fp32_param(p)  # collective; None when there is no master copy
                if full is None:
                    with gathered_parameters([p]):
                        full = p.detach().clone()
                if main:
                    saved.append((p, p.data))
                    p.data = full.detach().to("cpu", torch.float32)
                del full
            yield
        finally:
            for p, data in saved:
                p.data = data

    def save_sorsa_adapter(self, output_dir: str, metadata: dict | None = None) -> None:
        """Write the adapter (float32 factors) from the main process; collective under DeepSpeed."""
        with self.full_trainable_parameters():
            if self.args.should_save:
                save_adapter(self.accelerator.unwrap_model(self.model), output_dir, metadata=metadata,
                             factors=self._initial_factors)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.is_deepspeed_enabled and sorsa_layers(self.model):
            # not DeepSpeed's 16-bit consolidation of the whole model: the adapter alone, in float32
            return self.save_sorsa_adapter(output_dir or self.args.output_dir)
        return super().save_model(output_dir, _internal_call)

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
