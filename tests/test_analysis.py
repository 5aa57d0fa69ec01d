"""SVD variation analysis (known rotations and scalings, analyze_run against a direct recomputation for every
method), the results report against hand-made run directories, and the mini-reproduction configs."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from sorsa import cli as run
from sorsa.tools.analysis import analyze_main, analyze_run, plot_analysis, read_csv, svd_variation
from sorsa.tools.report import build_report, load_paper_results

from test_run import _train_argv

ROOT = Path(__file__).resolve().parents[1]


def _matrix_with_spectrum(out: int, inp: int, sigma: torch.Tensor, seed: int = 0):
    """W = U diag(sigma) Vh with random orthonormal U (out, k), Vh (k, in); float64 for exact checks."""
    g = torch.Generator().manual_seed(seed)
    k = sigma.numel()
    U, _ = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(inp, k, generator=g, dtype=torch.float64))
    return U, V.T, (U * sigma) @ V.T


def _plane_rotation(a: torch.Tensor, b: torch.Tensor, theta: float) -> torch.Tensor:
    """The rotation by theta in the plane of the orthonormal vectors a, b (identity elsewhere)."""
    n = a.numel()
    c, s = math.cos(theta), math.sin(theta)
    return (torch.eye(n, dtype=a.dtype) + (c - 1) * (torch.outer(a, a) + torch.outer(b, b))
            + s * (torch.outer(b, a) - torch.outer(a, b)))


# Well-separated singular values, as many as min(out, in) of the test matrices (6 x n): no zero triplet
# whose directions would be arbitrary.
SIGMA = torch.tensor([9.0, 7.0, 5.0, 4.0, 3.0, 2.0], dtype=torch.float64)


def test_unchanged_weight_has_zero_variation():
    W = torch.randn(12, 20, generator=torch.Generator().manual_seed(1))
    d_sigma, d_dir = svd_variation(W, W.clone())
    assert d_sigma == pytest.approx(0.0, abs=1e-6) and d_dir == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_rotating_two_singular_directions_gives_the_expected_direction_change(side):
    U, Vh, W0 = _matrix_with_spectrum(6, 14, SIGMA)
    theta = 0.4
    if side == "left":  # W_t = Q W0 with Q mixing u_1 and u_2: u_t,i = Q u_i, sigma unchanged
        Wt = _plane_rotation(U[:, 0], U[:, 1], theta) @ W0
    else:  # W_t = W0 Q mixing v_3 and v_4
        Wt = W0 @ _plane_rotation(Vh[2], Vh[3], theta).T
    k = SIGMA.numel()
    d_sigma, d_dir = svd_variation(W0.float(), Wt.float())
    # two triplets keep one vector and turn the other by theta: 1 − mean((cos θ + 1) / 2 ... 1) = (1 − cos θ) / k
    assert d_sigma == pytest.approx(0.0, abs=1e-5)
    assert d_dir == pytest.approx((1 - math.cos(theta)) / k, abs=1e-5)
    top = 2 if side == "left" else 4
    _, d_dir_top = svd_variation(W0.float(), Wt.float(), top_k=top)
    assert d_dir_top == pytest.approx((1 - math.cos(theta)) / top, abs=1e-5)


def test_scaling_changes_only_singular_values():
    _, _, W0 = _matrix_with_spectrum(6, 16, SIGMA)
    c = 1.5
    d_sigma, d_dir = svd_variation(W0.float(), (c * W0).float())
    assert d_sigma == pytest.approx((c - 1) * SIGMA.mean().item(), rel=1e-5)
    assert d_dir == pytest.approx(0.0, abs=1e-5)
    # top_k: moving only the smallest singular value leaves the top two untouched
    U, Vh, W0 = _matrix_with_spectrum(6, 16, SIGMA, seed=3)
    bumped = SIGMA.clone()
    bumped[-1] += 0.6
    Wt = (U * bumped) @ Vh
    assert svd_variation(W0.float(), Wt.float(), top_k=2) == pytest.approx((0.0, 0.0), abs=1e-5)
    assert svd_variation(W0.float(), Wt.float())[0] == pytest.approx(0.6 / SIGMA.numel(), rel=1e-4)


def _merged_weights(method: str, base_dir: Path, run_dir: Path, checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every adapted weight of `checkpoint`, merged by the library's own code paths (not by analysis.py)."""
    from transformers import AutoModelForCausalLM

    if method == "sorsa":
        from sorsa import load_adapter, merge_and_unload
        model = merge_and_unload(load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), checkpoint))
    else:  # LoRA / PiSSA / full: the merged/ directory written by run.py --merge from the final adapter
        model = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    return {k[:-len(".weight")]: v.float() for k, v in model.state_dict().items()
            if k.endswith("_proj.weight")}


@pytest.mark.parametrize("method", ["sorsa", "lora", "pissa", "full"])
def test_analyze_run_matches_a_direct_recomputation(tmp_path, builtin_model_dir, method):
    """CSV rows = (layer x checkpoint), each equal to svd_variation of the independently merged weight."""
    from transformers import AutoModelForCausalLM

    # SORSA: two checkpoints, compared with load_adapter + merge_and_unload; the others: one checkpoint,
    # compared with the merged/ model that run.py --merge builds from the final (for PiSSA: converted) adapter.
    steps = ["--max-steps", "4", "--save-steps", "2"] if method == "sorsa" else \
        ["--max-steps", "2", "--save-steps", "2", "--merge"]
    assert run.main(_train_argv(tmp_path, builtin_model_dir, method, "-p", method, "--lr", "5e-3", *steps)) == 0
    run_dir = tmp_path / "runs" / method
    rows = analyze_run(run_dir, progress=False)  # the base model comes from the run's config
    table = read_csv(run_dir / "analysis.csv")
    assert (run_dir / "analysis.png").stat().st_size > 0
    assert [(r["layer"], r["step"]) for r in table] == [(r["layer"], r["step"]) for r in rows]
    W0 = {k[:-len(".weight")]: v.float() for k, v in
          AutoModelForCausalLM.from_pretrained(builtin_model_dir).state_dict().items() if k.endswith("_proj.weight")}
    assert len(W0) == 14  # 2 layers x 7 projections
    expected_steps = [2, 4] if method == "sorsa" else [2]
    assert sorted({r["layer"] for r in table}) == sorted(W0)
    assert sorted(r["step"] for r in table) == sorted(expected_steps * len(W0))
    for step in expected_steps:
        merged = _merged_weights(method, builtin_model_dir, run_dir, run_dir / "checkpoints" / f"checkpoint-{step}")
        for r in (r for r in table if r["step"] == step):
            d_sigma, d_dir = svd_variation(W0[r["layer"]], merged[r["layer"]])
            assert r["delta_sigma"] == pytest.approx(d_sigma, rel=1e-3, abs=1e-6), (r, d_sigma)
            assert r["delta_direction"] == pytest.approx(d_dir, rel=1e-3, abs=1e-5), (r, d_dir)
    assert max(r["delta_sigma"] for r in table) > 1e-5  # training moved the weights
    if method == "sorsa":  # the CLI entry: per-run files, and the runs side by side in OUT
        files = analyze_main([run_dir], tmp_path / "out", progress=False)
        assert tmp_path / "out" / "analysis.png" in files and (tmp_path / "out" / "analysis.csv").is_file()
        plot_analysis([run_dir / "analysis.csv", tmp_path / "out" / "analysis.csv"], tmp_path / "two.png")
        assert (tmp_path / "two.png").stat().st_size > 0


# ----------------------------------------------------------------------------- report

def _hand_made_run(root: Path, name: str, config: dict, done: dict, log: list[dict], accuracies: dict) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "train_done.json").write_text(json.dumps(done))
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    for dataset, acc in accuracies.items():
        (run_dir / "eval" / dataset).mkdir(parents=True)
        (run_dir / "eval" / dataset / "results.json").write_text(json.dumps({"accuracy": acc, "total": 100}))
    return run_dir


def test_report_table_matches_hand_made_runs(tmp_path):
    log_a = [{"loss": 1.0 / s, "grad_norm": 2.0, "learning_rate": 3e-5, "ortho_loss": 1e-3 * s, "step": s}
             for s in range(1, 6)] + [{"train_runtime": 1.0, "step": 5}]
    a = _hand_made_run(tmp_path / "runs", "llama_sorsa",
                       {"model": "meta-llama/Llama-2-7b-hf", "peft": "sorsa", "rank": 128},
                       {"steps": 5, "trainable_params": 319_815_680}, log_a, {"gsm-8k": 0.5, "math": 0.1})
    b = _hand_made_run(tmp_path / "runs", "mistral_lora",
                       {"model": "/models/Mistral-7B-v0.1", "peft": "lora", "rank": 64},
                       {"steps": 3}, [{"loss": 2.0 - 0.1 * s, "grad_norm": 1.0, "step": s} for s in range(1, 4)],
                       {"humaneval": 0.45})
    # no recorded count: the report counts the adapter's lora_A / lora_B tensors (4x10 + 12x4 = 88)
    (b / "adapter").mkdir()
    save_file({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 10),
               "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.zeros(12, 4)},
              str(b / "adapter" / "adapter_model.safetensors"))
    result = build_report([a, b], tmp_path / "report")
    ra, rb = result["rows"]
    assert (ra["method"], ra["rank"], ra["trainable_params"]) == ("SORSA", 128, 319_815_680)
    assert (ra["paper_model"], ra["paper_trainable_params"]) == ("Llama 2 7B", 320_000_000)
    assert (ra["gsm8k"], ra["gsm8k_paper"]) == (50.0, 56.03) and ra["gsm8k_diff"] == pytest.approx(-6.03)
    assert (ra["math"], ra["math_paper"]) == (10.0, 10.36) and ra["math_diff"] == pytest.approx(-0.36)
    assert ra["humaneval"] is None and ra["humaneval_paper"] == 24.39 and ra["humaneval_diff"] is None
    assert (rb["method"], rb["trainable_params"], rb["paper_model"]) == ("LoRA", 88, "Mistral 7B v0.1")
    assert (rb["humaneval"], rb["humaneval_paper"]) == (45.0, 43.90) and rb["humaneval_diff"] == pytest.approx(1.10)
    assert rb["gsm8k"] is None and rb["gsm8k_paper"] == 67.70
    assert "PiSSA" in rb["paper_source"] and "PiSSA" not in ra["paper_source"]  # † numbers came from PiSSA

    md = (tmp_path / "report" / "report.md").read_text()
    assert ("| llama_sorsa | meta-llama/Llama-2-7b-hf | SORSA | 128 | 320M (320M) | 50.00 | 56.03 | -6.03 "
            "| 10.00 | 10.36 | -0.36 | – | 24.39 | – |") in md
    assert ("| mistral_lora | /models/Mistral-7B-v0.1 | LoRA | 64 | 0.1K (168M) | – | 67.70 | – "
            "| – | 19.68 | – | 45.00 | 43.90 | +1.10 |") in md
    with open(tmp_path / "report" / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["llama_sorsa", "mistral_lora"]
    assert float(table[0]["gsm8k_diff"]) == pytest.approx(-6.03) and table[1]["gsm8k"] == ""
    assert (tmp_path / "report" / "training_curves.png").stat().st_size > 0
    # the CLI: run.py --report RUN ... --out DIR writes the same table
    assert run.main(["--report", "llama_sorsa", "mistral_lora", "--run-path", str(tmp_path / "runs"),
                     "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "report.md").read_text() == md


def test_paper_results_hold_the_published_table():
    # the SORSA paper's table (PiSSA's quantized row and PEFT's method comparison are the other rows)
    rows = [r for r in load_paper_results() if r["model"] not in ("LLaMA 3 70B", "Llama 3.2 3B")]
    cell = {(r["model"], r["method"]): r for r in rows}
    assert len(rows) == 16
    assert (cell[("Llama 2 7B", "SORSA")]["gsm8k"], cell[("Llama 2 7B", "SORSA")]["math"]) == (56.03, 10.36)
    assert cell[("RWKV6 7B", "LoRA")]["trainable_params"] == 176_000_000
    assert cell[("Gemma 7B", "SORSA")]["humaneval"] == 55.49 and cell[("Mistral 7B v0.1", "Full FT")]["gsm8k"] == 67.02
    for (model, method), r in cell.items():  # the † entries: PiSSA's numbers quoted by SORSA
        from_pissa = model != "RWKV6 7B" and method in ("Full FT", "LoRA", "PiSSA")
        assert r["source"].startswith("PiSSA") == from_pissa, (model, method)


def test_paper_results_hold_peft_method_comparison():
    from sorsa.tools.report import find_paper_row

    peft = {r["method"]: r for r in load_paper_results() if r["model"] == "Llama 3.2 3B"}
    assert {m: r["gsm8k"] for m, r in peft.items()} == {"LoRA": 47.8, "rsLoRA": 51.3, "DoRA": 46.9, "Full FT": 47.2,
                                                        "Lily": 52.6}
    assert all("PEFT MetaMathQA method comparison" in r["source"] for r in peft.values())
    assert find_paper_row(load_paper_results(), "meta-llama/Llama-3.2-3B", "rslora") == peft["rsLoRA"]


def test_paper_results_hold_pissas_quantized_llama3_70b_row():
    quantized = {r["method"]: r for r in load_paper_results() if r["model"] == "LLaMA 3 70B"}
    assert set(quantized) == {"QLoRA", "QPiSSA"}
    assert (quantized["QLoRA"]["gsm8k"], quantized["QPiSSA"]["gsm8k"]) == (81.73, 86.05)
    assert all(r["source"].startswith("PiSSA") and r["math"] is None for r in quantized.values())
    from sorsa.tools.report import find_paper_row

    row = find_paper_row(load_paper_results(), "meta-llama/Meta-Llama-3-70B", "pissa", quantize="nf4")
    assert row == quantized["QPiSSA"]


# ----------------------------------------------------------------------------- mini reproduction configs

@pytest.mark.parametrize("method", ["sorsa", "pissa", "lora", "full"])
def test_mini_reproduction_configs_load(method):
    path = ROOT / "configs" / "mini" / f"{method}.yaml"
    text = path.read_text()
    assert text.startswith("#") and "Launch:" in text and "Effective batch" in text
    cfg = run.resolve_config(["--config", str(path)])
    assert cfg.peft == method and cfg.rank == 8 and cfg.max_steps == 480 and cfg.batch_size * cfg.accum_steps == 8
    pre = yaml.safe_load((ROOT / "configs" / "mini" / "pretrain.yaml").read_text())
    assert {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "steps", "batch_size",
            "lr", "level", "seed"} <= set(pre)


@pytest.mark.parametrize("targets", [None, ["all-linear"]])
def test_full_fine_tuning_is_analysed_on_the_architectures_own_targets(tmp_path, targets):
    """Full fine-tuning of a GPT-2 is analysed on the layers the adapters would take there (its defaults, or
    all-linear as training finds it: every Conv1D of the blocks, not the tied head), not on Llama's names."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sorsa.tools.analysis import _full_ft_layers
    from sorsa.train.settings import RunConfig
    from sorsa.core.fileio import TensorReader

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    cfg = RunConfig(peft="full", model=str(tmp_path / "gpt2"), target_modules=targets)
    layers = _full_ft_layers(TensorReader(tmp_path / "gpt2"), tmp_path / "gpt2", cfg)
    expected = {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj")}
    assert set(layers) == expected
