"""SORSA (arXiv 2409.00055) as a method of the toolkit: the adapter core (sorsa.core) applied to a run, its
orthonormal regularizer, its own adapter file (trained and initial factors), the exact reload, the merge, the
rank-2r LoRA export, and QSORSA over a quantized residual (the PiSSA-style alternating initialisation)."""
from __future__ import annotations

from pathlib import Path

from .base import Method


class SorsaMethod(Method):
    name = "sorsa"
    label = "SORSA"
    color = "tab:red"
    source = "SORSA, arXiv 2409.00055: U_p diag(S_p) Vh_p from the top-r SVD, orthonormal regularizer (gamma)"
    regularized = True
    extra_params_per_rank = 1  # S_p: r values beside U_p (out, r) and Vh_p (r, in)
    keeps_initial_factors = True  # U_0, S_0, Vh_0 (float32, CPU): W_res is re-derived from them on reload

    def prepare(self, model, cfg, targets, *, task_type="CAUSAL_LM", train_fully=()):
        from ..core.adapter_io import set_modules_to_save
        from ..core.model import apply_sorsa

        model = apply_sorsa(model, cfg.sorsa_config(targets), svd_cache_dir=cfg.svd_cache_path)
        return set_modules_to_save(model, list(train_fully)) if train_fully else model

    def load_quantized(self, model_dir, cfg, targets, device, run=None):
        from ..core.quant_model import load_qsorsa, rebuild_qsorsa

        if run is not None:
            return rebuild_qsorsa(model_dir, run.adapter_dir, device=device)
        return load_qsorsa(model_dir, cfg.sorsa_config(targets), targets, cfg.svd_cache_path, device=device)

    def save(self, trainer, run, cfg, tokenizer):
        # the per-layer SVD record (for "fast": iterations and final energy change) goes with the adapter
        init_log = getattr(trainer.accelerator.unwrap_model(trainer.model), "sorsa_init_log", None)
        trainer.save_sorsa_adapter(str(run.adapter_dir), metadata={"base_model": cfg.model, "svd_init": init_log})

    def load_trained(self, base, run):
        from ..core.adapter_io import load_adapter

        return load_adapter(base, run.adapter_dir)

    def merge(self, model):
        from ..core.model import merge_and_unload

        return merge_and_unload(model)

    def export_lora(self, model, out_dir, base_model):
        from ..core.adapter_io import export_lora

        export_lora(model, out_dir, base_model_name_or_path=base_model)
        return True

    def trainable_files(self, run):
        from ..core.adapter_io import ADAPTER_WEIGHTS, TRAINED

        suffixes = tuple("." + f for f in TRAINED)
        return [(run.adapter_dir / ADAPTER_WEIGHTS, lambda key: key.endswith(suffixes))]

    def weight_reader(self, checkpoint: Path, run, layers=None):
        from ..core.adapter_io import AdapterFile

        return AdapterFile(checkpoint)

