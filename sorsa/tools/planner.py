"""Plan a fine-tuning run without its weights or hardware: build the model on PyTorch's meta device from
its config, list the adapted layers, count trainable parameters and estimate memory per GPU.

Everything here is a pure function of settings; `run.py --dry-run` prints `format_plan(plan_run(...))`.
The configs of the paper's four 7B models are stored in configs/models/, so their plans work offline.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..core.dtypes import parse_dtype
from ..core.targets import features, linear_layers
from ..methods import get_method
from ..core.errors import UserError

MODELS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
# Hub id -> stored config (configs/models/README.md cites each file's source).
STORED_CONFIGS = {
    "meta-llama/Llama-2-7b-hf": "Llama-2-7b-hf.json",
    "mistralai/Mistral-7B-v0.1": "Mistral-7B-v0.1.json",
    "google/gemma-7b": "gemma-7b.json",
    "RWKV/v6-Finch-7B-HF": "RWKV6-7B.json",
}
# Models beyond the paper's table: LLaMA-3-70B of PiSSA's quantized experiment (configs/quantized/), Llama-3.2-3B of
# PEFT's MetaMathQA method comparison (configs/experiments/peft_metamathqa.yaml), and the real
# model that installs offline (sorsa/tasks/packaged.py), so its --dry-run needs neither the wheel nor a conversion.
MORE_CONFIGS = {"meta-llama/Meta-Llama-3-70B": "quantized/Meta-Llama-3-70B.json",
                "meta-llama/Llama-3.2-3B": "more/Llama-3.2-3B.json",  # PEFT's method comparison
                "builtin:smollm2-135m-instruct": "real/SmolLM2-135M-Instruct.json"}
# The paper's trainable-parameter counts (../PAPER.md): adapters at the paper's rank (all seven
# projections; RWKV6: its eight matrices), and full fine-tuning.
PAPER_PARAMS = {
    "meta-llama/Llama-2-7b-hf": {"rank": 128, "adapter": 320e6, "full": 6738e6},
    "mistralai/Mistral-7B-v0.1": {"rank": 64, "adapter": 168e6, "full": 7242e6},
    "google/gemma-7b": {"rank": 64, "adapter": 200e6, "full": 8538e6},
    "RWKV/v6-Finch-7B-HF": {"rank": 64, "adapter": 176e6, "full": None},
}
GiB = 1024 ** 3
INITIAL_FACTORS = "SORSA initial factors U_0, S_0, Vh_0 (fp32)"


# ----------------------------------------------------------------------------- the model, weightless

def load_model_config(name: str, rwkv: bool = False, trust_remote_code: bool = False):
    """(config, where it came from) for a hub id, a local directory or a builtin: name, without weights.

    The four 7B ids of the paper come from configs/models/ (offline); a local directory from its
    config.json; any other id from the Hugging Face Hub (or its cache).
    """
    if name in STORED_CONFIGS or name in MORE_CONFIGS:
        path = MODELS_DIR / {**STORED_CONFIGS, **MORE_CONFIGS}[name]
        values = json.loads(path.read_text())
        return _config_from_dict(values, rwkv or values.get("model_type") == "rwkv6"), str(path)
    if name.startswith("builtin:"):
        from ..tasks.builtin import BUILTIN_RWKV_MODEL, build_config, build_rwkv6_config, build_tokenizer

        tokenizer = build_tokenizer()
        config = build_rwkv6_config(tokenizer) if name == BUILTIN_RWKV_MODEL else build_config(tokenizer)
        return config, "built-in"
    local = Path(name).expanduser()
    if rwkv:
        if local.is_dir() and (local / "config.json").is_file():
            return _config_from_dict(json.loads((local / "config.json").read_text()), True), str(local / "config.json")
        raise UserError(f"--dry-run for RWKV6 {name!r}: give a -HF directory with a config.json, or "
                         f"one of {sorted(k for k in STORED_CONFIGS if 'RWKV' in k)}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(local) if local.exists() else name,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"--dry-run: no config for {name!r} ({str(err).splitlines()[0]}); give a local model "
                         f"directory or one of the stored configs {sorted(STORED_CONFIGS)}") from None
    return config, str(local / "config.json") if local.exists() else f"hub: {name}"


def _config_from_dict(values: dict, rwkv: bool):
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    if rwkv:
        from ..rwkv6 import RWKV6Config

        fields = set(RWKV6Config.__dataclass_fields__) if hasattr(RWKV6Config, "__dataclass_fields__") else None
        known = {k: v for k, v in values.items() if k not in ("model_type", "torch_dtype", "architectures")
                 and (fields is None or k in fields)}
        return RWKV6Config(**known)
    from transformers import AutoConfig

    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def meta_model(config, rwkv: bool = False) -> nn.Module:
    """The model of `config` on the meta device: every shape, no memory, no weights read."""
    with torch.device("meta"):
        if rwkv or getattr(config, "model_type", None) == "rwkv6":
            from ..rwkv6 import RWKV6ForCausalLM

            return RWKV6ForCausalLM(config)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(config)


# ----------------------------------------------------------------------------- parameters

def adapted_layers(model: nn.Module, target_modules) -> list[tuple[str, int, int]]:
    """(name, out_features, in_features) of every linear layer the targets match (SORSA's matching)."""
    from ..core.targets import find_target_modules

    return [(name, *features(m)) for name, m in find_target_modules(model, target_modules)]


def trainable_parameters(layers: list[tuple[str, int, int]], method: str, rank: int, total: int) -> int:
    """SORSA: Σ r(out + in + 1) (U_p, S_p, Vh_p); LoRA / PiSSA: Σ r(out + in) (B, A); full: all."""
    return get_method(method).trainable_count(layers, rank, total)


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- memory

def read_deepspeed_config(path: str | os.PathLike | None) -> dict:
    """ZeRO stage and offload targets of a DeepSpeed JSON: {"stage", "offload_optimizer", "offload_param"}."""
    if not path:
        return {"stage": 0, "offload_optimizer": False, "offload_param": False}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--deepspeed {path}: no such file; use one of configs/deepspeed/*.json")
    zero = json.loads(p.read_text()).get("zero_optimization", {})
    offloaded = lambda key: (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")  # noqa: E731
    return {"stage": int(zero.get("stage", 0)), "offload_optimizer": offloaded("offload_optimizer"),
            "offload_param": offloaded("offload_param")}


def activation_elements_per_token(model: nn.Module) -> tuple[int, int, int]:
    """(elements kept per token by all blocks, by one block, hidden size) for the backward pass.

    A deliberately simple upper estimate: every linear layer inside the blocks keeps its input and its
    output (Σ in + out), plus two norm inputs (2 · hidden) per block; attention runs through SDPA /
    flash kernels, so no sequence × sequence matrix is stored. The output head is counted separately.
    """
    hidden = model.config.hidden_size
    layers = model.config.num_hidden_layers
    linear = sum(sum(features(m)) for _, m in linear_layers(model))
    per_block = linear // layers + 2 * hidden
    return per_block * layers, per_block, hidden


def quantizable_params(model: nn.Module) -> int:
    """Weights of the linear layers that --quantize stores quantized: all but the output head."""
    return sum(m.weight.numel() for _, m in linear_layers(model))


def quant_bytes_per_weight(quantize: str | None, blocksize: int = 64, double: bool = True,
                           in_features: int = 4096) -> float:
    """Bytes per weight of a quantized layer, statistics included: 4-bit packs two weights a byte plus an absmax
    per block (float32, or 8-bit with a float32 per 256 blocks under double quantization, QLoRA's); int8 one byte
    plus a float32 scale per row."""
    if quantize is None:
        return 0.0
    if quantize == "int8":
        return 1.0 + 4.0 / in_features
    return 0.5 + ((1.0 + 4.0 / 256) / blocksize if double else 4.0 / blocksize)


@dataclass
class MemoryEstimate:
    """Bytes per GPU by kind (and what ZeRO offload moves to CPU memory), with the assumptions."""

    gpu: dict[str, float]
    cpu: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.gpu.values())


def estimate_memory(*, total_params: int, trainable: int, method: str, precision: str, batch_size: int,
                    tokens: int, vocab: int, act_per_token: int, act_per_block: int, hidden: int,
                    layers: int, grad_cp: bool = False, gpus: int = 1, zero_stage: int = 0,
                    offload_optimizer: bool = False, offload_param: bool = False,
                    deepspeed: bool = False, quantized_params: int = 0,
                    quant_bytes: float = 0.0) -> MemoryEstimate:
    """Memory per GPU of one training step (AdamW), by kind, in bytes. `total_params`: the base model's.

    Without DeepSpeed (this toolkit's Trainer path): the frozen base in the compute precision, the
    trainable tensors in float32 with float32 gradients and two float32 Adam moments (16 bytes per
    trainable parameter); SORSA also keeps its initial factors (float32 buffers). Full fine-tuning loads
    the model in float32. Under DeepSpeed with bf16/fp16, ZeRO's mixed precision: 16-bit working
    weights and gradients, and a float32 master copy plus two moments (12 bytes) per trainable
    parameter; ZeRO-1 partitions the optimizer state over the GPUs, ZeRO-2 also the gradients, ZeRO-3
    also the weights. Activations: `activation_elements_per_token` per token in the compute precision
    (checkpointing keeps each block's input plus one block), and the logits with their float32 copy in
    the loss. With --quantize, `quantized_params` of the frozen weights (every linear layer but the head) take
    `quant_bytes` each (sorsa/core/quant.py's layouts, statistics included) and the rest the compute precision.
    Not counted: the CUDA context, allocator fragmentation and communication buffers.
    """
    half = precision in ("bf16", "fp16")
    act = parse_dtype(precision).itemsize  # bytes of one activation element
    # The adapter methods keep every base weight (SORSA's W_res has W's shape) and add their own tensors.
    trains_all = get_method(method).trains_all_weights
    frozen = 0 if trains_all else total_params
    mixed = deepspeed and half
    base_bytes = 4 if trains_all and not mixed else (2 if half else 4)
    weight_part = gpus if zero_stage >= 3 else 1
    grad_part = gpus if zero_stage >= 2 else 1
    optim_part = gpus if zero_stage >= 1 else 1
    gpu, cpu, notes = {}, {}, []

    frozen_b = ((frozen - quantized_params) * base_bytes + quantized_params * quant_bytes) / weight_part
    train_w = trainable * (2 if mixed else 4) / weight_part
    (cpu if offload_param else gpu)["weights (frozen" + (", linear layers quantized)" if quantized_params else ")")] \
        = frozen_b
    (cpu if offload_param else gpu)["weights (trainable)"] = train_w
    if get_method(method).keeps_initial_factors:  # needed only to save and export: kept in CPU memory
        cpu[INITIAL_FACTORS] = trainable * 4.0
    gpu["gradients"] = trainable * (2 if mixed else 4) / grad_part
    if gpus > 1 and not deepspeed:
        gpu["DDP gradient buckets"] = trainable * 4.0
    optim = trainable * (12 if mixed else 8) / optim_part
    (cpu if offload_optimizer else gpu)["optimizer (AdamW moments" + (" + fp32 master)" if mixed else ")")] = optim
    seq = batch_size * tokens
    kept = (layers * hidden + act_per_block) if grad_cp else act_per_token
    gpu["activations" + (" (checkpointed)" if grad_cp else "")] = float(seq * kept * act)
    gpu["logits (+ float32 copy in the loss)"] = float(seq * vocab * (act + 4))
    notes.append(f"tokens per sequence: at most {tokens}; attention via SDPA/flash (no sequence² scores kept)")
    return MemoryEstimate(gpu=gpu, cpu=cpu, notes=notes)


# ----------------------------------------------------------------------------- the plan

@dataclass
class RunPlan:
    model: str
    config_source: str
    method: str
    rank: int
    target_modules: list[str] | str
    layers: list[tuple[str, int, int]]
    total_params: int
    trainable: int
    paper_trainable: float | None
    batch_size: int
    accum_steps: int
    gpus: int
    tokens: int
    precision: str
    grad_cp: bool
    deepspeed: str | None
    zero: dict
    memory: MemoryEstimate

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accum_steps * self.gpus


def plan_run(model: str, *, method: str = "sorsa", rank: int = 128, target_modules=None, rwkv: bool = False,
             quantize: str | None = None,
             batch_size: int = 2, accum_steps: int = 64, length: int = 512, precision: str = "bf16",
             grad_cp: bool = False, deepspeed: str | None = None, gpus: int = 1,
             trust_remote_code: bool = False) -> RunPlan:
    """The plan of a run: matched layers, parameter counts and memory per GPU, without any weight.

    `length` is the truncation of the prompt and of the response each (the paper's recipe), so a
    sequence holds at most 2 · length tokens.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # config-upgrade notices (e.g. Gemma's legacy "gelu") are noise here
    try:
        config, source = load_model_config(model, rwkv, trust_remote_code)
        net = meta_model(config, rwkv)
    finally:
        hf_logging.set_verbosity(verbosity)
    total = _numel(net)
    if not target_modules:  # the architecture's defaults (sorsa/core/targets.py)
        from ..core.targets import default_targets

        target_modules = default_targets(getattr(config, "model_type", None), rwkv=rwkv)
    trains_all = get_method(method).trains_all_weights
    layers = adapted_layers(net, target_modules) if not trains_all else []
    trainable = trainable_parameters(layers, method, rank, total)
    paper = PAPER_PARAMS.get(model, {})
    if trains_all:
        paper_trainable = paper.get("full")
    else:
        paper_trainable = paper.get("adapter") if paper.get("rank") == rank else None
    zero = read_deepspeed_config(deepspeed)
    per_token, per_block, hidden = activation_elements_per_token(net)
    tokens = 2 * length
    quantized_params = quantizable_params(net) if quantize else 0
    memory = estimate_memory(total_params=total, trainable=trainable, method=method, precision=precision,
                             quantized_params=quantized_params, quant_bytes=quant_bytes_per_weight(quantize),
                             batch_size=batch_size, tokens=tokens, vocab=config.vocab_size,
                             act_per_token=per_token, act_per_block=per_block, hidden=hidden,
                             layers=config.num_hidden_layers, grad_cp=grad_cp, gpus=gpus,
                             zero_stage=zero["stage"], offload_optimizer=zero["offload_optimizer"],
                             offload_param=zero["offload_param"], deepspeed=bool(deepspeed))
    return RunPlan(model=model, config_source=source, method=method, rank=rank, target_modules=target_modules,
                   layers=layers, total_params=total, trainable=trainable, paper_trainable=paper_trainable,
                   batch_size=batch_size, accum_steps=accum_steps, gpus=gpus, tokens=tokens,
                   precision=precision, grad_cp=grad_cp, deepspeed=deepspeed, zero=zero, memory=memory)


def _layer_groups(layers: list[tuple[str, int, int]]) -> list[str]:
    """'q_proj x32 (4096x4096)' per (last name part, shape), in first-seen order."""
    groups: dict[tuple[str, int, int], int] = {}
    for name, o, i in layers:
        key = (name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] if name.count(".") >= 2
               and name.rsplit(".", 2)[-2] in ("attention", "feed_forward") else name.rsplit(".", 1)[-1], o, i)
        groups[key] = groups.get(key, 0) + 1
    return [f"{n} x{c} ({o}x{i})" for (n, o, i), c in groups.items()]


def format_plan(plan: RunPlan) -> str:
    """The plan as the lines `run.py --dry-run` prints."""
    def gib(b: float) -> str:
        return f"{b / GiB:8.2f} GiB" if b >= 0.1 * GiB or b == 0 else f"{b / 1024 ** 2:8.2f} MiB"

    lines = [f"Plan (no weights loaded): {plan.method} on {plan.model}",
             f"  config: {plan.config_source}"]
    if not get_method(plan.method).trains_all_weights:
        lines.append(f"  rank {plan.rank}; {len(plan.layers)} target layers matched by {plan.target_modules}:")
        lines += [f"    {g}" for g in _layer_groups(plan.layers)]
    pct = 100.0 * plan.trainable / plan.total_params
    lines.append(f"  trainable parameters: {plan.trainable:,} ({plan.trainable / 1e6:.1f}M, {pct:.2f} % of the "
                 f"base model's {plan.total_params:,})")
    if plan.paper_trainable:
        dev = 100.0 * (plan.trainable - plan.paper_trainable) / plan.paper_trainable
        lines.append(f"  paper (arXiv 2409.00055): {plan.paper_trainable / 1e6:.0f}M -> {dev:+.2f} %")
    zero = plan.zero
    stage = f"ZeRO-{zero['stage']}" if plan.deepspeed else ("DDP" if plan.gpus > 1 else "single GPU")
    offload = [k.split("_")[1] for k in ("offload_optimizer", "offload_param") if zero.get(k)]
    lines.append(f"  batch: {plan.batch_size} per device x {plan.accum_steps} accumulation x {plan.gpus} GPU"
                 f"{'s' if plan.gpus > 1 else ''} = {plan.effective_batch}; {plan.precision}; {stage}"
                 + (f" (offload: {', '.join(offload)})" if offload else "")
                 + ("; activation checkpointing" if plan.grad_cp else ""))
    lines.append("  estimated memory per GPU:")
    width = max(len(k) for k in [*plan.memory.gpu, *plan.memory.cpu]) + 2
    lines += [f"    {k:<{width}}{gib(v)}" for k, v in plan.memory.gpu.items()]
    lines.append(f"    {'total':<{width}}{gib(plan.memory.total)}")
    if plan.memory.cpu:
        lines.append("  in CPU memory, not on the GPU (per process):")
        lines += [f"    {k:<{width}}{gib(v)}" for k, v in plan.memory.cpu.items()]
    lines += [f"  note: {n}" for n in plan.memory.notes]
    lines.append("  note: an estimate (AdamW, no CUDA context or fragmentation); allow ~10-20 % on top")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- compute (GPU-hours)

A100_BF16_TFLOPS = 312.0  # dense bf16 peak of an NVIDIA A100 (its datasheet)
DEFAULT_UTILIZATION = 0.3  # assumed model-FLOPs utilization of a Trainer run with padded, unpacked batches


def training_flops_per_token(plan: RunPlan) -> float:
    """Matmul FLOPs per trained token (the 6N rule of Kaplan et al. 2020, arXiv 2001.08361, split by part):
    forward 2·(frozen + trainable), the backward's activation gradients the same again (they flow through
    every weight, frozen or not), and the weight gradients 2·trainable; activation checkpointing adds one
    more forward. Full fine-tuning: 6N; an adapter: 4N + 6·N_adapter. Attention scores are left out (< 1 %
    at 7B and 1024 tokens)."""
    frozen = 0 if get_method(plan.method).trains_all_weights else plan.total_params
    forward = 2.0 * (frozen + plan.trainable)
    return forward * (3 if plan.grad_cp else 2) + 2.0 * plan.trainable


def training_gpu_hours(plan: RunPlan, tokens: float, gpu_tflops: float = A100_BF16_TFLOPS,
                       utilization: float = DEFAULT_UTILIZATION) -> float:
    """GPU-hours (summed over the GPUs) to train on `tokens` tokens at `utilization` of a `gpu_tflops` peak."""
    if gpu_tflops <= 0 or not 0 < utilization <= 1:
        raise UserError(f"gpu_tflops={gpu_tflops!r} must be > 0 and utilization={utilization!r} in (0, 1]")
    return training_flops_per_token(plan) * tokens / (gpu_tflops * 1e12 * utilization) / 3600.0


def dry_run(cfg, gpus: int = 1) -> RunPlan:
    """run.py --dry-run: print the plan of cfg's training run (cfg: a RunConfig), built on the meta device."""
    plan = plan_of(cfg, gpus)
    print(format_plan(plan))
    return plan


def plan_of(cfg, gpus: int = 1) -> RunPlan:
    """The RunPlan of cfg's training run (targets, parameter counts, memory), without weights."""
    model = cfg.model if cfg.model.startswith("builtin:") or not Path(cfg.model).expanduser().exists() \
        else str(Path(cfg.model).expanduser())
    return plan_run(model, method=cfg.peft, rank=cfg.rank, target_modules=cfg.target_modules, rwkv=cfg.rwkv,
                    quantize=cfg.quantize, batch_size=cfg.batch_size, accum_steps=cfg.accum_steps, length=cfg.length,
                    precision=cfg.precision, grad_cp=cfg.grad_cp, deepspeed=cfg.deepspeed, gpus=gpus,
                    trust_remote_code=cfg.trust_remote_code)
