"""HumanEval and the sandbox: code extraction table, program assembly, the 164 canonical solutions pass,
`pass` bodies fail, and a battery of hostile completions scores 0 with no effect outside the sandbox and
no process left behind, in bounded time, with the interpreter guard on and (where the OS layers exist) off."""
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from sorsa.eval import humaneval, sandbox
from sorsa.eval.sandbox import SandboxLimits, isolation_layers, run_many, run_python

EXAMPLES = humaneval.load_examples()
BY_ID = {ex.id: ex for ex in EXAMPLES}
REPO = Path(__file__).resolve().parents[1]

EXTRACT = [  # completion -> extracted code
    ("Sure:\n'''python\ndef f():\n    return 1\n'''\nDone.", "def f():\n    return 1\n"),
    ("```python\nx = 1\n```\n```python\nx = 2\n```", "x = 1\n"),  # the first block
    ("```\nplain = 1\n```", "plain = 1\n"),
    ("```text\nout\n```\n```py\ncode = 1\n```", "code = 1\n"),  # a python-tagged block beats an earlier one
    ("'''python\ndef f():\n    '''doc'''\n    return 1\n'''", "def f():\n    '''doc'''\n    return 1\n"),
    ("```python\ndef f():\n    return 1", "def f():\n    return 1"),  # cut off by the token limit
    ("    return sorted(l)\n", "    return sorted(l)\n"),  # no block: the whole completion
]


@pytest.mark.parametrize("completion,code", EXTRACT)
def test_extract_code(completion, code):
    assert humaneval.extract_code(completion) == code


def test_all_problems_load_offline():
    assert len(EXAMPLES) == 164 and EXAMPLES[0].id == "HumanEval/0" and EXAMPLES[-1].id == "HumanEval/163"


def test_program_assembly_body_and_full_function():
    ex = BY_ID["HumanEval/10"]  # make_palindrome: its prompt also defines the helper is_palindrome
    body = humaneval.build_program(ex.meta, ex.gold)
    assert body.startswith(ex.meta["prompt"] + ex.gold) and body.endswith("check(make_palindrome)\n")
    # The model returns the whole function (what the paper's prompt asks for), helper not repeated.
    signature = ex.meta["prompt"][ex.meta["prompt"].index("def make_palindrome"):]
    full = humaneval.build_program(ex.meta, signature + ex.gold)
    assert full.startswith(ex.meta["prompt"] + "\n" + signature)
    demo = ("\nif __name__ == '__main__':\n    print(make_palindrome(input()))\n")  # a demo block must not run
    results = run_many([body, full, humaneval.build_program(ex.meta, signature + ex.gold + demo)], workers=3)
    assert [r.status for r in results] == ["passed"] * 3


def test_canonical_solutions_pass_and_pass_bodies_fail():
    start = time.monotonic()
    verdicts = humaneval.score(EXAMPLES, [ex.gold for ex in EXAMPLES], workers=4)
    elapsed = time.monotonic() - start
    failed = [(ex.id, v["status"], v.get("error", "")[-200:]) for ex, v in zip(EXAMPLES, verdicts) if not v["correct"]]
    assert failed == [] and humaneval.summarize(verdicts)["correct"] == 164
    assert elapsed < 60, f"164 canonical solutions took {elapsed:.1f} s"
    empty = humaneval.summarize(humaneval.score(EXAMPLES, ["    pass\n"] * len(EXAMPLES), workers=4))
    assert (empty["correct"], empty["total"], empty["statuses"]) == (0, 164, {"failed": 164})


# ----------------------------------------------------------------------------------------- hostile battery
def _hostile(port: int, victim_pid: int, victims: list[Path], marker: str) -> dict[str, str]:
    """Completions for HumanEval/0 (has_close_elements); none of them is a correct solution."""
    fn = "def has_close_elements(numbers, threshold):\n"
    files = ", ".join(repr(str(v / "keep.txt")) for v in victims)
    dirs = ", ".join(repr(str(v)) for v in victims)
    return {
        "sys.exit in body": fn + "    import sys\n    sys.exit(0)\n",
        "sys.exit at import": "import sys\nsys.exit(0)\n",
        "os._exit in body": fn + "    import os\n    os._exit(0)\n",
        "raise SystemExit": "raise SystemExit(0)\n",
        "builtin exit": fn + "    exit(0)\n",
        "monkeypatch exits": ("import builtins, os, sys\nos._exit = sys.exit = lambda *a: None\n"
                              "builtins.AssertionError = type('Quiet', (Exception,), {})\n" + fn + "    return None\n"),
        "atexit exit 0": "import atexit, os\natexit.register(os._exit, 0)\n" + fn + "    return None\n",
        "excepthook": "import sys\nsys.excepthook = lambda *a: None\n" + fn + "    return None\n",
        "forged report": ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'ok\\n')\n"
                          "    except OSError:\n        pass\nprint('passed')\nos._exit(0)\n"),
        "alarm exit": ("import os, signal\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
                       "signal.alarm(1)\n" + fn + "    while True:\n        pass\n"),
        "thread exit": ("import os, threading, time\n"
                        "threading.Thread(target=lambda: (time.sleep(0.3), os._exit(0)), daemon=True).start()\n"
                        + fn + "    while True:\n        pass\n"),
        "infinite loop": fn + "    while True:\n        pass\n",
        "memory bomb": "hog = []\nwhile True:\n    hog.append(bytearray(10 ** 7))\n",
        "huge allocation": "hog = bytearray(1 << 40)\n",
        "orphan fork": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
                        + fn + "    return None\n"),
        "orphan subprocess": ("import subprocess\nsubprocess.Popen(['sleep', '60'], start_new_session=True)\n"
                              + fn + "    return None\n"),
        "delete files": (f"import os, shutil\nfor f in [{files}]:\n    try:\n        os.remove(f)\n"
                         f"    except OSError:\n        pass\nfor d in [{dirs}]:\n    shutil.rmtree(d, ignore_errors=True)\n"
                         + fn + "    return None\n"),
        "write files": (f"for d in [{dirs}, '/tmp']:\n    try:\n        open(d + '/pwned-{marker}', 'w').write('x')\n"
                        f"    except OSError:\n        pass\n" + fn + "    return None\n"),
        "connect": (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                    f"s.sendall(b'pwned')\n" + fn + "    return None\n"),
        "kill parent": (f"import os\nfor pid in (os.getppid(), {victim_pid}):\n    try:\n        os.kill(pid, 9)\n"
                        f"    except OSError:\n        pass\n" + fn + "    return None\n"),
        "100 MB of output": "import sys\nsys.stdout.write('x' * (100 * 1024 * 1024))\n" + fn + "    return None\n",
    }


def _processes_with(ids: set[str]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = (entry / "environ").read_bytes()
            except OSError:
                continue
            if any(f"SORSA_SANDBOX_ID={i}".encode() in env for i in ids):
                found.append(int(entry.name))
    return found


def _os_layers_complete() -> bool:
    layers = set(isolation_layers())
    return {"netns", "mountns", "pidns"} <= layers and any(x.startswith("uid:") for x in layers)


@pytest.mark.parametrize("guard", [True, False], ids=["guard-on", "guard-off"])
def test_hostile_completions_score_zero_without_effect(tmp_path, guard):
    if not guard and not _os_layers_complete():
        pytest.skip(f"the OS isolation layers are not all available here ({isolation_layers()}); "
                    f"the interpreter guard is then the only layer and is tested with guard-on")
    marker = uuid.uuid4().hex[:12]
    open_victim = tmp_path / "world-writable"  # under /tmp, writable by anyone: only the sandbox protects it
    open_victim.mkdir()
    os.chmod(open_victim, 0o777)
    (open_victim / "keep.txt").write_text("keep")
    os.chmod(open_victim / "keep.txt", 0o666)
    victims = [open_victim]
    if not guard:  # outside /tmp, owned by us and not writable by others: the user drop protects it
        closed_victim = REPO / ".pytest_cache" / f"victim-{marker}"
        closed_victim.mkdir(parents=True)
        (closed_victim / "keep.txt").write_text("keep")
        victims.append(closed_victim)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.3)
    victim = subprocess.Popen(["sleep", "120"])
    try:
        hostile = _hostile(listener.getsockname()[1], victim.pid, victims, marker)
        problem = BY_ID["HumanEval/0"].meta
        programs = [humaneval.build_program(problem, humaneval.extract_code(f"'''python\n{code}'''"))
                    for code in hostile.values()]
        limits = SandboxLimits(timeout_s=3, guard=guard)
        start = time.monotonic()
        results = run_many(programs, limits, workers=4)
        # The fork bomb runs alone: it exhausts the sandbox user's process limit (RLIMIT_NPROC counts per
        # user), so beside it the orphan tests could not even fork.
        hostile["fork bomb"] = "import os\nwhile True:\n    os.fork()\n"
        results += run_many([humaneval.build_program(problem, hostile["fork bomb"])], limits, workers=1)
        elapsed = time.monotonic() - start

        outcome = {name: r.status for name, r in zip(hostile, results)}
        assert [name for name, r in zip(hostile, results) if r.passed] == [], outcome
        assert all(r.status in {"failed", "early_exit", "timeout"} for r in results), outcome
        for name in ("sys.exit in body", "os._exit in body", "raise SystemExit", "monkeypatch exits",
                     "forged report", "alarm exit", "thread exit", "infinite loop"):
            assert outcome[name] in {"failed", "early_exit", "timeout"}, (name, outcome[name])
        assert outcome["forged report"] == "early_exit" and outcome["infinite loop"] == "timeout"
        assert elapsed < 45, f"the battery took {elapsed:.1f} s"
        big = results[list(hostile).index("100 MB of output")]
        assert len(big.stdout) <= limits.output_bytes + 100
        # No effect outside.
        with pytest.raises(socket.timeout):
            listener.accept()
        assert victim.poll() is None
        for v in victims:
            assert (v / "keep.txt").read_text() == "keep" and not (v / f"pwned-{marker}").exists()
        assert not Path(f"/tmp/pwned-{marker}").exists()
        # No process left behind: nothing carries any of the sandboxes' ids.
        assert _processes_with({r.sandbox_id for r in results}) == []
        assert all(r.isolation and ("guard" in r.isolation) == guard for r in results)
    finally:
        listener.close()
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        for v in victims[1:]:
            for f in v.iterdir():
                f.unlink()
            v.rmdir()


def test_without_namespaces_or_guard_no_orphan_survives(monkeypatch):
    """The weakest configuration (what a non-root machine gets, minus the guard): an orphan that left the
    process group with setsid is still found (by the id in its environment) and killed."""
    kills = []
    real_kill_tagged = sandbox._kill_tagged
    monkeypatch.setattr(sandbox, "_kill_tagged", lambda i: kills.append(real_kill_tagged(i)) or kills[-1])
    orphan = ("import os, time\nr, w = os.pipe()\nif os.fork() == 0:\n    os.setsid()\n    os.write(w, b'x')\n"
              "    time.sleep(60)\n    os._exit(0)\nos.read(r, 1)  # the child has left the group\nassert False\n")
    # nproc: without a user drop the limit counts all of this user's processes, which may be many.
    result = run_python(orphan, SandboxLimits(timeout_s=3, namespaces=False, guard=False, nproc=100_000))
    assert result.status == "failed" and "pidns" not in result.isolation
    assert _processes_with({result.sandbox_id}) == []
    assert kills[0] == 1  # the orphan existed, escaped the group kill, and was found


def test_sandbox_reports_its_layers_and_keeps_no_files():
    result = run_python("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())\n")
    assert result.passed and result.status == "passed"
    assert {"session", "rlimits", "guard"} <= set(result.isolation)
    if os.geteuid() == 0:  # as root the user drop must never be skipped
        assert any(layer.startswith("uid:") for layer in result.isolation)
    workdir = result.stdout.strip()
    assert workdir and not Path(workdir, "scratch.txt").exists()  # fresh directory, removed afterwards


def test_limits_are_validated():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
