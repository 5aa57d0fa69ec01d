"""The interface every fine-tuning method answers, so that the recipe, the reports, the analysis and the planner
never branch on a method's name: prepare a model for training, save what training made, load it back exactly,
merge it into a plain checkpoint, export it as a LoRA, and describe it (labels, parameter counts, files).

A method is a `Method` subclass registered in sorsa/methods/__init__.py (`-p NAME` looks it up there);
docs/architecture.md walks through adding one. Run settings reach a method as `cfg`, the run's RunConfig, and
the run directory as `run`, a RunDir (sorsa/train/): a method reads them, it never imports the application.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..core.dtypes import precision_dtype
from ..core.errors import UserError

CAUSAL_LM, SEQ_CLS = "CAUSAL_LM", "SEQ_CLS"  # the task types of PEFT's configs


class Method:
    """A fine-tuning method. Subclasses set the class attributes and override what differs."""

    name = ""  # -p NAME
    label = ""  # in tables and figures
    color = "tab:gray"  # in the experiment figures
    source = ""  # the paper (or library) it comes from
    trains_all_weights = False  # full fine-tuning: every weight trains; no targets, no rank
    regularized = False  # SORSA's orthonormal regularizer (gamma) applies to it
    quantizable = True  # it can train over a 4-bit / 8-bit base (--quantize)
    result_dir = "adapter"  # what training leaves in the run directory: RUN/adapter or RUN/model
    extra_params_per_rank = 0  # trainable parameters of an adapted (out, in) layer: rank · (out + in + this)
    keeps_initial_factors = False  # it keeps float32 initial factors in CPU memory (the planner counts them)

    # ------------------------------------------------------------------ settings
    def check(self, cfg) -> None:
        """Refuse settings this method cannot train with (a UserError naming the setting)."""
        if cfg.quantize and not self.quantizable:
            raise UserError(f"--quantize {cfg.quantize} does not work with -p {self.name} ({self.label} trains every "
                            "weight; quantize only under an adapter)")

    def base_dtype(self, cfg) -> torch.dtype:
        """The dtype the base model is loaded in for training and merging (the compute precision: the paper's
        bf16 residual; full fine-tuning keeps float32 master weights)."""
        return precision_dtype(cfg.precision)

    def training_gamma(self, cfg) -> float:
        """The orthonormal regularizer's gamma for this method's training (0: it does not apply)."""
        return cfg.gamma if self.regularized else 0.0

    # ------------------------------------------------------------------ training
    def prepare(self, model: nn.Module, cfg, targets, *, task_type: str = CAUSAL_LM,
                train_fully: tuple[str, ...] = ()) -> nn.Module:
        """`model` (the base, loaded in `base_dtype`) with this method's trainable parts on the layers `targets`
        (targets.find_target_modules' rule); `train_fully`: modules trained whole beside them and saved with the
        adapter (a classifier's new head); `task_type`: CAUSAL_LM or SEQ_CLS."""
        raise NotImplementedError

    def load_quantized(self, model_dir: Path, cfg, targets, device, run=None) -> nn.Module:
        """The method over a quantized base streamed from the checkpoint `model_dir` (sorsa.core.quant_model); with
        `run`, the run's trained model rebuilt exactly as at training."""
        raise UserError(f"--quantize is not supported with -p {self.name}")

    def on_fresh_start(self, model: nn.Module, run) -> None:
        """Called once before training starts from scratch (not on resume), on the main process."""

    def save(self, trainer, run, cfg, tokenizer) -> None:
        """Save the trained result into RUN/<result_dir>; called on every rank (DeepSpeed gathers collectively)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ after training
    def trained_weights_dir(self, run) -> Path | None:
        """A directory holding the whole trained model, loaded instead of the base (full fine-tuning), or None."""
        return None

    def load_trained(self, base: nn.Module, run) -> nn.Module:
        """The trained model, exactly, from a freshly loaded base and the run's saved result."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        """A plain model (the base architecture, the adapters folded in) from `load_trained`'s model."""
        raise NotImplementedError

    def dequantize(self, model: nn.Module, dtype: torch.dtype) -> nn.Module:
        """A plain model in `dtype` from a trained model over a quantized base: deq(W_q) + the adapter."""
        from ..core.quant_model import dequantized

        return dequantized(model, dtype)

    def export_lora(self, model: nn.Module, out_dir: Path, base_model: str) -> bool:
        """Write the trained change as a PEFT LoRA adapter of the untouched base into `out_dir`; False when the
        method has no such form (the caller says so)."""
        return False

    # ------------------------------------------------------------------ describing a run
    def trainable_count(self, layers: list[tuple[str, int, int]], rank: int, total: int) -> int:
        """Trainable parameters from the adapted layers ((name, out, in) each) at `rank`, or all `total`."""
        if self.trains_all_weights:
            return total
        return sum(rank * (o + i + self.extra_params_per_rank) for _, o, i in layers)

    def trainable_files(self, run) -> list[tuple[Path, object]]:
        """(safetensors file, key filter) pairs whose tensors are the run's trainable parameters (the report counts
        them when the completion marker does not)."""
        return []

    def weight_reader(self, checkpoint: Path, run, layers: list[str] | None = None):
        """An object with `.layers` and `.weight(layer, W0) -> W_t` (float32, (out, in)) for one checkpoint of the run:
        the SVD analysis reads trained weights through it. `layers`: the weights to compare for a method without
        targets (full fine-tuning)."""
        raise NotImplementedError

    def describe_result(self) -> str:
        """What training leaves, in words, for the one-line summary at the end of training."""
        return "model" if self.trains_all_weights else "adapter"
