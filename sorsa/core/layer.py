"""SORSALinear: a linear layer whose principal singular part is a trainable U_p diag(S_p) Vh_p.

The original layer (an nn.Linear, or transformers' Conv1D with its weight stored transposed) is wrapped
(`base_layer`), not re-created: its weight becomes the frozen W_res, in its own layout, and its bias stays
where it is, so the bias is added exactly once.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import functional as SF
from .targets import LINEAR_TYPES, dense_weight, features
from .errors import UserError


class SORSALinear(nn.Module):
    """y = W_res x + b + scale · U_p (S_p ⊙ (Vh_p dropout(x))).

    base_layer: the wrapped nn.Linear (weight (out, in)) or Conv1D (weight (in, out)); its weight is W_res,
    frozen, kept in the layer's own layout (the math always sees the (out, in) matrix).
    U_p: (out, r), S_p: (r,), Vh_p: (r, in) trainable, in `adapter_dtype` (float32 in the paper,
    over a bf16 residual). U_0, S_0, Vh_0 keep the initial factors: they define W_res, so `save_adapter`
    can store them and `export_lora` can express the change as a LoRA. They are needed only there, so they
    are plain tensors kept in CPU memory, not buffers: moving the model to an accelerator (or DeepSpeed
    placing it) leaves them behind, and the accelerator holds only W_res and the trainable factors
    (for Llama 2 7B at rank 128, 1.3 GB less per GPU).
    """

    def __init__(self, base_layer: nn.Module, rank: int, scale: float = 1.0, dropout: float = 0.0,
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base_layer, LINEAR_TYPES):
            raise TypeError(f"SORSALinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.rank, self.scale = rank, float(scale)
        self.out_features, self.in_features = features(base_layer)
        self.transposed = not isinstance(base_layer, nn.Linear)  # Conv1D stores Wᵀ
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        factory = dict(device=device, dtype=adapter_dtype)
        self.U_p = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # (out, r)
        self.S_p = nn.Parameter(torch.zeros(rank, **factory))  # (r,)
        self.Vh_p = nn.Parameter(torch.zeros(rank, self.in_features, **factory))  # (r, in)
        # Initial factors: CPU tensors outside the module's parameters and buffers (see the class docstring).
        cpu = dict(device="cpu", dtype=adapter_dtype)
        self.U_0 = torch.zeros(self.out_features, rank, **cpu)  # (out, r)
        self.S_0 = torch.zeros(rank, **cpu)  # (r,)
        self.Vh_0 = torch.zeros(rank, self.in_features, **cpu)  # (r, in)
        self.register_buffer("W_res_kept", None, persistent=False)  # W_res while merged by merge_adapter
        self.merged = False
        self.disabled = False  # inside disable_adapter(): the base model's output

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight (W_res, or the merged weight after `merge()`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @torch.no_grad()
    def set_factors(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                    residual_dtype: torch.dtype | None = None, quant=None):
        """Install initial factors (U: (out, r), S: (r,), Vh: (r, in)) and set W_res from them.

        W_res = W − scale · U diag(S) Vh is computed from the factors as stored (adapter dtype),
        in float32, then cast to `residual_dtype` (default: the weight's current dtype), or, with `quant`
        (a sorsa.quant.QuantSpec), quantized: the wrapped layer becomes a 4-bit / 8-bit layer holding Q(W_res).
        """
        W = dense_weight(self.base_layer)  # (out, in)
        residual_dtype = torch.float32 if quant is not None else (residual_dtype or W.dtype)
        for name, value in (("U_p", U), ("S_p", S), ("Vh_p", Vh), ("U_0", U), ("S_0", S), ("Vh_0", Vh)):
            getattr(self, name).copy_(value)
        # From U_p, S_p, Vh_p as just set (the values of U_0, S_0, Vh_0, on the weight's device): the same
        # arithmetic at initialisation and at reload, so a reload rebuilds the identical W_res (or W_q).
        W_res = SF.split_weight(W, self.U_p, self.S_p, self.Vh_p, self.scale, residual_dtype)
        if quant is None:
            self._set_weight(W_res)
        else:
            if self.transposed:
                raise UserError("a quantized residual is built for nn.Linear layers; GPT-2's Conv1D layers cannot "
                                 "be quantized here: drop --quantize or the Conv1D targets")
            from .quant import quantize_linear

            self.base_layer = quantize_linear(W_res, self.base_layer.bias, quant)
        self.merged = False

    def _set_weight(self, W: torch.Tensor) -> None:
        """Make `W` (out, in) the wrapped layer's frozen weight, in the layer's own layout."""
        W = W.T.contiguous() if self.transposed else W
        self.base_layer.weight = nn.Parameter(W, requires_grad=False)

    @property
    def quantized(self) -> bool:
        """True when W_res is stored quantized (a bitsandbytes layer)."""
        from .quant import is_quantized

        return is_quantized(self.base_layer)

    def residual(self) -> torch.Tensor:
        """W_res (or the merged weight after `merge()`) as the (out, in) matrix (dequantized when quantized)."""
        return dense_weight(self.base_layer)

    def delta_weight(self) -> torch.Tensor:
        """scale · U_p diag(S_p) Vh_p in float32, (out, in); feeds merge and analysis."""
        return SF.adapter_delta(self.U_p, self.S_p, self.Vh_p, self.scale)

    @torch.no_grad()
    def merge(self, dtype: torch.dtype | None = None, keep_residual: bool = False):
        """Fold the adapter into the base weight (float32 sum, then cast); a second call is a no-op.

        A quantized W_res is dequantized first: the merged layer is a plain nn.Linear holding
        deq(W_q) + scale · U_p diag(S_p) Vh_p in `dtype` (default its compute dtype), so the residual's
        quantization error is part of it, as in any QLoRA merge. keep_residual: keep W_res aside so
        `unmerge` restores it bit for bit, as `merge_adapter` does; `merge_and_unload` does not keep it.
        """
        if self.merged:
            return
        W = dense_weight(self.base_layer)  # (out, in)
        merged = W.to(torch.float32) + self.delta_weight()
        if self.quantized:
            kept = self.base_layer
            dtype = dtype or getattr(kept, "compute_dtype", None) or torch.bfloat16
            self.base_layer = plain_linear(merged.to(dtype), kept.bias)
            object.__setattr__(self, "quantized_kept", kept if keep_residual else None)  # not a submodule
        else:
            kept = self.base_layer.weight.data
            self._set_weight(merged.to(dtype or W.dtype))
            self.register_buffer("W_res_kept", kept if keep_residual else None, persistent=False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo `merge(keep_residual=True)`: W_res comes back exactly (the kept tensor, not a subtraction)."""
        if not self.merged:
            return
        quantized_kept = self.__dict__.get("quantized_kept")
        if self.W_res_kept is None and quantized_kept is None:
            raise UserError("this layer was merged without keeping W_res (merge_and_unload); load the adapter "
                             "onto a fresh base model instead, or merge with merge_adapter to unmerge later")
        if quantized_kept is not None:
            self.base_layer = quantized_kept
            object.__setattr__(self, "quantized_kept", None)
        else:
            self.base_layer.weight = nn.Parameter(self.W_res_kept, requires_grad=False)
            self.W_res_kept = None
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Mixed dtypes: the residual may be bf16 (or quantized, computing in its compute dtype) while the
        # adapters are float32 (the paper's setting) and the activations either. Each path runs in its own
        # weights' dtype and the sum is returned in the input's dtype. Under autocast both follow autocast.
        W = self.base_layer.weight
        same = x.dtype == W.dtype or not W.is_floating_point()  # a quantized layer casts its input itself
        result = self.base_layer(x if same else x.to(W.dtype))  # W_res x + b: (..., out)
        if self.merged:
            return result.to(x.dtype)
        if self.disabled:  # the base model: W = W_res + scale · U_0 diag(S_0) Vh_0
            U, S, Vh = (t.to(x.device) for t in (self.U_0, self.S_0, self.Vh_0))
            return result.to(x.dtype) + SF.adapter_forward(x.to(U.dtype), U, S, Vh, self.scale).to(x.dtype)
        h = self.adapter_dropout(x).to(self.U_p.dtype)
        delta = SF.adapter_forward(h, self.U_p, self.S_p, self.Vh_p, self.scale)  # (..., out)
        return result.to(x.dtype) + delta.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scale={self.scale}, merged={self.merged}")


def plain_linear(W: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding W (out, in) and `bias`, frozen, on W's device."""
    linear = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=W.device, dtype=W.dtype)
    linear.weight = nn.Parameter(W, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(W.dtype), requires_grad=False)
    return linear
