"""Quantized adaptation (QSORSA; QPiSSA / QLoRA through peft): PiSSA's alternating initialisation as a pure
function, 4-bit and 8-bit residuals through bitsandbytes on the CPU, identity at init, the quantization error
ordering T = 5 < T = 1 < QLoRA, a byte-equal residual after reload, and the merge."""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import sorsa.core.functional as SF
from sorsa import SORSAConfig, apply_sorsa, load_adapter, merge_and_unload, save_adapter, sorsa_layers
from sorsa.tools.synthetic import llm_like_weight

from test_core import RANK, logits, make_model, tokens, train_steps

bnb = pytest.importorskip("bitsandbytes", reason="the quantized tests need bitsandbytes (pip install -e '.[quant]')")
from sorsa.core.quant import QuantSpec, dequantize_linear, is_quantized, packed_state, quantizer


def nuclear(E: torch.Tensor) -> float:
    return torch.linalg.svdvals(E.double()).sum().item()


def _grid(W, step=0.01):
    """A deterministic stand-in quantizer: round to a grid (no library)."""
    return torch.round(W / step)


def test_quantized_split_is_the_alternating_rule_with_any_quantizer():
    W = llm_like_weight(96, 64, seed=0, spikes=4)
    quantize, dequantize = _grid, (lambda q: q * 0.01)
    U1, S1, Vh1 = SF.quantized_split(W, 8, quantize, dequantize, iters=1)
    U, S, Vh = SF.svd_top(W, 8)
    torch.testing.assert_close((U1 * S1) @ Vh1, (U * S) @ Vh)  # T = 1: the plain SVD split
    # T = 2 by hand: the second SVD is of W − deq(Q(W − U S Vh))
    res = W - dequantize(quantize(SF.split_weight(W, U, S, Vh, 1.0, torch.float32)))
    U2, S2, Vh2 = SF.svd_top(res, 8)
    got = SF.quantized_split(W, 8, quantize, dequantize, iters=2)
    torch.testing.assert_close((got[0] * got[1]) @ got[2], (U2 * S2) @ Vh2)
    errors = []
    for T in (1, 2, 5):
        f = SF.quantized_split(W, 8, quantize, dequantize, iters=T)
        W_q = dequantize(quantize(SF.split_weight(W, *f, 1.0, torch.float32)))
        errors.append(nuclear(W - (W_q + (f[0] * f[1]) @ f[2])))
    assert errors[2] < errors[0] and errors[1] < errors[0]
    with pytest.raises(ValueError, match="quant_iters=0"):
        SF.quantized_split(W, 8, quantize, dequantize, iters=0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_alternating_rounds_shrink_the_quantization_error_below_qlora(quant_type):
    """Planted LLM-like matrices: ‖W − (deq(W_q) + adapter)‖_* for T = 5 < T = 1 < QLoRA's ‖W − deq(Q(W))‖_*."""
    spec = QuantSpec(quant_type, compute_dtype=torch.float32)
    Q, deq = quantizer(spec)
    for seed in range(2):
        W = llm_like_weight(256, 192, seed=seed)
        qlora = nuclear(W - deq(Q(W)))
        err = {}
        for T in (1, 5):
            U, S, Vh = SF.quantized_split(W, 16, Q, deq, iters=T)
            err[T] = nuclear(W - (deq(Q(SF.split_weight(W, U, S, Vh, 1.0, torch.float32))) + (U * S) @ Vh))
        assert err[5] < err[1] < qlora, (seed, err, qlora)
        assert err[1] < 0.95 * qlora


def _spec_config(quant_type="nf4", iters=2, **kw):
    return SORSAConfig(rank=RANK, quantize=quant_type, quant_iters=iters, compute_dtype=torch.float32, **kw)


def _dequantized_copy(model):
    """A plain model holding deq(W_q) + scale U_p S_p Vh_p in every adapted layer and deq(W_q) elsewhere."""
    plain = merge_and_unload(copy.deepcopy(model), dtype=torch.float32)
    for name, module in list(plain.named_modules()):
        if is_quantized(module):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = nn.Parameter(dequantize_linear(module))
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child, linear)
    return plain


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_quantized_residual_at_init_reload_and_merge(tmp_path, quant_type):
    base = make_model("llama")
    ids = tokens()
    before = logits(base, ids)
    model = apply_sorsa(copy.deepcopy(base), _spec_config(quant_type), progress=False)
    layers = sorsa_layers(model)
    assert len(layers) == 14 and all(layer.quantized for _, layer in layers)
    # every other linear layer is quantized too, but not the output head
    plain_linear = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert plain_linear == ["lm_head"]
    at_init = logits(model, ids)
    # exactly deq(W_q) + adapter ...
    torch.testing.assert_close(at_init, logits(_dequantized_copy(model), ids), rtol=1e-4, atol=1e-4)
    # ... and the base model up to the quantization error of the other layers and of the residual
    rel = (at_init - before).norm() / before.norm()
    assert 0 < rel < (0.2 if quant_type != "int8" else 0.02)
    # reload onto a fresh full-precision base: the identical packed residual, the identical model
    model = train_steps(model)
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    for (n, a), (_, b) in zip(sorsa_layers(model), sorsa_layers(reloaded)):
        sa, sb = packed_state(a.base_layer), packed_state(b.base_layer)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), n
    trained = logits(model, ids)
    if quant_type == "int8":  # bitsandbytes' 8-bit layer keeps matmul state across a training pass (0.50):
        torch.testing.assert_close(logits(reloaded, ids), trained, rtol=0, atol=1e-2)  # same bytes, near logits
    else:
        assert torch.equal(logits(reloaded, ids), trained)
    # merge: a plain checkpoint of deq(W_q) + adapter (bf16 tolerance), loadable with plain transformers
    merged = merge_and_unload(reloaded, dtype=torch.bfloat16)
    merged_modules = dict(merged.named_modules())
    assert all(type(merged_modules[n]) is nn.Linear for n, _ in layers)  # the adapted layers are plain now
    torch.testing.assert_close(logits(_dequantized_copy(merged).float(), ids), trained, rtol=5e-2, atol=5e-2)


def test_quantized_merge_adapter_and_unmerge_restore_the_packed_residual():
    from sorsa import merge_adapter, unmerge_adapter

    model = train_steps(apply_sorsa(make_model("llama"), _spec_config("nf4", iters=1), progress=False))
    ids = tokens()
    trained = logits(model, ids)
    before = {n: {k: v.clone() for k, v in packed_state(l.base_layer).items()} for n, l in sorsa_layers(model)}
    merge_adapter(model)
    assert all(not l.quantized for _, l in sorsa_layers(model))
    torch.testing.assert_close(logits(model, ids), trained, rtol=1e-3, atol=1e-3)
    unmerge_adapter(model)
    for n, layer in sorsa_layers(model):
        assert all(torch.equal(before[n][k], v) for k, v in packed_state(layer.base_layer).items())
    assert torch.equal(logits(model, ids), trained)


def test_bad_quantization_settings_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="quantize='int4' is unknown"):
        SORSAConfig(quantize="int4")
    with pytest.raises(ValueError, match="quant_iters=0"):
        SORSAConfig(quantize="nf4", quant_iters=0)
    with pytest.raises(ValueError, match="quant_blocksize=48"):
        SORSAConfig(quantize="nf4", quant_blocksize=48)
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("no bitsandbytes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ValueError, match=r"pip install -e '\.\[quant\]'"):
        apply_sorsa(make_model("llama"), _spec_config("nf4"), progress=False)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "quantized").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_quantized_configs_load(path):
    from sorsa import cli as run

    text = path.read_text()
    assert text.startswith("#") and "Launch:" in text and "Effective batch" in text and "Reproduces:" in text
    cfg = run.resolve_config(["--config", str(path), "--train"])
    model, method, task = path.stem.rsplit("_", 2)
    assert cfg.name == path.stem and cfg.quantize == "nf4" and task == "math"
    assert cfg.peft == {"qsorsa": "sorsa", "qpissa": "pissa", "qlora": "lora"}[method]
    assert cfg.quant_iters == (1 if method == "qlora" else 5) and cfg.rank == (64 if model in ("mistral_7b", "gemma_7b") else 128)
    assert cfg.batch_size * cfg.accum_steps == 128 and cfg.loss_normalization == "reference"


def test_dry_run_of_llama3_70b_qsorsa_fits_one_80gb_gpu():
    from sorsa.tools.planner import plan_run, quant_bytes_per_weight

    plan = plan_run("meta-llama/Meta-Llama-3-70B", method="sorsa", rank=128, quantize="nf4", batch_size=1,
                    accum_steps=128, length=512, precision="bf16", grad_cp=True)
    assert len(plan.layers) == 560 and abs(plan.total_params - 70.55e9) < 0.01e9
    frozen = plan.memory.gpu["weights (frozen, linear layers quantized)"]
    linear = plan.total_params - 2 * 128256 * 8192 - (2 * 80 + 1) * 8192  # embeddings, head, norms stay bf16
    assert frozen == pytest.approx(linear * quant_bytes_per_weight("nf4") + (plan.total_params - linear) * 2, rel=1e-6)
    assert plan.memory.total * 1.15 < 80e9  # fits one 80 GB GPU with 15 % on top (CUDA context, fragmentation)


def test_quant_error_command_orders_the_initialisations(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "sorsa.tools.quant_error", "--synthetic", "192x128", "128x192", "-r", "8",
                          "--quant-iters", "5", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    import csv

    rows = list(csv.DictReader((tmp_path / "quant_error.csv").open()))
    assert len(rows) == 2
    for r in rows:
        assert float(r["tN"]) < float(r["t1"]) < float(r["qlora"])
    assert "| **total** | 2 |" in (tmp_path / "quant_error.md").read_text()
    assert (tmp_path / "quant_error.png").stat().st_size > 0


def test_quant_error_of_a_checkpoint_follows_the_target_rule_and_one_run_of_rounds(builtin_model_dir):
    """`--model DIR`: the layers are those training adapts (the defaults; all-linear: every linear layer but the
    head), and T = 1 taken from the first round of T = 3 equals a separate T = 1 initialisation."""
    from sorsa.tools.quant_error import layer_errors, model_weights

    defaults = [name for name, _ in model_weights(str(builtin_model_dir), None)]
    every = [name for name, _ in model_weights(str(builtin_model_dir), ["all-linear"])]
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert len(defaults) % 7 == 0 and {n.rsplit(".", 1)[1] for n in defaults} == set(projections)
    assert set(every) == set(defaults) and not any("lm_head" in n for n in every)  # Llama: the same layers
    name, W = next(model_weights(str(builtin_model_dir), ["q_proj"]))
    spec = QuantSpec("nf4", compute_dtype=torch.float32)
    errors = layer_errors(W, 4, spec, 3)
    Q, deq = quantizer(spec)
    U, S, Vh = SF.quantized_split(W, 4, Q, deq, 1)
    t1 = torch.linalg.svdvals(W - deq(Q(SF.split_weight(W, U, S, Vh, 1.0, torch.float32))) - SF.adapter_delta(U, S, Vh))
    assert errors["t1"] == pytest.approx(t1.double().sum().item(), rel=1e-5)
    assert errors["tN"] < errors["t1"] < errors["qlora"]
