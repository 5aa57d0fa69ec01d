"""SORSATrainer under DeepSpeed (ZeRO-2/3): the regularizer through the loss, and saving the float32 masters.

The engine clips and steps inside `backward`, so no callback can reach the gradient between the two; the
regularizer joins the loss of each accumulation window's last micro-batch instead (the one deviation that
follows is documented at `compute_loss`). With bf16, ZeRO keeps bf16 working copies of the trainable
parameters and float32 masters in the optimizer, so saving gathers the masters.
"""
from __future__ import annotations

import contextlib

import torch

from ..core.distributed import gathered_parameters
from ..core.functional import orthonormal_loss_pair
from ..core.model import sorsa_layers
from .trainer import SORSATrainer, regularizer_coefficient


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


class DeepSpeedSORSATrainer(SORSATrainer):
    """SORSATrainer for a run under DeepSpeed. Relies on the Trainer's `loss_is_scaled_for_ga`,
    `model_accepts_loss_kwargs`, `compute_loss_func` and `current_gradient_accumulation_steps`
    (checked by tests/test_trainer.py)."""

    regularizer_as_callback = False
    ortho_loss_fn = staticmethod(orthonormal_loss_gathered)  # collective under ZeRO-3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._regularizer_in_loss = None  # coef · L_o added to this micro-batch's loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        if not (self.regularizer is not None and model.training and self.accelerator.sync_gradients):
            return out
        # coef · L_o joins the loss of the last micro-batch of each accumulation window, on every rank, so
        # that after DeepSpeed averages over the ranks the optimizer sees the same task gradient + coef · ∇L_o
        # as without DeepSpeed.
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

    @contextlib.contextmanager
    def full_trainable_parameters(self):
        """Inside the block, on the main process, every trainable parameter holds its whole float32
        value: the optimizer's master copy (ZeRO-2/3 keep a bf16 working copy, ZeRO-3 only a shard of
        it). Collective: every rank must enter it."""
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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if sorsa_layers(self.model):
            # not DeepSpeed's 16-bit consolidation of the whole model: the adapter alone, in float32
            return self.save_sorsa_adapter(output_dir or self.args.output_dir)
        return super().save_model(output_dir, _internal_call)
