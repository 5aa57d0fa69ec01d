"""Full fine-tuning: every weight trains (float32 master weights), and the result is a whole model."""
from __future__ import annotations

from pathlib import Path

import torch

from .base import Method


class FullMethod(Method):
    name = "full"
    label = "Full FT"
    color = "tab:gray"
    source = "full fine-tuning of every weight"
    trains_all_weights = True
    quantizable = False
    result_dir = "model"

    def base_dtype(self, cfg) -> torch.dtype:
        return torch.float32  # master weights; the Trainer's autocast computes in bf16 / fp16

    def prepare(self, model, cfg, targets, *, task_type="CAUSAL_LM", train_fully=()):
        return model  # every parameter stays trainable (a new classification head included)

    def save(self, trainer, run, cfg, tokenizer):
        trainer.save_model(str(run.model_dir))  # DeepSpeed: its 16-bit consolidation (ZeRO-3 config)
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(run.model_dir)

    def trained_weights_dir(self, run) -> Path:
        return run.model_dir

    def load_trained(self, base, run):
        return base  # loaded from trained_weights_dir: already the trained model

    def merge(self, model):
        return model

    def trainable_files(self, run):
        return [(p, lambda key: True) for p in sorted(run.model_dir.glob("*.safetensors"))]

    def weight_reader(self, checkpoint: Path, run, layers=None):
        return FullWeights(checkpoint, layers or [])


class FullWeights:
    """W_t read from a full fine-tuning checkpoint (a save_pretrained model directory), for the layers given."""

    def __init__(self, checkpoint: Path, layers: list[str]):
        from ..core.fileio import TensorReader

        self.reader = TensorReader(checkpoint)
        self.layers = layers

    def weight(self, layer: str, W0: torch.Tensor) -> torch.Tensor:
        return self.reader.get(self.reader.weight_key(layer)).to(device=W0.device, dtype=torch.float32)
