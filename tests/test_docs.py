"""The documentation cannot drift from the code: the README is a front page (≤ 250 lines) linking every page, no
relative link is broken, the generated pages (flags, experiment schema, methods) are what scripts/gen_docs.py
writes, every shell command in README.md and docs/ that runs offline in seconds (--help, --dry-run) runs, every
other one parses (its flags exist, its config files load, its script or module exists), and every Python snippet
runs on the tiny model."""
import importlib.util
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from sorsa import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
sys.path.insert(0, str(ROOT / "scripts"))


def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def _commands(path: Path) -> list[str]:
    """The commands of a page's bash blocks: continuation lines joined, comments and `cd` / env prefixes dropped."""
    out = []
    for block in _blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def test_readme_is_a_front_page_that_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", readme))
    missing = [p.relative_to(ROOT).as_posix() for p in DOCS if p.relative_to(ROOT).as_posix() not in linked]
    assert not missing, f"pages not linked from the README: {missing}"


def test_no_relative_link_is_broken():
    broken = []
    for page in [*PAGES, *(ROOT / "docs").rglob("*/*.md")]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_generated_pages_are_current():
    import gen_docs

    assert gen_docs.main(["--check"]) == 0, "run python scripts/gen_docs.py"


def _run_argv(command: str) -> list[str] | None:
    """The arguments of a run.py / sorsa-run / python -m sorsa command, or None for another command."""
    words = shlex.split(command)
    while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
        words = words[1:]
    for prefix in (["python", "run.py"], ["sorsa-run"], ["python", "-m", "sorsa"]):
        if words[:len(prefix)] == prefix:
            return words[len(prefix):]
    if words[:3] == ["python", "-m", "sorsa.experiment"]:
        return ["--experiment", *words[3:]]
    return None


def _other_command_exists(command: str) -> bool:
    words = shlex.split(command)
    while words and "=" in words[0] and not words[0].startswith("-"):
        words = words[1:]
    if words[:2] == ["python", "-m"]:
        return importlib.util.find_spec(words[2]) is not None
    if words[0] in ("python", "bash", "torchrun", "deepspeed", "accelerate"):
        scripts = [w for w in words[1:] if w.endswith((".py", ".sh"))]
        return all((ROOT / w).is_file() for w in scripts)
    return words[0] in ("pip", "conda", "git", "cd", "export", "source", "sbatch", "vllm", "srun")


def test_every_command_parses_and_the_quick_ones_run(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    ran, parsed = 0, 0
    for page in PAGES:
        for command in _commands(page):
            argv = _run_argv(command)
            if argv is None:
                assert _other_command_exists(command), f"{page.name}: {command}"
                continue
            argv = [a.replace("FILE.yaml", "configs/experiments/mini.yaml") for a in argv]
            if "--help" in argv or "-h" in argv:
                with pytest.raises(SystemExit) as stop:
                    cli.main(argv)
                assert stop.value.code == 0
                ran += 1
            elif "--dry-run" in argv:
                assert cli.main(argv) == 0, f"{page.name}: {command}\n{capsys.readouterr().err}"
                ran += 1
            else:
                overrides, jobs = cli.parse(argv)  # the flags exist and take these values
                if "config" in overrides:
                    assert (ROOT / overrides["config"]).is_file(), f"{page.name}: {command}"
                parsed += 1
    assert ran >= 3 and parsed >= 10, (ran, parsed)


def test_every_python_snippet_runs_on_the_tiny_model(tmp_path, monkeypatch, builtin_model_dir):
    monkeypatch.chdir(tmp_path)
    snippets = [(page, code) for page in PAGES for code in _blocks(page, "python")]
    assert len(snippets) >= 4
    for page, code in snippets:
        for hub_id in ("meta-llama/Llama-2-7b-hf", "builtin:tiny-llama"):
            code = code.replace(hub_id, str(builtin_model_dir))
        code = code.replace('"max_steps": 100', '"max_steps": 10').replace('"test_file": "builtin:arithmetic"',
                                                                          '"test_file": "builtin:arithmetic", "limit": 8')
        namespace = {"__name__": f"snippet_{page.stem}"}
        exec(compile(code, f"{page.name} snippet", "exec"), namespace)  # noqa: S102 - the docs' own code
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert os.path.isdir(tmp_path / "runs" / "demo" / "merged")
