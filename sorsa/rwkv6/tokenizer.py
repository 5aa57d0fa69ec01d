"""The RWKV "world" tokenizer (the byte vocabulary shipped with the `rwkv` package), and the tokenizer lookup
beside an RWKV6 model directory."""
from __future__ import annotations

import ast
import functools
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from ..core.errors import MissingFileError, UserError


VOCAB_FILE = "rwkv_vocab_v20230424.txt"


def _default_vocab_file() -> Path:
    spec = importlib.util.find_spec("rwkv")  # locate the package's data file without importing rwkv.model
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(f"the RWKV world vocabulary ({VOCAB_FILE}) ships with the `rwkv` package: "
                                "pip install rwkv, or pass vocab_file=")
    return Path(list(spec.submodule_search_locations)[0]) / VOCAB_FILE


@functools.lru_cache(maxsize=4)
def _read_vocab(path: str) -> tuple[dict[int, bytes], dict]:
    """id → bytes, and a byte trie (nested dicts; key 256 holds the id of the token ending there)."""
    id_to_bytes: dict[int, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            first, last = line.index(" "), line.rindex(" ")
            # Each line is `id <python str or bytes literal> <byte length>`; literal_eval, never eval.
            tok = ast.literal_eval(line[first + 1:last])
            tok = tok.encode("utf-8") if isinstance(tok, str) else tok
            if not isinstance(tok, bytes) or len(tok) != int(line[last + 1:]):
                raise UserError(f"{path}:{n}: malformed vocabulary line {line[:60]!r}")
            id_to_bytes[int(line[:first])] = tok
    trie: dict = {}
    for i, tok in id_to_bytes.items():
        node = trie
        for b in tok:
            node = node.setdefault(b, {})
        node[256] = i
    return id_to_bytes, trie


class RWKVWorldTokenizer:
    """The RWKV "world" tokenizer: greedy longest match over the byte vocabulary shipped with the `rwkv` package
    (ids 1..65529); id 0 is end-of-text and padding and has no text.

    encode(str) → list[int]; decode(ids) → str; batch_decode; __call__(texts, padding=, return_tensors="pt")
    → BatchEncoding(input_ids, attention_mask) padded with id 0 on `padding_side`.
    """

    eos_token_id = 0
    pad_token_id = 0
    bos_token_id = 0
    # Id 0 has no text: templates that format "{eos}" into a string get nothing, so code that trains on
    # text must append eos_token_id to the ids itself.
    eos_token = ""
    bos_token = ""
    pad_token = ""
    vocab_size = 65536

    def __init__(self, vocab_file: str | os.PathLike | None = None, padding_side: str = "right"):
        self.vocab_file = str(vocab_file or _default_vocab_file())
        if not os.path.isfile(self.vocab_file):
            raise MissingFileError(f"RWKV vocabulary {self.vocab_file!r} does not exist")
        self.id_to_bytes, self._trie = _read_vocab(self.vocab_file)
        self.padding_side = padding_side

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (no BOS/EOS: RWKV world models use none at the start of a prompt)."""
        data, root = text.encode("utf-8"), self._trie
        ids, i, n = [], 0, len(data)
        while i < n:
            node, j, best, best_end = root, i, -1, i
            while j < n:
                node = node.get(data[j])
                if node is None:
                    break
                j += 1
                if 256 in node:
                    best, best_end = node[256], j
            if best < 0:  # every single byte is in the vocabulary, so this only happens with a broken file
                raise UserError(f"byte {data[i]} at offset {i} has no token in {self.vocab_file}")
            ids.append(best)
            i = best_end
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of token ids (ids without text, such as 0, give nothing; bad UTF-8 becomes U+FFFD)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return b"".join(self.id_to_bytes.get(int(i), b"") for i in ids).decode("utf-8", errors="replace")

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def __call__(self, texts: str | Sequence[str], padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = None,
                 padding_side: str | None = None, add_special_tokens: bool = False, **kwargs):
        """Tokenize a text or a batch. padding: False, True / "longest", or "max_length"; truncation keeps the
        first max_length ids. Returns a transformers BatchEncoding with input_ids and attention_mask
        (tensors (B, T) with return_tensors="pt", which needs equal lengths, i.e. padding)."""
        from transformers import BatchEncoding

        single = isinstance(texts, str)
        batch = [self.encode(t) for t in ([texts] if single else texts)]
        if truncation and max_length is not None:
            batch = [ids[:max_length] for ids in batch]
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise UserError(f"padding_side={side!r}; use 'left' (generation) or 'right' (training)")
        if padding in (True, "longest", "max_length"):
            width = max_length if padding == "max_length" and max_length else max((len(b) for b in batch), default=0)
            masks = [[1] * len(b) + [0] * (width - len(b)) for b in batch]
            padded = [b + [self.pad_token_id] * (width - len(b)) for b in batch]
            if side == "left":
                masks = [m[len(b):] + m[:len(b)] for m, b in zip(masks, batch)]
                padded = [p[len(b):] + p[:len(b)] for p, b in zip(padded, batch)]
            batch, mask = padded, masks
        elif padding in (False, "do_not_pad", None):
            mask = [[1] * len(b) for b in batch]
        else:
            raise UserError(f"padding={padding!r}; use False, True/'longest' or 'max_length'")
        data = {"input_ids": batch, "attention_mask": mask}
        if single:
            data = {k: v[0] for k, v in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Copy the vocabulary file into `directory` (so a run or merged model directory is self-contained)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / VOCAB_FILE).write_bytes(Path(self.vocab_file).read_bytes())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs) -> RWKVWorldTokenizer:
        """The tokenizer whose vocabulary file `save_pretrained` wrote into `directory`."""
        return cls(Path(directory) / VOCAB_FILE, **kwargs)



def load_rwkv_tokenizer(path: str | os.PathLike | None = None):
    """The tokenizer stored beside an RWKV6 model: a transformers tokenizer (tokenizer.json, as the built-in
    model has) or a copy of the world vocabulary; otherwise the RWKV world tokenizer shipped with `rwkv`."""
    directory = Path(path) if path is not None else None
    if directory is not None and directory.is_file():
        directory = directory.parent
    if directory is not None and (directory / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory)
    if directory is not None and (directory / VOCAB_FILE).is_file():
        return RWKVWorldTokenizer.from_pretrained(directory)
    return RWKVWorldTokenizer()

