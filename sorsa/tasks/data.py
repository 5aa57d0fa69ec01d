"""Prompt templates (the one source for training and test prompts) and dataset preprocessing.

The templates are the reference's Alpaca-style prompts, quoted in ../shared/PAPER.md ("Exact prompts").
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError
from ..core.fileio import parse_json_lines

ALPACA_PREFIX = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{query}\n\n### Response:"
)
# Training, math: loss only on the response part ("{response}{eos}").
MATH_TRAIN_PROMPT = "{bos}" + ALPACA_PREFIX
MATH_TRAIN_RESPONSE = "{response}{eos}"
# Training, code (CodeFeedback): "@@ Instruction / @@ Response".
CODE_TRAIN_PROMPT = "@@ Instruction\n{query}\n\n@@ Response\n"
CODE_TRAIN_RESPONSE = "{answer}{eos}"
# Test, GSM-8K and MATH: the training prompt (without BOS, the tokenizer adds it) plus the
# chain-of-thought cue; the answer is read after "The answer is: ".
MATH_TEST_PROMPT = ALPACA_PREFIX + " Let's think step by step."
# Test, HumanEval: the reference's code-completion prompt; {prompt} is the problem's prompt.
HUMANEVAL_TEST_PROMPT = (
    "@@ Instruction\nHere is the given code to do completion:\n```python\n{prompt}\n```\n\n"
    "Please continue to complete the function with python programming language. "
    "You are not allowed to modify the given code and do the completion only.\n\n"
    "Please return all completed codes in one code block.\n"
    "This code block should be in the following format:\n'''python\n# Your codes here\n'''\n\n"
    "@@ Response\n"
)
# Test, MBPP: the "@@ Instruction" MBPP instruction of the code-evaluation family whose HumanEval member is the
# prompt above (OpenCodeInterpreter/OpenCodeInterpreter, evaluation/evaluate/single_turn/
# gen_plus_solution_singleround.py, `build_mbpp_instruction`; PiSSA evaluates MBPP with that family's prompts,
# which ship inside its hub dataset fxmeng/pissa-dataset and could not be read offline). Without that script's
# system sentence and with the reference's ''' fences, as in the HumanEval prompt; {problem} is the problem's
# text followed by its test asserts, one per line (the "test examples").
MBPP_TEST_PROMPT = (
    "@@ Instruction\nHere is the given problem and test examples:\n{problem}\n\n"
    "Please use the python programming language to solve this problem.\n"
    "Please make sure that your code includes the functions from the test samples and that the input and output "
    "formats of these functions match the test samples.\n\n"
    "Please return all completed codes in one code block.\n"
    "This code block should be in the following format:\n'''python\n# Your codes here\n'''\n\n"
    "@@ Response\n"
)
ANSWER_CUE = "The answer is: "


def math_test_prompt(question: str) -> str:
    """The GSM-8K / MATH test prompt for one question."""
    return MATH_TEST_PROMPT.format(query=question)


def humaneval_test_prompt(prompt: str) -> str:
    """The HumanEval test prompt for one problem's prompt (function signature + docstring)."""
    return HUMANEVAL_TEST_PROMPT.format(prompt=prompt)


def mbpp_test_prompt(text: str, tests: list[str]) -> str:
    """The MBPP test prompt for one problem: its description, then its test asserts one per line."""
    return MBPP_TEST_PROMPT.format(problem="\n".join([text.strip(), *tests]))


# ---------------------------------------------------------------------------------------------
# Training data: loading (hub or local file), tokenization, collation
# ---------------------------------------------------------------------------------------------
IGNORE_INDEX = -100  # label value the causal-LM loss skips (prompt tokens and padding)

# name -> (hub dataset id, instruction column, response column, prompt template, response template)
TRAIN_DATASETS = {
    "metamath": ("meta-math/MetaMathQA", "query", "response", MATH_TRAIN_PROMPT, MATH_TRAIN_RESPONSE),
    "code": ("m-a-p/CodeFeedback-Filtered-Instruction", "query", "answer", CODE_TRAIN_PROMPT,
             CODE_TRAIN_RESPONSE),
}
TRAIN_FILE_EXTENSIONS = (".json", ".jsonl", ".parquet")


class DataError(UserError):
    """A training or test data problem, with one message naming the file and what is wrong."""


def _spec(name: str):
    if name not in TRAIN_DATASETS:
        raise DataError(f"unknown training dataset {name!r}; choose one of: {', '.join(TRAIN_DATASETS)}")
    return TRAIN_DATASETS[name]


_SPLIT_RE = re.compile(r"^(?:train)?(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?$")


def _parse_split(split: str | None) -> tuple[str, slice]:
    """'[:100000]' or 'train[:100000]' -> ('train[:100000]', slice(None, 100000)); None -> whole train."""
    text = (split or "").strip().replace(" ", "")
    match = _SPLIT_RE.match(text)
    if not match:
        raise DataError(f"split {split!r} not understood; use a slice of the train split such as "
                        "'[:100000]', 'train[:100000]' or '[:10%]'")
    start, stop = match.groups()
    hub_split = "train" + (text[text.index("["):] if "[" in text else "")
    return hub_split, slice(start, stop)


def _apply_slice(ds, bounds: slice, what: str):
    """The reference's `train[a:b]` slicing, applied to a dataset loaded from a local file."""
    n = len(ds)

    def index(bound):
        if bound is None:
            return None
        if bound.endswith("%"):
            return round(n * int(bound[:-1]) / 100)
        return int(bound)

    rows = range(n)[slice(index(bounds.start), index(bounds.stop))]
    if len(rows) == 0:
        raise DataError(f"{what}: the split leaves no rows (the file has {n})")
    return ds if len(rows) == n else ds.select(rows)


def _read_json_rows(path: Path) -> list[tuple[str, dict]]:
    """(position, row) pairs of a .json (a list of objects, or JSON lines) or .jsonl file, checked
    line by line so a broken file gets our message (file, line number), not a parser traceback."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); is it really JSON?") from None
    whole = None
    if path.suffix.lower() == ".json":
        # A .json file is either one JSON document (a list of rows, as the hub's MetaMathQA file)
        # or JSON lines under another name; only the first case parses as a whole.
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as err:
            if text.lstrip().startswith("["):
                raise DataError(f"{path}: not valid JSON at line {err.lineno} ({err.msg})") from None
    if isinstance(whole, list):
        rows = [(f"item {k}", item) for k, item in enumerate(whole)]
    elif whole is not None:
        rows = [("line 1", whole)]
    else:
        try:
            rows = [(f"line {n}", row) for n, row in parse_json_lines(text, str(path))]
        except ValueError as err:
            raise DataError(str(err)) from None
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}: {where} is not a JSON object")
    return rows


def _check_columns(found, columns: tuple[str, ...], where: str, name: str) -> None:
    missing = [c for c in columns if c not in found]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(map(repr, missing))} needed by the {name!r} "
                        f"dataset; found: {', '.join(map(repr, found)) or 'none'}")


def load_train_file(path, columns: tuple[str, ...], name: str = "metamath"):
    """A `datasets.Dataset` of `columns` from a local .json / .jsonl / .parquet file.
    Raises `DataError` for a missing file, an unknown extension, no rows, a broken line or
    missing columns."""
    import datasets

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"training file {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    if path.suffix.lower() not in TRAIN_FILE_EXTENSIONS:
        raise DataError(f"training file {path}: unknown extension {path.suffix or '(none)'!r}; "
                        f"use one of {', '.join(TRAIN_FILE_EXTENSIONS)}")
    if path.suffix.lower() == ".parquet":
        try:
            ds = datasets.Dataset.from_parquet(str(path))
        except Exception as err:  # pyarrow raises many types; the user needs one line
            raise DataError(f"{path}: cannot read as parquet ({str(err).splitlines()[0]})") from None
        if len(ds) == 0:
            raise DataError(f"{path}: the file has no rows")
        _check_columns(ds.column_names, columns, str(path), name)
        return ds
    rows = _read_json_rows(path)
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    _check_columns(list(rows[0][1]), columns, str(path), name)  # a file of the wrong schema
    for where, row in rows:  # a file whose later rows lose a field or hold a non-text value
        _check_columns(list(row), columns, f"{path}: {where}", name)
        for c in columns:
            if not isinstance(row[c], str):
                raise DataError(f"{path}: {where}: column {c!r} must be text, got {type(row[c]).__name__}")
    # Only the needed columns: extra ones may hold mixed types that Arrow cannot put in one column.
    return datasets.Dataset.from_list([{c: row[c] for c in columns} for _, row in rows])


def load_train_dataset(name: str, split: str | None = None, train_file=None, cache_dir=None):
    """The training set `name` ("metamath": MetaMathQA query/response; "code": CodeFeedback
    query/answer) as a `datasets.Dataset`: from `train_file` (.json/.jsonl/.parquet) when given,
    else from the Hugging Face hub. `split` is the reference's slice of the train split,
    e.g. "[:100000]" or "train[:100000]"."""
    hub_id, query_col, response_col, _, _ = _spec(name)
    hub_split, bounds = _parse_split(split)
    if train_file is not None:
        ds = load_train_file(train_file, (query_col, response_col), name)
        return _apply_slice(ds, bounds, str(train_file)) if bounds != slice(None, None) else ds
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, split=hub_split, cache_dir=cache_dir)
    except Exception as err:  # network, auth and hub errors come in many types; one line each
        raise DataError(f"could not load {hub_id} ({hub_split}) from the Hugging Face hub: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; without network, "
                        "download it elsewhere and pass the local file with --train-file") from None
    _check_columns(ds.column_names, (query_col, response_col), hub_id, name)
    return ds


# ---------------------------------------------------------------------------------------------
# Validation split: rows held out of the training data (experiments select hyper-parameters on them)
# ---------------------------------------------------------------------------------------------
# Fixed, independent of --seed: every run of an experiment, whatever its seed or method, holds out the same rows.
VALIDATION_SEED = 0


def validation_rows(n: int, val_size: float) -> list[int]:
    """The indices (ascending) of the `val_size` rows (>= 1) or that fraction (< 1) of `n` held out for validation.

    Each row is ranked by sha256("VALIDATION_SEED:index") and the lowest ranks are held out: the choice depends
    on nothing but n and val_size (no library's random stream), so it is the same on every machine and version.
    """
    import hashlib

    if not val_size:
        return []
    k = round(n * val_size) if val_size < 1 else int(val_size)
    if not 1 <= k < n:
        raise DataError(f"val_size={val_size!r} holds out {k} of the {n} training rows; leave at least one row "
                        "for training and hold out at least one")
    rank = sorted(range(n), key=lambda i: hashlib.sha256(f"{VALIDATION_SEED}:{i}".encode()).digest())
    return sorted(rank[:k])


def split_validation(ds, val_size: float):
    """(training rows, validation rows) of a `datasets.Dataset`: `validation_rows` held out, both parts in the
    file's order. val_size 0: (ds, an empty dataset)."""
    held = validation_rows(len(ds), val_size)
    if not held:
        return ds, ds.select([])
    chosen = set(held)
    return ds.select([i for i in range(len(ds)) if i not in chosen]), ds.select(held)


def math_validation_examples(rows, kind: str = "metamath") -> list[dict]:
    """Math training rows (MetaMathQA schema, responses ending "The answer is: N") as GSM-8K-schema test rows
    {"question", "answer": "... #### N"}, for validation accuracy by greedy generation. Rows whose answer
    after the last cue is not a single number (MATH-style LaTeX answers) are left out."""
    import re

    _, query_col, response_col, _, _ = _spec(kind)
    number = re.compile(r"^\s*-?[\d,]*\.?\d+\s*\.?\s*$")
    examples = []
    for row in rows:
        answer = row[response_col].rsplit(ANSWER_CUE.strip(), 1)
        if len(answer) == 2 and number.match(answer[1].lstrip(": ")):
            examples.append({"question": row[query_col], "answer": f"{answer[0].strip()}\n#### {answer[1].strip(': .')}"})
    return examples


def tokenize_train_dataset(ds, tokenizer, kind: str, max_length: int, num_proc: int | None = None):
    """Tokenize `ds` with the `kind` template ("metamath" or "code") as the reference did.

    Prompt = template with the tokenizer's BOS string, response = text + EOS string; each is
    tokenized without added special tokens and truncated to `max_length` on its own, then
    concatenated. Returns a Dataset with input_ids, labels (IGNORE_INDEX on the prompt tokens)
    and attention_mask, each a list of length <= 2 * max_length.
    """
    _, query_col, response_col, prompt_tpl, response_tpl = _spec(kind)
    if max_length < 1:
        raise DataError(f"max_length (--length) must be positive, got {max_length}")
    _check_columns(ds.column_names, (query_col, response_col), "training data", kind)
    if tokenizer.eos_token is None:
        raise DataError("the tokenizer has no EOS token; the training responses end with it, so set one")
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token
    # The response template's field is named after the column ({response} or {answer}).
    response_field = "response" if "{response}" in response_tpl else "answer"

    def tokenize(batch: dict) -> dict:
        prompts = [prompt_tpl.format(bos=bos, query=q) for q in batch[query_col]]
        responses = [response_tpl.format(**{response_field: r, "eos": eos}) for r in batch[response_col]]
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        if not eos:  # the RWKV world tokenizer's end-of-text (id 0) has no text: append its id
            response_ids = [r + [tokenizer.eos_token_id] for r in response_ids]
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        for p, r in zip(prompt_ids, response_ids):
            # The reference's truncation: prompt and response are each cut to max_length on their
            # own (keeping their beginnings), so a sequence can hold up to 2 * max_length tokens
            # and a response longer than max_length loses its EOS.
            p, r = p[:max_length], r[:max_length]
            out["input_ids"].append(p + r)
            out["labels"].append([IGNORE_INDEX] * len(p) + r)  # loss on the response only
            out["attention_mask"].append([1] * (len(p) + len(r)))
        return out

    return ds.map(tokenize, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                  desc=f"Tokenizing {kind} training data")


def pad_collate(features: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad a list of tokenized rows into a batch of torch tensors.

    input_ids (B, T) padded with `pad_token_id`, labels (B, T) with IGNORE_INDEX, attention_mask
    (B, T) with 0; T is the longest row, rounded up to `pad_to_multiple_of` when given.
    """
    import torch

    length = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = {}
    for key, fill in (("input_ids", pad_token_id), ("labels", IGNORE_INDEX), ("attention_mask", 0)):
        rows = []
        for f in features:
            values = f[key] if key in f else (f["input_ids"] if key == "labels" else [1] * len(f["input_ids"]))
            values = values.tolist() if hasattr(values, "tolist") else list(values)
            rows.append(values + [fill] * (length - len(values)))
        batch[key] = torch.tensor(rows, dtype=torch.long)
    return batch


@dataclass
class CausalLMCollator:
    """`pad_collate` as an object, usable as the Hugging Face Trainer's `data_collator`."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.pad_token_id is None:
            raise DataError("the tokenizer has no pad token id; set tokenizer.pad_token (e.g. to the "
                            "unk or eos token) before building the collator")

    def __call__(self, features: list[dict]) -> dict:
        return pad_collate(features, self.pad_token_id, self.pad_to_multiple_of)
