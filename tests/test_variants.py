"""The LoRA variants as methods (sorsa/methods/lora_variants.py): DoRA, rsLoRA, OLoRA, MiLoRA. Each starts equal to
the base model (residual + adapter = W for OLoRA and MiLoRA), trains 3 steps through the command line, merges into a
plain checkpoint with the adapter model's logits, and reloads exactly; MiLoRA's factors are the r smallest singular
triplets; -p loftq is one error naming why."""
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sorsa import cli as run
from sorsa.core.targets import LLAMA_TARGETS
from sorsa.methods import METHODS

from test_run import _train_argv, call

VARIANTS = ["dora", "rslora", "olora", "milora"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _ids():
    return torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", VARIANTS)
def test_variant_starts_at_the_base_model(builtin_model_dir, method):
    from sorsa.train import recipe

    cfg = recipe.resolve_config({"model": str(builtin_model_dir), "peft": method, "rank": 4, "train": True})
    base = AutoModelForCausalLM.from_pretrained(builtin_model_dir).eval()
    adapted = METHODS[method].prepare(AutoModelForCausalLM.from_pretrained(builtin_model_dir), cfg,
                                      LLAMA_TARGETS).eval()
    want, got = _logits(base, _ids()), _logits(adapted, _ids())
    assert ((got - want).norm() / want.norm()).item() < 2e-6
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert any("lora_magnitude_vector" in n for n in trainable) == (method == "dora")
    layer = adapted.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(4 / 2 if method == "rslora" else 1.0)  # alpha / √r, r = alpha = 4


def test_milora_takes_the_smallest_singular_triplets(builtin_model_dir):
    from sorsa.train import recipe

    cfg = recipe.resolve_config({"model": str(builtin_model_dir), "peft": "milora", "rank": 4, "train": True})
    W = AutoModelForCausalLM.from_pretrained(builtin_model_dir).model.layers[1].mlp.down_proj.weight.detach()
    adapted = METHODS["milora"].prepare(AutoModelForCausalLM.from_pretrained(builtin_model_dir), cfg, LLAMA_TARGETS)
    layer = adapted.base_model.model.model.layers[1].mlp.down_proj
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()  # (r, in), (out, r)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    expected = (U[:, -4:] * S[-4:]) @ Vh[-4:]  # the rank-4 part of W along its 4 smallest singular values
    torch.testing.assert_close((B @ A).double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.linalg.svdvals((B @ A).double())[:4], S[-4:], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.get_base_layer().weight.detach() + B @ A, W, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", VARIANTS)
def test_variant_trains_merges_and_reloads_exactly(tmp_path, builtin_model_dir, method):
    from peft import PeftModel

    from sorsa.train.runs import RunDir

    argv = _train_argv(tmp_path, builtin_model_dir, method, "-p", method, "--max-steps", "3", "--merge",
                       "--lr", "5e-3", "--save-steps", "3")
    assert run.main(argv) == 0
    run_dir = tmp_path / "runs" / method
    ids = _ids()
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(builtin_model_dir).eval(), ids)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_model_dir),
                                        str(run_dir / "adapter")).eval()
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_model_dir),
                                      str(run_dir / "adapter")).eval()
    expected = _logits(adapted, ids)
    assert torch.equal(_logits(again, ids), expected)  # the saved adapter reloads the same model every time
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-4, atol=1e-4)
    assert (expected - base_logits).abs().max() > 1e-4  # training changed the model
    # the analysis reads the trained weights of the last checkpoint as the merge does
    checkpoint = RunDir(run_dir).checkpoints()[-1][1]
    reader = METHODS[method].weight_reader(checkpoint, RunDir(run_dir))
    layer = "model.layers.0.self_attn.q_proj"
    W0 = AutoModelForCausalLM.from_pretrained(builtin_model_dir).get_submodule(layer).weight.detach().float()
    torch.testing.assert_close(reader.weight(layer, W0), merged.get_submodule(layer).weight.detach().float(),
                               rtol=1e-4, atol=1e-5)


def test_loftq_is_one_error_naming_why(tmp_path, capsys, builtin_model_dir):
    code, err = call(_train_argv(tmp_path, builtin_model_dir, "lq", "-p", "loftq", "--max-steps", "1"), capsys)
    assert code == 2 and len(err) == 1 and "loftq" in err[0], err
    assert ("CUDA" in err[0]) != torch.cuda.is_available()


def test_a_tiny_peft_protocol_experiment_runs_end_to_end(tmp_path, builtin_model_dir):
    """configs/experiments/peft_metamathqa.yaml with its base shrunk to the tiny model (every arm, one seed, 4 steps):
    every arm trains, is scored and gets its forgetting and efficiency rows."""
    import csv

    import yaml

    from sorsa.experiment import run_experiment
    from sorsa.tasks.builtin import materialize_dataset

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/experiments/peft_metamathqa.yaml").read_text())
    train, test = materialize_dataset(tmp_path / "data", n_train=64, n_test=8, seed=0, level=2)
    raw["base"].update(model=str(builtin_model_dir), train_file=str(train), split=None, rank=4, length=96, max_steps=4,
                       batch_size=4, mix_precision=["fp32"], test_precision="fp32", max_new_tokens=24, save_steps=4,
                       run_path=str(tmp_path / "runs"))
    raw["grid"]["seed"] = [1]
    raw["test"] = [{"name": "level-2", "dataset": "gsm-8k", "file": str(test), "limit": 8}]
    raw["forgetting"] = {"text": "builtin:python-docs", "tokens": 256, "length": 64}
    for key in ("prepare", "plan"):
        raw.pop(key)
    path = tmp_path / "peft_tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run_experiment(str(path), progress=False)
    assert all(o.ok for o in result["outcomes"]), [o.error for o in result["outcomes"] if not o.ok]
    folder = tmp_path / "runs" / "peft_metamathqa"
    with open(folder / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["arm"] for r in rows] == ["SORSA", "PiSSA", "LoRA", "rsLoRA", "DoRA", "OLoRA", "MiLoRA", "Full FT"]
    assert all(r["n_seeds"] == "1" and 0 <= float(r["accuracy_mean"]) <= 100 for r in rows)
    assert all(float(r["saved_bytes_mean"]) > 0 for r in rows)
    with open(folder / "forgetting_text.csv", newline="") as f:
        text = list(csv.DictReader(f))
    assert len(text) == 9 and all(float(r["cross_entropy"]) > 0 for r in text)
