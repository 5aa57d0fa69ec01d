"""The fine-tuning methods, one module per family, behind one interface (sorsa/methods/base.py), and the registry
that `-p NAME` looks up. Adding a method: a Method subclass in its family's module, one entry below, its tests."""
from __future__ import annotations

from ..core.errors import UserError
from .base import CAUSAL_LM, SEQ_CLS, Method
from .full import FullMethod
from .lora_variants import VARIANTS
from .peft_lora import LoraMethod, PissaMethod
from .sorsa import SorsaMethod

# -p NAME -> method, in the order tables and figures show them (the paper's: SORSA, PiSSA, LoRA, full FT; then the
# LoRA variants of sorsa/methods/lora_variants.py)
METHODS: dict[str, Method] = {m.name: m for m in (SorsaMethod(), PissaMethod(), LoraMethod(), FullMethod(),
                                                  *VARIANTS)}


def get_method(name: str) -> Method:
    """The method registered as `name`; a UserError naming the known ones otherwise."""
    if name not in METHODS:
        raise UserError(f"method {name!r} is unknown; use one of {', '.join(METHODS)}")
    return METHODS[name]


def method_label(name: str, quantize: str | None = None) -> str:
    """The table name of a run's method: "SORSA", ..., with a quantized base "QSORSA", "QPiSSA", "QLoRA"."""
    label = METHODS[name].label if name in METHODS else name
    return ("Q" if quantize else "") + label


__all__ = ["CAUSAL_LM", "METHODS", "SEQ_CLS", "Method", "get_method", "method_label"]
