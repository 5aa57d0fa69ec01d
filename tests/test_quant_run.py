"""Quantized runs through run.py (QSORSA, QPiSSA, QLoRA): train a few steps and resume exactly, merge into a plain
checkpoint equal to the quantized adapter model, and the streaming initialisation's peak memory flat in the
number of layers (the full-precision model is never held)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sorsa import cli as run

from test_init_memory import _clear_refs_works
from test_run import _train_argv, call

pytest.importorskip("bitsandbytes", reason="the quantized tests need bitsandbytes (pip install -e '.[quant]')")

ROOT = Path(__file__).resolve().parents[1]


def _adapter_tensors(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", ["sorsa", "pissa", "lora"])
def test_quantized_method_trains_resumes_exactly_and_merges(tmp_path, builtin_model_dir, method):
    q = ["-p", method, "--quantize", "nf4", "--quant-iters", "2", "--lr", "5e-3", "--grad-cp"]
    assert run.main(_train_argv(tmp_path, builtin_model_dir, "a", *q, "--max-steps", "4", "--save-steps", "2",
                                "--merge")) == 0
    run_a = tmp_path / "runs" / "a"
    run_b = tmp_path / "runs" / "b"
    shutil.copytree(run_a, run_b, ignore=shutil.ignore_patterns("merged"))
    for p in ("adapter", "train_done.json", "checkpoints/checkpoint-4"):
        shutil.rmtree(run_b / p) if (run_b / p).is_dir() else (run_b / p).unlink()
    assert run.main(_train_argv(tmp_path, builtin_model_dir, "b", *q, "--max-steps", "4", "--save-steps", "2",
                                "--resume")) == 0
    a, b = _adapter_tensors(run_a), _adapter_tensors(run_b)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    # the merged checkpoint (plain transformers, float32 here) equals the quantized adapter model
    cfg = run.resolve_config(["--name", "a", "--merge", "--run-path", str(tmp_path / "runs")])
    from sorsa.train.recipe import _quantized_model
    from sorsa.train.runs import RunDir

    quantized = _quantized_model(cfg, RunDir(run_a)).eval()
    merged = AutoModelForCausalLM.from_pretrained(run_a / "merged").eval()
    ids = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = quantized(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    fresh = AutoModelForCausalLM.from_pretrained(builtin_model_dir).eval()
    with torch.no_grad():
        assert (fresh(input_ids=ids).logits - got).abs().max() > 1e-3  # quantized and trained: another model
    assert yaml.safe_load((run_a / "config.yaml").read_text())["quantize"] == "nf4"


def test_quantize_refuses_what_it_cannot_do(tmp_path, capsys, builtin_model_dir):
    for extra, message in ((["-p", "full"], "-p full"), (["--rwkv"], "--rwkv"),
                           (["--deepspeed", str(ROOT / "configs/deepspeed/zero3.json")], "--deepspeed"),
                           (["--quant-iters", "0"], "quant_iters=0")):
        code, err = call(_train_argv(tmp_path, builtin_model_dir, "x", "--quantize", "nf4", *extra), capsys)
        assert code == 2 and len(err) == 1 and message in err[0], (extra, err)
    assert not (tmp_path / "runs" / "x").exists()  # nothing written


def test_quantized_targets_follow_the_matching_rule(builtin_model_dir):
    from sorsa import SORSAConfig, sorsa_layers
    from sorsa.core.quant import is_quantized
    from sorsa.methods.peft_lora import load_qpeft
    from sorsa.core.quant_model import load_qsorsa, stream_quantized

    cfg = SORSAConfig(rank=4, quantize="nf4", compute_dtype=torch.float32)
    model = load_qsorsa(builtin_model_dir, cfg, "all-linear", progress=False)  # every linear layer but the head
    assert len(sorsa_layers(model)) == 14 and type(model.get_output_embeddings()) is torch.nn.Linear
    assert sum(is_quantized(m) for m in model.modules()) == 14
    for bad, message in ((["nope_proj"], "matched no nn.Linear"), (["q_proj"], "rank=999")):
        with pytest.raises(ValueError, match=message):  # checked on the skeleton, before any weight is read
            stream_quantized(builtin_model_dir, cfg.quant_spec(), lambda n, m: None, bad, rank=999 if
                             bad == ["q_proj"] else None, progress=False)
    qpissa = load_qpeft(builtin_model_dir, "pissa", 4, "all-linear", cfg.quant_spec(), progress=False)
    assert sum(1 for n, _ in qpissa.named_modules() if n.endswith("lora_A.default")) == 14


PROBE = r"""
import gc, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from sorsa import SORSAConfig
from sorsa.core.quant_model import load_qsorsa

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
root, size = sys.argv[1], int(sys.argv[2])
for n in map(int, sys.argv[3:]):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=size, intermediate_size=size, num_hidden_layers=n,
                         num_attention_heads=4, num_key_value_heads=4)
    LlamaForCausalLM(config).save_pretrained(f"{root}/m{n}")  # float32 checkpoint
    gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
cfg = SORSAConfig(rank=8, quantize="nf4", quant_iters=2, compute_dtype=torch.float32)
load_qsorsa(f"{root}/m1", cfg, ["q_proj"], progress=False)  # one-time set-up is not counted
for n in map(int, sys.argv[3:]):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    model = load_qsorsa(f"{root}/m{n}", cfg, ["q_proj", "k_proj", "v_proj", "o_proj"], progress=False)
    gc.collect()
    print(n, status("VmHWM") - status("VmRSS"))
    del model
    gc.collect()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _clear_refs_works(),
                    reason="needs Linux's /proc/self/clear_refs to reset the peak-RSS counter")
def test_streaming_initialisation_peak_memory_is_flat_in_the_number_of_layers(tmp_path):
    size = 512
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), str(size), "1", "4", "16"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines()]
    peak = {int(r[0]): int(r[1]) for r in rows if len(r) == 2 and all(x.isdigit() for x in r)}
    one_layer_f32 = size * size * 4
    model_f32 = 16 * 7 * one_layer_f32  # the 16-layer model's linear weights in float32
    print(f"peak extra memory while streaming: 4 layers {peak[4] / 2**20:.1f} MiB, 16 layers "
          f"{peak[16] / 2**20:.1f} MiB (one float32 layer {one_layer_f32 / 2**20:.0f} MiB, the 16-layer model's "
          f"float32 linear weights {model_f32 / 2**20:.0f} MiB)")
    assert peak[16] < peak[4] + one_layer_f32  # flat: nothing accumulates per layer
    assert peak[16] < 12 * one_layer_f32  # a few copies of one weight
    assert peak[16] < 0.15 * model_f32  # never the full-precision model
