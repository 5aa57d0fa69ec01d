"""An on-disk cache of top-r SVD factors, so a second start of the same run skips the decomposition."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from .dtypes import dtype_name
from .fileio import atomic_save_safetensors


class SVDCache:
    """Top-r SVD factors on disk, one safetensors file per (weight, layer, rank, method) key.

    The key hashes the weight's bytes, shape and dtype together with the layer name, rank, method,
    and the method's options, so a changed weight or setting never reuses a stale entry. Files are written to a temporary name and renamed, so an interrupted write is never read.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(weight: torch.Tensor, name: str, rank: int, method: str, options: dict) -> str:
        """The cache key of a weight's decomposition: its bytes, shape and dtype, the layer name, rank, method
        and the method's options (`options`: niter and seed for "randomized"; seed, tol, oversample and
        max_iter for "fast"; none count for "full")."""
        h = hashlib.sha256()
        w = weight.detach().contiguous().cpu()
        h.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
        settings = {"name": name, "shape": list(w.shape), "dtype": dtype_name(w.dtype), "rank": rank,
                    "method": method}
        if method == "randomized":
            settings.update(niter=options["niter"], seed=options["seed"])
        elif method == "fast":
            settings.update({k: options[k] for k in ("seed", "tol", "oversample", "max_iter")})
        # a quantized residual's rounds: the entry then holds their adapter, which these settings decide
        settings.update({k: v for k, v in options.items() if k.startswith("quant") or k in ("scale", "alpha_init")})
        h.update(json.dumps(settings, sort_keys=True).encode())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, key: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...] | None:
        """The cached (U, S, Vh) on `device` (the weight's, so that ZeRO-3's broadcast and the split see the
        tensors where freshly computed ones would be), or None."""
        path = self._path(key)
        if not path.exists():
            return None
        t = load_file(str(path), device=str(device))
        return t["U"], t["S"], t["Vh"]

    def put(self, key: str, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor):
        tensors = {"U": U.detach().cpu().contiguous(), "S": S.detach().cpu().contiguous(),
                   "Vh": Vh.detach().cpu().contiguous()}
        atomic_save_safetensors(tensors, self._path(key))
