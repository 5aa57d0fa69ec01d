"""File helpers shared by the library, the CLI and the benchmarks: atomic writes (a reader never sees half a
file), JSON lines, the weight files of a (sharded) checkpoint directory, and lazy safetensors reading."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import MissingFileError, UserError


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the finished file is an ordinary one
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jsonl_text(rows) -> str:
    """One JSON object per line (non-ASCII kept readable)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file` through a temporary file and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_json_lines(text: str, source: str) -> list[tuple[int, object]]:
    """(line number, value) of each non-blank line of JSON-lines `text`; a broken line raises one
    ValueError naming `source` and the line (blank lines still count, as an editor shows them)."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as err:
            raise UserError(f"{source}: line {lineno} is not valid JSON ({err.msg})") from None
    return rows


def checkpoint_files(directory: str | os.PathLike, weights_name: str = "model.safetensors") -> list[Path]:
    """The weight files of a Hugging Face checkpoint directory: the shards that `<weights_name>.index.json`
    lists, else the single `<weights_name>`; [] when there is neither."""
    directory = Path(directory)
    index = directory / f"{weights_name}.index.json"
    if index.is_file():
        return [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = directory / weights_name
    return [single] if single.is_file() else []


class TensorReader:
    """Lazy, one-tensor-at-a-time access to the weights of a safetensors model directory (single file
    or sharded with an index), a single safetensors file, or a directory of several safetensors."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_file():
            files = [path]
        else:
            files = checkpoint_files(path) or (sorted(path.glob("*.safetensors")) if path.is_dir() else [])
        if not files:
            raise MissingFileError(f"{path} holds no safetensors weights; this reads safetensors "
                                    "checkpoints (save the model with save_pretrained first)")
        self.path = path
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    self._where[key] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(str(self._where[key]), framework="pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.get(key)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise UserError(f"{self.path} has no tensor {key!r}")
        with safe_open(str(self._where[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    def weight_key(self, module: str) -> str:
        """The key of `module`'s weight: `module.weight`, or a key ending in it (a prefixed checkpoint)."""
        key = f"{module}.weight"
        if key in self._where:
            return key
        hits = [k for k in self._where if k.endswith("." + key)]
        if len(hits) != 1:
            raise UserError(f"{self.path} has no weight for layer {module!r} (looked for {key!r}); "
                           "is this the base model the run was trained from?")
        return hits[0]


# ----------------------------------------------------------------------------- folders built once and cached

@contextlib.contextmanager
def exclusive_lock(lock_path: Path):
    """An advisory inter-process lock (flock) held for the block; a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: no concurrent ranks to guard against in practice
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def marker_matches(path: Path, settings: dict, marker_file: str = "builtin.json") -> bool:
    """Whether the folder `path` holds a marker file (written last, when the folder was complete) recording `settings`."""
    try:
        marker = json.loads((path / marker_file).read_text())
    except (OSError, ValueError):
        return False
    return all(marker.get(k) == v for k, v in settings.items())


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` to `dst`, replacing a stale or incomplete `dst`."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
        try:
            os.replace(src, dst)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
