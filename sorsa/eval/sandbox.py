"""Running untrusted Python (HumanEval completions) in a separate, isolated, resource-limited process.

Layers, each applied where the OS allows it (`SandboxResult.isolation` names those that were active):
a new session (own process group, killed afterwards); a wall-clock timeout; RLIMIT_AS / CPU / NPROC /
FSIZE / CORE; a fresh working directory; stdout/stderr to files capped by RLIMIT_FSIZE, of which at most
`output_bytes` are read back; as root also a new network namespace (no network), a private mount namespace
(/tmp, /var/tmp, /dev/shm replaced by an empty size-capped tmpfs), a PID namespace (when its first process
dies the kernel kills every process left in it) and a drop to an unprivileged user (`nobody`); and a guard
in the interpreter (process, signal, deletion, network calls and ctypes disabled; writes outside the
working directory refused). A program passes ONLY when the child wrote a random nonce, known to the parent
alone until then, to an inherited pipe after the program returned: an early `sys.exit(0)`, `os._exit(0)`,
`raise SystemExit` or a printed "passed" is a failure. Without a PID namespace, processes that left the
group are found afterwards by an id in their environment and killed. The nonce does not stop a program that searches the
interpreter's memory for it; the layers above are what contain such a program.
"""
from __future__ import annotations

import functools
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from ..core.errors import UserError

HARNESS = Path(__file__).with_name("sandbox_harness.py")


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run. `cpu_s` None means the wall-clock timeout plus one second."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    cpu_s: int | None = None
    nproc: int = 64
    file_size_mb: int = 4
    output_bytes: int = 16384
    tmpfs_mb: int = 64
    user: str = "nobody"
    namespaces: bool = True
    guard: bool = True

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_mb", "nproc", "file_size_mb", "output_bytes", "tmpfs_mb"):
            if getattr(self, name) <= 0:
                raise UserError(f"SandboxLimits.{name} = {getattr(self, name)!r}; expected a positive number")


@dataclass
class SandboxResult:
    """passed: the nonce arrived after the program returned, the process exited 0, within the timeout.
    status: "passed", "failed" (an exception or a signal), "early_exit" (exit 0 without the nonce),
    "timeout", or "error" (the sandbox itself could not run)."""

    passed: bool
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    isolation: list[str] = field(default_factory=list)
    sandbox_id: str = ""


def _sandbox_user(name: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534  # the conventional uid/gid of nobody


def _read_head(path: Path, limit: int) -> str:
    with path.open("rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + "\n[... output truncated]" if len(data) > limit else text


def _read_pipe(fd: int, limit: int = 65536) -> bytes:
    """What is already in the pipe, without blocking (a survivor could hold the write end open)."""
    os.set_blocking(fd, False)
    chunks, total = [], 0
    try:
        while total < limit:
            chunk = os.read(fd, limit - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    return b"".join(chunks)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_tagged(sandbox_id: str) -> int:
    """SIGKILL every process whose environment carries this sandbox's id (ones that left the process
    group with setsid); the fallback when there is no PID namespace. Returns how many were found."""
    tag, killed = f"SORSA_SANDBOX_ID={sandbox_id}".encode(), []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    if tag not in f.read():
                        continue
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except OSError:
                continue
    # SIGKILL is delivered asynchronously: wait (briefly) until each one is gone or a zombie, so that
    # "no survivor" holds when this returns.
    deadline = time.monotonic() + 2.0
    for pid in killed:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.01)
    return len(killed)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"  # the state field follows the name
    except (OSError, IndexError):
        return False


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `program` (Python source) once in the sandbox; see the module docstring for what is enforced."""
    start = time.monotonic()
    sandbox_id = secrets.token_hex(8)
    nonce = secrets.token_hex(32)  # never written anywhere the program can read before it returns
    uid, gid = _sandbox_user(limits.user)
    base = Path(tempfile.mkdtemp(prefix="sorsa-sandbox-"))
    # 0711: the sandbox user may pass through to work/ but cannot list or open the output files here.
    os.chmod(base, 0o711)
    work = base / "work"
    work.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(work, uid, gid)
    header = {"nonce": nonce, "workdir": str(work), "uid": uid, "gid": gid, "guard": limits.guard,
              "namespaces": limits.namespaces, "memory_bytes": limits.memory_mb << 20,
              "cpu_seconds": int(limits.cpu_s or int(limits.timeout_s) + 1), "nproc": limits.nproc,
              "file_size_bytes": limits.file_size_mb << 20, "tmpfs_mb": limits.tmpfs_mb}
    # The program and the nonce travel in an unlinked temporary file, read once by the harness.
    source = tempfile.TemporaryFile()  # noqa: SIM115
    source.write(json.dumps(header).encode() + b"\n" + program.encode("utf-8", errors="surrogatepass"))
    source.seek(0)
    result_r, result_w = os.pipe()
    try:
        try:
            returncode, timed_out = _run_harness(base, work, source, result_w, limits, sandbox_id)
        except OSError as e:
            return SandboxResult(False, "error", None, "", f"could not start the sandbox: {e}",
                                 time.monotonic() - start, [], sandbox_id)
        report = _read_pipe(result_r).decode("utf-8", errors="replace").splitlines()
        result_r = -1
        isolation = _isolation_layers(report)
        if "pidns" not in isolation and os.path.isdir("/proc"):
            for _ in range(5):  # again while any turn up: one may have forked between scan and kill
                if not _kill_tagged(sandbox_id):
                    break
        status = _status(timed_out, bool(report) and report[-1] == nonce, returncode)
        return SandboxResult(status == "passed", status, returncode,
                             _read_head(base / "stdout", limits.output_bytes),
                             _read_head(base / "stderr", limits.output_bytes),
                             time.monotonic() - start, isolation, sandbox_id)
    finally:
        _close(result_r)
        shutil.rmtree(base, ignore_errors=True)


def _run_harness(base: Path, work: Path, source, result_w: int, limits: SandboxLimits,
                 sandbox_id: str) -> tuple[int | None, bool]:
    """Start the harness on `source` in its own session, wait up to the timeout, then kill whatever is left
    of it; returns (exit status, timed out). `result_w` and `source` are closed here."""
    control_r, control_w = os.pipe()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work),
           "SORSA_SANDBOX_ID": sandbox_id}
    timed_out = False
    try:
        with (base / "stdout").open("wb") as out, (base / "stderr").open("wb") as err:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", str(HARNESS), str(source.fileno()), str(result_w), str(control_w)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=work, env=env, close_fds=True,
                    pass_fds=(source.fileno(), result_w, control_w), start_new_session=True)
            finally:
                os.close(result_w)
                os.close(control_w)
                source.close()
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                control = _read_pipe(control_r).split()
                control_r = -1
                if proc.poll() is None and control:
                    # The outer harness still lives, so the inner's PID is not reusable yet (it waits with
                    # WNOWAIT): kill the inner directly, in case it left the process group.
                    try:
                        os.kill(int(control[0]), signal.SIGKILL)
                    except (ProcessLookupError, PermissionError, ValueError):
                        pass
                _kill_group(proc.pid)
                returncode = proc.wait()
        return returncode, timed_out
    finally:
        _close(control_r)


def _isolation_layers(report: list[str]) -> list[str]:
    """The isolation layers the harness reported on its first line (none if it reported nothing)."""
    if not report:
        return []
    try:
        return list(json.loads(report[0]).get("layers", []))
    except (ValueError, AttributeError):
        return []


def _status(timed_out: bool, got_nonce: bool, returncode: int | None) -> str:
    """passed: exited 0 after reporting the nonce (check() returned); early_exit: exited 0 without it."""
    if timed_out:
        return "timeout"
    if got_nonce and returncode == 0:
        return "passed"
    return "early_exit" if returncode == 0 else "failed"


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def run_many(programs: list[str], limits: SandboxLimits = SandboxLimits(), workers: int = 4,
             progress=None) -> list[SandboxResult]:
    """Run each program in its own sandbox, at most `workers` at a time; results in input order.
    `progress(i, result)` is called as each finishes."""
    if workers < 1:
        raise UserError(f"workers = {workers!r}; expected at least 1")
    results: list[SandboxResult | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_python, p, limits): i for i, p in enumerate(programs)}
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            if progress is not None:
                progress(i, results[i])
    return results  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def isolation_layers(limits: SandboxLimits = SandboxLimits()) -> tuple[str, ...]:
    """The isolation layers active on this machine (from a trivial probe run), e.g. for results.json."""
    result = run_python("pass\n", limits)
    return tuple(result.isolation)
