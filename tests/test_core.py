"""The adapter core on tiny random Llama / Mistral / Gemma models: init, gradients, merge, save/load,
LoRA export, the orthonormal loss, the SVD cache and the validation errors."""
import copy

import pytest
import torch
import torch.nn as nn
from transformers import (GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM)

import sorsa.core.functional as SF
from sorsa import (SORSAConfig, apply_sorsa, export_lora, load_adapter, merge_and_unload,
                   orthonormal_loss, parameter_summary, save_adapter, sorsa_layers)

RANK = 8
COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def make_model(kind: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=None))
    else:
        model = GemmaForCausalLM(GemmaConfig(**COMMON, head_dim=16))
    return model.to(dtype).eval()


def tokens(seed=1, batch=2, length=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, COMMON["vocab_size"], (batch, length), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def train_steps(model, steps=3, lr=1e-2):
    """A few AdamW steps on random tokens so the adapters move away from their init."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        ids = tokens(seed=10 + i)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


KINDS = ["llama", "mistral", "gemma"]


@pytest.mark.parametrize("kind", KINDS)
def test_output_unchanged_at_init_and_trainable_count(kind):
    model = make_model(kind)
    ids = tokens()
    before = logits(model, ids)
    linears = [(n, m.in_features, m.out_features) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.split(".")[-1] in SORSAConfig().target_modules]
    assert len(linears) == 7 * COMMON["num_hidden_layers"]
    apply_sorsa(model, SORSAConfig(rank=RANK), progress=False)
    after = logits(model, ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert len(sorsa_layers(model)) == len(linears)
    assert parameter_summary(model)["trainable"] == sum(RANK * (i + o + 1) for _, i, o in linears)


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapters_get_gradients_and_residual_is_frozen(kind):
    model = apply_sorsa(make_model(kind), SORSAConfig(rank=RANK), progress=False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = tokens()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        is_adapter = name.rsplit(".", 1)[-1] in ("U_p", "S_p", "Vh_p")
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name
        if is_adapter:
            assert p.grad.abs().sum() > 0, name
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_unmerged_and_is_idempotent(kind):
    model = train_steps(apply_sorsa(make_model(kind), SORSAConfig(rank=RANK), progress=False))
    ids = tokens()
    unmerged = logits(model, ids)
    base_keys = set(make_model(kind).state_dict())
    layer = sorsa_layers(model)[0][1]
    layer.merge()
    w_once = layer.weight.detach().clone()
    layer.merge()  # second merge: a no-op
    assert torch.equal(layer.weight, w_once)
    merged = merge_and_unload(model)
    assert not sorsa_layers(merged)
    assert set(merged.state_dict()) == base_keys
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith("q_proj"))
    torch.testing.assert_close(logits(merged, ids), unmerged, rtol=1e-4, atol=1e-4)
    merge_and_unload(merged)  # nothing left to merge: unchanged
    torch.testing.assert_close(logits(merged, ids), unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,svd", [("llama", "full"), ("llama", "randomized"), ("gemma", "randomized"),
                                      ("mistral", "full")])
def test_save_load_on_fresh_base_is_exact(tmp_path, kind, svd):
    model = train_steps(apply_sorsa(make_model(kind, seed=0), SORSAConfig(rank=RANK, svd=svd, niter=2, seed=3),
                                    progress=False))
    ids = tokens()
    trained = logits(model, ids)
    save_adapter(model, tmp_path / "adapter")
    torch.manual_seed(12345)  # a different global seed: nothing on load may depend on it
    base = make_model(kind, seed=0)
    loaded = load_adapter(base, tmp_path / "adapter")
    assert torch.equal(logits(loaded, ids), trained)
    for (n1, a), (n2, b) in zip(sorsa_layers(model), sorsa_layers(loaded)):
        assert n1 == n2 and torch.equal(a.weight, b.weight) and torch.equal(a.U_p, b.U_p)
    assert loaded.sorsa_config.svd == svd and loaded.sorsa_config.seed == 3
    assert parameter_summary(loaded)["trainable"] == parameter_summary(model)["trainable"]


@pytest.mark.parametrize("kind", KINDS)
def test_export_lora_gives_same_logits_with_peft(tmp_path, kind):
    from peft import PeftModel

    model = train_steps(apply_sorsa(make_model(kind), SORSAConfig(rank=RANK, alpha=4), progress=False))
    ids = tokens()
    trained = logits(model, ids)
    export_lora(model, tmp_path / "lora")
    peft_model = PeftModel.from_pretrained(make_model(kind), str(tmp_path / "lora")).eval()
    assert peft_model.peft_config["default"].r == 2 * RANK
    torch.testing.assert_close(logits(peft_model, ids), trained, rtol=1e-4, atol=1e-4)
    # The export is a real change: the untouched base gives other logits.
    assert (logits(make_model(kind), ids) - trained).abs().max() > 1e-3


def test_init_factors_are_the_top_singular_triplets():
    model = make_model("llama")
    W = model.model.layers[0].mlp.down_proj.weight.detach().clone()  # (64, 96)
    apply_sorsa(model, SORSAConfig(rank=RANK), progress=False)
    layer = model.model.layers[0].mlp.down_proj
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    torch.testing.assert_close(layer.S_p.double(), S[:RANK], rtol=1e-5, atol=1e-6)
    # Singular vectors are unique up to sign: compare U_p diag(S_p) Vh_p and |<u_i, u_i'>|.
    torch.testing.assert_close(((layer.U_p * layer.S_p) @ layer.Vh_p).double(), (U[:, :RANK] * S[:RANK]) @ Vh[:RANK],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((layer.U_p.double() * U[:, :RANK]).sum(0).abs(), torch.ones(RANK, dtype=torch.double),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.double(), (U[:, RANK:] * S[RANK:]) @ Vh[RANK:], rtol=1e-5, atol=1e-5)


def test_alpha_2r_leaves_the_svd_tail_as_residual():
    model = make_model("llama")
    W = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    apply_sorsa(model, SORSAConfig(rank=RANK, alpha=2 * RANK), progress=False)
    layer = model.model.layers[1].self_attn.q_proj
    assert layer.scale == 2.0
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    torch.testing.assert_close(layer.weight.double(), (U[:, RANK:] * S[RANK:]) @ Vh[RANK:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.S_p.double(), S[:RANK] / 2.0, rtol=1e-5, atol=1e-6)


def test_bf16_base_is_decomposed_in_float32_and_runs_mixed():
    model = make_model("llama", dtype=torch.bfloat16)
    W = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    ids = tokens()
    before = logits(model, ids)
    apply_sorsa(model, SORSAConfig(rank=RANK), progress=False)
    layer = model.model.layers[0].self_attn.o_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.U_p.dtype == torch.float32
    S_ref = torch.linalg.svd(W.float(), full_matrices=False).S[:RANK]
    torch.testing.assert_close(layer.S_p, S_ref, rtol=1e-6, atol=1e-6)  # fp32 SVD of the bf16 values
    S_bf16 = torch.linalg.svdvals(W.float()).bfloat16().float()[:RANK]
    assert not torch.equal(layer.S_p, S_bf16)  # not rounded through bf16
    after = logits(model, ids)
    assert after.dtype == torch.float32 and torch.isfinite(after).all()
    # bf16 residual + fp32 adapter reproduce the bf16 model up to bf16 rounding.
    assert (after - before).abs().max() < 0.1 * before.abs().max()


def test_residual_dtype_bf16_over_fp32_model_and_adapter_dtype():
    model = make_model("llama")
    ids = tokens()
    before = logits(model, ids)
    apply_sorsa(model, SORSAConfig(rank=RANK, residual_dtype="bf16"), progress=False)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.U_p.dtype == torch.float32
    after = logits(model, ids)
    assert 0 < (after - before).abs().max() < 0.05 * before.abs().max()


def test_bias_is_added_once():
    torch.manual_seed(0)
    linear = nn.Linear(24, 16, bias=True)
    with torch.no_grad():
        linear.bias.uniform_(1.0, 2.0)
    x = torch.randn(5, 24)
    expected = linear(x).detach()
    model = nn.Sequential()
    model.add_module("proj", linear)
    apply_sorsa(model, SORSAConfig(rank=4, target_modules=["proj"]), progress=False)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert model.proj.bias is linear.bias and not model.proj.bias.requires_grad
    merge_and_unload(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_regex_targets_and_dropout_only_on_adapter_path():
    model = make_model("llama")
    apply_sorsa(model, SORSAConfig(rank=RANK, target_modules=r".*layers\.0\.self_attn\.(q|v)_proj", dropout=0.5),
                progress=False)
    names = [n for n, _ in sorsa_layers(model)]
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    layer = sorsa_layers(model)[0][1]
    x = torch.randn(3, 64)
    layer.eval()
    y_eval = layer(x)
    torch.testing.assert_close(layer.base_layer(x) + SF.adapter_forward(x, layer.U_p, layer.S_p, layer.Vh_p), y_eval)
    layer.train()
    torch.manual_seed(0)
    y_train = layer(x)
    assert not torch.allclose(y_train, y_eval)
    # Dropout acts on the adapter input only: the residual path is untouched.
    torch.manual_seed(0)
    keep = layer.adapter_dropout(torch.ones_like(x))
    torch.testing.assert_close(y_train, layer.base_layer(x) + SF.adapter_forward(x * keep, layer.U_p, layer.S_p,
                                                                                 layer.Vh_p))


def test_orthonormal_loss_zero_at_init_and_matches_formula_after_training():
    model = apply_sorsa(make_model("llama"), SORSAConfig(rank=RANK), progress=False)
    assert orthonormal_loss(model).item() < 1e-5
    train_steps(model, steps=3, lr=5e-2)
    terms = []
    for _, layer in sorsa_layers(model):
        U, Vh = layer.U_p.detach().double(), layer.Vh_p.detach().double()
        eye = torch.eye(RANK, dtype=torch.double)
        terms += [torch.sqrt(((U.T @ U - eye) ** 2).sum()), torch.sqrt(((Vh @ Vh.T - eye) ** 2).sum())]
    expected = torch.stack(terms).mean()
    assert expected > 1e-2
    loss = orthonormal_loss(model)
    assert loss.requires_grad and loss.dim() == 0
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_randomized_svd_is_seeded_and_close_to_full():
    torch.manual_seed(0)
    # A matrix with a decaying spectrum, as pre-trained weights have.
    W = torch.randn(128, 8) @ torch.randn(8, 96) + 0.01 * torch.randn(128, 96)
    U1, S1, V1 = SF.svd_top(W, 8, "randomized", niter=4, seed=7)
    torch.manual_seed(999)
    U2, S2, V2 = SF.svd_top(W, 8, "randomized", niter=4, seed=7)
    assert torch.equal(U1, U2) and torch.equal(S1, S2) and torch.equal(V1, V2)
    _, S3, _ = SF.svd_top(W, 8, "randomized", niter=4, seed=8)
    assert not torch.equal(S1, S3)
    _, S_full, _ = SF.svd_top(W, 8, "full")
    torch.testing.assert_close(S1, S_full, rtol=1e-3, atol=1e-3)
    assert U1.dtype == torch.float32 and U1.shape == (128, 8) and V1.shape == (8, 96)


def test_svd_cache_reuses_only_matching_entries(tmp_path, monkeypatch):
    calls = []
    real = SF.svd_top

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(SF, "svd_top", counting)
    cfg = SORSAConfig(rank=RANK, target_modules=["q_proj", "v_proj"])
    ids = tokens()
    first = apply_sorsa(make_model("llama"), cfg, svd_cache_dir=tmp_path, progress=False)
    assert len(calls) == 4 and len(list(tmp_path.glob("*.safetensors"))) == 4
    second = apply_sorsa(make_model("llama"), cfg, svd_cache_dir=tmp_path, progress=False)
    assert len(calls) == 4  # all four from the cache
    assert torch.equal(logits(first, ids), logits(second, ids))
    apply_sorsa(make_model("llama"), SORSAConfig(rank=4, target_modules=["q_proj", "v_proj"]),
                svd_cache_dir=tmp_path, progress=False)
    assert len(calls) == 8  # another rank: new entries
    apply_sorsa(make_model("llama", seed=1), cfg, svd_cache_dir=tmp_path, progress=False)
    assert len(calls) == 12  # other weights: new entries
    apply_sorsa(make_model("llama"), SORSAConfig(rank=RANK, target_modules=["q_proj", "v_proj"], svd="randomized",
                                                 seed=1), svd_cache_dir=tmp_path, progress=False)
    apply_sorsa(make_model("llama"), SORSAConfig(rank=RANK, target_modules=["q_proj", "v_proj"], svd="randomized",
                                                 seed=2), svd_cache_dir=tmp_path, progress=False)
    assert len(calls) == 20  # method and seed are part of the key


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=0), "rank=0"),
    (dict(rank=2.5), "rank=2.5"),
    (dict(svd="qr"), "svd='qr'"),
    (dict(dropout=1.5), "dropout=1.5"),
    (dict(alpha=-1), "alpha=-1"),
    (dict(niter=-1), "niter=-1"),
    (dict(target_modules=[]), "target_modules"),
    (dict(target_modules="(unclosed"), "not a valid regex"),
    (dict(residual_dtype="int8"), "residual_dtype='int8'"),
])
def test_bad_config_raises_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        SORSAConfig(**kwargs)


def test_bad_targets_raise_clear_value_error():
    with pytest.raises(ValueError, match=r"rank=65 is larger than min\(in, out\) = 64 .*q_proj"):
        apply_sorsa(make_model("llama"), SORSAConfig(rank=65), progress=False)
    with pytest.raises(ValueError, match=r"matched no nn.Linear layer.*'q_proj'"):
        apply_sorsa(make_model("llama"), SORSAConfig(rank=4, target_modules=["query_key_value"]), progress=False)
    model = apply_sorsa(make_model("llama"), SORSAConfig(rank=4), progress=False)
    with pytest.raises(ValueError, match="already has a SORSA adapter"):
        apply_sorsa(model, SORSAConfig(rank=4), progress=False)
    # A failed apply must not have touched the model.
    fresh = make_model("llama")
    state = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError):
        apply_sorsa(fresh, SORSAConfig(rank=65), progress=False)
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())


def test_load_adapter_errors_name_the_problem(tmp_path):
    model = apply_sorsa(make_model("llama"), SORSAConfig(rank=4), progress=False)
    save_adapter(model, tmp_path / "a")
    other = MistralForCausalLM(MistralConfig(**{**COMMON, "hidden_size": 32, "intermediate_size": 48}))
    with pytest.raises(ValueError, match="has shape 32x32 in the base model"):
        load_adapter(other, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="not a saved SORSA adapter"):
        load_adapter(make_model("llama"), tmp_path / "missing")
    with pytest.raises(ValueError, match="no SORSA adapters"):
        save_adapter(make_model("llama"), tmp_path / "b")


def test_full_svd_of_a_wide_weight_equals_torch_linalg_svd():
    """Wide weights (out < in, e.g. down_proj) are decomposed through their transpose, which is faster."""
    torch.manual_seed(0)
    W = torch.randn(48, 160)
    U, S, Vh = SF.svd_top(W, 12, "full")
    U2, S2, Vh2 = torch.linalg.svd(W.double(), full_matrices=False)
    assert U.shape == (48, 12) and Vh.shape == (12, 160)
    torch.testing.assert_close(S.double(), S2[:12], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(((U * S) @ Vh).double(), (U2[:, :12] * S2[:12]) @ Vh2[:12], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(U.T @ U, torch.eye(12), rtol=0, atol=1e-5)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(12), rtol=0, atol=1e-5)
