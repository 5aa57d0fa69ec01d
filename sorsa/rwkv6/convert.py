"""Conversion between the two RWKV6 checkpoint layouts, and reading a "-HF" directory's weights.

Checkpoint layouts. The model's state dict *is* the Hugging Face "-HF" layout (what `save_pretrained`
writes, what `from_hf_rwkv6` reads); the official `.pth` layout (`from_rwkv_checkpoint`,
`save_rwkv_checkpoint`, read by the `rwkv` package) differs only in the names. C = hidden size, A = attention
size (= C in every released model), H = A / N heads of size N, F = intermediate size, V = vocabulary,
Dm / Dd = the ranks of the token-shift / decay low-rank maps (32 / 64; 64 / 128 for the 7B):

    official .pth key                  this module / "-HF" key                          shape
    ---------------------------------  -----------------------------------------------  -----------
    emb.weight                         rwkv.embeddings.weight                           V × C
    blocks.0.ln0.{weight,bias}         rwkv.blocks.0.pre_ln.{weight,bias}               C
    blocks.N.ln1.*, blocks.N.ln2.*     rwkv.blocks.N.ln1.*, rwkv.blocks.N.ln2.*         C
    blocks.N.att.time_maa_{x,w,k,v,r,g}  rwkv.blocks.N.attention.time_maa_{x,w,k,v,r,g}  1 × 1 × C
    blocks.N.att.time_maa_w1           rwkv.blocks.N.attention.time_maa_w1              C × 5·Dm
    blocks.N.att.time_maa_w2           rwkv.blocks.N.attention.time_maa_w2              5 × Dm × C
    blocks.N.att.time_decay            rwkv.blocks.N.attention.time_decay               1 × 1 × A
    blocks.N.att.time_decay_w1         rwkv.blocks.N.attention.time_decay_w1            C × Dd
    blocks.N.att.time_decay_w2         rwkv.blocks.N.attention.time_decay_w2            Dd × A
    blocks.N.att.time_faaaa            rwkv.blocks.N.attention.time_faaaa               H × N
    blocks.N.att.{receptance,key,value,gate}.weight  rwkv.blocks.N.attention.<same>     A × C
    blocks.N.att.output.weight         rwkv.blocks.N.attention.output.weight            C × A
    blocks.N.att.ln_x.{weight,bias}    rwkv.blocks.N.attention.ln_x.{weight,bias}       A
    blocks.N.ffn.time_maa_{k,r}        rwkv.blocks.N.feed_forward.time_maa_{k,r}        1 × 1 × C
    blocks.N.ffn.key.weight            rwkv.blocks.N.feed_forward.key.weight            F × C
    blocks.N.ffn.receptance.weight     rwkv.blocks.N.feed_forward.receptance.weight     C × C
    blocks.N.ffn.value.weight          rwkv.blocks.N.feed_forward.value.weight          C × F
    ln_out.{weight,bias}               rwkv.ln_out.{weight,bias}                        C
    head.weight                        head.weight                                      V × C

Both layouts store `time_decay` raw (the decay is w = exp(-exp(time_decay + lora))) and `time_faaaa` (the
bonus u) as is: the `rwkv` package reads x060 checkpoints without transforming either (it only squeezes and
reshapes them), and so do we. Linear weights are (out, in) in both; the `rwkv` package transposes on load.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .configuration import RWKV6Config
from ..core.errors import MissingFileError, UserError


def _official_to_hf_key(key: str) -> str:
    if key == "head.weight":
        return key
    key = re.sub(r"^emb\.", "embeddings.", key)
    key = re.sub(r"^blocks\.0\.ln0\.", "blocks.0.pre_ln.", key)
    key = re.sub(r"^blocks\.(\d+)\.att\.", r"blocks.\1.attention.", key)
    key = re.sub(r"^blocks\.(\d+)\.ffn\.", r"blocks.\1.feed_forward.", key)
    return "rwkv." + key


def _hf_to_official_key(key: str) -> str:
    if key == "head.weight":
        return key
    key = key.removeprefix("rwkv.")
    key = re.sub(r"^embeddings\.", "emb.", key)
    key = re.sub(r"^blocks\.0\.pre_ln\.", "blocks.0.ln0.", key)
    key = re.sub(r"^blocks\.(\d+)\.attention\.", r"blocks.\1.att.", key)
    key = re.sub(r"^blocks\.(\d+)\.feed_forward\.", r"blocks.\1.ffn.", key)
    return key


def official_to_hf_state_dict(sd: dict, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename an official RWKV6 `.pth` state dict to this module's (= the "-HF") layout, checking that it is one."""
    if not isinstance(sd, dict) or "emb.weight" not in sd:
        raise UserError(f"{source} is not an official RWKV checkpoint (no 'emb.weight'); "
                         "for a Hugging Face directory use RWKV6ForCausalLM.from_hf_rwkv6")
    if "_strategy" in sd:
        raise UserError(f"{source} was converted by the rwkv package (strategy {sd['_strategy']!r}); "
                         "load the original .pth instead")
    if "blocks.0.att.time_maa_x" not in sd:
        version = "v7" if "blocks.0.att.r_k" in sd else "v4/v5" if "blocks.0.att.time_mix_k" in sd else "unknown"
        raise UserError(f"{source} is an RWKV {version} checkpoint, not RWKV6 (x060: blocks.N.att.time_maa_x); "
                         "only RWKV6 Finch models are supported")
    if any(k.endswith(".time_state") for k in sd):
        raise UserError(f"{source} carries a tuned initial state (time_state), which is not supported; "
                         "use the base model's .pth")
    return {_official_to_hf_key(k): v for k, v in sd.items()}


def hf_to_official_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a state dict of this module's layout to the official `.pth` layout."""
    return {_hf_to_official_key(k): v for k, v in sd.items()}


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> RWKV6Config:
    """An RWKV6Config read off the tensor shapes of a state dict in this module's (= "-HF") layout."""
    try:
        V, C = sd["rwkv.embeddings.weight"].shape
        att = "rwkv.blocks.0.attention."
        H, N = sd[att + "time_faaaa"].shape
        return RWKV6Config(
            vocab_size=V, hidden_size=C,
            num_hidden_layers=1 + max(int(m.group(1)) for k in sd if (m := re.match(r"rwkv\.blocks\.(\d+)\.", k))),
            attention_hidden_size=sd[att + "key.weight"].shape[0], head_size=N,
            intermediate_size=sd["rwkv.blocks.0.feed_forward.key.weight"].shape[0],
            time_mix_extra_dim=sd[att + "time_maa_w2"].shape[-2],
            time_decay_extra_dim=sd[att + "time_decay_w1"].shape[-1])
    except KeyError as e:
        raise UserError(f"not an RWKV6 state dict: missing {e.args[0]!r}") from None


def load_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict of a "-HF" directory: safetensors (single or sharded), else pytorch_model.bin (single or
    sharded, read with weights_only=True)."""
    from safetensors.torch import load_file

    from ..core.fileio import checkpoint_files

    if not directory.is_dir():
        raise MissingFileError(f"{str(directory)!r} is not a directory; pass a local RWKV6 -HF model directory")
    for weights_name, loader in (("model.safetensors", load_file), ("pytorch_model.bin", torch_load_safe)):
        files = checkpoint_files(directory, weights_name)
        if files:
            sd = {}
            for f in files:
                sd.update(loader(str(f)))
            return sd
    raise MissingFileError(f"{str(directory)!r} has no model.safetensors or pytorch_model.bin (nor a sharded index)")


def torch_load_safe(path: str, hint: str = "") -> dict[str, torch.Tensor]:
    """A torch checkpoint read with weights_only=True (nothing is unpickled); anything else is one ValueError
    (`hint`: what to pass instead)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with non-tensor objects, or not a torch file at all
        raise UserError(f"{str(path)!r} is not a plain tensor checkpoint loadable with weights_only=True "
                         f"({type(e).__name__}), so it is not read{hint}") from None


