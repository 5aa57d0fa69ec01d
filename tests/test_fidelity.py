"""Faithful to the authors' code on its own terms: alpha_init, merge / unmerge / disable, and converting a
checkpoint saved in the reference's layout (SORSAModel.save_pretrained) into this project's adapter."""
import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sorsa import (SORSAConfig, apply_sorsa, disable_adapter, load_adapter, merge_adapter, merge_and_unload,
                   save_adapter, sorsa_layers, unmerge_adapter)
from sorsa.core.adapter_io import read_adapter_config

from test_core import RANK, logits, make_model, tokens, train_steps

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- alpha_init

def test_alpha_init_reference_keeps_sigma_and_the_scaled_residual():
    base = make_model("llama")
    W = base.model.layers[0].mlp.up_proj.weight.detach().double().clone()
    ids = tokens()
    before = logits(base, ids)
    alpha = 4 * RANK  # scale 4
    tail = apply_sorsa(copy.deepcopy(base), SORSAConfig(rank=RANK, alpha=alpha), progress=False)
    ref = apply_sorsa(copy.deepcopy(base), SORSAConfig(rank=RANK, alpha=alpha, alpha_init="reference"), progress=False)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    layer_t, layer_r = tail.model.layers[0].mlp.up_proj, ref.model.layers[0].mlp.up_proj
    torch.testing.assert_close(layer_t.S_p.double(), S[:RANK] / 4, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer_r.S_p.double(), S[:RANK], rtol=1e-5, atol=1e-6)
    principal = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
    torch.testing.assert_close(layer_r.weight.double(), W - 4 * principal, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer_t.weight.double(), W - principal, rtol=1e-5, atol=1e-5)
    # the same function at init, different training
    torch.testing.assert_close(logits(tail, ids), before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(ref, ids), before, rtol=1e-4, atol=1e-4)
    diff = (logits(train_steps(tail), ids) - logits(train_steps(ref), ids)).abs().max().item()
    assert diff > 1e-3


def test_alpha_init_is_stored_with_the_adapter_and_reload_is_exact(tmp_path):
    model = train_steps(apply_sorsa(make_model("llama"), SORSAConfig(rank=RANK, alpha=2 * RANK,
                                                                     alpha_init="reference"), progress=False))
    save_adapter(model, tmp_path / "a")
    config, _ = read_adapter_config(tmp_path / "a")
    assert config.alpha_init == "reference"
    ids = tokens()
    reloaded = load_adapter(make_model("llama"), tmp_path / "a")
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    with pytest.raises(ValueError, match="alpha_init"):
        SORSAConfig(alpha_init="halfway")


# ----------------------------------------------------------------------------- merge / unmerge / disable

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_is_exact_and_disable_gives_the_base_model(dtype):
    base = make_model("llama", dtype=dtype)
    ids = tokens()
    base_logits = logits(base, ids)
    model = train_steps(apply_sorsa(copy.deepcopy(base).float(), SORSAConfig(rank=RANK, residual_dtype=dtype),
                                    progress=False))
    residuals = {n: layer.weight.detach().clone() for n, layer in sorsa_layers(model)}
    trained = logits(model, ids)
    merge_adapter(model)
    assert all(layer.merged for _, layer in sorsa_layers(model))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(logits(model, ids), trained, rtol=tol, atol=tol)
    unmerge_adapter(model)
    for n, layer in sorsa_layers(model):
        assert torch.equal(layer.weight, residuals[n]), n  # bit for bit
    assert torch.equal(logits(model, ids), trained)
    with disable_adapter(model):  # the base model's output, adapters in place
        disabled = logits(model, ids)
    torch.testing.assert_close(disabled, base_logits, rtol=tol, atol=tol)
    assert (trained - base_logits).abs().max() > 1e-3
    assert torch.equal(logits(model, ids), trained)  # enabled again
    merge_adapter(model)  # a merged model is unmerged for the block and merged again after it
    with disable_adapter(model):
        torch.testing.assert_close(logits(model, ids), base_logits, rtol=tol, atol=tol)
    assert all(layer.merged for _, layer in sorsa_layers(model))
    plain = merge_and_unload(copy.deepcopy(model))  # drops W_res: nothing to unmerge any more
    assert not sorsa_layers(plain)
    with pytest.raises(ValueError, match="without keeping W_res"):
        layer = sorsa_layers(copy.deepcopy(model))[0][1]
        layer.W_res_kept = None
        layer.unmerge()


# ----------------------------------------------------------------------------- reference checkpoints

def _reference_checkpoint(base, directory: Path, rank: int, alpha, train: bool = True, dtype=torch.float32):
    """A checkpoint in the layout the authors' SORSAModel.save_pretrained writes (the wrapped model under
    `model.`; per adapted layer `weight` = W_res, `sorsa_A` = Vh_p (r x in), `sorsa_S` = S_p, `sorsa_B` = U_p
    (out x r); config.json with model_type "sorsa"), built from its definition: S_p = sigma and
    W_res = W - scale U sigma Vh, then (optionally) the factors moved as training would. Returns the merged
    weights of that model (its function)."""
    scale = 1.0 if alpha is None else alpha / rank
    state, merged = {}, {}
    g = torch.Generator().manual_seed(5)
    for key, value in base.state_dict().items():
        state[f"model.{key}"] = value.detach().clone().contiguous()
    targets = ["q_proj", "v_proj", "down_proj"]
    for name, module in base.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        W = module.weight.detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
        W_res = (W - scale * (U * S) @ Vh).to(dtype)
        if train:
            U = U + 0.01 * torch.randn(U.shape, generator=g, dtype=U.dtype)
            S = S * (1 + 0.05 * torch.randn(S.shape, generator=g, dtype=S.dtype))
            Vh = Vh + 0.01 * torch.randn(Vh.shape, generator=g, dtype=Vh.dtype)
        state[f"model.{name}.weight"] = W_res.contiguous()
        state[f"model.{name}.sorsa_A"] = Vh.float().contiguous()
        state[f"model.{name}.sorsa_S"] = S.float().contiguous()
        state[f"model.{name}.sorsa_B"] = U.float().contiguous()
        merged[name] = W_res.double() + scale * (U.float().double() * S.float().double()) @ Vh.float().double()
    directory.mkdir(parents=True)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({
        "model_type": "sorsa", "base_model_name_or_path": "base", "rank": rank, "alpha": alpha, "dropout": 0.0,
        "target_modules": targets, "architectures": ["SORSAModel"]}))
    return merged


@pytest.mark.parametrize("alpha", [None, 2 * RANK])
def test_reference_checkpoint_converts_to_an_adapter_with_the_reference_logits(tmp_path, alpha):
    base = make_model("llama")
    base.save_pretrained(tmp_path / "base")
    merged = _reference_checkpoint(base, tmp_path / "ref", RANK, alpha)
    out = subprocess.run([sys.executable, "-m", "sorsa.convert", "from-reference", str(tmp_path / "ref"),
                          "--base", str(tmp_path / "base"), "--out", str(tmp_path / "adapter")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    config, info = read_adapter_config(tmp_path / "adapter")
    assert config.rank == RANK and config.alpha == alpha and config.alpha_init == "reference"
    assert len(info["layers"]) == 3 * 2
    ids = tokens()
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name, W in merged.items():
            reference.get_submodule(name).weight.copy_(W.float())
    converted = load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(logits(converted, ids), logits(reference, ids), rtol=1e-4, atol=1e-4)
    assert (logits(reference, ids) - logits(base, ids)).abs().max() > 1e-3


def test_reference_checkpoint_of_another_base_is_refused(tmp_path):
    other = make_model("llama", seed=7)
    other.save_pretrained(tmp_path / "other")
    _reference_checkpoint(make_model("llama"), tmp_path / "ref", RANK, None)
    out = subprocess.run([sys.executable, "-m", "sorsa.convert", "from-reference", str(tmp_path / "ref"),
                          "--base", str(tmp_path / "other"), "--out", str(tmp_path / "adapter")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "not of rank" in lines[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "adapter").exists()


def test_a_converted_reference_run_merges_through_run_py(tmp_path):
    from sorsa import cli as run
    from transformers import AutoModelForCausalLM

    base = make_model("llama")
    base.save_pretrained(tmp_path / "base")
    merged = _reference_checkpoint(base, tmp_path / "ref", RANK, None)
    out = subprocess.run([sys.executable, "-m", "sorsa.convert", "from-reference", str(tmp_path / "ref"), "--base",
                          str(tmp_path / "base"), "--as-run", "ref", "--run-path", str(tmp_path / "runs")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    _tiny_tokenizer().save_pretrained(tmp_path / "base")
    # merging saves the tokenizer too: a tiny one beside the base weights
    assert run.main(["-n", "ref", "--run-path", str(tmp_path / "runs"), "--merge", "--export-lora"]) == 0
    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "ref" / "merged").eval()
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name, W in merged.items():
            reference.get_submodule(name).weight.copy_(W.float())
    ids = tokens()
    torch.testing.assert_close(logits(merged_model, ids), logits(reference, ids), rtol=1e-4, atol=1e-4)
    assert (tmp_path / "runs" / "ref" / "lora_export" / "adapter_model.safetensors").is_file()
    # --analyze: the converted adapter (its step unknown: step 1) against the base, as the reference's weights give
    from sorsa.tools.analysis import svd_variation

    assert run.main(["-n", "ref", "--run-path", str(tmp_path / "runs"), "--analyze"]) == 0
    with open(tmp_path / "runs" / "ref" / "analysis.csv", newline="") as f:
        rows = {r["layer"]: r for r in csv.DictReader(f)}
    assert len(rows) == len(merged) and {r["step"] for r in rows.values()} == {"1"}
    for name, W in merged.items():
        expected = svd_variation(base.get_submodule(name).weight.detach(), W.float())
        assert float(rows[name]["delta_sigma"]) == pytest.approx(expected[0], rel=1e-3, abs=1e-6)
    # a second conversion into the same run name is refused before it converts anything
    again = subprocess.run([sys.executable, "-m", "sorsa.convert", "from-reference", str(tmp_path / "ref"), "--base",
                            str(tmp_path / "base"), "--as-run", "ref", "--run-path", str(tmp_path / "runs")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr and not (tmp_path / "runs" / ".ref.converting").exists()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(96)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w1", eos_token="w2", bos_token="w3")
