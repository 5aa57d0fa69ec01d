"""Models with quantized frozen weights: a loader that streams a full-precision checkpoint one linear layer at a time
and keeps only its quantized form, QSORSA on top of it (QPiSSA and QLoRA: sorsa.methods.peft_lora), the rebuild of
a trained run's quantized model, and the merge into a plain checkpoint of deq(W_q) + adapter.

Peak memory while loading: the quantized model plus a few float32 copies of one weight (tests/test_quant_run.py
measures it flat in the number of layers). Every quantized residual is a deterministic function of the base
weight and the stored initial factors, so a run never stores its quantized model: it is rebuilt.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .fileio import TensorReader
from .model import check_rank, replace_module
from .quant import QuantSpec, dequantize_linear, is_quantized, quantize_linear
from .targets import find_target_modules, linear_layers
from .errors import UserError


def stream_quantized(model_dir: str | Path, spec: QuantSpec, adapt=None, targets: list[str] | str | None = None,
                     rank: int | None = None, device: str | torch.device = "cpu", trust_remote_code: bool = False,
                     progress: bool = True) -> nn.Module:
    """The causal LM of a safetensors checkpoint directory with every linear layer but the output head quantized,
    built one layer at a time: the skeleton is made on the meta device (buffers real), each linear weight is read
    from the checkpoint and, when it is one of `targets` (targets.find_target_modules' rule, checked on the
    skeleton first: an unmatched target list or a `rank` above a target's min(out, in) is a ValueError before
    anything is read), handed to `adapt(name, nn.Linear)`, which returns its replacement (e.g. a SORSALinear over
    a quantized residual) or None for plain Q(W); the full-precision copy is freed before the next layer. The
    other parameters (embeddings, norms, the head) are read in `spec.compute_dtype`. Returns the model in eval
    mode, frozen."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if getattr(config, "model_type", None) == "rwkv6" or getattr(config, "quantization_config", None):
        raise UserError(f"{model_dir}: quantized loading reads a full-precision Hugging Face causal LM; RWKV6 and "
                         "already-quantized checkpoints are not supported with --quantize")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=spec.compute_dtype, trust_remote_code=trust_remote_code)
    reader = TensorReader(model_dir)
    linears = linear_layers(model, (nn.Linear,))
    if any(type(m).__name__ == "Conv1D" for m in model.modules()):
        raise UserError("--quantize builds nn.Linear layers; GPT-2's Conv1D layers are not supported")
    chosen = set()
    if targets is not None:
        matched = find_target_modules(model, targets)
        if rank is not None:
            check_rank(matched, rank)
        chosen = {name for name, _ in matched}
    for name, module in tqdm(linears, desc=f"quantizing ({spec.quant_type})", unit="layer", disable=not progress):
        linear = _read_linear(reader, name, module, device)
        new = adapt(name, linear) if adapt is not None and name in chosen else None
        if new is None:
            new = quantize_linear(linear.weight, linear.bias, spec)
        replace_module(model, name, new)
        del linear, new  # the full-precision copy goes before the next layer is read
    _load_the_rest(model, reader, spec.compute_dtype, device, {id(m) for _, m in linears})
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _read_linear(reader: TensorReader, name: str, meta: nn.Linear, device) -> nn.Linear:
    """One linear layer of the checkpoint, in its stored precision, on `device`."""
    weight = reader.get(reader.weight_key(name)).to(device)  # (out, in)
    bias_key = f"{name}.bias"
    linear = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if meta.bias is not None:
        linear.bias = nn.Parameter(reader.get(bias_key).to(device), requires_grad=False)
    return linear


def _load_the_rest(model: nn.Module, reader: TensorReader, dtype: torch.dtype, device, done: set[int]) -> None:
    """Every parameter outside the linear layers, from the checkpoint (a tied output head from its embeddings)."""
    for name, module in model.named_modules():
        if id(module) in done or is_quantized(module):
            continue
        for pname, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            key = f"{name}.{pname}" if name else pname
            if key in reader:
                module._parameters[pname] = nn.Parameter(reader.get(key).to(device=device, dtype=dtype),
                                                         requires_grad=False)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UserError(f"the checkpoint has no tensors for {missing[:3]}: is it a complete model directory?")


# ----------------------------------------------------------------------------- the three methods

def load_qsorsa(model_dir, config, targets, cache_dir=None, device="cpu", progress=True) -> nn.Module:
    """QSORSA: every target layer a SORSALinear over a quantized residual, initialised from its full-precision
    weight by `config.quant_iters` alternating rounds (config: a SORSAConfig with `quantize` set); the other
    linear layers quantized. The model carries `sorsa_config` and `sorsa_init_log` as after apply_sorsa."""
    from .model import adapt_linear
    from .svd_cache import SVDCache

    cache = SVDCache(cache_dir) if cache_dir is not None else None
    log: list[dict] = []

    def adapt(name, linear):
        return adapt_linear(name, linear, config, cache, log)

    model = stream_quantized(model_dir, config.quant_spec(), adapt, targets, config.rank, device=device,
                             progress=progress)
    _train_adapters(model)
    model.sorsa_config, model.sorsa_init_log = config, log
    return model


def rebuild_qsorsa(model_dir, adapter_dir, device="cpu", progress=True) -> nn.Module:
    """A trained QSORSA model from its saved adapter: each residual rebuilt as Q(W − scale · U_0 diag(S_0) Vh_0)
    from the full-precision checkpoint (the same bytes as at training, no SVD), the trained factors on top."""
    from safetensors.torch import load_file

    from .adapter_io import ADAPTER_WEIGHTS, adapter_layer, read_adapter_config

    config, info = read_adapter_config(adapter_dir)
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))

    def adapt(name, linear):
        return adapter_layer(name, linear, config, tensors, adapter_dir)

    model = stream_quantized(model_dir, config.quant_spec(), adapt, list(info["layers"]), device=device,
                             progress=progress)
    model.sorsa_config = config
    return model


def _train_adapters(model: nn.Module) -> None:
    from .layer import SORSALinear

    for module in model.modules():
        if isinstance(module, SORSALinear):
            for p in (module.U_p, module.S_p, module.Vh_p):
                p.requires_grad_(True)


# ----------------------------------------------------------------------------- merge

@torch.no_grad()
def dequantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A plain model from a quantized one, in place: SORSA layers merged (deq(W_q) + scale · U_p diag(S_p) Vh_p),
    every other quantized layer dequantized; all in `dtype`. (A PEFT model over a quantized base is merged by its
    method first: sorsa.methods.peft_lora.)"""
    from .layer import plain_linear
    from .model import merge_and_unload

    model = merge_and_unload(model, dtype=dtype)
    for name, module in list(model.named_modules()):
        if is_quantized(module):
            replace_module(model, name, plain_linear(dequantize_linear(module).to(dtype), module.bias))
    return model.to(dtype)
