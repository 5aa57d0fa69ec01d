"""Synthetic weights with the features of LLM weight matrices, for tests and benchmarks that cannot read a real
7B checkpoint offline: a few large singular values over a random bulk, and a few input channels of large
magnitude (the outlier features of Dettmers et al. 2022, arXiv 2208.07339)."""
from __future__ import annotations

import torch


def llm_like_weight(out_features: int, in_features: int, seed: int = 0, spikes: int = 16, spike_top: float = 12.0,
                    outlier_channels: int = 8, outlier_gain: float = 6.0, std: float = 0.02) -> torch.Tensor:
    """A float32 (out, in) matrix: std · (G / √in + Σᵢ sᵢ uᵢ vᵢᵀ) with G Gaussian (a Marchenko–Pastur bulk whose
    largest singular value is about 1 + √(out/in)), `spikes` planted directions with singular values from
    `spike_top` down to 2 (geometrically spaced, so the top ones stand far above the bulk), then
    `outlier_channels` input columns scaled by `outlier_gain`. Deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    bulk = torch.randn(out_features, in_features, generator=g) / in_features ** 0.5  # (out, in)
    U, _ = torch.linalg.qr(torch.randn(out_features, spikes, generator=g))  # (out, spikes)
    V, _ = torch.linalg.qr(torch.randn(in_features, spikes, generator=g))  # (in, spikes)
    s = torch.logspace(torch.log10(torch.tensor(spike_top)), torch.log10(torch.tensor(2.0)), spikes)  # (spikes,)
    W = bulk + (U * s) @ V.T
    columns = torch.randperm(in_features, generator=g)[:outlier_channels]
    W[:, columns] *= outlier_gain
    return (std * W).contiguous()
