"""The LoRA variants a 2026 comparison names, as methods of the PEFT family (sorsa/methods/peft_lora.py): each is LoRA
with other `peft.LoraConfig` options or another initialisation, at alpha = r as our LoRA and PiSSA.

| -p | what changes | the base | saved as |
|---|---|---|---|
| dora | W' = m · (W + s·B A) / ‖W + s·B A‖_row, m trained (`use_dora`) | untouched | PEFT's DoRA adapter |
| rslora | the scale alpha / √r instead of alpha / r (`use_rslora`) | untouched | a LoRA adapter |
| olora | A, B from the QR of W (`init_lora_weights="olora"`) | W − s·B₀A₀ | a rank-2r LoRA of the base |
| milora | A, B from the r *smallest* singular triplets | W − s·B₀A₀ | a rank-2r LoRA of the base |
| loftq | refused: PEFT's LoftQ sends weights to CUDA unconditionally | | |

The data-driven variants (CorDA, EVA, LoRA-GA) and KaSA are not offered yet (README, "Baselines").
"""
from __future__ import annotations

from ..core.errors import UserError
from .peft_lora import LoraMethod, PissaMethod


class DoraMethod(LoraMethod):
    """DoRA: the weight split into a magnitude (trained) and a direction (adapted by LoRA)."""

    name, label, color = "dora", "DoRA", "tab:purple"
    source = "DoRA, Liu et al. 2024 (arXiv 2402.09353), through peft (use_dora=True)"
    lora_options, quantizable = {"use_dora": True}, False  # quantizable: not wired to the streaming 4-bit loader

    def trainable_count(self, layers, rank, total):
        return super().trainable_count(layers, rank, total) + sum(o for _, o, _ in layers)  # + the magnitude m


class RsLoraMethod(LoraMethod):
    """rsLoRA: the rank-stabilised scale alpha / √r (so the update does not shrink as r grows)."""

    name, label, color = "rslora", "rsLoRA", "tab:olive"
    source = "rsLoRA, Kalajdzievski 2023 (arXiv 2312.03732), through peft (use_rslora=True)"
    lora_options, quantizable = {"use_rslora": True}, False


class OLoraMethod(PissaMethod):
    """OLoRA: A and B from the QR decomposition of W (orthonormal B), the base becomes the residual."""

    name, label, color = "olora", "OLoRA", "tab:cyan"
    init_family = "olora"
    source = "OLoRA, Büyükakyüz 2024 (arXiv 2406.01775), through peft (init_lora_weights='olora')"
    quantizable = False


class MiLoraMethod(PissaMethod):
    """MiLoRA: PiSSA's construction on the r smallest singular triplets (the minor components), so the adapter
    starts in the directions pretraining used least."""

    name, label, color = "milora", "MiLoRA", "tab:brown"
    init_family = "milora"
    source = "MiLoRA, Wang et al. 2024 (arXiv 2406.09044); this project's full SVD, the r smallest triplets"
    quantizable = False


class LoftQMethod(LoraMethod):
    """LoftQ: listed so that `-p loftq` says why it cannot run here instead of being unknown."""

    name, label, color = "loftq", "LoftQ", "tab:pink"
    source = "LoftQ, Li et al. 2023 (arXiv 2310.08659): refused with the reason (peft's LoftQ needs CUDA)"
    quantizable = False

    def check(self, cfg) -> None:
        import torch

        if not torch.cuda.is_available():
            raise UserError("-p loftq needs a CUDA GPU: peft's LoftQ (peft/utils/loftq_utils.py) moves every weight "
                            "to CUDA unconditionally; on a CPU use -p pissa --quantize nf4 (QPiSSA), the same idea "
                            "of a low-rank correction of the quantization error")
        raise UserError("-p loftq is not wired into this toolkit yet (its 4-bit base needs peft's own loader); use "
                        "-p pissa --quantize nf4 --quant-iters 5 (QPiSSA with LoftQ-style alternating rounds)")


VARIANTS = (DoraMethod(), RsLoraMethod(), OLoraMethod(), MiLoraMethod(), LoftQMethod())
