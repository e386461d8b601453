"""Run untrusted code (model-written Python or a command) in a separate, limited process.

Every run gets a fresh temporary directory as its working directory and these limits:
CPU seconds, address space (RLIMIT_AS), file size, number of processes and wall-clock time.

Isolation, strongest first (`SandboxResult.isolation` says which one a run got):
- "jail" (root, Linux): the child unshares a new network namespace (only a downed loopback:
  every connect fails) and a new mount namespace, chroots into a tmpfs holding read-only bind
  mounts of /usr, the Python installation and a few /dev nodes, with the work directory at
  /sandbox and a small private /tmp, and then drops to a uid of its own (so RLIMIT_NPROC
  holds and leftover processes can all be killed). Nothing of the host's /etc, /root or
  /home is visible; outside /sandbox and /tmp the tree is read-only.
- "rlimits" (elsewhere): the same limits and temporary directory, the current user, and
  for Python code an audit hook that refuses socket connects, binds and DNS look-ups. A
  command (not Python) then has network access and can read what the user can read;
  RLIMIT_NPROC counts all of the user's processes (and root ignores it), and processes
  that leave the process group are not swept up. Python code that uses ctypes can get past
  the audit hook: only the jail is a boundary.

A `fault` (timeout, memory, filesize, processes, crash, sandbox) is the sandbox stopping the
code or failing itself; it is not the program's verdict, and trainers leave it out.
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

_CLONE_NEWNS, _CLONE_NEWNET = 0x00020000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT = 1, 2, 4, 32
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_UID_BASE = 200_000  # uids from here on are the sandbox's own: 16 per host process
_OUTPUT_LIMIT = 64 * 1024

# Python that refuses the network before running main.py (used in both modes).
_BOOT = (
    "import os, sys\n"
    "def _guard(event, args):\n"
    "    if event in ('socket.connect', 'socket.bind', 'socket.getaddrinfo', 'socket.sendto'):\n"
    "        raise PermissionError('network access is disabled in the sandbox')\n"
    "sys.addaudithook(_guard)\n"
    "sys.path.insert(0, os.getcwd())\n"
    "sys.argv = sys.argv[1:]\n"
    "import runpy\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 5
    wall_s: float = 10.0
    memory_mb: int = 512
    file_mb: int = 8
    processes: int = 16


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # negative: killed by that signal; None: never started
    fault: str | None  # None, or timeout / memory / filesize / processes / crash / sandbox
    wall_s: float
    isolation: str  # "jail" or "rlimits"
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.fault is None and self.exit_code == 0


def run_python(source: str, files: dict[str, str] | None = None, limits: Limits = Limits(),
               args: list[str] | None = None) -> SandboxResult:
    """Run Python `source` as main.py beside `files` (relative path -> text)."""
    all_files = dict(files or {})
    all_files["main.py"] = source
    argv = [_python_in_sandbox(), "-S", "-s", "-B", "-c", _BOOT, "main.py", *(args or [])]
    return run_command(argv, all_files, limits)


def run_command(argv: list[str], files: dict[str, str] | None = None,
                limits: Limits = Limits()) -> SandboxResult:
    """Run `argv` in a fresh temporary directory holding `files`."""
    mode = isolation_mode()
    work = Path(tempfile.mkdtemp(prefix="onthejob-sandbox-"))
    try:
        box = work / "box"
        box.mkdir()
        _write_files(box, files or {})
        uid = _next_uid() if mode == "jail" else None
        if uid is not None:
            for path in [box, *box.rglob("*")]:
                os.lchown(path, uid, uid)
        return _run(argv, work, box, limits, mode, uid)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_files(box: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"sandbox file path {name!r} must be relative and stay inside")
        target = box.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


_uid_counter = 0


def _next_uid() -> int:
    global _uid_counter
    _uid_counter += 1
    return _UID_BASE + os.getpid() * 16 + _uid_counter % 16


def _python_in_sandbox() -> str:
    # The base interpreter: the sandbox sees the Python installation, not our virtualenv.
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def _set_limits(limits: Limits) -> None:
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def _libc_call(name: str, *args) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{args!r}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _libc_call("mount", enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3])


def _bind_readonly(source: str, root: str) -> None:
    target = root + source
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(source, target, None, _MS_BIND | _MS_REC)
    _mount(None, target, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID)


def _jail_paths() -> tuple[list[str], list[tuple[str, str]]]:
    """Directories and files to bind read-only, and symlinks to recreate, inside the jail."""
    binds, links = [], []
    for top in ("/usr", "/bin", "/lib", "/lib64", "/sbin"):
        if os.path.islink(top):
            links.append((os.readlink(top), top))
        elif os.path.isdir(top):
            binds.append(top)
    prefix = os.path.realpath(sys.base_prefix)
    if not prefix.startswith("/usr/"):
        binds.append(prefix)
    binds += [p for p in ("/etc/ld.so.cache", "/dev/null", "/dev/zero", "/dev/urandom",
                          "/dev/random") if os.path.exists(p)]
    return binds, links


def _enter_jail(root: str, box: str, uid: int, limits: Limits) -> None:
    """Runs in the child between fork and exec (as root)."""
    binds, links = _jail_paths()
    _libc_call("unshare", _CLONE_NEWNS | _CLONE_NEWNET)
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
    for path in binds:
        _bind_readonly(path, root)
    for target, name in links:
        os.symlink(target, root + name)
    os.makedirs(root + "/sandbox")
    _mount(box, root + "/sandbox", None, _MS_BIND)
    os.makedirs(root + "/tmp")
    _mount("tmpfs", root + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={limits.file_mb}m,mode=1777")
    _mount(None, root, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV,
           "size=1m,mode=0755")
    os.chroot(root)
    os.chdir("/sandbox")
    _set_limits(limits)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _run(argv: list[str], work: Path, box: Path, limits: Limits, mode: str,
         uid: int | None) -> SandboxResult:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/sandbox" if uid is not None else str(box)}
    if uid is not None:
        root = work / "root"
        root.mkdir()

        def prepare() -> None:
            _enter_jail(str(root), str(box), uid, limits)
        cwd = None
    else:
        def prepare() -> None:
            _set_limits(limits)
        cwd = str(box)
    started = time.monotonic()
    with open(work / "stdout", "w+b") as out, open(work / "stderr", "w+b") as err:
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, preexec_fn=prepare,
                                    start_new_session=True)
        except (OSError, subprocess.SubprocessError) as exc:
            return SandboxResult("", "", None, "sandbox", time.monotonic() - started, mode,
                                 [f"could not start: {exc}"])
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_all(proc, uid)
        wall = time.monotonic() - started
        stdout, stderr = _read(out), _read(err)
    fault = "timeout" if timed_out else _classify(proc.returncode, stderr)
    notes = []
    if timed_out:
        notes.append(f"wall-clock limit of {limits.wall_s} s reached")
    return SandboxResult(stdout, stderr, proc.returncode, fault, wall, mode, notes)


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the process, its group, and (jail) every process of the sandbox's uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None:
        # kill(-1) as the sandbox's uid reaches every process it started, even ones that
        # left the process group, and nothing else.
        # Repeat while something was signalled: a fork bomb may fork during the sweep.
        for _ in range(5):
            swept = subprocess.run(["/bin/kill", "-9", "-1"], user=uid, group=uid,
                                   extra_groups=[], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, check=False)
            if swept.returncode != 0:
                break
            time.sleep(0.01)
    proc.wait()


def _read(handle) -> str:
    handle.seek(0)
    data = handle.read(_OUTPUT_LIMIT + 1)
    text = data[:_OUTPUT_LIMIT].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > _OUTPUT_LIMIT else "")


def _classify(code: int, stderr: str) -> str | None:
    if code in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"  # the CPU limit sends SIGXCPU, then SIGKILL
    if code == -signal.SIGXFSZ or (code and "File too large" in stderr):
        return "filesize"
    if code and "MemoryError" in stderr:
        return "memory"
    if code and "BlockingIOError" in stderr and "Resource temporarily unavailable" in stderr:
        return "processes"
    if code is not None and code < 0:
        return "crash"
    return None


@functools.cache
def isolation_mode() -> str:
    """'jail' where this process may build one (root on Linux, checked once), else 'rlimits'."""
    if os.environ.get("ONTHEJOB_SANDBOX") == "rlimits" or not hasattr(os, "getuid"):
        return "rlimits"
    if os.getuid() != 0 or sys.platform != "linux":
        return "rlimits"
    work = Path(tempfile.mkdtemp(prefix="onthejob-sandbox-probe-"))
    try:
        (work / "box").mkdir()
        uid = _next_uid()
        os.chown(work / "box", uid, uid)
        result = _run(["/bin/true"], work, work / "box", Limits(), "jail", uid)
        return "jail" if result.ok else "rlimits"
    finally:
        shutil.rmtree(work, ignore_errors=True)
