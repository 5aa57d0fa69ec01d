"""Speed of sorsa.rwkv6 on this machine: training tokens/s (forward + backward) of a small RWKV6, and the chunked
parallel WKV against the naive per-token loop (time and max abs difference). One summary line per measurement.

    python scripts/bench_rwkv6.py                      # C=512, 4 layers, 512 tokens, batch 1, world vocab
    python scripts/bench_rwkv6.py --batch 2 --device cuda --threads 8
"""
from __future__ import annotations

import argparse
import time

import torch

from sorsa.rwkv6 import RWKV6Config, RWKV6ForCausalLM, wkv6_chunked, wkv6_recurrent


def timed(fn, repeats: int, device: str) -> float:
    """Mean seconds per call of fn() over `repeats` calls, after one warm-up call."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def bench_training(args) -> None:
    torch.manual_seed(0)
    cfg = RWKV6Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      head_size=64, wkv_chunk_size=args.chunk)
    model = RWKV6ForCausalLM(cfg).to(args.device).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    sec = timed(step, args.steps, args.device)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"train fwd+bwd: {args.batch * args.seq / sec:8.0f} tokens/s  ({sec:.3f} s/step; C={args.hidden} "
          f"layers={args.layers} T={args.seq} B={args.batch} V={args.vocab} ({n_params:.1f}M params) float32 "
          f"chunk={args.chunk} {args.device} threads={torch.get_num_threads()})")


def bench_wkv(args) -> None:
    g = torch.Generator().manual_seed(0)
    B, T, N = args.batch, args.seq, 64
    H = args.hidden // N

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(args.device)

    # Roughly trained-model statistics: unit-scale r, k, v; decays spread from w ≈ 1 to w ≈ exp(-e^2).
    r, k, v = rand(B, T, H, N), rand(B, T, H, N), rand(B, T, H, N)
    log_w = -torch.exp(rand(B, T, H, N, std=1.5) - 2.0)
    u = rand(H, N, std=0.5)
    with torch.no_grad():
        ref, ref_state = wkv6_recurrent(*(x.double() for x in (r, k, v, log_w, u)))
        naive, naive_state = wkv6_recurrent(r, k, v, log_w, u)
    naive_fwd = timed(lambda: wkv6_recurrent(r, k, v, log_w, u), args.steps, args.device)
    leaves = [x.clone().requires_grad_() for x in (r, k, v, log_w, u)]

    def fwd_bwd(fn, **kw):
        def run():
            out, state = fn(*leaves, **kw)
            (out.square().mean() + state.square().mean()).backward()
        return run

    naive_bwd = timed(fwd_bwd(wkv6_recurrent), args.steps, args.device)
    print(f"wkv naive loop:  fwd {naive_fwd * 1e3:7.1f} ms  fwd+bwd {naive_bwd * 1e3:7.1f} ms  "
          f"max|out - float64| {(naive - ref).abs().max():.2e}  (B={B} T={T} H={H} N={N} {args.device})")
    for L in sorted({16, 32, 64, args.chunk}):
        with torch.no_grad():
            out, state = wkv6_chunked(r, k, v, log_w, u, chunk_size=L)
        fwd = timed(lambda: wkv6_chunked(r, k, v, log_w, u, chunk_size=L), args.steps, args.device)
        bwd = timed(fwd_bwd(wkv6_chunked, chunk_size=L), args.steps, args.device)
        print(f"wkv chunked L={L:<3d} fwd {fwd * 1e3:7.1f} ms  fwd+bwd {bwd * 1e3:7.1f} ms  "
              f"speed-up {naive_fwd / fwd:5.1f}x / {naive_bwd / bwd:5.1f}x  max|out - naive| "
              f"{(out - naive).abs().max():.2e}  max|state - naive| {(state - naive_state).abs().max():.2e}  "
              f"max|out - float64| {(out - ref).abs().max():.2e}  (max|out| {ref.abs().max():.1f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vocab", type=int, default=65536, help="65536 = the RWKV world vocabulary")
    p.add_argument("--chunk", type=int, default=16, help="WKV chunk length of the model")
    p.add_argument("--steps", type=int, default=3, help="timed repeats after one warm-up")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_train:
        bench_training(args)
    bench_wkv(args)


if __name__ == "__main__":
    main()
