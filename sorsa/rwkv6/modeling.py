"""The RWKV6 (Finch) model as a transformers causal LM: token shift, time mixing with the WKV, channel mixing,
a recurrent state for O(1)-per-token greedy decoding, and loading / saving in both checkpoint layouts
(the layouts themselves are in `convert.py`)."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration import RWKV6Config
from .convert import (config_from_state_dict, hf_to_official_state_dict, load_hf_weights, official_to_hf_state_dict,
                      torch_load_safe)
from .wkv import wkv6_chunked, wkv6_recurrent
from ..core.errors import MissingFileError, UserError

# A recurrent state: one (att_shift (B, C), wkv (B, H, N, N) float32, ffn_shift (B, C)) per layer.
RWKV6State = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _token_shift(x, shift_state, mask):
    """The previous token's x for every position, and the shift state after the last valid position.

    x: (B, T, C); shift_state: (B, C); mask: (B, T) of 0/1 or None. A padded position is skipped: the token
    after a run of left padding sees `shift_state`, and the returned state is x at the last valid position.
    """
    prev = torch.cat([shift_state[:, None], x[:, :-1]], 1)  # (B, T, C)
    if mask is None:
        return prev, x[:, -1]
    valid = mask.bool()
    prev_valid = torch.cat([valid.new_ones(valid.shape[0], 1), valid[:, :-1]], 1)  # (B, T)
    prev = torch.where(prev_valid[..., None], prev, shift_state[:, None])
    pos = torch.arange(x.shape[1], device=x.device)
    last = torch.where(valid, pos, -1).amax(1)  # (B,): -1 when a row has no valid position
    new = x[torch.arange(x.shape[0], device=x.device), last.clamp(min=0)]  # (B, C)
    return prev, torch.where((last >= 0)[:, None], new, shift_state)


class RWKV6TimeMix(nn.Module):
    """Finch time mixing ("attention"): data-dependent token shift (ddlerp), data-dependent decay, the WKV
    recurrence with bonus u, per-head group norm `ln_x`, the SiLU gate, and the output projection."""

    def __init__(self, config: RWKV6Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, A, N = config.hidden_size, config.attention_hidden_size, config.head_size
        H, Dm, Dd = config.num_heads, config.time_mix_extra_dim, config.time_decay_extra_dim
        self.num_heads, self.head_size, self.chunk_size = H, N, config.wkv_chunk_size
        for name in ("x", "w", "k", "v", "r", "g"):
            setattr(self, f"time_maa_{name}", nn.Parameter(torch.empty(1, 1, C)))
        self.time_maa_w1 = nn.Parameter(torch.empty(C, 5 * Dm))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, Dm, C))
        self.time_decay = nn.Parameter(torch.empty(1, 1, A))
        self.time_decay_w1 = nn.Parameter(torch.empty(C, Dd))
        self.time_decay_w2 = nn.Parameter(torch.empty(Dd, A))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, A, bias=False)
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.gate = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)
        self.ln_x = nn.GroupNorm(H, A, eps=1e-5 * config.head_size_divisor ** 2)

    def forward(self, x, shift_state, wkv_state, mask=None):
        """x: (B, T, C), the ln1 output; shift_state (B, C); wkv_state (B, H, N, N) float32; mask (B, T) or None.
        Returns the block's residual update (B, T, C), the new shift state and the new WKV state."""
        B, T, C = x.shape
        H, N = self.num_heads, self.head_size
        prev, shift_state = _token_shift(x, shift_state, mask)
        xx = prev - x  # (B, T, C)
        # ddlerp (Finch token shift): lerp weights μ + tanh(x A) B, one low-rank map per target w, k, v, r, g.
        xxx = x + xx * self.time_maa_x
        lora = torch.tanh(xxx @ self.time_maa_w1).view(B, T, 5, -1)  # (B, T, 5, Dm)
        mw, mk, mv, mr, mg = torch.einsum("btfd,fdc->fbtc", lora, self.time_maa_w2).unbind(0)  # 5 × (B, T, C)
        xw = x + xx * (self.time_maa_w + mw)
        xk = x + xx * (self.time_maa_k + mk)
        xv = x + xx * (self.time_maa_v + mv)
        xr = x + xx * (self.time_maa_r + mr)
        xg = x + xx * (self.time_maa_g + mg)
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)  # (B, T, A)
        g = F.silu(self.gate(xg))  # (B, T, A)
        # Data-dependent decay d_t = λ + tanh(x_w A) B; w_t = exp(-exp(d_t)), kept as log w_t = -exp(d_t) in
        # float32 (the `rwkv` package also computes it in float32).
        d = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2  # (B, T, A)
        log_w = -torch.exp(d.float())
        if mask is not None:  # a padded token writes nothing (k = 0) and decays nothing (w = 1)
            m = mask[..., None]
            k, log_w = k * m.to(k.dtype), log_w * m.to(log_w.dtype)
        shape = (B, T, H, N)
        args = (r.view(shape), k.view(shape), v.view(shape), log_w.view(shape), self.time_faaaa)
        if T == 1:
            out, wkv_state = wkv6_recurrent(*args, state=wkv_state)
        else:
            out, wkv_state = wkv6_chunked(*args, state=wkv_state, chunk_size=self.chunk_size)
        # Group norm per head in float32 (as the `rwkv` package does), then the gate and the output projection.
        out = F.group_norm(out.reshape(B * T, H * N), H, self.ln_x.weight.to(out.dtype),
                           self.ln_x.bias.to(out.dtype), self.ln_x.eps).view(B, T, H * N)
        return self.output(out.to(x.dtype) * g), shift_state, wkv_state


class RWKV6ChannelMix(nn.Module):
    """Finch channel mixing ("feed_forward"): token shift, squared-ReLU key, sigmoid receptance gate."""

    def __init__(self, config: RWKV6Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, Fd = config.hidden_size, config.intermediate_size
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, Fd, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(Fd, C, bias=False)

    def forward(self, x, shift_state, mask=None):
        """x: (B, T, C), the ln2 output; shift_state (B, C) → update (B, T, C), new shift state (B, C)."""
        prev, shift_state = _token_shift(x, shift_state, mask)
        xx = prev - x
        k = torch.relu(self.key(x + xx * self.time_maa_k)).square()  # (B, T, F)
        r = torch.sigmoid(self.receptance(x + xx * self.time_maa_r))  # (B, T, C)
        return r * self.value(k), shift_state


class RWKV6Block(GradientCheckpointingLayer):
    """One Finch block: x += TimeMix(ln1(x)); x += ChannelMix(ln2(x)); block 0 first applies ln0 (`pre_ln`)."""

    def __init__(self, config: RWKV6Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, eps = config.hidden_size, config.layer_norm_epsilon
        if layer_id == 0:
            self.pre_ln = nn.LayerNorm(C, eps=eps)
        self.ln1 = nn.LayerNorm(C, eps=eps)
        self.ln2 = nn.LayerNorm(C, eps=eps)
        self.attention = RWKV6TimeMix(config, layer_id)
        self.feed_forward = RWKV6ChannelMix(config, layer_id)

    def forward(self, x, att_shift, wkv_state, ffn_shift, mask=None):
        """x: (B, T, C) and this layer's state → new x (B, T, C) and the new state triple."""
        if self.layer_id == 0:
            x = self.pre_ln(x)
        out, att_shift, wkv_state = self.attention(self.ln1(x), att_shift, wkv_state, mask)
        x = x + out
        out, ffn_shift = self.feed_forward(self.ln2(x), ffn_shift, mask)
        return x + out, att_shift, wkv_state, ffn_shift


# ============================================================================ models

@dataclass
class RWKV6CausalLMOutput(ModelOutput):
    """loss: 0-dim (when labels are given); logits: (B, T, V); state: RWKV6State (when use_cache)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: list | None = None


class RWKV6PreTrainedModel(PreTrainedModel):
    config_class = RWKV6Config
    config: RWKV6Config
    base_model_prefix = "rwkv"
    _no_split_modules = ["RWKV6Block"]
    supports_gradient_checkpointing = True
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """A from-scratch initialisation. The time_* parameters follow RWKV-LM's x060 init (layer-dependent
        lerp weights, a decay spread over channels, a zigzag bonus, zero / ±0.01 low-rank maps).
        Deviation from RWKV-LM: it zero-initialises att.output, ffn.value and ffn.receptance; we give every
        linear layer an orthogonal init instead, so a from-scratch model is not degenerate (its logits depend
        on the context) and an SVD-based adapter has a spectrum to work with."""
        cfg = self.config
        if isinstance(module, RWKV6TimeMix):
            C, A, n_layer = cfg.hidden_size, cfg.attention_hidden_size, cfg.num_hidden_layers
            r01 = module.layer_id / max(n_layer - 1, 1)  # 0 → 1 over depth
            r10 = 1.0 - module.layer_id / n_layer  # 1 → ~0 over depth
            ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
            for name, power, extra in (("x", r10, 0.0), ("w", r10, 0.0), ("k", r10, 0.0),
                                       ("v", r10, 0.3 * r01), ("r", 0.5 * r10, 0.0), ("g", 0.5 * r10, 0.0)):
                init.copy_(getattr(module, f"time_maa_{name}"), 1.0 - (ddd.pow(power) + extra))
            n = torch.arange(A, dtype=torch.float32)
            init.copy_(module.time_decay, (-6 + 5 * (n / max(A - 1, 1)) ** (0.7 + 1.3 * r01)).view(1, 1, A))
            zigzag = ((n + 1) % 3 - 1) * 0.1
            init.copy_(module.time_faaaa, (r01 * (1 - n / max(A - 1, 1)) + zigzag).view_as(module.time_faaaa))
            init.zeros_(module.time_maa_w1)
            init.uniform_(module.time_maa_w2, -0.01, 0.01)
            init.zeros_(module.time_decay_w1)
            init.uniform_(module.time_decay_w2, -0.01, 0.01)
        elif isinstance(module, RWKV6ChannelMix):
            C = cfg.hidden_size
            ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
            r10 = 1.0 - module.layer_id / cfg.num_hidden_layers
            init.copy_(module.time_maa_k, 1.0 - ddd.pow(r10))
            init.copy_(module.time_maa_r, 1.0 - ddd.pow(r10))
        elif isinstance(module, nn.Linear):
            out_f, in_f = module.weight.shape
            gain = max(1.0, (out_f / in_f) ** 0.5)
            if out_f == cfg.vocab_size:
                gain = 0.5 * (out_f / in_f) ** 0.5  # RWKV-LM's head gain
            init.orthogonal_(module.weight, gain=gain)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)  # ln0 normalises the embedding anyway
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class RWKV6Model(RWKV6PreTrainedModel):
    """Embedding, the blocks and ln_out: hidden states (B, T, C) from token ids (B, T)."""

    def __init__(self, config: RWKV6Config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(RWKV6Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_out = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def init_state(self, batch_size: int, device=None, dtype=None) -> RWKV6State:
        """The zero state: per layer (att_shift (B, C), wkv (B, H, N, N) float32, ffn_shift (B, C))."""
        cfg = self.config
        device = device or self.embeddings.weight.device
        dtype = dtype or self.embeddings.weight.dtype
        C, H, N = cfg.hidden_size, cfg.num_heads, cfg.head_size
        wkv_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return [(torch.zeros(batch_size, C, device=device, dtype=dtype),
                 torch.zeros(batch_size, H, N, N, device=device, dtype=wkv_dtype),
                 torch.zeros(batch_size, C, device=device, dtype=dtype)) for _ in range(cfg.num_hidden_layers)]

    def forward(self, input_ids, attention_mask=None, state: RWKV6State | None = None):
        """input_ids (B, T); attention_mask (B, T) of 0/1 or None; state or None (zeros)
        → hidden states after ln_out (B, T, C) and the new state."""
        B, T = input_ids.shape
        x = self.embeddings(input_ids)  # (B, T, C)
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        elif len(state) != len(self.blocks) or state[0][0].shape[0] != B:
            raise UserError(f"state has {len(state)} layers of batch {state[0][0].shape[0]}; this model needs "
                             f"{len(self.blocks)} layers of batch {B} (pass the state this model returned)")
        mask = None
        if attention_mask is not None:
            mask = attention_mask.to(x.device)
            if mask.shape != input_ids.shape:
                raise UserError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(input_ids.shape)}")
            if bool(mask.all()):
                mask = None  # nothing padded: skip the masking work
        new_state = []
        for block, (att_shift, wkv, ffn_shift) in zip(self.blocks, state):
            x, att_shift, wkv, ffn_shift = block(x, att_shift, wkv, ffn_shift, mask)
            new_state.append((att_shift, wkv, ffn_shift))
        return self.ln_out(x), new_state


class RWKV6ForCausalLM(RWKV6PreTrainedModel):
    """RWKV6 (Finch) language model: `RWKV6Model` + the `head` projection, with a shifted cross-entropy loss.

    Adapter-targetable linear layers (all bias-free nn.Linear): rwkv.blocks.N.attention.{receptance, key,
    value, gate, output} and rwkv.blocks.N.feed_forward.{key, value, receptance}.
    """

    def __init__(self, config: RWKV6Config):
        super().__init__(config)
        self.rwkv = RWKV6Model(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, value):
        self.head = value

    def init_state(self, batch_size: int) -> RWKV6State:
        """The zero recurrent state for a batch (see `RWKV6Model.init_state`)."""
        return self.rwkv.init_state(batch_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, state: RWKV6State | None = None,
                use_cache: bool | None = None, return_dict: bool = True, logits_to_keep: int = 0,
                num_items_in_batch: int | torch.Tensor | None = None, **kwargs):
        """input_ids (B, T); attention_mask (B, T) of 0/1 (left or right padding; a padded position leaves the
        state unchanged); labels (B, T), -100 = ignored, shifted inside (token t predicts labels[t + 1]);
        state: the recurrent state to continue from (None = start of text); use_cache: return the new state
        (default: only when a state was passed in); logits_to_keep: if > 0, logits of the last n positions only.
        Returns RWKV6CausalLMOutput(loss, logits (B, T or n, V), state)."""
        if use_cache is None:
            use_cache = state is not None
        hidden, new_state = self.rwkv(input_ids, attention_mask, state)  # (B, T, C)
        if logits_to_keep:
            if labels is not None:
                raise UserError("logits_to_keep > 0 drops positions the loss needs; pass logits_to_keep=0")
            hidden = hidden[:, -logits_to_keep:]
        logits = self.head(hidden)  # (B, T, V)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B·(T-1), V)
            shift_labels = labels[:, 1:].to(logits.device).reshape(-1)  # (B·(T-1),)
            if num_items_in_batch is None:
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
            else:  # the Trainer's token count over the accumulated batch, as transformers' own causal LMs do
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
                loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        state_out = new_state if use_cache else None
        if not return_dict:
            return tuple(t for t in (loss, logits, state_out) if t is not None)
        return RWKV6CausalLMOutput(loss=loss, logits=logits, state=state_out)

    # ------------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate_greedy(self, input_ids, max_new_tokens: int, eos_token_id: int | Sequence[int] | None = 0,
                        stop: Sequence[Sequence[int]] | Callable[[list[int]], bool] | None = None,
                        attention_mask: torch.Tensor | None = None) -> list[list[int]]:
        """Greedy decoding for a batch of prompts, through the recurrent state (O(1) per new token).

        input_ids: a list of token-id lists (any lengths), or a (B, T) tensor (with attention_mask (B, T) when
        padded: only positions with mask 1 are read). The prompts are left-padded and run in one parallel
        pass (padded positions leave the state unchanged), then tokens are decoded one step at a time.
        A sequence ends at an EOS (not included in its output) or when its generated ids end with one of the
        `stop` id sequences (included), or when `stop(generated_ids)` returns True.
        Returns the generated ids (without the prompt) per prompt.
        """
        prompts = _as_prompt_lists(input_ids, attention_mask)
        if any(len(p) == 0 for p in prompts):
            raise UserError("generate_greedy got an empty prompt; every prompt needs at least one token")
        eos = set() if eos_token_id is None else (
            {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id})
        stop_seqs = [list(s) for s in stop] if stop is not None and not callable(stop) else []
        device = self.head.weight.device
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(B, T, dtype=torch.long, device=device)
        mask = torch.zeros(B, T, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, T - len(p):] = 1
        was_training = self.training
        self.eval()
        try:
            out = self(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            state, logits = out.state, out.logits[:, -1]  # left padding: the last position is real for all
            generated: list[list[int]] = [[] for _ in range(B)]
            done = [False] * B
            for step in range(max_new_tokens):
                next_ids = logits.argmax(-1)  # (B,)
                for i, tok in enumerate(next_ids.tolist()):
                    if done[i]:
                        continue
                    if tok in eos:
                        done[i] = True
                        continue
                    generated[i].append(tok)
                    if callable(stop):
                        done[i] = bool(stop(generated[i]))
                    elif any(len(s) and generated[i][-len(s):] == s for s in stop_seqs):
                        done[i] = True
                if all(done) or step == max_new_tokens - 1:
                    break
                out = self(next_ids[:, None], state=state, use_cache=True)
                state, logits = out.state, out.logits[:, -1]
        finally:
            self.train(was_training)
        return generated

    # ------------------------------------------------------------------------ checkpoint layouts

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], config: RWKV6Config | None = None,
                        dtype: torch.dtype = torch.float32, consume: bool = False) -> RWKV6ForCausalLM:
        """A model from a state dict in this module's (= the "-HF") layout, built without a random init.
        The config is inferred from the tensor shapes when not given. consume=True empties `state_dict` as it
        goes, so a dtype conversion of a large checkpoint never holds both copies whole."""
        config = config or config_from_state_dict(state_dict)
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise UserError(f"not an RWKV6 (x060) state dict for this config: missing {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                             f"{' ...' if len(unexpected) > 4 else ''}")
        tensors = {}
        for name, ref in expected.items():
            t = state_dict.pop(name) if consume else state_dict[name]
            if t.numel() != ref.numel():
                raise UserError(f"{name} has shape {tuple(t.shape)}; the inferred config needs {tuple(ref.shape)}")
            tensors[name] = t.detach().reshape(ref.shape).to(dtype=dtype).contiguous()
        model.load_state_dict(tensors, strict=True, assign=True)
        model.config.dtype = dtype
        return model

    @classmethod
    def from_rwkv_checkpoint(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> RWKV6ForCausalLM:
        """Load an official RWKV6 (x060) `.pth` (the layout in the module docstring), inferring the config
        from tensor shapes. Read with torch.load(weights_only=True): nothing is unpickled."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"RWKV checkpoint {str(path)!r} does not exist; pass the path of an RWKV6 .pth")
        sd = torch_load_safe(str(path), "; pass an official RWKV6 .pth")
        sd = official_to_hf_state_dict(sd, source=str(path))  # drops the last reference to the original dict
        return cls.from_state_dict(sd, dtype=dtype, consume=True)

    def save_rwkv_checkpoint(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write the official `.pth` layout (readable by the `rwkv` package; dtype None keeps the model's).
        Written to a temporary file and renamed, so an interrupted save never leaves a partial file."""
        sd = self.state_dict()
        expected = _expected_hf_keys(self.config)
        if set(sd) != expected:
            odd = sorted(set(sd) ^ expected)[:4]
            raise UserError(f"the model has non-RWKV6 parameters ({odd} ...); merge adapters first "
                             "(sorsa.merge_and_unload) so only plain linear weights remain")
        out = hf_to_official_state_dict({k: v.detach().to(dtype or v.dtype).cpu().contiguous() for k, v in sd.items()})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(out, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def from_hf_rwkv6(cls, directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> RWKV6ForCausalLM:
        """Load a local Hugging Face RWKV6 "-HF" directory (rwkv.blocks.N.attention.key.weight, ...): safetensors
        (model.safetensors, or sharded with an index) or pytorch_model.bin (read with weights_only=True).
        The config comes from the tensor shapes; config.json, when present, supplies layer_norm_epsilon and
        head_size_divisor and must agree with the shapes."""
        directory = Path(directory)
        sd = load_hf_weights(directory)
        config = config_from_state_dict(sd)
        cfg_file = directory / "config.json"
        if cfg_file.is_file():
            hf = json.loads(cfg_file.read_text())
            if hf.get("head_size") not in (None, config.head_size):
                raise UserError(f"{cfg_file}: head_size={hf['head_size']} but time_faaaa has head size "
                                 f"{config.head_size}; the checkpoint's config.json does not match its weights")
            for key in ("layer_norm_epsilon", "head_size_divisor"):
                if hf.get(key) is not None:
                    setattr(config, key, type(getattr(config, key))(hf[key]))
        return cls.from_state_dict(sd, config=config, dtype=dtype, consume=True)


def _as_prompt_lists(input_ids, attention_mask) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise UserError(f"input_ids tensor must be (B, T), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            return input_ids.tolist()
        return [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
    return [[int(t) for t in p] for p in input_ids]



def _expected_hf_keys(config: RWKV6Config) -> set[str]:
    with torch.device("meta"):
        return set(RWKV6ForCausalLM(config).state_dict())



def load_rwkv6(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> RWKV6ForCausalLM:
    """An RWKV6 model from an official `.pth` file, or from a directory in the "-HF" layout (a released
    "-HF" checkpoint, or one this toolkit wrote with save_pretrained)."""
    path = Path(path)
    if path.is_file():
        return RWKV6ForCausalLM.from_rwkv_checkpoint(path, dtype=dtype)
    if path.is_dir():
        return RWKV6ForCausalLM.from_hf_rwkv6(path, dtype=dtype)
    raise MissingFileError(f"RWKV6 model {str(path)!r} does not exist; pass an official .pth file or a "
                            "directory in the -HF layout")


