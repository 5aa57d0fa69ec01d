"""Initialisation at scale: the peak extra memory of apply_sorsa does not grow with the number of layers
(one weight is decomposed at a time), the progress bar shows an ETA, and the SVD cache makes a second
start of `run.py --train` skip every SVD."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from sorsa import cli as run
from sorsa import SORSAConfig, apply_sorsa

ROOT = Path(__file__).resolve().parents[1]
SIZE = 512  # 512 x 512 bf16 layers: one float32 copy of a layer is 1 MiB

# Peak resident memory (VmHWM, reset through /proc/self/clear_refs) minus the resident memory after
# apply_sorsa, i.e. what initialisation needed on top of the finished model. A child process with a fixed
# mmap threshold, so that freed tensors go back to the OS at once and RSS follows the live tensors.
PROBE = r"""
import gc, sys, torch, torch.nn as nn
from sorsa import SORSAConfig, apply_sorsa

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
size, svd = int(sys.argv[1]), sys.argv[2]
cfg = SORSAConfig(rank=8, target_modules=r"\d+", svd=svd, residual_dtype=torch.bfloat16)
def model(n):
    torch.manual_seed(0)
    return nn.ModuleList(nn.Linear(size, size, bias=False, dtype=torch.bfloat16) for _ in range(n))
apply_sorsa(model(1), cfg, progress=False)  # one-time LAPACK / allocator set-up is not counted
for n in map(int, sys.argv[3:]):
    m = model(n)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    apply_sorsa(m, cfg, progress=False)
    gc.collect()
    print(n, status("VmHWM") - status("VmRSS"))
    del m
    gc.collect()
"""


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _clear_refs_works(),
                    reason="needs Linux's /proc/self/clear_refs to reset the peak-RSS counter")
@pytest.mark.parametrize("svd", ["full", "randomized"])
def test_peak_extra_memory_is_flat_in_the_number_of_layers(svd):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(SIZE), svd, "6", "24"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    peak = {int(n): int(b) for n, b in (line.split() for line in out.stdout.split("\n") if line.strip())}
    one_layer_f32 = SIZE * SIZE * 4
    print(f"[{svd}] peak extra memory: 6 layers {peak[6] / 2**20:.1f} MiB, 24 layers {peak[24] / 2**20:.1f} MiB "
          f"(one float32 layer: {one_layer_f32 / 2**20:.0f} MiB)")
    # Measured here: full 6.9 / 6.8 MiB (the float32 copy, the SVD's U and Vh, LAPACK's workspace and the
    # residual's float32 temporaries: ~7 layer copies), randomized 2.9 / 2.8 MiB.
    assert peak[24] < peak[6] + one_layer_f32 / 2  # flat: no per-layer leftovers accumulate
    assert peak[24] < 10 * one_layer_f32  # a few copies of one layer
    assert peak[24] < 0.5 * 24 * one_layer_f32  # far below a float32 copy of the model


def test_progress_bar_shows_the_eta(capsys):
    torch.manual_seed(0)
    model = nn.ModuleList(nn.Linear(64, 64, bias=False) for _ in range(3))
    apply_sorsa(model, SORSAConfig(rank=4, target_modules=r"\d+"), progress=True)
    err = capsys.readouterr().err
    assert "SORSA init (full SVD, r=4)" in err and "3/3" in err and "layer/s" in err
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", err), err  # elapsed<remaining


def test_second_start_skips_the_svd_through_the_cache(tmp_path, builtin_model_dir, monkeypatch):
    from sorsa.core import functional as SF

    from tests.test_run import _train_argv

    cache = tmp_path / "svd_cache"
    argv = ["--max-steps", "1", "--svd-cache-path", str(cache), "--overwrite"]
    assert run.main(_train_argv(tmp_path, builtin_model_dir, "first", *argv)) == 0
    assert len(list(cache.glob("*.safetensors"))) == 14  # 2 blocks x 7 projections

    def no_svd(*a, **kw):
        raise AssertionError("the SVD ran although every decomposition is cached")

    monkeypatch.setattr(SF, "svd_top", no_svd)
    assert run.main(_train_argv(tmp_path, builtin_model_dir, "second", *argv)) == 0
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "runs" / "first" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "runs" / "second" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        if k.endswith(("U_0", "S_0", "Vh_0")):
            assert torch.equal(a[k], b[k]), k
