"""The statistics of an experiment's report: confidence intervals over seeds, paired tests between two methods
scored on the same test items (bootstrap over items and seeds; McNemar), and Holm's correction.
Distributions come from scipy and resampling from numpy; nothing here reads files.
"""
from __future__ import annotations

import math

import numpy as np
from ..core.errors import UserError


def mean_ci(values, confidence: float = 0.95) -> dict:
    """Mean and Student-t confidence interval of `values` (one number per seed).

    half_width = t_{(1+confidence)/2, n-1} · sd / √n with the n−1 standard deviation; with one value the
    interval is unknown (half_width = nan). Returns {"n", "mean", "sd", "half_width", "low", "high"}.
    """
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise UserError(f"mean_ci needs a non-empty list of numbers, got {values!r}")
    n, mean = x.size, float(x.mean())
    sd = float(x.std(ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else math.nan
    return {"n": n, "mean": mean, "sd": sd, "half_width": half, "low": mean - half, "high": mean + half}


def _paired_matrices(a, b) -> np.ndarray:
    """D = a − b as a float (seeds, items) matrix, after checking that the two are paired."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim == 1:
        a, b = a[None, :], b[None, :]
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise UserError(f"paired scores need the same (seeds, items) shape, got {a.shape} and {b.shape}")
    return a - b


def paired_bootstrap(a, b, samples: int = 10000, seed: int = 0, confidence: float = 0.95,
                     chunk: int = 500) -> dict:
    """Paired bootstrap over items and seeds of the mean difference between two methods.

    a, b: (seeds, items) per-item scores (1 correct, 0 wrong); row s of both comes from the same seed
    (the same data order) and column i from the same test item. The statistic is d = mean(a − b). Each
    replicate draws the seeds and, independently, the items with replacement (a two-way bootstrap of the
    crossed seeds × items design) and takes d* = mean of (a − b) over the drawn rows × columns.
    Interval: the percentile interval of d*. p-value (two-sided, H0: no difference): the bootstrap
    distribution shifted to the null, p = (1 + #{|d* − d| ≥ |d|}) / (samples + 1) (Hall & Wilson 1991,
    "Two guidelines for bootstrap hypothesis testing"). Returns {"diff", "low", "high", "p", "seeds",
    "items", "samples"}; deterministic for a given `seed`.
    """
    diff_matrix = _paired_matrices(a, b)  # (S, N)
    n_seeds, n_items = diff_matrix.shape
    rng = np.random.default_rng(seed)
    diff = float(diff_matrix.mean())
    replicates = []
    for start in range(0, samples, chunk):
        size = min(chunk, samples - start)
        rows = rng.integers(0, n_seeds, size=(size, n_seeds))  # (B, S) drawn seeds
        cols = rng.integers(0, n_items, size=(size, n_items))  # (B, N) drawn items
        replicates.append(diff_matrix[rows[:, :, None], cols[:, None, :]].mean(axis=(1, 2)))  # (B,)
    boot = np.concatenate(replicates)
    alpha = (1 - confidence) / 2
    # A small tolerance so that replicates equal to |d| up to rounding count as "at least as extreme".
    extreme = int(np.sum(np.abs(boot - diff) >= abs(diff) - 1e-12))
    return {"diff": diff, "low": float(np.quantile(boot, alpha)), "high": float(np.quantile(boot, 1 - alpha)),
            "p": (1 + extreme) / (samples + 1), "seeds": n_seeds, "items": n_items, "samples": samples}


def mcnemar_exact(a, b) -> dict:
    """McNemar's exact test on paired verdicts, the discordant pairs pooled over seeds.

    a_only = #(a right, b wrong), b_only = #(a wrong, b right); under H0 a_only ~ Binomial(a_only + b_only, 1/2),
    and p is scipy's two-sided exact binomial p-value (1 when there is no discordant pair).
    Returns {"a_only", "b_only", "p"}.
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise UserError(f"paired verdicts need the same shape, got {a.shape} and {b.shape}")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p = 1.0 if a_only + b_only == 0 else float(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p": p}


def holm(pvalues) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, family-wise error), in the input order."""
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))  # monotone in the sorted order
        adjusted[index] = running
    return adjusted.tolist()
