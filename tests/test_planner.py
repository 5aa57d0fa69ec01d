"""The dry-run planner: the paper's trainable-parameter counts from the stored 7B configs (meta device,
offline), a memory estimate checked against a hand computation, and `run.py --dry-run` end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from sorsa import cli as run
from sorsa.core.targets import LLAMA_TARGETS, RWKV_TARGETS
from sorsa.tools.planner import (INITIAL_FACTORS, MODELS_DIR, PAPER_PARAMS, STORED_CONFIGS, plan_run, read_deepspeed_config)

ROOT = Path(__file__).resolve().parents[1]

# (hub id, rank, targets, RWKV?, the paper's count: PAPER.md)
PAPER_CASES = [
    ("meta-llama/Llama-2-7b-hf", 128, LLAMA_TARGETS, False, 320e6),
    ("mistralai/Mistral-7B-v0.1", 64, LLAMA_TARGETS, False, 168e6),
    ("google/gemma-7b", 64, LLAMA_TARGETS, False, 200e6),
    ("RWKV/v6-Finch-7B-HF", 64, RWKV_TARGETS, True, 176e6),
]


@pytest.mark.parametrize("model,rank,targets,rwkv,paper", PAPER_CASES, ids=[c[0] for c in PAPER_CASES])
@pytest.mark.parametrize("method", ["sorsa", "lora"])
def test_trainable_parameters_match_the_paper_within_one_percent(model, rank, targets, rwkv, paper, method):
    plan = plan_run(model, method=method, rank=rank, target_modules=targets, rwkv=rwkv)
    assert plan.paper_trainable == paper == PAPER_PARAMS[model]["adapter"]
    assert abs(plan.trainable - paper) / paper < 0.01, plan.trainable
    assert len(plan.layers) == len(targets) * (28 if "gemma" in model else 32)
    extra = len(plan.layers) * rank if method == "sorsa" else 0  # S_p
    assert plan.trainable == sum(rank * (o + i) for _, o, i in plan.layers) + extra


@pytest.mark.parametrize("model,full", [(m, p["full"]) for m, p in PAPER_PARAMS.items() if p["full"]])
def test_full_fine_tuning_counts_match_the_paper(model, full):
    plan = plan_run(model, method="full", target_modules=LLAMA_TARGETS)
    assert abs(plan.trainable - full) / full < 0.001 and plan.layers == []


def test_stored_configs_exist_and_the_configs_point_at_them():
    assert {p.name for p in MODELS_DIR.glob("*.json")} == set(STORED_CONFIGS.values())
    used = {run.resolve_config(["--config", str(c), "--train"]).model for c in (ROOT / "configs").glob("*_7b_*.yaml")}
    assert used == set(STORED_CONFIGS)


def test_memory_estimate_matches_a_hand_computation(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    config.save_pretrained(tmp_path)
    plan = plan_run(str(tmp_path), method="sorsa", rank=4, target_modules=LLAMA_TARGETS,
                    batch_size=2, accum_steps=3, length=8, precision="bf16")
    # Per block: q 32->32, k 32->16, v 32->16, o 32->32, gate/up 32->48, down 48->32.
    assert plan.trainable == 2 * 4 * ((32 + 32 + 1) * 2 + (16 + 32 + 1) * 2 + (48 + 32 + 1) * 3) == 3768
    base = 64 * 32 * 2 + 2 * (32 * 32 * 2 + 16 * 32 * 2 + 48 * 32 * 3 + 2 * 32) + 32
    assert plan.total_params == base == 19616
    act = (2 * 16) * 2 * ((64 + 48 + 48 + 64 + 80 * 3) + 2 * 32) * 2  # tokens x blocks x (Σ in+out + norms) x bf16
    expected = {
        "weights (frozen)": base * 2,  # bf16 residual
        "weights (trainable)": 3768 * 4,  # float32 adapters
        "gradients": 3768 * 4,
        "optimizer (AdamW moments)": 3768 * 8,
        "activations": act,
        "logits (+ float32 copy in the loss)": (2 * 16) * 64 * (2 + 4),
    }
    # U_0, S_0, Vh_0 stay in CPU memory (issue 14: 3768 x 4 bytes less on the GPU than before)
    assert plan.memory.gpu == expected and plan.memory.total == 194464 - 3768 * 4
    assert plan.memory.cpu == {INITIAL_FACTORS: 3768 * 4}
    assert plan.effective_batch == 6 and plan.tokens == 16

    # ZeRO-3 on 4 GPUs, bf16: DeepSpeed's mixed precision (2 + 2 + 12 bytes per trainable parameter),
    # weights, gradients and optimizer state split four ways; the SORSA buffers are not partitioned.
    z3 = plan_run(str(tmp_path), method="sorsa", rank=4, target_modules=LLAMA_TARGETS, batch_size=2,
                  length=8, precision="bf16", gpus=4, deepspeed=str(ROOT / "configs/deepspeed/zero3.json"))
    assert z3.memory.gpu["weights (frozen)"] == base * 2 / 4
    assert z3.memory.gpu["weights (trainable)"] == 3768 * 2 / 4
    assert z3.memory.gpu["gradients"] == 3768 * 2 / 4
    assert z3.memory.gpu["optimizer (AdamW moments + fp32 master)"] == 3768 * 12 / 4
    assert z3.memory.cpu[INITIAL_FACTORS] == 3768 * 4 and INITIAL_FACTORS not in z3.memory.gpu
    off = plan_run(str(tmp_path), method="sorsa", rank=4, target_modules=LLAMA_TARGETS, precision="bf16",
                   gpus=4, deepspeed=str(ROOT / "configs/deepspeed/zero3_offload.json"))
    assert "optimizer (AdamW moments + fp32 master)" in off.memory.cpu and "weights (frozen)" in off.memory.cpu


def test_deepspeed_configs_are_read():
    ds = ROOT / "configs" / "deepspeed"
    assert read_deepspeed_config(ds / "zero2.json") == {"stage": 2, "offload_optimizer": False, "offload_param": False}
    assert read_deepspeed_config(ds / "zero3.json")["stage"] == 3
    assert read_deepspeed_config(ds / "zero3_offload.json") == {"stage": 3, "offload_optimizer": True,
                                                                 "offload_param": True}
    for f in ds.glob("*.json"):  # every batch / clipping / precision setting is filled from run.py's flags
        cfg = json.loads(f.read_text())
        assert all(cfg[k] == "auto" for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                              "gradient_accumulation_steps", "gradient_clipping"))


def test_dry_run_cli_prints_the_plan_offline(tmp_path):
    out = subprocess.run([sys.executable, "run.py", "--config", "configs/llama2_7b_sorsa_math.yaml", "--dry-run",
                          "--gpus", "8", "--accum-steps", "8", "--deepspeed", "configs/deepspeed/zero3.json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "trainable parameters: 319,844,352" in text and "320M -> -0.05 %" in text
    assert "2 per device x 8 accumulation x 8 GPUs = 128" in text and "ZeRO-3" in text
    assert "q_proj x32 (4096x4096)" in text and "down_proj x32 (4096x11008)" in text
    bad = subprocess.run([sys.executable, "run.py", "--dry-run", "--model", str(tmp_path / "nope"), "--rwkv"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and "Traceback" not in bad.stderr
