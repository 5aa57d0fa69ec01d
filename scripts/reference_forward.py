"""The authors' SORSA forward (sorsa==1.0.1, `Linear.forward`), for the benchmarks that compare against it:
W_res x, plus x times the out x in delta (U_p diag(S_p)) Vh_p built on every call, scaled (two full-size
matmuls and the delta's product). Benchmark-only; the library's forward is `SORSALinear` (two thin matmuls)."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class DenseDelta(nn.Module):
    """A SORSALinear's weights run through the reference's forward (its own parameters, gradients included)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        layer = self.layer
        delta = (layer.U_p * layer.S_p) @ layer.Vh_p  # (out, in), the adapters' dtype
        return layer.base_layer(x) + layer.scale * F.linear(x.to(delta.dtype), delta).to(x.dtype)
