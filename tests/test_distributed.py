"""Two ranks on the CPU (gloo): `torchrun --nproc_per_node 2 run.py --train` under plain DDP and under
DeepSpeed ZeRO-2/3 finishes, saves the adapter, and gives the adapter of one process that sees the same
global batches (2 ranks x 4 per rank = 1 process x 8, the same seed and data order) under transformers' token
normalisation; under the reference's per-micro-batch normalisation (the default), 2 ranks x 4 x accumulation 2
equal 1 process x 4 x accumulation 4 (the same micro-batches, each its own mean, averaged).

Each run is a subprocess of the real CLI; the DeepSpeed tests are skipped where deepspeed is missing.
Clipping is off in the comparison (--max-grad-norm 0): under DeepSpeed the regularizer's gradient is
clipped together with the task gradient (sorsa/trainer.py), so only then are the updates the same.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed "
                                     "(DS_BUILD_OPS=0 pip install -e '.[deepspeed]'); the DDP tests still run")

# Measured on the CPU (2 ranks vs 1 process, 4 Adam steps at lr 2e-3, training moves U_p by ~4e-3):
# max |difference| of any adapter entry 4e-8 for DDP (float32 sums in another order; `pytest -s` prints
# it). 1e-5 leaves room for other BLAS builds, while a wrong data shard, a missing all-reduce or a
# regularizer that is lost, doubled or wrongly scaled moves entries by ~1e-3
# (test_regularizer_matters_at_this_gamma).
ATOL = 1e-5
STEPS = 4


def _env():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None), env.pop("RANK", None), env.pop("LOCAL_RANK", None)
    return env


def _argv(tmp, model_dir, name, batch_size, *extra):
    return ["run.py", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--train", "--no-merge", "--no-test",
            "--name", name, "--model", str(model_dir), "--run-path", str(tmp / "runs"),
            "--cache-path", str(tmp / "cache"), "--max-steps", str(STEPS), "--batch-size", str(batch_size),
            "--accum-steps", "2", "--max-grad-norm", "0", "--gamma", "0.05", "--logging-steps", "1",
            "--save-steps", "1000", "--loss-normalization", "tokens", *extra]


def _run(cmd, tmp, name):
    start = time.time()
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=280)
    wall = time.time() - start
    assert out.returncode == 0, f"{name} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    run_dir = tmp / "runs" / name
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    print(f"[{name}] {wall:.1f} s wall")
    _run.stdout = out.stdout
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors")), \
        json.loads((run_dir / "train_done.json").read_text()), run_dir


def _torchrun(tmp, model_dir, name, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_argv(tmp, model_dir, name, 4, *extra)]
    return _run(cmd, tmp, name)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def single(work, builtin_model_dir):
    """The reference: one process, batch 8 (= 2 ranks x 4), same seed, accumulation and steps."""
    return _run([sys.executable, *_argv(work, builtin_model_dir, "single", 8)], work, "single")


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _assert_matches(adapter, reference, what):
    diff = _max_diff(adapter, reference)
    moved = max((reference[k] - reference[k[:-len("U_p")] + "U_0"]).abs().max().item()
                for k in reference if k.endswith(".U_p"))
    print(f"[{what}] max |adapter - single-process adapter| = {diff:.2e} (training moved U_p by {moved:.2e})")
    assert moved > 1e-3  # the runs really trained
    assert diff < ATOL, f"{what}: adapters differ by {diff:.2e} from the single-process run"


def _log(run_dir):
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [(r["loss"], r["ortho_loss"]) for r in rows if "loss" in r]


def _same_losses(done, run_dir, ref):
    """Every step logs the same task loss (without the regularizer, also where DeepSpeed adds it to the
    loss) and the same L_o as the single-process run."""
    assert done["steps"] == ref[1]["steps"] == STEPS and done["world_size"] == 2
    log, ref_log = _log(run_dir), _log(ref[2])
    assert len(log) == len(ref_log) == STEPS
    for (loss, ortho), (ref_loss, ref_ortho) in zip(log, ref_log):
        assert loss == pytest.approx(ref_loss, rel=1e-4) and ortho == pytest.approx(ref_ortho, rel=1e-3, abs=1e-7)


def test_ddp_two_ranks_match_one_process(work, builtin_model_dir, single):
    adapter, done, run_dir = _torchrun(work, builtin_model_dir, "ddp")
    assert done["deepspeed"] is None
    _same_losses(done, run_dir, single)
    _assert_matches(adapter, single[0], "DDP")


def test_regularizer_matters_at_this_gamma(work, builtin_model_dir, single):
    """Without gamma the adapter moves elsewhere by far more than ATOL: the comparisons above would see
    a regularizer that is lost, doubled or wrongly scaled on some path."""
    no_reg, _, _ = _run([sys.executable, *_argv(work, builtin_model_dir, "single_gamma0", 8, "--gamma", "0")],
                        work, "single_gamma0")
    diff = _max_diff(no_reg, single[0])
    print(f"[gamma 0] max |adapter - adapter with gamma 0.05| = {diff:.2e}")
    assert diff > 100 * ATOL


@needs_deepspeed
def test_zero3_two_ranks_match_one_process(work, builtin_model_dir, single):
    adapter, done, run_dir = _torchrun(work, builtin_model_dir, "zero3", "--deepspeed",
                                       str(ROOT / "configs" / "deepspeed" / "zero3.json"))
    assert done["deepspeed"].endswith("zero3.json")
    assert "ZeRO-3: the base weights were loaded partitioned over 2 ranks" in _run.stdout
    _same_losses(done, run_dir, single)
    _assert_matches(adapter, single[0], "ZeRO-3")
    # the adapter file is the plain single-process format: float32, whole tensors
    assert all(t.dtype == torch.float32 and t.numel() > 0 for t in adapter.values())


@needs_deepspeed
def test_zero2_two_ranks_match_one_process(work, builtin_model_dir, single):
    adapter, done, run_dir = _torchrun(work, builtin_model_dir, "zero2", "--deepspeed",
                                       str(ROOT / "configs" / "deepspeed" / "zero2.json"))
    _same_losses(done, run_dir, single)
    _assert_matches(adapter, single[0], "ZeRO-2")


def _reference_pair(work, model_dir, name, *extra, single_extra=()):
    """The reference normalisation: 2 ranks x 4 x accumulation 2 against 1 process x 4 x accumulation 4. The
    regularizer's coefficient is gamma / lr / accumulation steps per rank (the reference's), so the single
    process, with twice the accumulation, needs twice the gamma for the same update."""
    ref = ["--loss-normalization", "reference"]
    single = _run([sys.executable, *_argv(work, model_dir, f"{name}_single", 4, *ref, "--accum-steps", "4",
                                          "--gamma", "0.1", *single_extra)], work, f"{name}_single")
    return _torchrun(work, model_dir, name, *ref, *extra), single


def test_reference_normalisation_under_ddp_matches_one_process(work, builtin_model_dir):
    (adapter, done, run_dir), single = _reference_pair(work, builtin_model_dir, "ddp_ref")
    _assert_matches(adapter, single[0], "DDP, reference normalisation")


@needs_deepspeed
def test_reference_normalisation_under_zero2_matches_one_process(work, builtin_model_dir):
    (adapter, done, run_dir), single = _reference_pair(work, builtin_model_dir, "zero2_ref", "--deepspeed",
                                                       str(ROOT / "configs" / "deepspeed" / "zero2.json"))
    _assert_matches(adapter, single[0], "ZeRO-2, reference normalisation")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes ('.[quant]')")
def test_quantized_base_under_ddp_matches_one_process(work, builtin_model_dir):
    """QSORSA (a 4-bit NF4 residual, every other linear layer 4-bit) on 2 ranks equals one process."""
    q = ("--quantize", "nf4")
    (adapter, done, run_dir), single = _reference_pair(work, builtin_model_dir, "ddp_nf4", *q, single_extra=q)
    assert done["world_size"] == 2
    _assert_matches(adapter, single[0], "DDP over a 4-bit base")
