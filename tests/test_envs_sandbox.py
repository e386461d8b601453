"""The sandbox: each limit holds, faults are told apart from ordinary failures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from onthejob.envs import sandbox
from onthejob.envs.sandbox import Limits, run_command, run_python

FAST = Limits(cpu_s=2, wall_s=5, memory_mb=256, file_mb=4, processes=16)
JAILED = sandbox.isolation_mode() == "jail"
needs_jail = pytest.mark.skipif(not JAILED, reason="the jail needs root on Linux; this run "
                                "has rlimits only (see onthejob.envs.sandbox)")


def test_ordinary_run_and_ordinary_failure_are_not_faults():
    ok = run_python("import sys\nprint('hello', sys.argv[1:])", args=["a"], limits=FAST)
    assert ok.ok and ok.stdout == "hello ['a']\n" and ok.fault is None
    failed = run_python("raise SystemExit(3)", limits=FAST)
    assert failed.exit_code == 3 and failed.fault is None and not failed.ok
    error = run_python("1 / 0", limits=FAST)
    assert error.exit_code == 1 and error.fault is None and "ZeroDivisionError" in error.stderr


def test_files_are_given_and_cwd_is_a_fresh_directory():
    result = run_python("import os, helper\nprint(sorted(os.listdir('.')), helper.X)",
                        files={"helper.py": "X = 7\n", "data/in.txt": "hi"}, limits=FAST)
    assert result.ok, result.stderr
    assert result.stdout.strip() == "['data', 'helper.py', 'main.py'] 7"
    with pytest.raises(ValueError, match="relative"):
        run_python("pass", files={"../x.py": ""})


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    result = run_python("while True:\n    pass", limits=Limits(cpu_s=1, wall_s=10))
    # Stopped by the CPU limit's signal, not by the wall clock that would stop it at 10 s.
    assert result.fault == "timeout" and not result.notes
    assert result.exit_code in (-signal.SIGXCPU, -signal.SIGKILL)


def test_sleeping_forever_is_stopped_by_the_wall_clock_limit():
    result = run_python("import time\ntime.sleep(60)\nprint('woke')",
                        limits=Limits(cpu_s=5, wall_s=1))
    assert result.fault == "timeout" and "wall-clock" in result.notes[0]
    assert result.exit_code == -signal.SIGKILL and "woke" not in result.stdout


def test_memory_bomb_is_stopped():
    result = run_python("x = []\nwhile True:\n    x.append(bytearray(50_000_000))", limits=FAST)
    assert result.fault == "memory" and "MemoryError" in result.stderr


@needs_jail
def test_fork_bomb_is_stopped_and_cleaned_up():
    source = "import os, time\nfor _ in range(200):\n    os.fork()\ntime.sleep(30)"
    result = run_python(source, limits=Limits(cpu_s=2, wall_s=3, processes=8))
    assert result.fault in ("processes", "timeout")
    assert "Resource temporarily unavailable" in result.stderr or result.fault == "timeout"
    deadline = time.monotonic() + 3
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)  # SIGKILL is delivered asynchronously; orphans are reaped by init
    assert not _sandbox_processes()  # every forked child was killed


def _sandbox_processes() -> list[str]:
    """Live (not zombie) processes of any sandbox uid."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines()
                          if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) >= sandbox._UID_BASE and "Z" not in fields["State"]:
            found.append(status.parent.name)
    return found


def test_big_file_write_is_stopped():
    result = run_python("open('big', 'wb').write(b'x' * 20_000_000)", limits=FAST)
    assert result.fault == "filesize"


class LoopbackServer:
    """A TCP server on 127.0.0.1 that records every connection it accepts. It serves on its
    own thread for at most `seconds` and then stops itself, so a test cannot leave it behind."""

    def __init__(self, seconds: float = 30.0) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._deadline = time.monotonic() + seconds
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.close()
        self.sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def loopback():
    server = LoopbackServer()
    yield server
    server.close()


def _connect_code(port: int) -> str:
    return ("import socket\ns = socket.socket()\ns.settimeout(2)\n"
            f"s.connect(('127.0.0.1', {port}))\nprint('connected')")


def test_a_server_on_loopback_is_reachable_outside_and_not_from_the_sandbox(loopback):
    # The same code outside the sandbox connects: the server is there to be reached.
    outside = subprocess.run([sys.executable, "-c", _connect_code(loopback.port)],
                             capture_output=True, text=True, timeout=30)
    assert outside.stdout.strip() == "connected", outside.stderr
    assert loopback.accepted == 1
    result = run_python(_connect_code(loopback.port), limits=FAST)
    assert "connected" not in result.stdout and result.exit_code != 0
    time.sleep(0.3)  # a connection that got through would be accepted by now
    assert loopback.accepted == 1


@needs_jail
def test_network_namespace_has_no_route_even_without_the_audit_hook(loopback):
    # A command (no audit hook): the only protection is the empty network namespace, whose
    # own loopback is down, so the host's loopback server is out of reach.
    code = ("import socket\ns = socket.socket()\ns.settimeout(2)\n"
            f"print(s.connect_ex(('1.1.1.1', 80)), s.connect_ex(('127.0.0.1', {loopback.port})))")
    result = run_command([sandbox._python_in_sandbox(), "-S", "-c", code], limits=FAST)
    assert result.ok, result.stderr
    unreachable, refused = result.stdout.split()
    assert unreachable != "0" and refused != "0"
    assert loopback.accepted == 0


@needs_jail
def test_outside_is_invisible_and_read_only():
    source = (
        "import json, os\n"
        "seen = {p: os.path.exists(p) for p in ('/etc/shadow', '/home', '" + __file__ + "')}\n"
        "writes = {}\n"
        "for path in ('/usr/evil', '/evil', 'inside.txt', '/tmp/scratch'):\n"
        "    try:\n        open(path, 'w').write('x')\n        writes[path] = 'written'\n"
        "    except OSError as exc:\n        writes[path] = type(exc).__name__\n"
        "print(json.dumps([seen, writes, os.getuid(), sorted(os.listdir('/'))]))\n"
    )
    result = run_python(source, limits=FAST)
    assert result.ok, result.stderr
    seen, writes, uid, top = __import__("json").loads(result.stdout)
    assert not any(seen.values())  # host secrets, homes and our tests are not there
    assert writes == {"/usr/evil": "OSError", "/evil": "OSError", "inside.txt": "written",
                      "/tmp/scratch": "written"}  # /tmp is the jail's own small tmpfs
    assert uid != 0
    assert "home" not in top and "work" not in top and "sandbox" in top


def test_rlimits_fallback_still_enforces_limits_and_blocks_python_sockets(monkeypatch, loopback):
    monkeypatch.setattr(sandbox, "isolation_mode", lambda: "rlimits")
    loop = run_python("while True:\n    pass", limits=Limits(cpu_s=1, wall_s=10))
    assert loop.fault == "timeout" and loop.isolation == "rlimits"
    net = run_python(_connect_code(loopback.port), limits=FAST)
    assert "network access is disabled" in net.stderr and "connected" not in net.stdout
    time.sleep(0.3)
    assert loopback.accepted == 0


def test_output_is_capped():
    result = run_python("print('x' * 200_000)", limits=FAST)
    assert result.stdout.endswith("[output truncated]") and len(result.stdout) < 70_000


def test_isolation_mode_is_reported_and_root_on_linux_gets_the_jail():
    assert run_python("pass", limits=FAST).isolation == sandbox.isolation_mode()
    if sys.platform == "linux" and os.getuid() == 0 and not JAILED:
        pytest.skip("root without CAP_SYS_ADMIN (a container?): the jail is unavailable")
    assert JAILED == (sys.platform == "linux" and os.getuid() == 0)
