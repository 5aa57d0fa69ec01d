"""The GPU numbers: SORSA's initialisation, training step and generation on a Llama-2-7B-shaped model built from
its config with random bf16 weights (no download), against PEFT LoRA, PiSSA, the reference's dense-delta forward
and the frozen model. Prints a markdown table and writes JSON.

    python scripts/bench_gpu.py --json bench_gpu.json                 # on a CUDA machine (about 5-8 minutes)
    python scripts/bench_gpu.py --tiny --json /tmp/b.json             # a tiny shape on the CPU (the test)
    python scripts/bench_gpu.py --skip-full-init                      # leave out the slow full-SVD init

Measured, each after warm-up, with torch.cuda.synchronize around the timed region:
- init: apply_sorsa on all target layers (224 for Llama-2-7B) with svd full / fast / randomized; seconds and the
  peak memory above the model;
- train_step: forward + backward + AdamW step at rank 128, batch 2 x 512 tokens, bf16 residual with float32
  adapters under bf16 autocast, activation checkpointing off and on; tokens/s and peak memory;
- generate: greedy decoding of the merged model through transformers' generate (the HF backend's call), batch 1
  and 64, tokens/s;
- the training step again over a 4-bit NF4 base (QSORSA and PEFT QLoRA), when bitsandbytes is installed.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sorsa import SORSAConfig, apply_sorsa, merge_and_unload, sorsa_layers  # noqa: E402
from sorsa.methods.peft_lora import apply_peft_baseline
from sorsa.core.targets import LLAMA_TARGETS
from reference_forward import DenseDelta  # noqa: E402  (scripts/)

FULL = dict(config=ROOT / "configs" / "models" / "Llama-2-7b-hf.json", rank=128, batch=2, tokens=512, steps=5,
            warmup=2, gen_batches=(1, 64), prompt=64, new_tokens=128, device="cuda", dtype=torch.bfloat16)
TINY = dict(config=None, rank=8, batch=2, tokens=32, steps=2, warmup=1, gen_batches=(1, 4), prompt=8,
            new_tokens=8, device="cpu", dtype=torch.float32)


class Timer:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() if self.cuda else 0

    def peak(self, start: int) -> float:
        return (torch.cuda.max_memory_allocated() - start) / 2 ** 30 if self.cuda else 0.0


def build_model(spec: dict):
    """A Llama from the stored 7B config (or a tiny one), random weights, in spec's dtype on spec's device."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if spec["config"] is None:
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    else:
        values = {k: v for k, v in json.loads(Path(spec["config"]).read_text()).items() if not k.startswith("_")}
        values.pop("model_type", None)
        config = LlamaConfig(**values)
    torch.manual_seed(0)
    with torch.device(spec["device"]):
        model = AutoModelForCausalLM.from_config(config, dtype=spec["dtype"])
    return model.eval()


def bench_init(base, spec: dict, timer: Timer, methods) -> dict:
    out = {}
    for method in methods:
        model = copy.deepcopy(base)
        start_mem = timer.reset_peak()
        timer.sync()
        start = time.perf_counter()
        apply_sorsa(model, SORSAConfig(rank=spec["rank"], svd=method, residual_dtype=spec["dtype"]), progress=False)
        timer.sync()
        out[method] = {"seconds": time.perf_counter() - start, "layers": len(sorsa_layers(model)),
                       "peak_extra_gib": timer.peak(start_mem)}
        print(f"  init {method}: {out[method]['seconds']:.1f} s", file=sys.stderr)
        del model
    return out


def adapted(base, method: str, spec: dict):
    """A fresh copy of `base` with the method's adapters (SORSA and PiSSA from the fast SVD, to save time)."""
    model = copy.deepcopy(base)
    if method in ("sorsa", "dense_delta"):
        apply_sorsa(model, SORSAConfig(rank=spec["rank"], svd="fast", residual_dtype=spec["dtype"]), progress=False)
        if method == "dense_delta":
            for name, layer in sorsa_layers(model):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, DenseDelta(layer))
        return model
    if method in ("lora", "pissa"):
        return apply_peft_baseline(model, method, spec["rank"], LLAMA_TARGETS, svd="fast", svd_options={"seed": 0})
    if method == "qsorsa":  # a 4-bit NF4 residual (bitsandbytes), the other linear layers 4-bit too
        return apply_sorsa(model, SORSAConfig(rank=spec["rank"], svd="fast", quantize="nf4", compute_dtype=spec["dtype"]),
                           progress=False)
    if method == "qlora":
        from peft import LoraConfig, get_peft_model

        from sorsa.core.model import quantize_linear_layers
        from sorsa.core.quant import QuantSpec

        quantize_linear_layers(model, QuantSpec("nf4", compute_dtype=spec["dtype"]))
        return get_peft_model(model, LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], target_modules=LLAMA_TARGETS))
    for p in model.parameters():  # the frozen model: forward and backward to the inputs only
        p.requires_grad_(False)
    return model


def train_step_rate(model, spec: dict, timer: Timer, checkpointing: bool, before: int) -> dict:
    """Seconds per training step, tokens/s and the peak memory of the adapted model, its optimizer state and
    the step (`before`: the bytes allocated before the model was made, i.e. the shared base model's)."""
    model.train()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if checkpointing:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inner.enable_input_require_grads()  # frozen embeddings: the backward still runs through every block
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
    vocab = inner.config.vocab_size
    ids = torch.randint(0, vocab, (spec["batch"], spec["tokens"]), device=spec["device"])
    device_type = "cuda" if spec["device"].startswith("cuda") else "cpu"
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=spec["dtype"] == torch.bfloat16)

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    for _ in range(spec["warmup"]):
        step()
    timer.reset_peak()
    timer.sync()
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    timer.sync()
    seconds = (time.perf_counter() - start) / spec["steps"]
    if checkpointing:
        inner.gradient_checkpointing_disable()
    return {"seconds_per_step": seconds, "tokens_per_s": spec["batch"] * spec["tokens"] / seconds,
            "peak_gib": timer.peak(before)}


def bench_train(base, spec: dict, timer: Timer) -> list[dict]:
    rows = []
    methods = ("frozen", "sorsa", "lora", "pissa", "dense_delta")
    if importlib.util.find_spec("bitsandbytes") is not None:
        methods += ("qsorsa", "qlora")  # over a 4-bit NF4 base
    for method in methods:
        before = timer.reset_peak()  # the base model stays allocated: not counted in the method's peak
        model = adapted(base, method, spec)
        for checkpointing in (False, True):
            row = {"method": method, "checkpointing": checkpointing,
                   **train_step_rate(model, spec, timer, checkpointing, before)}
            rows.append(row)
            print(f"  step {method} ckpt={checkpointing}: {row['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
        del model
        if timer.cuda:
            torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def bench_generate(base, spec: dict, timer: Timer) -> list[dict]:
    from transformers import GenerationConfig

    model = merge_and_unload(apply_sorsa(copy.deepcopy(base), SORSAConfig(rank=spec["rank"], svd="fast",
                                                                           residual_dtype=spec["dtype"]), progress=False))
    rows = []
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=spec["new_tokens"],
                              min_new_tokens=spec["new_tokens"], eos_token_id=None, pad_token_id=0)
    for batch in spec["gen_batches"]:
        ids = torch.randint(1, model.config.vocab_size, (batch, spec["prompt"]), device=spec["device"])
        model.generate(input_ids=ids, generation_config=config)  # warm-up
        timer.sync()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, generation_config=config)
        timer.sync()
        seconds = time.perf_counter() - start
        new = (out.shape[1] - spec["prompt"]) * batch
        rows.append({"batch": batch, "new_tokens": new, "seconds": seconds, "tokens_per_s": new / seconds})
        print(f"  generate batch {batch}: {new / seconds:.0f} tokens/s", file=sys.stderr)
    return rows


def table(result: dict) -> str:
    lines = [f"{result['device']}; torch {result['versions']['torch']}, transformers {result['versions']['transformers']}, "
             f"peft {result['versions']['peft']}; {result['date']}", "",
             "| init (all target layers) | seconds | peak extra GiB |", "|---|---|---|"]
    lines += [f"| {m} ({r['layers']} layers) | {r['seconds']:.1f} | {r['peak_extra_gib']:.2f} |"
              for m, r in result["init"].items()]
    lines += ["", "| train step | checkpointing | s / step | tokens/s | peak GiB | vs LoRA |", "|---|---|---|---|---|---|"]
    lora = {r["checkpointing"]: r["seconds_per_step"] for r in result["train_step"] if r["method"] == "lora"}
    lines += [f"| {r['method']} | {'on' if r['checkpointing'] else 'off'} | {r['seconds_per_step']:.3f} "
              f"| {r['tokens_per_s']:.0f} | {r['peak_gib']:.1f} | {r['seconds_per_step'] / lora[r['checkpointing']]:.3f} |"
              for r in result["train_step"]]
    lines += ["", "| generation (merged, greedy) | batch | tokens/s |", "|---|---|---|"]
    lines += [f"| HF generate | {r['batch']} | {r['tokens_per_s']:.0f} |" for r in result["generate"]]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU (what the test suite runs)")
    p.add_argument("--skip-full-init", action="store_true", help="leave out the full-SVD initialisation")
    p.add_argument("--json", help="write the measurements here")
    args = p.parse_args(argv)
    spec = dict(TINY if args.tiny else FULL)
    if args.tiny:
        torch.set_num_threads(1)  # tiny ops: thread start-up and spinning would dominate the timings
    if spec["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --tiny for the CPU shape")
    timer = Timer(spec["device"])
    from sorsa.core.records import package_versions

    base = build_model(spec)
    methods = ["fast", "randomized"] + ([] if args.skip_full_init else ["full"])
    result = {"device": torch.cuda.get_device_name() if timer.cuda else f"{platform.machine()} CPU",
              "date": time.strftime("%Y-%m-%d"), "versions": package_versions(),
              "spec": {k: str(v) for k, v in spec.items()},
              "init": bench_init(base, spec, timer, methods), "train_step": bench_train(base, spec, timer),
              "generate": bench_generate(base, spec, timer)}
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
