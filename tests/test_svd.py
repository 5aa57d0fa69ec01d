"""The SVD methods of the initialisation: "fast" (adaptive subspace iteration) against torch.linalg.svd on
planted LLM-like spectra, batched against one at a time, the initial factors kept off the accelerator, PiSSA
from the fast SVD, and scripts/bench_gpu.py on its tiny CPU shape."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sorsa.core.functional as SF
from sorsa import SORSAConfig, apply_sorsa, sorsa_layers
from sorsa.tools.synthetic import llm_like_weight

from test_core import RANK, logits, make_model, tokens

ROOT = Path(__file__).resolve().parents[1]


def _excess(W, factors, rank):
    """‖W − U S Vh‖_F over the optimal rank-r residual, minus 1."""
    U, S, Vh = (f.double() for f in factors)
    optimal = torch.linalg.svdvals(W.double())[rank:].pow(2).sum().sqrt()
    return ((W.double() - (U * S) @ Vh).norm() / optimal - 1).item()


@pytest.mark.parametrize("shape", [(384, 256), (256, 384)], ids=["tall", "wide"])
def test_fast_svd_matches_the_full_svd_on_a_planted_spectrum(shape):
    W = llm_like_weight(*shape, seed=3, spikes=8)
    rank = 24
    info = {}
    U, S, Vh = SF.svd_top(W, rank, "fast", seed=5, info=info)
    S_full = torch.linalg.svdvals(W.double())
    assert U.shape == (shape[0], rank) and S.shape == (rank,) and Vh.shape == (rank, shape[1])
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert _excess(W, (U, S, Vh), rank) < 1e-4  # the captured energy is the optimal one
    assert ((S.double() - S_full[:rank]).abs().max() / S_full[0]).item() < 1e-4
    eye = torch.eye(rank)
    assert (U.T @ U - eye).abs().max() < 2e-6 and (Vh @ Vh.T - eye).abs().max() < 2e-6  # orthonormal to fp32
    assert 2 <= info["iterations"] <= SF.FAST_MAX_ITER and info["change"] < 1e-6
    # deterministic for a seed; another seed gives another (equally good) basis
    again = SF.svd_top(W, rank, "fast", seed=5)
    assert all(torch.equal(a, b) for a, b in zip((U, S, Vh), again))
    other = SF.svd_top(W, rank, "fast", seed=6)
    assert not torch.equal(other[0], U) and _excess(W, other, rank) < 1e-4
    # a looser tolerance stops earlier and is less exact, but better than the randomized SVD at q = r
    loose = {}
    approx = SF.svd_top(W, rank, "fast", seed=5, tol=1e-2, info=loose)
    assert loose["iterations"] < info["iterations"]
    assert _excess(W, SF.svd_top(W, rank, "randomized", niter=1, seed=5), rank) > _excess(W, approx, rank)


def test_fast_svd_of_a_batch_equals_each_matrix_alone():
    Ws = torch.stack([llm_like_weight(128, 96, seed=s, spikes=4) for s in range(3)])  # (3, 128, 96)
    U, S, Vh = SF.svd_top(Ws, 8, "fast", seed=0, tol=0, max_iter=6)
    for i in range(3):
        u, s, vh = SF.svd_top(Ws[i], 8, "fast", seed=0, tol=0, max_iter=6)
        torch.testing.assert_close(S[i], s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((U[i] * S[i]) @ Vh[i], (u * s) @ vh, rtol=1e-4, atol=1e-6)
    full = SF.svd_top(Ws, 8, "full")
    torch.testing.assert_close(full[1], torch.stack([SF.svd_top(w, 8, "full")[1] for w in Ws]), rtol=1e-5, atol=1e-6)


def test_batched_initialisation_equals_one_layer_at_a_time():
    base = make_model("llama")
    ids = tokens()
    one = apply_sorsa(copy.deepcopy(base), SORSAConfig(rank=RANK), progress=False)
    batched = apply_sorsa(copy.deepcopy(base), SORSAConfig(rank=RANK), progress=False, batch_init=True)
    assert any(e.get("batch", 1) > 1 for e in batched.sorsa_init_log)  # same-shaped layers went together
    assert len(batched.sorsa_init_log) == len(sorsa_layers(batched))
    for (n, a), (_, b) in zip(sorsa_layers(one), sorsa_layers(batched)):
        torch.testing.assert_close(b.weight, a.weight, rtol=1e-5, atol=1e-5, msg=n)
        torch.testing.assert_close(b.S_p, a.S_p, rtol=1e-5, atol=1e-5, msg=n)
    torch.testing.assert_close(logits(batched, ids), logits(one, ids), rtol=1e-4, atol=1e-4)
    # the memory bound: a budget of the smallest float32 copy leaves every group a single weight
    tiny = apply_sorsa(copy.deepcopy(base), SORSAConfig(rank=RANK, svd="fast"), progress=False, batch_init=True,
                       batch_memory=4 * 32 * 64)  # the smallest layer's float32 copy
    assert all(e.get("batch", 1) == 1 for e in tiny.sorsa_init_log)
    assert all("iterations" in e and "change" in e for e in tiny.sorsa_init_log)


def test_randomized_svd_is_never_batched():
    """torch.svd_lowrank takes one matrix: with batching asked for (the default on a GPU), the randomized SVD
    still goes one weight at a time and gives what it gives without batching."""
    base = make_model("llama")
    cfg = SORSAConfig(rank=RANK, svd="randomized")
    one = apply_sorsa(copy.deepcopy(base), cfg, progress=False, batch_init=False)
    asked = apply_sorsa(copy.deepcopy(base), cfg, progress=False, batch_init=True)
    assert all("batch" not in e for e in asked.sorsa_init_log) and len(asked.sorsa_init_log) == len(sorsa_layers(one))
    for (n, a), (_, b) in zip(sorsa_layers(one), sorsa_layers(asked)):
        torch.testing.assert_close(b.weight, a.weight, rtol=0, atol=0, msg=n)


def test_initial_factors_stay_in_cpu_memory_when_the_model_moves():
    model = apply_sorsa(make_model("llama"), SORSAConfig(rank=RANK), progress=False)
    layers = sorsa_layers(model)
    model.to("meta")  # stands for an accelerator: what moves is what the accelerator would hold
    for _, layer in layers:
        assert layer.U_p.device.type == layer.weight.device.type == "meta"
        assert layer.U_0.device.type == layer.S_0.device.type == layer.Vh_0.device.type == "cpu"
    on_device = {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert not any(id(getattr(l, f)) in on_device for _, l in layers for f in ("U_0", "S_0", "Vh_0"))
    saved = sum(getattr(l, f).numel() for _, l in layers for f in ("U_0", "S_0", "Vh_0"))
    assert saved == sum(RANK * (l.in_features + l.out_features + 1) for _, l in layers)


def test_pissa_from_the_fast_svd_equals_peft_pissa():
    from peft.tuners.lora import LoraLayer

    from sorsa.methods.peft_lora import apply_peft_baseline

    ids = tokens()
    before = logits(make_model("llama"), ids)
    ours = apply_peft_baseline(make_model("llama"), "pissa", RANK, ["q_proj", "down_proj"], svd="fast",
                               svd_options={"seed": 0})
    theirs = apply_peft_baseline(make_model("llama"), "pissa", RANK, ["q_proj", "down_proj"], svd="full")
    torch.testing.assert_close(logits(ours, ids), before, rtol=1e-4, atol=1e-4)
    assert ours.peft_config["default"].init_lora_weights == "pissa"
    pairs = [(a, b) for (_, a), (_, b) in zip(ours.named_modules(), theirs.named_modules()) if isinstance(a, LoraLayer)]
    assert len(pairs) == 4
    for a, b in pairs:
        BA = a.lora_B["default"].weight @ a.lora_A["default"].weight
        torch.testing.assert_close(BA, b.lora_B["default"].weight @ b.lora_A["default"].weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.get_base_layer().weight, b.get_base_layer().weight, rtol=1e-4, atol=1e-5)


def test_bench_gpu_runs_on_its_tiny_cpu_shape(tmp_path):
    out = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--tiny", "--json", str(tmp_path / "b.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "b.json").read_text())
    init = result["init"]
    assert set(init) == {"full", "fast", "randomized"} and all(r["seconds"] > 0 and r["layers"] == 14 for r in init.values())
    steps = result["train_step"]
    assert {"sorsa", "lora", "pissa", "dense_delta", "frozen"} <= {r["method"] for r in steps}
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        assert {"qsorsa", "qlora"} <= {r["method"] for r in steps}
    assert all(r["tokens_per_s"] > 0 for r in steps)
    assert {r["batch"] for r in result["generate"]} == {1, 4} and all(r["tokens_per_s"] > 0 for r in result["generate"])
    # the printed table has a row per init method, per step method and checkpointing setting, per batch
    assert sum(f"| {m} (14 layers) |" in out.stdout for m in init) == 3
    assert all(f"| {r['method']} | {'on' if r['checkpointing'] else 'off'} |" in out.stdout for r in steps)
