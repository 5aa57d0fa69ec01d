"""The Finch WKV (arXiv 2404.05892, time mixing): the per-token recurrence and its chunk-parallel form."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _float32_region(fn):
    """Run a WKV kernel with autocast off: under mixed precision its matmuls would otherwise run in bf16/fp16,
    and the decay products and the state need float32."""
    @functools.wraps(fn)
    def wrapper(r, *args, **kwargs):
        with torch.autocast(device_type=r.device.type, enabled=False):
            return fn(r, *args, **kwargs)
    return wrapper


@_float32_region
def wkv6_recurrent(r, k, v, log_w, u, state=None):
    """The Finch WKV recurrence, one token at a time (the reference, and the generation path).

    r, k, v, log_w: (B, T, H, N), log_w = -exp(d) = log of the decay w; u: (H, N); state: (B, H, N, N) or None.
    Returns out (B, T, H, N) and the new state (B, H, N, N), both float32 (float64 if r is float64).
    Per head (arXiv 2404.05892, Finch time mixing, recurrent form), with S the N_k × N_v state:
        out_t = r_t (S_{t-1} + diag(u) k_tᵀ v_t),   S_t = diag(w_t) S_{t-1} + k_tᵀ v_t.
    """
    dt = torch.float64 if r.dtype == torch.float64 else torch.float32
    B, T, H, N = r.shape
    r, k, v, log_w = (x.to(dt) for x in (r, k, v, log_w))
    S = r.new_zeros(B, H, N, N) if state is None else state.to(dt)
    u = u.to(dt)[:, :, None]  # (H, N, 1): the bonus scales rows (the key index) of k_tᵀ v_t
    outs = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # (B, H, N, N) = k_tᵀ v_t
        outs.append(torch.einsum("bhi,bhij->bhj", r[:, t], S + u * kv))  # (B, H, N)
        S = torch.exp(log_w[:, t])[..., None] * S + kv
    return torch.stack(outs, 1), S


@_float32_region
def wkv6_chunked(r, k, v, log_w, u, state=None, chunk_size: int = 16):
    """The same WKV as `wkv6_recurrent`, computed chunk-parallel (for training: matmuls instead of a T-step loop).

    r, k, v, log_w: (B, T, H, N); u: (H, N); state: (B, H, N, N) or None → out (B, T, H, N), state (B, H, N, N),
    float32 (float64 if r is float64). Unrolling the recurrence, for t in a chunk that starts with state S:
        out_t = Σ_{s<t in chunk} (Σ_i r_ti k_si Π_{s<j<t} w_ji) v_s + (r_t·(u ⊙ k_t)) v_t + (r_t ⊙ Π_{j<t} w_j) S
        S'    = diag(Π_{j in chunk} w_j) S + Σ_s (k_s ⊙ Π_{j>s} w_j)ᵀ v_s
    Every decay product is exp of a sum of log-decays over a *range that the product really spans*, so all
    exponents are ≤ 0 (no overflow however strong the decay), and no product is formed as the ratio of two
    cumulative products (exp(A_t - A_s) with A a running sum loses all precision once |A| is large, e.g. after
    one strongly decayed token); the intra-chunk ranges are summed exactly by a 0/1 matmul.
    """
    dt = torch.float64 if r.dtype == torch.float64 else torch.float32
    B, T, H, N = r.shape
    L = int(chunk_size)
    r, k, v, log_w = (x.to(dt).transpose(1, 2) for x in (r, k, v, log_w))  # (B, H, T, N)
    pad = (-T) % L
    if pad:  # zero tail: k = v = 0 adds nothing, log_w = 0 (w = 1) decays nothing, so the state is unchanged
        r, k, v, log_w = (F.pad(x, (0, 0, 0, pad)) for x in (r, k, v, log_w))
    nc = (T + pad) // L
    r, k, v, log_w = (x.reshape(B, H, nc, L, N) for x in (r, k, v, log_w))  # (B, H, nc, L, N)

    # Decay from the chunk start to just before t, and from just after s to the chunk end: prefix / suffix sums
    # of same-signed terms (each computed directly, never as a difference of two running sums).
    before = F.pad(log_w.cumsum(-2)[..., :-1, :], (0, 0, 1, 0))  # (B, H, nc, L, N): Σ_{j<t} log w_j
    after = F.pad(log_w.flip(-2).cumsum(-2).flip(-2)[..., 1:, :], (0, 0, 0, 1))  # Σ_{j>s} log w_j
    whole = log_w.sum(-2)  # (B, H, nc, N)

    # Intra-chunk: between[t, s] = Σ_{s<j<t} log w_j, an exact sum through the 0/1 mask M[t, s, j] = [s < j < t].
    idx = torch.arange(L, device=r.device)
    M = ((idx[None, :, None] < idx[None, None, :]) & (idx[None, None, :] < idx[:, None, None])).to(dt)
    between = (M.reshape(L * L, L) @ log_w).reshape(B, H, nc, L, L, N)  # (B, H, nc, L_t, L_s, N)
    causal = (idx[None, :] < idx[:, None])[..., None]  # (L_t, L_s, 1): strictly earlier sources only
    decay = torch.exp(between).masked_fill(~causal, 0.0)  # exponents ≤ 0: values in [0, 1]
    scores = torch.einsum("bhcti,bhcsi,bhctsi->bhcts", r, k, decay)  # (B, H, nc, L, L)
    bonus = (r * u.to(dt)[None, :, None, None, :] * k).sum(-1, keepdim=True)  # (B, H, nc, L, 1): r_t·(u ⊙ k_t)
    out = scores @ v + bonus * v  # (B, H, nc, L, N)

    # Inter-chunk: each chunk's own contribution to the state, then a short scan over chunks carrying it.
    delta = (k * torch.exp(after)).transpose(-1, -2) @ v  # (B, H, nc, N, N)
    carry = torch.exp(whole)[..., None]  # (B, H, nc, N, 1)
    S = r.new_zeros(B, H, N, N) if state is None else state.to(dt)
    starts = []
    for c in range(nc):
        starts.append(S)
        S = carry[:, :, c] * S + delta[:, :, c]
    out = out + (r * torch.exp(before)) @ torch.stack(starts, 2)  # (B, H, nc, L, N)
    out = out.reshape(B, H, nc * L, N)[:, :, :T].transpose(1, 2)  # (B, T, H, N)
    return out, S

