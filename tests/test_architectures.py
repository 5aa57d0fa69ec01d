"""Beyond the paper's four models: tiny Llama-3 (rope scaling), Qwen2 (tied embeddings), Phi-3 (fused
projections), GPT-2 (transformers' Conv1D) and Gemma 2 train a few steps through run.py with their default
targets, merge into a checkpoint that loads as the plain architecture, and reload to the same logits;
"all-linear" adapts every linear layer but the output head."""
import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig, Phi3Config, Qwen2Config)
from transformers.pytorch_utils import Conv1D

from sorsa import cli as run
from sorsa import SORSAConfig, apply_sorsa, load_adapter, merge_and_unload, sorsa_layers
from sorsa.tasks.builtin import build_tokenizer, materialize_dataset
from sorsa.core.targets import ALL_LINEAR, DEFAULT_TARGETS, LINEAR_TYPES, find_target_modules

SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _configs(vocab: int) -> dict:
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, **SPECIAL)
    return {
        "llama3": LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "qwen2": Qwen2Config(**common, tie_word_embeddings=True),
        "phi3": Phi3Config(**common),
        "gpt2": GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, **SPECIAL),
        "gemma2": Gemma2Config(**common, head_dim=16),
    }


# (layers adapted per block by the default targets, Conv1D?)
EXPECTED = {"llama3": (7, False), "qwen2": (7, False), "phi3": (4, False), "gpt2": (4, True), "gemma2": (7, False)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    train, _ = materialize_dataset(tmp_path_factory.mktemp("arch-data"), n_train=64, n_test=8, seed=0)
    return train


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_architecture_trains_merges_and_reloads_through_run_py(tmp_path, data, arch):
    tokenizer = build_tokenizer()
    config = _configs(len(tokenizer))[arch]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    argv = ["--name", arch, "--train", "--merge", "--model", str(tmp_path / "base"), "--train-file", str(data),
            "--split", "[:32]", "--run-path", str(tmp_path / "runs"), "-r", "4", "--lr", "5e-3", "--batch-size", "4",
            "--accum-steps", "1", "--max-steps", "3", "--mix-precision", "fp32", "--length", "64", "--export-lora"]
    assert run.main(argv) == 0
    run_dir = tmp_path / "runs" / arch
    info = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    per_block, conv1d = EXPECTED[arch]
    assert len(info["layers"]) == 2 * per_block  # the architecture's default targets (sorsa/core/targets.py)
    assert info["config"]["target_modules"] == DEFAULT_TARGETS[config.model_type]
    ids = torch.randint(4, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    adapted = load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), run_dir / "adapter").eval()
    assert any(layer.transposed for _, layer in sorsa_layers(adapted)) == conv1d
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()  # the plain architecture
    assert type(merged) is type(fresh) and set(merged.state_dict()) == set(fresh.state_dict())
    assert any(isinstance(m, Conv1D) for m in merged.modules()) == conv1d
    expected = _logits(adapted, ids)
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-4, atol=1e-4)
    assert (expected - _logits(fresh, ids)).abs().max() > 1e-4  # three steps changed the model
    from peft import PeftModel

    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                         str(run_dir / "lora_export")).eval()
    torch.testing.assert_close(_logits(exported, ids), expected, rtol=1e-4, atol=1e-4)


def test_all_linear_adapts_every_linear_layer_but_the_head():
    config = _configs(64)["gpt2"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 64, (2, 10))
    before = _logits(model, ids)
    linear = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]
    assert "lm_head" in linear
    apply_sorsa(model, SORSAConfig(rank=4, target_modules=ALL_LINEAR), progress=False)
    adapted = [n for n, _ in sorsa_layers(model)]
    assert sorted(adapted) == sorted(n for n in linear if n != "lm_head")
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-4)  # unchanged at init
    merged = merge_and_unload(model)
    assert all(isinstance(merged.get_submodule(n), Conv1D) for n in adapted)  # merged back in GPT-2's layout
    torch.testing.assert_close(_logits(merged, ids), before, rtol=1e-4, atol=1e-4)
    # a head kept apart (a classifier's) is excluded on request; nothing matched is a clear error
    assert "transformer.h.0.attn.c_attn" not in [
        n for n, _ in find_target_modules(AutoModelForCausalLM.from_config(config), ALL_LINEAR,
                                          exclude=("transformer.h.0",))]
    with pytest.raises(ValueError, match="matched no nn.Linear layer"):
        find_target_modules(AutoModelForCausalLM.from_config(config), ["q_proj"])
