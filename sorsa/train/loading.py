"""Loading base models and tokenizers: hub ids, local directories, builtin: names and RWKV6 checkpoints,
with one readable error when a model cannot be reached (offline, missing or gated)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..core.errors import MissingFileError, UnreachableError, UserError


def builtin_cache(cache_path: str | None, run_path: str | os.PathLike) -> Path:
    """Where builtin: models and data are materialised: the cache path, else RUN_PATH/.builtin."""
    return Path(cache_path) if cache_path else Path(run_path) / ".builtin"


def resolve_model_name(name: str, cache_path: str | None = None, run_path: str | os.PathLike = "./runs") -> str:
    """A builtin name (materialised on first use), an existing directory, or a hub id (checked for obvious
    path mistakes)."""
    if name.startswith("builtin:"):
        from ..tasks.builtin import resolve_builtin

        return resolve_builtin(name, builtin_cache(cache_path, run_path))
    path = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep == "\\" and "\\" in name
    if looks_like_path and not path.exists():
        raise MissingFileError(f"model path {name} does not exist; give an existing directory or a hub id like "
                         "meta-llama/Llama-2-7b-hf")
    return str(path) if path.exists() else name


def resolve_data_file(path: str | None, cache_path: str | None, run_path: str | os.PathLike,
                      split: str) -> str | None:
    """A local data file, or the file behind a builtin: name (materialised on first use)."""
    if path and path.startswith("builtin:"):
        from ..tasks.builtin import resolve_builtin

        return resolve_builtin(path, builtin_cache(cache_path, run_path), split=split)
    return path


def hub_error(name: str, err: Exception) -> UserError:
    """The one-line error for a model that could not be loaded: a broken local directory, or an
    unreachable hub id with what to do about it."""
    if Path(name).exists():
        return UserError(f"could not load {name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    return UnreachableError(f"could not reach model {name!r}: it is not a local directory and the Hugging Face Hub "
                      "could not be reached (offline?) or does not have it; download it where there is network "
                      f"(`huggingface-cli download {name} --local-dir DIR`) and pass --model DIR "
                      "(gated models also need HF_TOKEN)")


def local_snapshot(name: str, cache_path: str | None = None, local_only: bool = False,
                   allow_patterns: list[str] | None = None) -> str:
    """A local directory for `name`: the path itself, or the hub snapshot (downloaded or from the cache)."""
    if Path(name).exists():
        return name
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, cache_dir=cache_path, local_files_only=local_only,
                                 allow_patterns=allow_patterns)
    except Exception as err:  # offline, missing or gated: one line
        raise hub_error(name, err) from None


def load_tokenizer(cfg, name: str | None = None):
    """The run's tokenizer (cfg: a RunConfig); a missing pad token becomes unk (or eos): padding is masked
    out of the loss and the attention anyway."""
    from transformers import AutoTokenizer

    name = resolve_model_name(name or cfg.tokenizer or cfg.model, cfg.cache_path, cfg.run_path)
    if cfg.rwkv:
        from ..rwkv6 import load_rwkv_tokenizer

        return load_rwkv_tokenizer(local_snapshot(name, cfg.cache_path, cfg.local))
    try:
        tok = AutoTokenizer.from_pretrained(name, cache_dir=cfg.cache_path, local_files_only=cfg.local,
                                            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise hub_error(name, err) from None
    if tok.pad_token is None:  # Llama 2 has none
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def model_class(cfg) -> tuple[type, dict]:
    """The auto class of a run's model and its extra arguments (sorsa.train.task: a sequence classifier with the
    task's label count for a GLUE run, else a causal LM)."""
    from .task import training_task

    return training_task(cfg).model_class(cfg)


def load_model(cfg, dtype: torch.dtype, name: str | None = None):
    """The run's causal LM, or its sequence classifier (`model_class`), (cfg: a RunConfig) in `dtype`, on the
    GPU when there is one (DeepSpeed places it itself)."""
    name = resolve_model_name(name or cfg.model, cfg.cache_path, cfg.run_path)
    if cfg.rwkv:
        from ..rwkv6 import load_rwkv6

        model = load_rwkv6(local_snapshot(name, cfg.cache_path, cfg.local), dtype=dtype)
    else:
        auto_class, extra = model_class(cfg)
        try:
            model = auto_class.from_pretrained(name, dtype=dtype, cache_dir=cfg.cache_path,
                                               local_files_only=cfg.local,
                                               trust_remote_code=cfg.trust_remote_code, **extra)
        except (OSError, ValueError) as err:
            raise hub_error(name, err) from None
    if torch.cuda.is_available() and not cfg.deepspeed:
        model = model.to("cuda")
    return model


def run_base_model_dir(cfg, run_dir: Path) -> Path:
    """The local directory of a run's base model (cfg: its RunConfig), resolved as training did; a relative
    path or a builtin cache is also looked up relative to the run (RUN_PATH = the run's parent)."""
    name = cfg.model
    if name.startswith("builtin:"):
        return Path(resolve_model_name(name, cfg.cache_path, run_dir.parent))
    for candidate in (Path(name).expanduser(), run_dir.parent.parent / name):
        if candidate.exists():
            return candidate
    return Path(local_snapshot(name, cfg.cache_path, cfg.local, allow_patterns=["*.safetensors", "*.json"]))
