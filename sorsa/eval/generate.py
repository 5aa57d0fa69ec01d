"""Generation backends behind one interface: a callable that maps a list of prompts to a list of completions.

- "hf": Hugging Face `model.generate`, greedy, batched with left padding (the default).
- "vllm": vLLM, greedy (temperature 0, as the reference evaluated), when vllm is installed and a GPU exists.
- "rwkv": the project's own RWKV6 (sorsa.rwkv6) with its recurrent state.
- "auto": vllm when available, else hf.
Each backend is a factory in `BACKENDS` that takes the arguments of `make_generator` and returns the callable.

Every backend stops at EOS or at a stop string (default: the start of a new "### Instruction", which a
model trained on the Alpaca template writes after its answer) and cuts the completion before it.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Protocol, Sequence

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from ..core.errors import UserError

DEFAULT_STOP = ("### Instruction",)


class GenerateFn(Protocol):
    """A generation backend: completions[i] is the greedy continuation of prompts[i] (prompt excluded)."""

    def __call__(self, prompts: list[str]) -> list[str]: ...


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i != -1), default=len(text))
    return text[:cut]


class HFGenerator:
    """Greedy `model.generate` over batches of `batch_size` prompts, left-padded.

    The prompts are tokenized one by one (with the tokenizer's special tokens, i.e. BOS) and padded here,
    so the caller's tokenizer is never modified; a tokenizer without a pad token pads with EOS."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 1024, batch_size: int = 8,
                 stop: Sequence[str] = DEFAULT_STOP) -> None:
        if max_new_tokens < 1 or batch_size < 1:
            raise UserError(f"max_new_tokens = {max_new_tokens}, batch_size = {batch_size}; both must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size, self.stop = max_new_tokens, batch_size, tuple(stop)
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = tokenizer.pad_token_id
        # No pad token (Llama 2, Mistral): pad with EOS. The attention mask hides the padding anyway.
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

    def __call__(self, prompts: list[str]) -> list[str]:
        completions: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            completions.extend(self._generate_batch(prompts[start:start + self.batch_size]))
        return completions

    def _generate_batch(self, prompts: list[str]) -> list[str]:
        encoded = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        width = max(len(ids) for ids in encoded)
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)  # (B, width)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):  # left padding: the last prompt token is at width - 1 for all
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
        # A fresh config: the model's own generation_config may carry sampling or repetition settings.
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens,
                                  pad_token_id=self.pad_id, eos_token_id=self.eos_ids or None)
        criteria = StoppingCriteriaList([_StopStrings(self.tokenizer, self.stop, width)] if self.stop else [])
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                         generation_config=config, stopping_criteria=criteria)
        completions = []
        for row in output[:, width:].tolist():  # (B, new tokens)
            for i, token in enumerate(row):
                if token in self.eos_ids:
                    row = row[:i]
                    break
            completions.append(truncate_at_stop(self.tokenizer.decode(row, skip_special_tokens=True), self.stop))
        return completions


class _StopStrings(StoppingCriteria):
    """Per-sequence stop once the newest tokens contain a stop string (finished rows are then padded)."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int, window: int = 32) -> None:
        self.tokenizer, self.stop, self.prompt_width, self.window = tokenizer, tuple(stop), prompt_width, window

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_width:][:, -self.window:]  # (B, <= window): a stop string is short
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], dtype=torch.bool,
                            device=input_ids.device)


class VLLMGenerator:
    """Greedy vLLM generation (temperature 0) of a saved model directory or hub id."""

    def __init__(self, model_path: str, *, tokenizer: str | None = None, max_new_tokens: int = 1024,
                 batch_size: int = 256, stop: Sequence[str] = DEFAULT_STOP, dtype: str = "bfloat16",
                 trust_remote_code: bool = False, seed: int = 0) -> None:
        from vllm import LLM, SamplingParams

        self.batch_size, self.stop = batch_size, tuple(stop)  # the runner hands over this many at a time
        self.llm = LLM(model=model_path, tokenizer=tokenizer or model_path, dtype=dtype,
                       trust_remote_code=trust_remote_code, seed=seed)
        self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=list(self.stop))

    def __call__(self, prompts: list[str]) -> list[str]:
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [truncate_at_stop(o.outputs[0].text, self.stop) for o in outputs]


def vllm_available() -> bool:
    """True when vllm is importable and a CUDA GPU is present."""
    if importlib.util.find_spec("vllm") is None:
        return False
    return torch.cuda.is_available()


def _hf_factory(model, tokenizer=None, *, max_new_tokens: int = 1024, batch_size: int | None = None,
                stop: Sequence[str] = DEFAULT_STOP, dtype: str = "bfloat16", device: str | None = None,
                trust_remote_code: bool = False, **_: object) -> GenerateFn:
    if isinstance(model, str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype),
                                                     trust_remote_code=trust_remote_code)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    elif isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise UserError("the hf backend got a model object but no tokenizer; pass tokenizer=")
    model.eval()
    return HFGenerator(model, tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size or 8, stop=stop)


def _vllm_factory(model, tokenizer=None, *, max_new_tokens: int = 1024, batch_size: int | None = None,
                  stop: Sequence[str] = DEFAULT_STOP, dtype: str = "bfloat16", trust_remote_code: bool = False,
                  **_: object) -> GenerateFn:
    if not isinstance(model, str):
        raise UserError("the vllm backend loads the model itself and needs its path or hub id, not a model "
                         "object; save the model first (run.py --merge) or use --backend hf")
    return VLLMGenerator(model, tokenizer=tokenizer if isinstance(tokenizer, str) else None,
                         max_new_tokens=max_new_tokens, batch_size=batch_size or 256, stop=stop, dtype=dtype,
                         trust_remote_code=trust_remote_code)


class RWKVGenerator:
    """Greedy generation with the project's own RWKV6 through its recurrent state (sorsa.rwkv6)."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 1024, batch_size: int = 8,
                 stop: Sequence[str] = DEFAULT_STOP) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_new_tokens, self.batch_size, self.stop = max_new_tokens, batch_size, tuple(stop)
        self.eos = tokenizer.eos_token_id

    def _stopped(self, ids: list[int]) -> bool:
        tail = self.tokenizer.decode(ids[-32:])  # a stop string is far shorter than 32 tokens
        return any(s in tail for s in self.stop)

    def __call__(self, prompts: list[str]) -> list[str]:
        # The tokenizer's own special tokens (a BOS where it has one, none for the world tokenizer).
        ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        out = self.model.generate_greedy(ids, self.max_new_tokens, eos_token_id=self.eos, stop=self._stopped)
        return [truncate_at_stop(self.tokenizer.decode(o), self.stop) for o in out]


def _rwkv_factory(model, tokenizer=None, *, max_new_tokens: int = 1024, batch_size: int | None = None,
                  stop: Sequence[str] = DEFAULT_STOP, dtype: str = "float32", device: str | None = None,
                  **_: object) -> GenerateFn:
    from sorsa.rwkv6 import load_rwkv6, load_rwkv_tokenizer

    if isinstance(model, str):
        tokenizer = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else \
            load_rwkv_tokenizer(tokenizer or model)
        model = load_rwkv6(model, dtype=getattr(torch, dtype))
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if tokenizer is None:
        raise UserError("the rwkv backend got a model object but no tokenizer; pass tokenizer=")
    return RWKVGenerator(model, tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size or 8, stop=stop)


BACKENDS: dict[str, Callable[..., GenerateFn]] = {"hf": _hf_factory, "vllm": _vllm_factory, "rwkv": _rwkv_factory}


def resolve_backend(backend: str) -> str:
    """"auto" -> "vllm" if available else "hf"; a named backend is checked to be usable."""
    if backend == "auto":
        return "vllm" if vllm_available() else "hf"
    if backend not in BACKENDS:
        raise UserError(f"unknown generation backend {backend!r}; expected auto or one of {sorted(BACKENDS)}")
    if backend == "vllm" and not vllm_available():
        raise UserError("backend 'vllm' needs the vllm package and a CUDA GPU "
                           f"(vllm installed: {importlib.util.find_spec('vllm') is not None}); "
                           "install it with pip install 'sorsa[vllm]' on a GPU machine, or use --backend hf")
    return backend


def make_generator(model, tokenizer=None, *, backend: str = "auto", max_new_tokens: int = 1024,
                   batch_size: int | None = None, stop: Sequence[str] = DEFAULT_STOP, dtype: str = "bfloat16",
                   device: str | None = None, trust_remote_code: bool = False) -> GenerateFn:
    """A generation callable for `model` (a path / hub id, or for "hf" also a loaded model object).

    `batch_size` prompts go through the model at once (default 8 for hf, 256 for vllm; the runner hands
    over that many at a time);
    `dtype` applies when the backend loads the model itself."""
    name = resolve_backend(backend)
    return BACKENDS[name](model, tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop,
                          dtype=dtype, device=device, trust_remote_code=trust_remote_code)
