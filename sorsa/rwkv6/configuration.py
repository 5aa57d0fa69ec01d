"""RWKV6Config: the hyper-parameters of an RWKV6 (Finch) model, as a transformers config."""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from ..core.errors import UserError


@strict(accept_kwargs=True)
class RWKV6Config(PreTrainedConfig):
    r"""Hyper-parameters of an RWKV6 (Finch) model; the loaders infer them from a checkpoint's shapes.

    attention_hidden_size: A (None → hidden_size). head_size: N (64 in every released model).
    intermediate_size: F (None → int(3.5 · C) rounded down to a multiple of 32, as RWKV-LM does).
    time_mix_extra_dim / time_decay_extra_dim: Dm / Dd (None → 32 / 64, or 64 / 128 for C = 4096 as in
    RWKV-LM's x060 model). head_size_divisor: the group norm `ln_x` uses eps = 1e-5 · divisor² (RWKV-LM).
    wkv_chunk_size: chunk length of the parallel WKV (a speed / memory knob; the result does not depend on it).
    """

    model_type = "rwkv6"
    keys_to_ignore_at_inference = ["state"]

    vocab_size: int = 65536
    hidden_size: int = 768
    num_hidden_layers: int = 12
    attention_hidden_size: int | None = None
    head_size: int = 64
    head_size_divisor: int = 8
    intermediate_size: int | None = None
    time_mix_extra_dim: int | None = None
    time_decay_extra_dim: int | None = None
    layer_norm_epsilon: float = 1e-5
    wkv_chunk_size: int = 16
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = False
    use_cache: bool = False

    def __post_init__(self, **kwargs):
        if self.attention_hidden_size is None:
            self.attention_hidden_size = self.hidden_size
        if self.intermediate_size is None:
            self.intermediate_size = int(self.hidden_size * 3.5) // 32 * 32
        big = self.hidden_size == 4096
        if self.time_mix_extra_dim is None:
            self.time_mix_extra_dim = 64 if big else 32
        if self.time_decay_extra_dim is None:
            self.time_decay_extra_dim = 128 if big else 64
        if self.attention_hidden_size % self.head_size:
            raise UserError(f"attention_hidden_size={self.attention_hidden_size} is not a multiple of "
                             f"head_size={self.head_size}; pick a head size that divides it")
        if self.wkv_chunk_size < 1:
            raise UserError(f"wkv_chunk_size={self.wkv_chunk_size} must be >= 1 (16 is a good default)")
        super().__post_init__(**kwargs)

    @property
    def num_heads(self) -> int:
        return self.attention_hidden_size // self.head_size

