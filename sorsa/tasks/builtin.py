"""The embedded offline default: a word-level tokenizer, synthetic arithmetic word problems
(MetaMathQA schema for training, GSM-8K schema for testing) and a tiny Llama model pre-trained on them.
Everything is built here, deterministically, from a seed; nothing touches the network.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InTheWayError, UserError
from ..core.fileio import atomic_write_text, exclusive_lock, jsonl_text, marker_matches, replace_dir
from .data import (ALPACA_PREFIX, ANSWER_CUE, CODE_TRAIN_PROMPT, HUMANEVAL_TEST_PROMPT, MATH_TEST_PROMPT,
                   MATH_TRAIN_PROMPT, MATH_TRAIN_RESPONSE)
from .packaged import PACKAGED_MODELS, materialize_packaged

# The paper's test prompt ends "### Response: Let's think step by step."
COT_CUE = MATH_TEST_PROMPT[len(ALPACA_PREFIX):]
BUILTIN_MODEL = "builtin:tiny-llama"
BUILTIN_RWKV_MODEL = "builtin:tiny-rwkv6"  # the same recipe on the RWKV6 architecture
BUILTIN_DATA = "builtin:arithmetic"  # level 2: the fine-tuning task, shifted from pre-training
BUILTIN_DATA_EASY = "builtin:arithmetic-easy"  # level 1: the family the base model was pre-trained on
# General text a pretrained model has seen, offline everywhere: Python's reference documentation (for forgetting)
BUILTIN_TEXT = "builtin:python-docs"
# Bump when the tokenizer, the generator, the model config or the pre-training recipe changes, so a
# cached directory from an older version is rebuilt instead of silently reused.
BUILTIN_VERSION = 2
MARKER_FILE = "builtin.json"

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3, in this order

# Defaults of the shipped base model: pre-training takes ~22 s on 2 idle CPU cores (0.09 s a step).
DEFAULT_PRETRAIN_STEPS = 250
DEFAULT_PRETRAIN_SEED = 0
RWKV_PRETRAIN_STEPS = 150
DEFAULT_PRETRAIN_LEVEL = 1
MODEL_MAX_LENGTH = 512

# ---------------------------------------------------------------------------------------------
# Synthetic arithmetic word problems
# ---------------------------------------------------------------------------------------------

NAMES = [("Tom", "He"), ("Ben", "He"), ("Sam", "He"), ("Max", "He"),
         ("Anna", "She"), ("Mia", "She"), ("Lily", "She"), ("Zoe", "She")]
ITEMS = ["apples", "pens", "books", "cards", "balls", "eggs", "shells", "stamps", "cookies", "marbles"]

# Per level, its task families as (kind, question, solution lines). Placeholders: {n} name, {p} pronoun,
# {m} another name, {i} item (plural), {a} {b} {c} operands, {t} intermediate result, {r} answer.
# Level 1 is one operation; level 2 chains two, or multiplies: the "shifted" task of the quickstart.
FAMILIES = {
    1: [
        ("add",
         "{n} has {a} {i}. {p} buys {b} more. How many {i} does {n} have now?",
         ["{n} has {a} {i} and buys {b} more.", "{a} + {b} = {r}"]),
        ("sub",
         "{n} has {a} {i}. {p} gives {b} {i} to {m}. How many {i} does {n} have left?",
         ["{n} gives {b} of {a} {i} away.", "{a} - {b} = {r}"]),
    ],
    2: [
        ("add_sub",
         "{n} has {a} {i}. {p} buys {b} more and gives {c} to {m}. How many {i} does {n} have left?",
         ["{n} has {a} {i} and buys {b} more.", "{a} + {b} = {t}",
          "{n} gives {c} away.", "{t} - {c} = {r}"]),
        ("mul",
         "{n} buys {a} boxes of {i}. Each box has {b} {i}. How many {i} does {n} buy?",
         ["{n} buys {a} boxes with {b} {i} each.", "{a} * {b} = {r}"]),
    ],
}


@dataclass(frozen=True)
class Problem:
    """One synthetic word problem: the question, its solution steps and the integer answer."""

    question: str
    steps: tuple[str, ...]
    answer: int

    def metamath(self) -> dict:
        """The MetaMathQA-schema training row: query, response ending in "The answer is: N".

        The response opens with the test prompt's chain-of-thought cue, so the paper's test prompt
        ("### Response: Let's think step by step.") is a prefix of the training text. A 400k-parameter
        model with a word-level vocabulary does not bridge that gap by itself as a 7B model does.
        """
        return {"query": self.question,
                "response": COT_CUE + "\n" + "\n".join(self.steps) + f"\n{ANSWER_CUE}{self.answer}"}

    def gsm8k(self) -> dict:
        """The GSM-8K-schema test row: question, answer ending in "#### N"."""
        return {"question": self.question, "answer": "\n".join(self.steps) + f"\n#### {self.answer}"}


def _operands(kind: str, rng: random.Random) -> dict:
    # One-digit operands: a tiny model learns these facts in a short pre-training; counts start at 2
    # so "has {a} apples" / "gives {b} apples" stay plural.
    if kind == "add":
        a, b = rng.randint(2, 9), rng.randint(1, 9)
        return {"a": a, "b": b, "r": a + b}
    if kind == "sub":
        b = rng.randint(2, 9)
        a = rng.randint(b + 1, b + 9)
        return {"a": a, "b": b, "r": a - b}
    if kind == "add_sub":
        a, b = rng.randint(2, 9), rng.randint(1, 9)
        c = rng.randint(1, min(9, a + b - 1))
        return {"a": a, "b": b, "c": c, "t": a + b, "r": a + b - c}
    if kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return {"a": a, "b": b, "r": a * b}
    raise UserError(f"unknown task family {kind!r}")


def make_problems(n: int, seed: int, level: int = 1, exclude: set[str] | None = None) -> list[Problem]:
    """`n` distinct problems of difficulty `level` (1: one operation; 2: two operations or a
    product), the same list for the same (n, seed, level). Questions in `exclude` are skipped."""
    if level not in FAMILIES:
        raise UserError(f"level must be one of {sorted(FAMILIES)}, got {level!r}")
    rng = random.Random(f"sorsa-builtin-{seed}-{level}")  # string seeds are stable across runs
    seen = set(exclude or ())
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise UserError(f"cannot draw {n} distinct level-{level} problems; ask for fewer")
        kind, question, steps = rng.choice(FAMILIES[level])
        (name, pronoun), other = rng.sample(NAMES, 2)
        values = {"n": name, "p": pronoun, "m": other[0], "i": rng.choice(ITEMS), **_operands(kind, rng)}
        text = question.format(**values)
        if text in seen:
            continue
        seen.add(text)
        problems.append(Problem(text, tuple(s.format(**values) for s in steps), values["r"]))
    return problems


def materialize_dataset(path_dir, n_train: int = 2000, n_test: int = 200, seed: int = 0,
                        level: int = 2) -> tuple[Path, Path]:
    """Write `train.jsonl` (MetaMathQA schema) and `test.jsonl` (GSM-8K schema, no question shared
    with train) under `path_dir`; returns both paths. Files already there with the same settings are kept."""
    path_dir = Path(path_dir)
    train_path, test_path = path_dir / "train.jsonl", path_dir / "test.jsonl"
    settings = {"name": BUILTIN_DATA, "version": BUILTIN_VERSION, "n_train": n_train,
                "n_test": n_test, "seed": seed, "level": level}
    if marker_matches(path_dir, settings) and train_path.is_file() and test_path.is_file():
        return train_path, test_path
    train = make_problems(n_train, seed, level)
    test = make_problems(n_test, seed + 1_000_003, level, exclude={p.question for p in train})
    path_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(train_path, jsonl_text(p.metamath() for p in train))
    atomic_write_text(test_path, jsonl_text(p.gsm8k() for p in test))
    atomic_write_text(path_dir / MARKER_FILE, json.dumps(settings, indent=2) + "\n")
    return train_path, test_path


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def _vocabulary_words() -> list[str]:
    """Every word of the prompt templates and of the generator, longest first (for the regex)."""
    texts = [ALPACA_PREFIX, MATH_TEST_PROMPT, CODE_TRAIN_PROMPT, HUMANEVAL_TEST_PROMPT, ANSWER_CUE]
    texts += [q + " " + " ".join(s) for fam in FAMILIES.values() for _, q, s in fam]
    texts += [f"{n} {p}" for n, p in NAMES] + ITEMS
    words = set()
    for text in texts:
        words.update(re.findall(r"[A-Za-z]+", re.sub(r"\{[a-z]+\}", " ", text)))
    return sorted(words, key=lambda w: (-len(w), w))


# Multi-character symbols of the templates that deserve one token each (longest first).
_SYMBOLS = ["####", "###", "```", "'''", "@@", "\n\n"]


def build_tokenizer():
    """The built-in word-level tokenizer as a `transformers` fast tokenizer.

    Lossless on any ASCII text: known words (with their leading space) are one token, everything
    else falls back to one token per character, so `decode(encode(s)) == s` for the data and every
    template. Digits are single tokens so numbers are spelled digit by digit. Ids 0-3 are
    <pad> <s> </s> <unk>; with `add_special_tokens=True` the tokenizer prepends <s>, as Llama's does.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = _vocabulary_words()
    # A known word (optionally with its leading space) not followed by more letters, a symbol,
    # or any single character: every piece of the input is matched, so nothing is dropped.
    word_alt = "|".join(re.escape(w) for w in words)
    symbol_alt = "|".join(re.escape(s) for s in _SYMBOLS)
    pattern = rf"(?: ?(?:{word_alt}))(?![A-Za-z])|{symbol_alt}|[\s\S]"
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + chars + _SYMBOLS + [p + w for w in words for p in ("", " ")]:
        vocab.setdefault(token, len(vocab))

    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()  # tokens carry their own spaces: decoding is concatenation
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        # Decoding must give back the exact text (" ." stays " ."), so no clean-up pass.
        clean_up_tokenization_spaces=False, model_max_length=MODEL_MAX_LENGTH)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def build_config(tokenizer):
    """The tiny Llama configuration: 2 layers, hidden 128, 4 heads, SwiGLU 256, vocab of `tokenizer`."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MODEL_MAX_LENGTH,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_rwkv6_config(tokenizer):
    """The tiny RWKV6 (Finch) configuration: 2 layers, hidden 128, heads of 32, channel mix 256."""
    from ..rwkv6 import RWKV6Config

    return RWKV6Config(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, head_size=32,
                       intermediate_size=256, time_mix_extra_dim=16, time_decay_extra_dim=32,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def build_model(tokenizer, seed: int = DEFAULT_PRETRAIN_SEED, arch: str = "llama"):
    """A randomly initialised tiny `LlamaForCausalLM` (or RWKV6 with arch="rwkv6"), float32; same seed,
    same weights."""
    import torch

    torch.manual_seed(seed)
    if arch == "rwkv6":
        from ..rwkv6 import RWKV6ForCausalLM

        return RWKV6ForCausalLM(build_rwkv6_config(tokenizer))
    if arch != "llama":
        raise UserError(f"unknown built-in architecture {arch!r}; use 'llama' or 'rwkv6'")
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(build_config(tokenizer))


PRETRAIN_POOL_MAX = 8192  # distinct problems pre-training cycles through


def _pretrain_pool(n: int, seed: int, level: int) -> list[Problem]:
    # Its own seed offset keeps the pool apart from the dataset seeds materialize_dataset uses.
    return make_problems(n, seed=10_000 + seed, level=level)


def pretrain_problems(steps: int, batch_size: int, seed: int, level: int) -> list[Problem]:
    """The problems `pretrain(steps, seed, batch_size, level)` cycles through (to keep test sets apart from them)."""
    return _pretrain_pool(min(steps * batch_size, PRETRAIN_POOL_MAX), seed, level)


def _pretrain_texts(problems: list[Problem], bos: str, eos: str) -> list[str]:
    # The fine-tuning format; the test prompt is its prefix (the response opens with the cue).
    return [MATH_TRAIN_PROMPT.format(bos=bos, query=p.question)
            + MATH_TRAIN_RESPONSE.format(response=p.metamath()["response"], eos=eos) for p in problems]


def _batch(tokenizer, texts: list[str]):
    """Right-padded input_ids / attention_mask / labels (-100 on padding) for full-sequence LM loss."""
    enc = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc["input_ids"], enc["attention_mask"], labels


def pretrain(model, tokenizer, steps: int, seed: int = DEFAULT_PRETRAIN_SEED, batch_size: int = 32,
             lr: float = 3e-3, level: int = DEFAULT_PRETRAIN_LEVEL, progress: bool = True) -> list[float]:
    """Full-parameter pre-training of `model` in place on level-`level` problems (both prompt
    formats, loss on every token), AdamW with warmup + cosine decay; returns the loss per step.
    Deterministic for a given seed and thread count."""
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    pool = pretrain_problems(steps, batch_size, seed, level)
    texts = _pretrain_texts(pool, tokenizer.bos_token, tokenizer.eos_token)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=f"pre-training builtin {type(model).__name__}", disable=not progress)
    for step in bar:
        start = (step * batch_size) % len(texts)
        idx = order[start:start + batch_size].tolist()
        input_ids, attention_mask, labels = _batch(tokenizer, [texts[i] for i in idx])
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def heldout_loss(model, tokenizer, n: int = 128, seed: int = 777, level: int = DEFAULT_PRETRAIN_LEVEL,
                 batch_size: int = 64, pretrain_seed: int = DEFAULT_PRETRAIN_SEED) -> float:
    """Mean cross-entropy per response token (training template, prompt masked) on `n` problems
    of `level` that are not in the pre-training pool of `pretrain_seed`."""
    import torch

    seen = {p.question for p in _pretrain_pool(PRETRAIN_POOL_MAX, pretrain_seed, level)}
    problems = make_problems(n, seed=seed, level=level, exclude=seen)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, n, batch_size):
            chunk = problems[start:start + batch_size]
            prompts = [MATH_TRAIN_PROMPT.format(bos=tokenizer.bos_token, query=p.question) for p in chunk]
            full = [pr + MATH_TRAIN_RESPONSE.format(response=p.metamath()["response"], eos=tokenizer.eos_token)
                    for pr, p in zip(prompts, chunk)]
            input_ids, attention_mask, labels = _batch(tokenizer, full)
            for row, prompt in enumerate(prompts):
                n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
                labels[row, :n_prompt] = -100
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            # Position t predicts token t + 1.
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((labels[:, 1:] != -100).sum())
    return total / count


def materialize_model(path, pretrain_steps: int = DEFAULT_PRETRAIN_STEPS,
                      seed: int = DEFAULT_PRETRAIN_SEED, progress: bool = True, arch: str = "llama") -> Path:
    """Write the built-in base model as a plain Hugging Face directory (config.json,
    model.safetensors, tokenizer files, builtin.json with the recipe and measured losses) that
    `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load without this project.

    Skips the work when `path` already holds a complete directory built with the same settings.
    Builds in a temporary sibling directory and renames it into place, so an interrupted run
    never leaves a half-written model at `path`.
    """
    path = Path(path)
    settings = {"name": BUILTIN_RWKV_MODEL if arch == "rwkv6" else BUILTIN_MODEL, "version": BUILTIN_VERSION,
                "pretrain_steps": pretrain_steps, "seed": seed, "level": DEFAULT_PRETRAIN_LEVEL, "arch": arch}
    required = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    if marker_matches(path, settings) and all((path / f).is_file() for f in required):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (the ranks of one distributed run) may ask at once: one builds, the others
    # wait for it and then find the directory complete.
    with exclusive_lock(path.parent / f".{path.name}.lock"):
        if marker_matches(path, settings) and all((path / f).is_file() for f in required):
            return path
        _build_model_dir(path, settings, pretrain_steps, seed, progress, arch)
    return path


def _build_model_dir(path: Path, settings: dict, pretrain_steps: int, seed: int, progress: bool,
                     arch: str = "llama") -> None:
    if path.exists() and any(path.iterdir()) and not (path / MARKER_FILE).is_file():
        raise InTheWayError(f"{path} exists and is not a built-in model directory; "
                              "remove it or choose another path")

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed, arch=arch)
    info = dict(settings, loss_before=heldout_loss(model, tokenizer, pretrain_seed=seed))
    started = time.perf_counter()
    losses = pretrain(model, tokenizer, pretrain_steps, seed=seed, progress=progress) if pretrain_steps else []
    info["pretrain_seconds"] = round(time.perf_counter() - started, 2)
    info["final_train_loss"] = losses[-1] if losses else None
    info["loss_after"] = heldout_loss(model, tokenizer, pretrain_seed=seed) if losses else info["loss_before"]

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished directory is an ordinary one
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # The marker goes last: its presence means the directory is complete.
        (tmp / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def materialize_text(path_dir) -> Path:
    """Python's own documentation topics (`pydoc_data.topics`, shipped with CPython under the PSF license: the
    language reference's prose and grammar), sorted by topic, as one UTF-8 file. The text follows the Python
    version; a measurement records its hash."""
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics)) + "\n"
    path = Path(path_dir) / "python-docs.txt"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return path


def resolve_builtin(name: str, cache_dir, split: str = "train") -> str:
    """The local path behind a "builtin:" name, materialised under `cache_dir/builtin/` on first use.

    `BUILTIN_MODEL` gives the model directory; a packaged real model (`builtin:smollm2-135m-instruct`) its
    converted folder. `BUILTIN_DATA` (level 2, the quickstart's task) and
    `BUILTIN_DATA_EASY` (level 1, what the base was pre-trained on: a forgetting check) give the
    `split` file: "train" is MetaMathQA-schema jsonl, "test" GSM-8K-schema jsonl.
    """
    root = Path(cache_dir) / "builtin"
    levels = {BUILTIN_DATA: 2, BUILTIN_DATA_EASY: 1}
    if name == BUILTIN_MODEL:
        return str(materialize_model(root / "tiny-llama"))
    if name == BUILTIN_RWKV_MODEL:
        return str(materialize_model(root / "tiny-rwkv6", pretrain_steps=RWKV_PRETRAIN_STEPS, arch="rwkv6"))
    if name == BUILTIN_TEXT:
        return str(materialize_text(root / "python-docs"))
    if name in PACKAGED_MODELS:  # a real pretrained model shipped in a wheel (sorsa/tasks/packaged.py)
        return str(materialize_packaged(PACKAGED_MODELS[name], root))
    if name in levels:
        if split not in ("train", "test"):
            raise UserError(f"split for {name} must be 'train' or 'test', got {split!r}")
        train_path, test_path = materialize_dataset(root / name.split(":", 1)[1], level=levels[name])
        return str(train_path if split == "train" else test_path)
    known = [BUILTIN_MODEL, BUILTIN_RWKV_MODEL, *PACKAGED_MODELS, *levels, BUILTIN_TEXT]
    raise UserError(f"unknown built-in name {name!r}; known: {', '.join(known)}")

