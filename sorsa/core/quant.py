"""Quantized frozen weights through bitsandbytes: 4-bit NF4 / FP4 (Dettmers et al. 2023, QLoRA, arXiv 2305.14314)
and 8-bit (LLM.int8, arXiv 2208.07339) linear layers, built from a float32 weight and read back as one.

`quantize_linear(W, bias, spec)` is the quantizer Q (a bitsandbytes Linear4bit / Linear8bitLt holding W_q) and
`dequantize_linear(module)` is deq; both are deterministic, so the same W always gives the same bytes.
bitsandbytes is an optional dependency (`pip install -e '.[quant]'`), imported only here and only when used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from .errors import UserError

QUANT_TYPES = ("nf4", "fp4", "int8")
INSTALL_HINT = "pip install -e '.[quant]' (bitsandbytes)"


@dataclass(frozen=True)
class QuantSpec:
    """How a frozen weight is quantized: "nf4" / "fp4" (4-bit, `blocksize` weights per absmax, `double`:
    the absmax themselves quantized, QLoRA's double quantization) or "int8" (row-wise absmax); the
    matmul runs in `compute_dtype`."""

    quant_type: str
    blocksize: int = 64
    double: bool = True
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise UserError(f"quantize={self.quant_type!r} is unknown; use one of {list(QUANT_TYPES)}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise UserError(f"quant_blocksize={self.blocksize!r} is not one bitsandbytes supports; use 64 "
                             "(QLoRA's), or a power of two from 32 to 4096")


def bitsandbytes():
    """The bitsandbytes module, or one clear error saying how to install it."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"--quantize needs the bitsandbytes package: {INSTALL_HINT}") from None
    return bnb


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit linear layer (checked without importing bitsandbytes)."""
    return type(module).__module__.startswith("bitsandbytes") and type(module).__name__ in ("Linear4bit",
                                                                                          "Linear8bitLt")


@torch.no_grad()
def quantize_linear(W: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec) -> nn.Module:
    """A bitsandbytes linear layer y = deq(W_q) x + b holding Q(W); W: (out, in), on W's device."""
    bnb = bitsandbytes()
    W = W.detach().to(torch.float32)
    out_features, in_features = W.shape
    if spec.quant_type == "int8":
        module = _int8_linear(bnb, W, bias is not None)
    else:
        packed, state = bnb.functional.quantize_4bit(W, blocksize=spec.blocksize, compress_statistics=spec.double,
                                                     quant_type=spec.quant_type)
        module = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=spec.compute_dtype,
                                   quant_type=spec.quant_type, device=W.device)
        module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=spec.blocksize,
                                          compress_statistics=spec.double, quant_type=spec.quant_type,
                                          bnb_quantized=True, module=module)
        # bitsandbytes (0.50) repacks a 4-bit weight in place for its CPU inference kernel on the first eval
        # forward, after which a training forward and dequantize_4bit no longer agree with it: keep W_q as made.
        module.support_avx512bf16_for_cpu = False
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().to(spec.compute_dtype), requires_grad=False)
    return module


def _int8_linear(bnb, W: torch.Tensor, has_bias: bool) -> nn.Module:
    """Linear8bitLt holding the row-wise int8 quantization of W (threshold 0: no fp16 outlier columns)."""
    q, scales, _ = bnb.functional.int8_vectorwise_quant(W.to(torch.float16))  # (out, in) int8, (out,)
    module = bnb.nn.Linear8bitLt(W.shape[1], W.shape[0], bias=has_bias, has_fp16_weights=False, threshold=0.0,
                                 device=W.device)
    weight = bnb.nn.Int8Params(q, requires_grad=False, has_fp16_weights=False)
    weight.CB, weight.SCB = q, scales
    module.weight = weight
    module.state.CB, module.state.SCB = q, scales
    return module


@torch.no_grad()
def dequantize_linear(module: nn.Module) -> torch.Tensor:
    """deq(W_q) of a bitsandbytes linear layer as a float32 (out, in) matrix."""
    bnb = bitsandbytes()
    if type(module).__name__ == "Linear8bitLt":
        return bnb.functional.int8_vectorwise_dequant(module.weight.data, _int8_scales(module)).to(torch.float32)
    weight = module.weight
    W = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    return W.reshape(module.out_features, module.in_features).to(torch.float32)


def _int8_scales(module: nn.Module) -> torch.Tensor:
    """The row scales of an 8-bit layer: on its weight, or (after a deepcopy, which drops them there) its state."""
    scales = getattr(module.weight, "SCB", None)
    return scales if scales is not None else module.state.SCB


def quantizer(spec: QuantSpec):
    """The pair (Q, deq) for `functional.quantized_split`: W (out, in) -> a quantized layer -> float32 W."""
    return (lambda W: quantize_linear(W, None, spec)), dequantize_linear


def packed_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that defines a quantized layer's W_q (the packed weight and its quantization statistics),
    for comparing two of them byte for byte."""
    weight = module.weight
    if type(module).__name__ == "Linear8bitLt":
        return {"weight": weight.data, "SCB": _int8_scales(module)}
    return {"weight": weight.data, **{k: v for k, v in weight.quant_state.as_dict(packed=True).items()
                                      if isinstance(v, torch.Tensor)}}

