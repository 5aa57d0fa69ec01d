"""The shape of the package, checked from its source: `import sorsa` loads the adapter core alone, subpackages import
one way (no cycles; core imports nothing else of the project), no function runs past 60 lines, no code outside the
method modules branches on a method's name; and the one error boundary: bad input is one line, a bug keeps its
traceback."""
import ast
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from sorsa import cli
from sorsa.core.functional import SVD_METHODS
from sorsa.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sorsa"
# Subpackages and the ones each may import (DESIGN.md, "Layout": cli → train/experiment → methods → core; tasks,
# eval and tools are used by train and experiment and use core).
ALLOWED = {
    "core": set(),
    "rwkv6": {"core"},
    "tasks": {"core", "rwkv6"},
    "eval": {"core", "tasks", "rwkv6"},
    "methods": {"core"},
    "train": {"core", "methods", "tasks", "eval", "rwkv6"},
    "tools": {"core", "methods", "tasks", "eval", "train", "rwkv6"},
    "experiment": {"core", "methods", "tasks", "eval", "train", "tools"},
    "cli": {"core", "train", "tools", "experiment"},
    "peft": {"core", "train"},  # SORSA inside PEFT (sorsa/peft.py): the core's math, the trainer's regularizer
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _subpackage(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _imported_subpackages(path: Path, tree: ast.AST) -> set[str]:
    """The sorsa subpackages a module imports (relative or absolute, at any depth of the module)."""
    here = path.relative_to(ROOT).with_suffix("").parts[:-1]  # the module's package, e.g. ("sorsa", "train")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[:len(here) - node.level + 1]) + (node.module.split(".") if node.module else [])
            else:
                base = node.module.split(".")
            if base[:1] != ["sorsa"]:
                continue
            if len(base) == 1:  # from sorsa import x / from . import x (in a top-level module)
                found |= {a.name for a in node.names}
            else:
                found.add(base[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sorsa.")}
    return found


def test_import_sorsa_loads_the_adapter_core_only():
    code = ("import json, sys; import sorsa; print(json.dumps(sorted(m for m in sys.modules if m == 'sorsa' or "
            "m.startswith('sorsa.') or m.split('.')[0] in ('matplotlib', 'scipy', 'datasets', 'deepspeed', "
            "'bitsandbytes', 'sklearn', 'peft', 'trl'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    loaded = json.loads(out.stdout)
    outside = [m for m in loaded if m != "sorsa" and not m.startswith("sorsa.core")]
    assert outside == [], outside
    assert "sorsa.core.functional" in loaded and "sorsa.core.adapter_io" in loaded


def test_subpackages_import_one_way_and_core_imports_nothing_else():
    graph = defaultdict(set)
    for path, tree in _modules():
        sub = _subpackage(path)
        if sub in ("__init__", "convert") or path.name == "__main__.py":  # the package's face, command-name shims
            continue
        graph[sub] |= _imported_subpackages(path, tree) - {sub}
    wrong = {sub: sorted(deps - ALLOWED[sub]) for sub, deps in graph.items() if deps - ALLOWED[sub]}
    assert not wrong, wrong
    # and therefore no cycle; checked directly too, so a wider ALLOWED table cannot hide one
    state = {}

    def visit(node, trail):
        if state.get(node) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(trail + [node])}")
        if state.get(node) != "done":
            state[node] = "open"
            for nxt in graph.get(node, ()):
                visit(nxt, trail + [node])
            state[node] = "done"

    for node in list(graph):
        visit(node, [])


def test_no_function_is_longer_than_60_lines():
    long = [f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1})"
            for path, tree in _modules() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long


def _method_name_compare(node: ast.Compare) -> bool:
    """`cfg.peft == "sorsa"`, `method in ("lora", "pissa")`, ...: a comparison of a method-valued expression with
    registered method names."""
    operands = [node.left, *node.comparators]
    names = set()
    for op in operands:
        if isinstance(op, ast.Constant) and isinstance(op.value, str):
            names.add(op.value)
        elif isinstance(op, (ast.Tuple, ast.List, ast.Set)):
            names |= {e.value for e in op.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    if any(isinstance(op, ast.Attribute) and op.attr in ("peft", "method") for op in operands):
        return bool(names & set(METHODS))
    # a plain `method` variable may hold an SVD method ("full", "randomized", "fast"): those names are not counted
    if any(isinstance(op, ast.Name) and "method" in op.id for op in operands):
        return bool(names & (set(METHODS) - set(SVD_METHODS)))
    return False


def test_no_code_outside_the_method_modules_branches_on_a_method_name():
    found = [f"{path.relative_to(ROOT)}:{node.lineno}" for path, tree in _modules()
             if _subpackage(path) != "methods"
             for node in ast.walk(tree) if isinstance(node, ast.Compare) and _method_name_compare(node)]
    assert not found, found


def test_unreachable_hub_test_data_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "run.py", "--test", "--name", "NO_SUCH_RUN", "--test-dataset", "gsm-8k",
                          "--run-path", str(tmp_path / "runs")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == cli.USER_ERROR_EXIT and "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: no trained run 'NO_SUCH_RUN'"), lines
    assert "could not reach model 'meta-llama/Llama-2-7b-hf'" in lines[0]


def test_a_bug_keeps_its_traceback_and_bad_input_does_not(monkeypatch, capsys):
    from sorsa.core.errors import UserError
    from sorsa.train import recipe

    def internal_bug(cfg):
        raise ValueError("an internal ValueError, e.g. from inside torch")

    monkeypatch.setattr(recipe, "train", internal_bug)
    with pytest.raises(ValueError, match="internal ValueError"):
        cli.main(["--name", "x", "--train"])

    def bad_input(cfg):
        raise UserError("a bad input")

    monkeypatch.setattr(recipe, "train", bad_input)
    capsys.readouterr()
    assert cli.main(["--name", "x", "--train"]) == cli.USER_ERROR_EXIT
    assert capsys.readouterr().err.strip().splitlines() == ["error: a bad input"]


def test_python_m_sorsa_is_the_command_line():
    out = subprocess.run([sys.executable, "-m", "sorsa", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--train" in out.stdout and "--experiment" in out.stdout
