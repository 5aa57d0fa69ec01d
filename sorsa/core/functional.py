"""The SORSA math (arXiv 2409.00055, Sec. 3) as pure tensor functions.

Every other module (layer, model, trainer, merge, export) calls these; nothing here holds state.
Shapes: a linear layer y = W x has W: (out, in); the adapter has U_p: (out, r), S_p: (r,), Vh_p: (r, in).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from .errors import UserError

SVD_METHODS = ("full", "randomized", "fast")
# "fast": its defaults (scripts/bench_init.py measures the trade-off; README "Initialisation at 7B scale").
# On LLM-like spectra (a flat random bulk around σ_r) the energy still moves by ~1e-4 per iteration after 8,
# so the cap decides there: 8 iterations keep the residual excess under 1e-3 on Llama-2-7B's shapes at
# ~10x less time than the full SVD; matrices with a clear gap at r stop earlier on the tolerance.
FAST_TOL, FAST_OVERSAMPLE, FAST_MAX_ITER = 1e-6, 64, 8


def svd_top(weight: torch.Tensor, rank: int, method: str = "full", niter: int = 4, seed: int = 0, *,
            tol: float = FAST_TOL, oversample: int = FAST_OVERSAMPLE, max_iter: int = FAST_MAX_ITER,
            info: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` singular triplets of `weight` (out, in), or of each matrix of a batch (..., out, in),
    computed in float32 on its device.

    Returns U: (..., out, r), S: (..., r) descending, Vh: (..., r, in), all float32.
    - "full": torch.linalg.svd (the reference's choice; exact to float32).
    - "randomized": Halko et al.'s randomized SVD as PiSSA's fast initialisation (`torch.svd_lowrank`,
      q = rank, `niter` subspace iterations), PEFT-compatible; single matrices only.
    - "fast": randomized subspace iteration with `oversample` extra columns, stopped when the captured energy
      Σ σ̂ᵢ² of the top `rank` changes by less than `tol` (relative) between iterations, at most `max_iter`
      iterations (`subspace_svd`). `info`, when given, receives {"iterations", "change"}.
    The random test matrices are drawn from `seed`, so the same weight and settings give the same factors.
    """
    if method not in SVD_METHODS:
        raise UserError(f"svd method {method!r} is unknown; expected one of {SVD_METHODS}")
    # Always a float32 copy, whatever the weight's dtype. (The reference's `.to(float32)` is discarded; its
    # SVD ran in float32 only because it loads the model in float32 first, and torch.linalg.svd would
    # raise on a bf16 weight on the CPU.)
    w = weight.detach().to(torch.float32)  # (..., out, in)
    if method == "fast":
        return subspace_svd(w, rank, seed=seed, tol=tol, oversample=oversample, max_iter=max_iter, info=info)
    if method == "full":
        if w.shape[-2] < w.shape[-1]:  # a wide matrix: the SVD of its (tall) transpose is about 2x faster
            V, S, Uh = torch.linalg.svd(w.mT, full_matrices=False)  # Wᵀ = V diag(S) Uᵀ
            U, Vh = Uh.mT, V.mT  # (..., out, k), (..., k, in)
        else:
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)  # (..., out, k), (..., k), (..., k, in)
        return U[..., :rank].contiguous(), S[..., :rank].contiguous(), Vh[..., :rank, :].contiguous()
    if w.dim() != 2:
        raise UserError("svd='randomized' decomposes one matrix at a time; use 'fast' or 'full' for a batch")
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(w, q=rank, niter=niter)  # (out, r), (r,), (in, r)
    return U.contiguous(), S.contiguous(), V.T.contiguous()


def subspace_svd(w: torch.Tensor, rank: int, seed: int = 0, tol: float = FAST_TOL, oversample: int = FAST_OVERSAMPLE,
                 max_iter: int = FAST_MAX_ITER, info: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4) with adaptive stopping.

    w: (..., m, n) float32. A seeded Gaussian test matrix Ω (n, k), k = min(rank + oversample, m, n), gives
    Q = orth(W Ω); each iteration re-orthonormalises Z = orth(Wᵀ Q), then W Z = Q R, whose singular values
    (those of R, k x k, computed in float64) estimate the top ones of W. It stops when the captured energy
    Σ_{i<=rank} σ̂ᵢ² changes by less than `tol` relative (the worst matrix of a batch decides), or after
    `max_iter` iterations. The Rayleigh-Ritz step B = Qᵀ W (k, n) is decomposed in float64 (cheap: k rows),
    so U = Q U_B and Vh are orthonormal to float32 precision. The same Ω serves every matrix of a batch,
    so a batch gives what each matrix gives alone. Returns U (..., m, r), S (..., r), Vh (..., r, n).
    """
    m, n = w.shape[-2:]
    k = min(rank + oversample, m, n)
    generator = torch.Generator(device=w.device).manual_seed(seed)
    omega = torch.randn((n, k), generator=generator, device=w.device, dtype=torch.float32)  # (n, k)
    Q = torch.linalg.qr(w @ omega).Q  # (..., m, k)
    previous, change, iterations = None, float("inf"), 0
    for iterations in range(1, max_iter + 1):
        Z = torch.linalg.qr(w.mT @ Q).Q  # (..., n, k)
        Q, R = torch.linalg.qr(w @ Z)  # W Z = Q R: (..., m, k), (..., k, k)
        energy = (torch.linalg.svdvals(R.double())[..., :rank] ** 2).sum(-1)  # (...,)
        if previous is not None:
            change = ((energy - previous).abs() / energy.clamp_min(torch.finfo(torch.float64).tiny)).max().item()
            if change < tol:
                break
        previous = energy
    U_B, S, Vh = torch.linalg.svd((Q.mT @ w).double(), full_matrices=False)  # (..., k, k), (..., k), (..., k, n)
    if info is not None:
        info.update(iterations=iterations, change=change)
    U = Q @ U_B[..., :rank].float()  # (..., m, r)
    return U.contiguous(), S[..., :rank].float().contiguous(), Vh[..., :rank, :].float().contiguous()


def adapter_delta(U_p: torch.Tensor, S_p: torch.Tensor, Vh_p: torch.Tensor,
                  scale: float = 1.0) -> torch.Tensor:
    """scale · U_p diag(S_p) Vh_p in float32: (out, r), (r,), (r, in) -> (out, in).

    Used only by initialisation, merge and export; the forward never builds this matrix.
    """
    U, S, Vh = U_p.to(torch.float32), S_p.to(torch.float32), Vh_p.to(torch.float32)
    return scale * ((U * S) @ Vh)  # (out, r) * (r,) -> (out, r); @ (r, in) -> (out, in)


def split_weight(weight: torch.Tensor, U_p: torch.Tensor, S_p: torch.Tensor, Vh_p: torch.Tensor,
                 scale: float, residual_dtype: torch.dtype) -> torch.Tensor:
    """W_res = W − scale · U_p diag(S_p) Vh_p in float32, cast to `residual_dtype`; (out, in).

    The adapter tensors are passed as stored (after their cast to the adapter dtype), so
    W_res + adapter reproduces W up to the residual cast, and a reload that recomputes W_res from
    the same stored factors gets the identical residual.
    """
    return (weight.detach().to(torch.float32) - adapter_delta(U_p, S_p, Vh_p, scale)).to(residual_dtype)


ALPHA_INIT = ("tail", "reference")


def pissa_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                  scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's LoRA factors from top-r triplets (arXiv 2404.02948, Eq. 2-3): A = √(S/s) Vh (r, in) and
    B = U √(S/s) (out, r), so that s · B A = U diag(S) Vh for the LoRA scale s."""
    root = (S / scale).sqrt()  # (r,)
    return root[:, None] * Vh, U * root


def lora_residual(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                  residual_dtype: torch.dtype) -> torch.Tensor:
    """PiSSA's frozen residual W − s · B A in float32, cast to `residual_dtype`; A (r, in), B (out, r) on W's
    device (the split_weight of a LoRA pair: its 'singular values' are ones)."""
    ones = torch.ones(B.shape[-1], device=weight.device)
    return split_weight(weight, B.to(weight.device), ones, A.to(weight.device), scale, residual_dtype)


def initial_adapter(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scale: float = 1.0,
                    alpha_init: str = "tail") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The adapter (U_p, S_p, Vh_p) at initialisation from the top-r SVD (U: (out, r), S: (r,), Vh: (r, in)).

    "tail": S_p = S / scale, so scale · U_p diag(S_p) Vh_p is the rank-r principal part for any alpha and
    W_res is exactly the SVD tail. "reference": S_p = S as the authors' code does, so W_res =
    W − scale · U diag(S) Vh keeps (1 − scale) of the principal part when scale ≠ 1. Both give the same
    function at initialisation; they differ in training when alpha ≠ r. With alpha = None (scale 1, the
    paper's setting) they are identical.
    """
    if alpha_init not in ALPHA_INIT:
        raise UserError(f"alpha_init={alpha_init!r} is unknown; use one of {list(ALPHA_INIT)}")
    return U, (S / scale if alpha_init == "tail" else S), Vh


def quantized_split(weight: torch.Tensor, rank: int, quantize, dequantize, iters: int = 1, scale: float = 1.0,
                    alpha_init: str = "tail", method: str = "full", rounds: list | None = None,
                    **svd_options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The adapter (U_p, S_p, Vh_p) over a quantized residual, by PiSSA's alternating initialisation
    (arXiv 2404.02948, Sec. 4.3 / its init_qpissa.py, as LoftQ): res = W; `iters` (T) times:
    (U, S, Vh) = top-r SVD of res (`method`, `svd_options`), W_q = Q(W − scale · U_p diag(S_p) Vh_p),
    res = W − deq(W_q). Each round moves the part of the quantization error that lies in the top-r subspace
    into the adapter; T = 1 is plain "quantize the SVD tail".

    weight: (out, in); `quantize(W)` -> anything `dequantize` turns back into a float32 (out, in) matrix.
    Returns the last round's adapter (float32); the caller quantizes W − scale · U_p diag(S_p) Vh_p once
    more from these factors as stored (SORSALinear.set_factors), which is exactly what a reload does.
    `rounds`, when given, receives every round's adapter in order (round t's is what T = t returns).
    """
    if iters < 1:
        raise UserError(f"quant_iters={iters} must be >= 1 (1: quantize the residual once)")
    W = weight.detach().to(torch.float32)  # (out, in)
    residual = W
    for round_ in range(iters):
        factors = initial_adapter(*svd_top(residual, rank, method, **svd_options), scale, alpha_init)
        if rounds is not None:
            rounds.append(factors)
        if round_ < iters - 1:
            residual = W - dequantize(quantize(split_weight(W, *factors, scale, torch.float32)))
    return factors


def adapter_forward(x: torch.Tensor, U_p: torch.Tensor, S_p: torch.Tensor, Vh_p: torch.Tensor,
                    scale: float = 1.0) -> torch.Tensor:
    """scale · U_p (S_p ⊙ (Vh_p x)) for x: (..., in) -> (..., out), never forming U_p S_p Vh_p.

    Costs two thin matmuls, the same as LoRA's B (A x); the diagonal is an (..., r) product.
    """
    h = F.linear(x, Vh_p)  # (..., in) -> (..., r)
    h = h * (S_p * scale)  # (..., r)
    return F.linear(h, U_p)  # (..., r) -> (..., out)


def orthonormality_error(M: torch.Tensor) -> torch.Tensor:
    """‖MᵀM − I‖_F (unsquared) for M: (n, r) with r ≤ n; 0-dim, differentiable.

    Pass U_p as is and Vh_p transposed (‖Vh Vhᵀ − I‖_F = ‖(Vhᵀ)ᵀ Vhᵀ − I‖_F).
    """
    M = M.to(torch.float32)
    gram = M.T @ M  # (r, r)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.matrix_norm(gram - eye, ord="fro")


def orthonormal_loss_pair(U_p: torch.Tensor, Vh_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖U_pᵀU_p − I‖_F, ‖Vh_p Vh_pᵀ − I‖_F) for one adapter; the paper's L_o terms (Eq. 6)."""
    return orthonormality_error(U_p), orthonormality_error(Vh_p.T)


def lora_factors(U_p: torch.Tensor, S_p: torch.Tensor, Vh_p: torch.Tensor, U_0: torch.Tensor,
                 S_0: torch.Tensor, Vh_0: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-2r LoRA (B: (out, 2r), A: (2r, in)) with B A = scale · (U_p S_p Vh_p − U_0 S_0 Vh_0).

    This is the trained adapter's change relative to the untouched base weight W = W_res +
    scale · U_0 S_0 Vh_0, so a LoRA with scaling 1 on the original model reproduces the trained one.
    """
    f32 = torch.float32
    B = torch.cat([scale * U_p.to(f32) * S_p.to(f32), -scale * U_0.to(f32) * S_0.to(f32)], dim=1)
    A = torch.cat([Vh_p.to(f32), Vh_0.to(f32)], dim=0)
    return B.contiguous(), A.contiguous()
