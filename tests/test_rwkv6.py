"""Tests of sorsa.rwkv6: parity with the `rwkv` package, the chunked WKV, checkpoint layouts, loss and gradients,
padded batched generation, and the world tokenizer. Tiny random models; CPU; a few seconds in all.

Parity norm: rel(ours, ref) = max |ours - ref| / max |ref| over all positions and vocabulary entries.
"""
from __future__ import annotations

import json
import os

# The rwkv package reads these at import: no TorchScript, no CUDA extension build.
os.environ["RWKV_JIT_ON"] = "0"
os.environ["RWKV_CUDA_ON"] = "0"

import pytest
import torch
import torch.nn.functional as F

from sorsa.rwkv6 import (RWKV6Config, RWKV6ForCausalLM, RWKVWorldTokenizer, hf_to_official_state_dict,
                         wkv6_chunked, wkv6_recurrent)

C, LAYERS, HEAD, VOCAB, FFN, D_MIX, D_DECAY, SEQ = 128, 2, 32, 512, 448, 8, 16, 64
PARITY_TOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def random_official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the official x060 layout, scaled so every path matters: lerp weights in [0, 1],
    decays from w ≈ 1 to w ≈ 0.01 (time_decay in [-6, 1.5]), low-rank maps that move them by O(0.3),
    unit-variance-preserving linear layers, non-trivial norms."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def uniform(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    H = C // HEAD
    sd = {"emb.weight": normal(VOCAB, C), "blocks.0.ln0.weight": 1 + normal(C, std=0.1),
          "blocks.0.ln0.bias": normal(C, std=0.1)}
    for i in range(LAYERS):
        p, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for ln in ("ln1", "ln2"):
            sd[f"{p}{ln}.weight"], sd[f"{p}{ln}.bias"] = 1 + normal(C, std=0.1), normal(C, std=0.1)
        for n in "xwkvrg":
            sd[a + "time_maa_" + n] = uniform(1, 1, C)
        sd[a + "time_maa_w1"] = normal(C, 5 * D_MIX, std=0.5 / C ** 0.5)
        sd[a + "time_maa_w2"] = normal(5, D_MIX, C, std=0.3 / D_MIX ** 0.5)
        sd[a + "time_decay"] = uniform(1, 1, C, lo=-6.0, hi=1.5)
        sd[a + "time_decay_w1"] = normal(C, D_DECAY, std=0.5 / C ** 0.5)
        sd[a + "time_decay_w2"] = normal(D_DECAY, C, std=0.5 / D_DECAY ** 0.5)
        sd[a + "time_faaaa"] = normal(H, HEAD, std=0.5)
        for n in ("receptance", "key", "value", "gate", "output"):
            sd[a + n + ".weight"] = normal(C, C, std=C ** -0.5)
        sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = 1 + normal(C, std=0.1), normal(C, std=0.1)
        sd[f + "time_maa_k"], sd[f + "time_maa_r"] = uniform(1, 1, C), uniform(1, 1, C)
        sd[f + "key.weight"] = normal(FFN, C, std=C ** -0.5)
        sd[f + "receptance.weight"] = normal(C, C, std=C ** -0.5)
        sd[f + "value.weight"] = normal(C, FFN, std=FFN ** -0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = 1 + normal(C, std=0.1), normal(C, std=0.1)
    sd["head.weight"] = normal(VOCAB, C, std=C ** -0.5)
    return sd


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The random official checkpoint, a 64-token sequence, and the rwkv package's logits for it
    (one parallel call with full_output, and token by token through its state)."""
    rwkv_model = pytest.importorskip("rwkv.model")
    path = tmp_path_factory.mktemp("rwkv6") / "tiny.pth"
    sd = random_official_state_dict()
    torch.save(sd, path)
    tokens = torch.randint(1, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = rwkv_model.RWKV(str(path), strategy="cpu fp32", verbose=False)
    seq_logits, _ = ref.forward(tokens, None, full_output=True)  # (T, V)
    state, step_logits = None, []
    for t in tokens:
        logits, state = ref.forward([t], state)
        step_logits.append(logits)
    return dict(path=path, sd=sd, tokens=tokens, seq=seq_logits, step=torch.stack(step_logits), rwkv=rwkv_model)


@pytest.fixture(scope="module")
def model(official):
    return RWKV6ForCausalLM.from_rwkv_checkpoint(official["path"]).eval()


# ----------------------------------------------------------------------------- WKV

def test_chunked_wkv_equals_recurrent_loop():
    g = torch.Generator().manual_seed(0)
    B, T, H, N = 2, 45, 3, 8  # T not a multiple of any chunk length used
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
    log_w = -torch.exp(torch.randn(B, T, H, N, generator=g, dtype=torch.float64) * 2)
    log_w[:, 7] = -1e4  # one token that wipes the state: the chunked form must not lose precision after it
    u = torch.randn(H, N, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    out_ref, s_ref = wkv6_recurrent(r, k, v, log_w, u, s0)
    for L in (1, 5, 16, 64):
        out, s = wkv6_chunked(r, k, v, log_w, u, s0, chunk_size=L)
        assert (out - out_ref).abs().max() < 1e-10, L
        assert (s - s_ref).abs().max() < 1e-10, L
    # float32 inputs: computed in float32, close to the float64 result.
    out32, s32 = wkv6_chunked(r.float(), k.float(), v.float(), log_w.float(), u.float(), s0.float())
    assert out32.dtype == torch.float32 and rel(out32, out_ref) < 1e-5 and rel(s32, s_ref) < 1e-5
    # Mixed-precision training (autocast) must not push the WKV matmuls to bf16.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac, _ = wkv6_chunked(r.float(), k.float(), v.float(), log_w.float(), u.float(), s0.float())
    assert rel(out_ac, out_ref) < 1e-5


# ----------------------------------------------------------------------------- parity with the rwkv package

def test_parity_with_rwkv_package_parallel_and_recurrent(official, model):
    ref = official["seq"]
    # Not degenerate: the logits change along the sequence, as much as they vary across the vocabulary.
    assert ref.std(0).mean() > 0.5 * ref.std(1).mean() > 0
    assert rel(official["step"], ref) < 1e-5  # the reference's own two paths agree
    ids = torch.tensor([official["tokens"]])
    with torch.no_grad():
        parallel = model(ids).logits[0]  # (T, V), chunked WKV
        state, steps = None, []
        for t in official["tokens"]:
            out = model(torch.tensor([[t]]), state=state, use_cache=True)
            state = out.state
            steps.append(out.logits[0, -1])
    assert rel(parallel, ref) < PARITY_TOL
    assert rel(torch.stack(steps), official["step"]) < PARITY_TOL
    # Prompt in parallel, then continue with the state: the same logits as one pass.
    with torch.no_grad():
        head = model(ids[:, :40], use_cache=True)
        tail = model(ids[:, 40:], state=head.state).logits[0]
    assert rel(tail, parallel[40:]) < 1e-5


def test_rwkv_checkpoint_round_trip_is_exact_and_readable_by_rwkv(official, model, tmp_path):
    path = tmp_path / "saved.pth"
    model.save_rwkv_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert set(saved) == set(official["sd"])
    for key, value in official["sd"].items():
        assert saved[key].shape == value.shape and torch.equal(saved[key], value), key
    again = RWKV6ForCausalLM.from_rwkv_checkpoint(path)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    ref = official["rwkv"].RWKV(str(path), strategy="cpu fp32", verbose=False)
    logits, _ = ref.forward(official["tokens"], None, full_output=True)
    assert rel(logits, official["seq"]) == 0.0


def test_hf_layout_round_trip(official, model, tmp_path):
    # save_pretrained writes the "-HF" layout; both loaders read it back exactly.
    model.save_pretrained(tmp_path / "ours")
    for loaded in (RWKV6ForCausalLM.from_hf_rwkv6(tmp_path / "ours"),
                   RWKV6ForCausalLM.from_pretrained(tmp_path / "ours")):
        for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert k1 == k2 and torch.equal(v1, v2)
    # A directory as the RWKV "-HF" conversion writes it: renamed keys, pytorch_model.bin, its config.json.
    sd = official["sd"]
    hf = {("head.weight" if k == "head.weight" else "rwkv." + k
           .replace("emb.", "embeddings.", 1).replace("blocks.0.ln0.", "blocks.0.pre_ln.")
           .replace(".att.", ".attention.").replace(".ffn.", ".feed_forward.")): v for k, v in sd.items()}
    assert "rwkv.blocks.1.attention.time_faaaa" in hf and "rwkv.blocks.0.feed_forward.key.weight" in hf
    assert hf_to_official_state_dict(hf).keys() == sd.keys()
    d = tmp_path / "hf"
    d.mkdir()
    torch.save(hf, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["Rwkv6ForCausalLM"], "model_type": "rwkv6", "attention_hidden_size": C,
        "head_size": HEAD, "hidden_size": C, "intermediate_size": None, "layer_norm_epsilon": 1e-5,
        "num_hidden_layers": LAYERS, "vocab_size": VOCAB, "rescale_every": 6, "tie_word_embeddings": False}))
    loaded = RWKV6ForCausalLM.from_hf_rwkv6(d)
    with torch.no_grad():
        logits = loaded(torch.tensor([official["tokens"]])).logits[0]
    assert rel(logits, official["seq"]) < PARITY_TOL


def test_loader_rejects_other_checkpoints(tmp_path):
    path = tmp_path / "v5.pth"
    torch.save({"emb.weight": torch.zeros(4, 4), "blocks.0.att.time_mix_k": torch.zeros(4)}, path)
    with pytest.raises(ValueError, match="v4/v5 checkpoint, not RWKV6"):
        RWKV6ForCausalLM.from_rwkv_checkpoint(path)


# ----------------------------------------------------------------------------- training

def test_loss_and_gradients_reach_every_linear_layer(official):
    torch.manual_seed(0)
    model = RWKV6ForCausalLM.from_rwkv_checkpoint(official["path"]).train()
    ids = torch.tensor([official["tokens"][:32], official["tokens"][32:]])  # (2, 32)
    labels = ids.clone()
    labels[1, :10] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.isfinite(out.loss) and abs(out.loss.item() - expected.item()) < 1e-6
    out.loss.backward()
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 8 * LAYERS + 1
    for name in ("attention.receptance", "attention.key", "attention.value", "attention.gate",
                 "attention.output", "feed_forward.key", "feed_forward.value", "feed_forward.receptance"):
        assert f"rwkv.blocks.0.{name}" in linear
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Gradient checkpointing gives the same gradients.
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model(ids, labels=labels).loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-6), n


def test_padding_leaves_real_positions_and_state_unchanged(model, official):
    toks = official["tokens"]
    a, b = toks[:20], toks[20:33]  # lengths 20 and 13
    with torch.no_grad():
        alone_a = model(torch.tensor([a]), use_cache=True)
        alone_b = model(torch.tensor([b]), use_cache=True)
        # Right padding (training): the real positions see exactly what they see alone.
        right = model(torch.tensor([a, b + [0] * 7]), attention_mask=torch.tensor([[1] * 20, [1] * 13 + [0] * 7]),
                      use_cache=True)
        assert rel(right.logits[1, :13], alone_b.logits[0]) < 1e-5
        # Left padding (generation): same last logits and the same state as the prompt alone.
        left = model(torch.tensor([a, [0] * 7 + b]), attention_mask=torch.tensor([[1] * 20, [0] * 7 + [1] * 13]),
                     use_cache=True)
        assert rel(left.logits[1, 7:], alone_b.logits[0]) < 1e-5
        assert rel(left.logits[0], alone_a.logits[0]) < 1e-5
        for padded in (left, right):
            for (s1, s2, s3), (t1, t2, t3) in zip(padded.state, alone_b.state):
                assert rel(s1[1], t1[0]) < 1e-5 and rel(s2[1], t2[0]) < 1e-5 and rel(s3[1], t3[0]) < 1e-5


def test_batched_left_padded_generation_equals_one_by_one(model, official):
    toks = official["tokens"]
    prompts = [toks[:5], toks[10:27], toks[30:31], toks[40:49]]
    single = [model.generate_greedy([p], max_new_tokens=12, eos_token_id=None)[0] for p in prompts]
    batched = model.generate_greedy(prompts, max_new_tokens=12, eos_token_id=None)
    assert batched == single and all(len(s) == 12 for s in single)
    assert len({tuple(s) for s in single}) > 1  # the prompts matter
    # Greedy decoding through the state equals argmax over full re-runs of the growing sequence.
    seq = list(prompts[1])
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert seq[len(prompts[1]):] == single[1]
    # Stops: an EOS is dropped, a stop sequence is kept, each row stops on its own.
    first = single[0][0]
    assert model.generate_greedy([prompts[0]], max_new_tokens=12, eos_token_id=first) == [[]]
    stopped = model.generate_greedy(prompts, max_new_tokens=12, eos_token_id=None, stop=[single[1][2:4]])
    assert stopped[1] == single[1][:4] and stopped[0] == single[0][:len(stopped[0])]
    # A padded tensor with its mask gives the same as the lists.
    ids = torch.tensor([[0, 0] + toks[:5], toks[50:57]])
    mask = torch.tensor([[0, 0] + [1] * 5, [1] * 7])
    assert model.generate_greedy(ids, 6, eos_token_id=None, attention_mask=mask) == \
        model.generate_greedy([toks[:5], toks[50:57]], 6, eos_token_id=None)


def test_fresh_model_is_not_degenerate():
    torch.manual_seed(0)
    cfg = RWKV6Config(vocab_size=300, hidden_size=64, num_hidden_layers=2, head_size=16,
                      time_mix_extra_dim=4, time_decay_extra_dim=8)
    model = RWKV6ForCausalLM(cfg)
    with torch.no_grad():
        logits = model(torch.randint(0, 300, (1, 32))).logits[0]
    assert torch.isfinite(logits).all() and logits.std(0).mean() > 0.1
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert module.weight.abs().sum() > 0, name


# ----------------------------------------------------------------------------- tokenizer

def test_world_tokenizer_round_trip_and_batching():
    trie_module = pytest.importorskip("rwkv.rwkv_tokenizer")  # the vocabulary file ships with the rwkv package
    tok = RWKVWorldTokenizer()
    texts = ["Hello, world!", "Natalia sold clips to 48 of her friends in April.",
             "数学 問題 — ünïcödé ✓ 🙂", "def f(x):\n    return x ** 2\n", ""]
    trie = trie_module.TRIE_TOKENIZER(tok.vocab_file)
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids == trie.encode(text)  # the same greedy longest match as the reference tokenizer
        assert all(0 < i < 65536 for i in ids)
    assert tok.encode("Hello") == [33155] and tok.decode([33155, 0]) == "Hello"
    batch = tok(texts[:2], padding=True, return_tensors="pt", padding_side="left")
    n0, n1 = len(tok.encode(texts[0])), len(tok.encode(texts[1]))
    assert batch["input_ids"].shape == (2, max(n0, n1)) and batch["attention_mask"].sum().item() == n0 + n1
    assert batch["input_ids"][0, 0] == tok.pad_token_id == tok.eos_token_id == 0
    assert tok.batch_decode(batch["input_ids"]) == texts[:2]
