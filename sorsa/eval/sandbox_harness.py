"""The child side of `eval.sandbox`: isolates itself, runs one untrusted program, reports success with a nonce.

Run as `python -I sandbox_harness.py INPUT_FD RESULT_FD CONTROL_FD` by `eval.sandbox` only (stdlib only;
it must not import the project). INPUT_FD holds one JSON header line (settings and the nonce), then the
program. The process ("outer") applies the namespaces, forks the "inner" process that runs the program,
and waits for it. Only the inner process ever holds RESULT_FD open for writing; it writes the nonce there
after the program (which ends in `check(entry_point)`) returned normally, and nowhere else.
"""
import json
import os
import resource
import sys

# Linux constants (sched.h, sys/mount.h); Python 3.11 has no os.unshare, so libc is called through ctypes.
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
# Never covered by a tmpfs to expose the interpreter (see `_private_mounts`).
SYSTEM_DIRS = {"/", "/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/dev", "/sys", "/tmp", "/var"}
# Imported before the privilege drop when the sandbox user cannot read the interpreter's library.
PREIMPORT = ("math", "cmath", "re", "string", "collections", "collections.abc", "itertools", "functools",
             "heapq", "bisect", "hashlib", "random", "typing", "fractions", "decimal", "datetime", "copy",
             "operator", "statistics", "json", "array", "numbers", "traceback", "linecache", "tokenize")


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _unshare(flag: int) -> bool:
    ctypes, libc = _libc()
    return libc.unshare(ctypes.c_int(flag)) == 0


def _first_closed_dir(path: str) -> str | None:
    """The outermost directory on `path` that other users cannot enter (no o+x), or None."""
    current = "/"
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & 0o001:
            return current
    return None


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _private_mounts(cover: list[str], size_mb: int) -> tuple[bool, bool]:
    """A private mount namespace in which each directory of `cover` (the world-writable ones) is an empty,
    size-capped tmpfs, so writes there vanish with the sandbox. Returns (all of `cover` is private, the
    import path is readable by the sandbox user).

    The interpreter's import path must stay importable after the user drop: a directory of it that lies
    under a covered directory, or under one other users cannot enter (e.g. pyenv under /root, mode 0700),
    is held by an O_PATH descriptor, its closed ancestor is covered by an empty tmpfs too (which also
    hides everything else in it, e.g. ~/.ssh), and the directory is bind-mounted back at its own path."""
    if not _unshare(CLONE_NEWNS):
        return False, False
    ctypes, libc = _libc()
    if libc.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None) != 0:
        return False, False  # unshared but still propagating: do not mount anything
    cover = [c for c in cover if os.path.isdir(c)]
    paths = sorted({os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}, key=len)
    paths = [p for i, p in enumerate(paths) if not any(_under(p, q) for q in paths[:i])]
    keep, closed_tops = {}, set()
    for path in paths:
        closed = _first_closed_dir(path)
        covered = any(_under(path, c) for c in cover)
        if closed is not None and not any(_under(closed, c) for c in cover):
            closed_tops.add(closed)
        if closed is not None or covered:
            keep[path] = os.open(path, os.O_PATH | os.O_DIRECTORY)
    readable = not any(top in SYSTEM_DIRS for top in closed_tops)
    tops = [(c, "1777") for c in cover] + ([(t, "0755") for t in sorted(closed_tops)] if readable else [])
    for top, mode in tops:
        if libc.mount(b"tmpfs", top.encode(), b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV),
                      f"size={size_mb}m,mode={mode}".encode()) != 0:
            # A partial cover: report no private mounts (the host work dir is used) and preimport.
            return False, False
    for path, fd in keep.items():
        if readable or any(_under(path, c) for c in cover):
            os.makedirs(path, mode=0o755, exist_ok=True)
            if libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None,
                          ctypes.c_ulong(MS_BIND | MS_REC), None) != 0:
                readable = False
        os.close(fd)
    return True, readable


def _disabled(name: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the HumanEval sandbox")

    return refuse


def install_guard(workdir: str) -> None:
    """Second layer, for when the OS layers are missing: disable process, signal, deletion and network
    calls, refuse writes outside `workdir`, and block ctypes (the way around all of this)."""
    import builtins
    import io
    import shutil
    import socket
    import subprocess

    for name in ("kill", "killpg", "fork", "forkpty", "setsid", "setpgid", "setpgrp", "system", "popen",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl",
                 "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
                 "posix_spawnp", "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace",
                 "truncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chdir",
                 "fchdir", "link", "symlink", "mkfifo", "mknod", "setuid", "setgid",
                 "seteuid", "setegid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
                 "nice", "plock", "sched_setaffinity", "pidfd_open"):
        if hasattr(os, name):
            setattr(os, name, _disabled(f"os.{name}"))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, _disabled(f"shutil.{name}"))
    for name in ("Popen", "call", "run", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, _disabled(f"subprocess.{name}"))
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, name, _disabled(f"socket.{name}"))
    for name in ("ctypes", "_ctypes", "multiprocessing", "_posixsubprocess", "pty", "resource"):
        sys.modules[name] = None  # `import ctypes` now raises ImportError

    root = os.path.realpath(workdir)
    real_open, real_os_open = io.open, os.open

    def inside(path) -> bool:
        if isinstance(path, int):  # an already-open descriptor
            return True
        full = os.path.realpath(os.fspath(path))
        return full == root or full.startswith(root + os.sep)

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"writing {file!r} is outside the HumanEval sandbox")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and not inside(path):
            raise PermissionError(f"writing {path!r} is outside the HumanEval sandbox")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open


def _limit(kind: int, value: int) -> None:
    soft, hard = resource.getrlimit(kind)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))


def _drop_root(cfg: dict, layers: list, exit_now) -> None:
    """Become the sandbox user for good (root only); the process exits if the drop could be undone."""
    if "mountns" not in layers or "interpreter-hidden" in layers:
        # The import path may be unreadable once we are `nobody`: load the usual modules now.
        import importlib

        for name in PREIMPORT:
            importlib.import_module(name)
        layers.append("preimport")
    os.setgroups([])
    os.setgid(cfg["gid"])
    os.setuid(cfg["uid"])
    try:  # the drop must be irreversible
        os.setuid(0)
    except PermissionError:
        layers.append(f"uid:{cfg['uid']}")
    else:
        exit_now(3)


def run_inner(cfg: dict, program: str, nonce: str, result_fd: int, layers: list) -> None:
    """The inner process: limits, working directory, privilege drop, guard, then the program."""
    write, exit_now = os.write, os._exit  # kept before the program can monkeypatch os
    # Limits first, while still root (lowering is always allowed; raising later is not).
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_AS, cfg["memory_bytes"])
    _limit(resource.RLIMIT_CPU, cfg["cpu_seconds"])
    _limit(resource.RLIMIT_FSIZE, cfg["file_size_bytes"])
    _limit(resource.RLIMIT_NPROC, cfg["nproc"])
    layers.append("rlimits")
    workdir = cfg["workdir"]
    if "mountns" in layers:  # the fresh tmpfs is private and size-capped: work there
        workdir = "/tmp/sandbox"
        os.mkdir(workdir, 0o700)
        if os.geteuid() == 0:
            os.chown(workdir, cfg["uid"], cfg["gid"])
    os.chdir(workdir)
    os.environ.update(HOME=workdir, TMPDIR="/tmp" if "mountns" in layers else workdir)
    if cfg["guard"]:
        import shutil, socket, subprocess  # noqa: E401,F401  (the guard patches them; load while readable)
    if os.geteuid() == 0:
        _drop_root(cfg, layers, exit_now)
    if cfg["guard"]:
        install_guard(workdir)
        layers.append("guard")
    write(result_fd, (json.dumps({"layers": layers}) + "\n").encode())
    sys.stdin = open(os.devnull)  # noqa: SIM115
    # `__name__` is not "__main__", so a completion's `if __name__ == "__main__":` demo block does not
    # run (it often waits on input()); fresh globals keep the harness's names out of the program's scope.
    namespace = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    try:
        exec(compile(program, "<humaneval>", "exec"), namespace)  # noqa: S102  (the point of the sandbox)
    except BaseException:  # noqa: BLE001  (SystemExit included: an early exit is a failure)
        import traceback

        try:
            traceback.print_exc(limit=5)
            sys.stderr.flush()
        finally:
            exit_now(1)
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001
        pass
    write(result_fd, (nonce + "\n").encode())
    exit_now(0)


def main() -> None:
    input_fd, result_fd, control_fd = (int(a) for a in sys.argv[1:4])
    with os.fdopen(input_fd, "rb") as f:
        header, _, body = f.read().partition(b"\n")
    cfg = json.loads(header)
    nonce, program = cfg.pop("nonce"), body.decode("utf-8")
    layers = ["session"]  # the parent started us in a new session (our own process group)
    if cfg["namespaces"] and os.geteuid() == 0:
        if _unshare(CLONE_NEWNET):  # a new network namespace has only a loopback device, and it is down
            layers.append("netns")
        private, readable = _private_mounts(["/tmp", "/var/tmp", "/dev/shm"], cfg["tmpfs_mb"])
        if private:
            layers.append("mountns")
            if not readable:
                layers.append("interpreter-hidden")
        if _unshare(CLONE_NEWPID):  # the inner process becomes PID 1: when it dies, the kernel kills the rest
            layers.append("pidns")
    pid = os.fork()
    if pid == 0:
        os.close(control_fd)
        try:
            run_inner(cfg, program, nonce, result_fd, layers)
        except BaseException as e:  # noqa: BLE001  (the harness itself failed: say why, never pass)
            os.write(2, f"sandbox harness error: {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(4)
    os.close(result_fd)
    os.write(control_fd, f"{pid}\n".encode())  # the parent kills this PID directly if we overrun
    os.close(control_fd)
    # WNOWAIT: the inner stays a zombie, so its PID cannot be reused while we live.
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    code = info.si_status if info.si_code == os.CLD_EXITED else 128 + info.si_status
    os._exit(code)


if __name__ == "__main__":
    main()
