"""Real processes killed with SIGKILL at the worst moments (the named points of
onthejob.faults), then restarted:

- the server, while answers stream: every message it acknowledged is in the store;
- `onthejob consolidate`, mid-training: the active adapter is untouched, the run is marked
  interrupted, and the next consolidation resumes its training from the checkpoint;
- `onthejob consolidate`, at each point of promotion (ONTHEJOB_FAULT_PAUSE, see
  onthejob.faults): the active adapter is the old one or the new one, its checksum verifies and
  the server loads it, and the next consolidation completes;
- `onthejob dream`, mid-training and right after gating: the next dream of the same work marks
  it interrupted and resumes it (its tasks are not written again; training goes on from the
  checkpoint); a server started after one that died marks its dream jobs interrupted;
- `onthejob grind`, mid-training and before registering its adapter: the next grind resumes
  from the checkpoint, and adapter files never registered are set aside, not in the way.

The tiny random model is saved to a directory so the subprocesses load it like a real one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch

from onthejob.cli import main
from onthejob.faults import PROMOTION
from onthejob.model import adapters as model_adapters
from onthejob.model import tiny_model
from onthejob.serve.turns import AdapterResolver
from onthejob.store import Store

LOOSE_GATE = ["--min-gain", "-1", "--max-kl", "1000", "--max-retention-drop", "1"]


def _env(home) -> dict:
    env = {**os.environ, "ONTHEJOB_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("ONTHEJOB_FAULT_PAUSE", None)
    return env


def _spawn(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "onthejob.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _wait_for_point(proc: subprocess.Popen, point: str, kill: bool = True) -> list[str]:
    """Read the process's output until it pauses at the named fault point; then SIGKILL it."""
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith(f"fault-pause: {point}"):
            break
    assert output and output[-1].startswith(f"fault-pause: {point}"), "".join(output)
    if kill:
        _kill(proc)
    return output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the server killed while it streams ---------------------------------------------------------

def _start_server(tiny_dir, db, home, port) -> subprocess.Popen:
    proc = _spawn(["serve", "--model", tiny_dir, "--db", db, "--port", str(port)], _env(home))
    deadline = time.time() + 90
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    _kill(proc)
    raise AssertionError("the server did not start in 90 s")


def _client(base, key, model, streaming, acked, stop):
    """Send turns until the server dies; record (session, role, content) once acknowledged:
    the user's message when the response starts, the answer when it is complete."""
    sid = None
    with httpx.Client(base_url=base, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as http:
        for turn in range(1000):
            if stop.is_set():
                return
            content = f"turn {turn} {uuid.uuid4().hex}"
            body = {"model": model, "messages": [{"role": "user", "content": content}],
                    "temperature": 1.0, "seed": turn, "stream": streaming,
                    "max_tokens": 600 if streaming else 4}
            if streaming:
                sid = None  # a new session for each long answer, which fills the context
            headers = {"X-Session-Id": sid} if sid else {}
            try:
                if not streaming:
                    r = http.post("/v1/chat/completions", json=body, headers=headers)
                    assert r.status_code == 200, r.text
                    sid = r.headers["x-session-id"]
                    acked.append((sid, "user", content))
                    acked.append((sid, "assistant", r.json()["choices"][0]["message"]["content"]))
                    continue
                with http.stream("POST", "/v1/chat/completions", json=body,
                                 headers=headers) as r:
                    assert r.status_code == 200, r.read()
                    sid = r.headers["x-session-id"]
                    acked.append((sid, "user", content))
                    pieces, done = [], False
                    for line in r.iter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            chunk = json.loads(line[6:])
                            if chunk.get("choices"):
                                pieces.append(chunk["choices"][0]["delta"].get("content", ""))
                    if done:
                        acked.append((sid, "assistant", "".join(pieces)))
            except (httpx.HTTPError, OSError):
                return  # the server is gone


def test_server_killed_mid_stream_loses_no_acknowledged_message(tiny_dir, tmp_path):
    db = f"sqlite:///{tmp_path / 'serve.db'}"
    store = Store(db)
    store.create_tenant("acme")
    key = store.create_key("acme")
    store.close()
    port = _free_port()
    server = _start_server(tiny_dir, db, tmp_path / "home", port)
    base, model = f"http://127.0.0.1:{port}", httpx.get(f"http://127.0.0.1:{port}/health").json()["model"]
    acked: list[tuple[str, str, str]] = []
    stop = threading.Event()
    clients = [threading.Thread(target=_client, args=(base, key, model, i < 3, acked, stop))
               for i in range(5)]
    for c in clients:
        c.start()
    deadline = time.time() + 240  # a loaded 2-core machine answers slowly
    while sum(role == "user" for _, role, _ in acked) < 6 and time.time() < deadline:
        time.sleep(0.05)
    _kill(server)  # answers are mid-stream now: three clients ask for 600 tokens each
    stop.set()
    for c in clients:
        c.join(timeout=60)
    assert sum(role == "user" for _, role, _ in acked) >= 6

    server = _start_server(tiny_dir, db, tmp_path / "home", port)
    try:
        with httpx.Client(base_url=base, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as http:
            stored = {}
            for sid in {sid for sid, _, _ in acked}:
                r = http.get(f"/v1/sessions/{sid}")
                assert r.status_code == 200, r.text
                stored[sid] = [(m["role"], m["content"]) for m in r.json()["messages"]]
            for sid, role, content in acked:
                assert stored[sid].count((role, content)) == 1, (role, content)
            # The restarted server carries on in a session the kill interrupted.
            sid = next(sid for sid, role, _ in acked if role == "assistant")
            r = http.post("/v1/chat/completions", headers={"X-Session-Id": sid}, json={
                "model": model, "max_tokens": 2,
                "messages": [{"role": "user", "content": "still there?"}]})
            assert r.status_code == 200 and r.headers["x-session-id"] == sid
    finally:
        _kill(server)


# --- consolidation killed -----------------------------------------------------------------------

def _write_adapter(target, seed: int) -> str:
    lm = tiny_model(seed=0)
    model_adapters.attach(lm, "fresh", model_adapters.LoraSpec(rank=2, alpha=4))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in lm.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model_adapters.save(lm.model, "fresh", target)


def _store_with_v1(tmp_path) -> tuple[Store, str, object]:
    """acme with an active v1 adapter and one approved, unconsolidated session."""
    db = f"sqlite:///{tmp_path / 'learn.db'}"
    store = Store(db)
    store.create_tenant("acme")
    path = tmp_path / "home" / "adapters" / "tenant" / "acme" / "v1"
    v1 = store.add_adapter("tenant", "acme", method="test", path=str(path),
                           checksum=_write_adapter(path, seed=1))
    store.activate_adapter(v1.id)
    s = store.create_session("acme", title="Bluefin")
    store.add_message("acme", s.id, "user", "Remember: the codename is Bluefin. It ships in May.")
    store.add_message("acme", s.id, "assistant", "Noted.")
    store.set_review("acme", s.id, "up", "")
    return store, db, store.get_adapter(v1.id)


def _assert_serves_a_valid_active_adapter(store: Store, allowed: set[int]) -> None:
    active = store.active_adapter("acme")
    assert active is not None and active.version in allowed
    assert model_adapters.verify(active.path) == active.checksum
    paths = AdapterResolver(store).paths(store.get_tenant("acme"))
    assert paths == [active.path]
    lm = tiny_model(seed=0)
    model_adapters.use_adapter(lm, paths)  # loads, with its checksum verified


def _consolidate_args(db, tiny_dir, steps: int) -> list[str]:
    return ["consolidate", "--db", db, "--tenant", "acme", "--model", tiny_dir, "--method", "sft",
            "--steps", str(steps), "--rank", "2", *LOOSE_GATE]


def test_consolidate_killed_mid_training_is_interrupted_then_resumed(tiny_dir, tmp_path,
                                                                      monkeypatch):
    store, db, v1 = _store_with_v1(tmp_path)
    args = _consolidate_args(db, tiny_dir, steps=400)
    # Killed right after the first step's checkpoint is written (faults.py names the point).
    env = {**_env(tmp_path / "home"), "ONTHEJOB_FAULT_PAUSE": "checkpoint-saved"}
    _wait_for_point(_spawn(args, env), "checkpoint-saved", kill=True)
    dead = store.list_runs("consolidate")[0]
    saved = json.loads((tmp_path / "home" / "runs" / f"consolidate-{dead.id}"
                        / "progress.json").read_text())
    reached = saved["step"]
    assert reached == 1
    assert dead.status == "running"  # as the killed process left it
    assert store.active_adapter("acme") == v1
    assert [a.version for a in store.list_adapters("tenant", "acme")] == [1]
    _assert_serves_a_valid_active_adapter(store, {1})
    # The same command again: the dead run is found, marked, and its training resumed.
    # (400 steps would be long; the test stops the resumed run right after it resumes.)
    from onthejob.learn import loop

    seen = {}
    original = loop.Trainer._resume

    def resume_then_finish(self, path):
        start = original(self, path)
        seen["start"] = start
        # What was restored is what the killed run saved: the adapter's weights and the
        # optimizer's moments, tensor for tensor (not only the step number).
        saved = torch.load(Path(path) / "state.pt", weights_only=False)
        named = dict(self.lm.model.named_parameters())
        assert saved["params"] and all(torch.equal(named[n], v) for n, v in saved["params"].items())
        restored = self.optimizer.state_dict()["state"]
        moments = [(pid, k) for pid, per in saved["optimizer"]["state"].items() for k in per]
        assert moments and all(torch.equal(restored[pid][k], saved["optimizer"]["state"][pid][k])
                               for pid, k in moments)
        seen["checked"] = len(saved["params"])
        self.cfg.steps = start + 1  # one more step, then the gate and promotion
        return start

    monkeypatch.setattr(loop.Trainer, "_resume", resume_then_finish)
    monkeypatch.setenv("ONTHEJOB_HOME", str(tmp_path / "home"))
    assert main(args) == 0
    assert seen["start"] == reached and seen["checked"] > 0
    interrupted = store.get_run(dead.id)
    assert interrupted.status == "interrupted" and "killed" in interrupted.error
    new = store.list_runs("consolidate")[0]
    assert new.params["resumed_from"] == dead.id and new.status == "done"
    active = store.active_adapter("acme")
    assert active.version == 2 and active.parent_id == v1.id
    _assert_serves_a_valid_active_adapter(store, {2})


def test_consolidate_to_a_pipe_logs_each_phase_as_it_happens_and_a_resume_reuses_them(
        tiny_dir, tmp_path, monkeypatch, capsys):
    """A job runner's view: stdout is a pipe and Python is NOT told to be unbuffered. Killed
    at its first checkpoint, the run has already written every phase line before that point,
    in order, each with its time; its row in the store says the phase it is in. The same
    command again reuses the practice material and the gate's first measures."""
    import re

    store, db, v1 = _store_with_v1(tmp_path)
    args = _consolidate_args(db, tiny_dir, steps=2)
    env = {**_env(tmp_path / "home"), "ONTHEJOB_FAULT_PAUSE": "checkpoint-saved"}
    env.pop("PYTHONUNBUFFERED")
    lines = _wait_for_point(_spawn(args, env), "checkpoint-saved", kill=True)
    phases = [m.group(1) for line in lines
              if (m := re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d phase (.+?): (?:started|done)", line))]
    assert phases == ["practice material", "practice material", "gate before training",
                      "gate before training", "teacher answers and anchors",
                      "teacher answers and anchors", "training"], "".join(lines)
    dead = store.list_runs("consolidate")[0]
    assert dead.progress["phase"] == "training"  # (its step is stored just after the checkpoint)
    assert set(dead.progress["phases"]) == {"practice material", "gate before training",
                                            "teacher answers and anchors"}
    monkeypatch.setenv("ONTHEJOB_HOME", str(tmp_path / "home"))
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "reused the interrupted run's practice material" in out
    assert "(reused from the interrupted run)" in out
    new = store.list_runs("consolidate")[0]
    assert new.params["resumed_from"] == dead.id and new.status == "done"
    assert store.active_adapter("acme").version == 2


@pytest.mark.parametrize("point", PROMOTION)
def test_consolidate_killed_during_promotion_keeps_a_valid_active_adapter(tiny_dir, tmp_path,
                                                                          monkeypatch, point):
    store, db, v1 = _store_with_v1(tmp_path)
    env = {**_env(tmp_path / "home"), "ONTHEJOB_FAULT_PAUSE": point}
    _wait_for_point(_spawn(_consolidate_args(db, tiny_dir, steps=1), env), point)
    _assert_serves_a_valid_active_adapter(store, {1, 2})
    expected = 2 if point == "promoted" else 1
    assert store.active_adapter("acme").version == expected
    sessions = store.sessions_to_consolidate("acme")
    assert (sessions == []) == (point == "promoted")  # promotion and marking are one step

    # Restart: the dead run is marked and the work completes (or there is none left).
    monkeypatch.setenv("ONTHEJOB_HOME", str(tmp_path / "home"))
    assert main(_consolidate_args(db, tiny_dir, steps=1)) == 0
    runs = store.list_runs("consolidate")
    assert runs[-1].status == "interrupted"
    assert store.sessions_to_consolidate("acme") == []
    # A registered candidate keeps its version number, so the retry is v3; files written but
    # never registered are set aside and v2 is written afresh.
    final = store.active_adapter("acme")
    assert final.version == (3 if point == "candidate-registered" else 2)
    assert final.parent_id == v1.id
    _assert_serves_a_valid_active_adapter(store, {final.version})


def test_dead_runs_are_found_by_their_process_or_their_heartbeat(tmp_path):
    from datetime import timedelta

    from sqlalchemy import update

    from onthejob.store.schema import RunRow

    store = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    mine = store.create_run("consolidate")  # this process: alive
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = store.create_run("consolidate")
    far = store.create_run("grind")
    far_fresh = store.create_run("grind")
    params = store.get_run(dead.id).params
    params["process"] = {**params["process"], "pid": gone.pid}
    elsewhere = {**far.params, "process": {"host": "elsewhere", "pid": 1}}
    with store.tx() as orm:
        orm.execute(update(RunRow).where(RunRow.id == dead.id).values(params=params))
        for run, age in ((far, timedelta(hours=2)), (far_fresh, timedelta(minutes=1))):
            orm.execute(update(RunRow).where(RunRow.id == run.id).values(
                params=elsewhere, heartbeat_at=run.heartbeat_at - age))
    found = {r.id for r in store.interrupt_dead_runs(stale_after=timedelta(minutes=30))}
    assert found == {dead.id, far.id}
    assert store.get_run(mine.id).status == store.get_run(far_fresh.id).status == "running"
    assert store.interrupt_dead_runs() == []  # idempotent
    store.close()


# --- dreams and grinds killed -------------------------------------------------------------------

MATERIAL = ("The Bluefin project ships on March 3 in Oslo. Its lead engineer is Ada Lind. "
            "The team chose Rust for the storage engine because of memory safety.")


def _dream_store(tmp_path) -> tuple[Store, str, str]:
    db = f"sqlite:///{tmp_path / 'dream.db'}"
    store = Store(db)
    store.create_tenant("acme")
    s = store.create_session("acme", title="Bluefin")
    store.add_message("acme", s.id, "user", f"Please remember this: {MATERIAL}")
    store.add_message("acme", s.id, "assistant", "I will remember it.")
    return store, db, s.id


def _dream_args(db, model_dir, sid, budget: int) -> list[str]:
    return ["dream", "--db", db, "--tenant", "acme", "--session", sid, "--model", model_dir,
            "--budget", str(budget), "--group", "8", "--max-tasks", "3", "--attempts", "1",
            "--rank", "2", *LOOSE_GATE]


def _no_new_dreams(monkeypatch) -> None:
    """A resumed dream must reuse the tasks its interrupted run wrote and gated."""
    def refuse(*args, **kwargs):
        raise AssertionError("the resumed dream wrote or gated its tasks again")

    monkeypatch.setattr("onthejob.dream.run.write_tasks", refuse)
    monkeypatch.setattr("onthejob.dream.run.gate", refuse)


def test_dream_killed_mid_training_is_interrupted_then_resumed(taught_dir, tmp_path,
                                                                monkeypatch):
    store, db, sid = _dream_store(tmp_path)
    args = _dream_args(db, taught_dir, sid, budget=3)
    env = {**_env(tmp_path / "home"), "ONTHEJOB_FAULT_PAUSE": "checkpoint-saved"}
    _wait_for_point(_spawn(args, env), "checkpoint-saved")
    dead = store.list_runs("dream")[0]
    assert dead.status == "running" and dead.progress["phase"] == "training"
    assert store.active_adapter("acme") is None
    tasks = json.loads((tmp_path / "home" / "dreams" / f"{dead.id}.json").read_text())["tasks"]

    from onthejob.learn import loop

    seen = {}
    original = loop.Trainer._resume

    def resume(self, path):
        seen["start"] = original(self, path)
        return seen["start"]

    monkeypatch.setattr(loop.Trainer, "_resume", resume)
    monkeypatch.setenv("ONTHEJOB_HOME", str(tmp_path / "home"))
    with monkeypatch.context() as patch:
        _no_new_dreams(patch)
        assert main(args) == 0
    interrupted = store.get_run(dead.id)
    assert interrupted.status == "interrupted" and "killed" in interrupted.error
    new = store.list_runs("dream")[0]
    assert interrupted.progress["resumed_by"] == new.id and new.params["resumed_from"] == dead.id
    assert new.status == "done" and new.progress["outcome"] == "promoted"
    assert seen["start"] == 1  # training went on after the killed run's first step
    record = json.loads((tmp_path / "home" / "dreams" / f"{new.id}.json").read_text())
    assert record["resumed_from"] == dead.id and record["tasks"] == tasks
    active = store.active_adapter("acme")
    assert active.version == 1 and active.metrics["steps"] == 3
    assert model_adapters.verify(active.path) == active.checksum
    assert main(args) == 0  # the resumed run is not resumed again: a fresh dream
    assert store.list_runs("dream")[0].params["resumed_from"] is None


def test_dream_killed_after_gating_reuses_its_tasks(taught_dir, tmp_path, monkeypatch):
    store, db, sid = _dream_store(tmp_path)
    args = _dream_args(db, taught_dir, sid, budget=1)
    env = {**_env(tmp_path / "home"), "ONTHEJOB_FAULT_PAUSE": "dream-gated"}
    _wait_for_point(_spawn(args, env), "dream-gated")
    dead = store.list_runs("dream")[0]
    assert dead.status == "running"
    _no_new_dreams(monkeypatch)
    monkeypatch.setenv("ONTHEJOB_HOME", str(tmp_path / "home"))
    assert main(args) == 0
    new = store.list_runs("dream")[0]
    assert store.get_run(dead.id).status == "interrupted"
    assert new.params["resumed_from"] == dead.id and new.status == "done"
    assert store.active_adapter("acme").version == 1


def test_a_server_marks_the_dream_jobs_of_a_dead_server_interrupted(tiny_lm, tmp_path):
    from sqlalchemy import update

    from onthejob.serve.app import create_app
    from onthejob.store.schema import RunRow

    store = Store(f"sqlite:///{tmp_path / 'serve.db'}")
    store.create_tenant("acme")
    run = store.create_run("dream", "acme", params={"session": "s", "mode": "opsd"})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    params = {**run.params, "process": {**run.params["process"], "pid": gone.pid}}
    with store.tx() as orm:  # as a server killed mid-job leaves it
        orm.execute(update(RunRow).where(RunRow.id == run.id).values(params=params))
    assert store.get_run(run.id).status == "running"
    create_app(tiny_lm, store)
    assert store.get_run(run.id).status == "interrupted"
    store.close()


def _grind_args(db, tiny_dir, steps: int) -> list[str]:
    return ["grind", "--db", db, "--tenant", "acme", "--model", tiny_dir, "--env", "arith",
            "--group", "2", "--starts", "1", "--steps", str(steps), "--rank", "2",
            "--max-new-tokens", "4", "--eval-seeds", "0"]


def test_grind_killed_mid_training_is_interrupted_then_resumed(tiny_dir, tmp_path, monkeypatch):
    db = f"sqlite:///{tmp_path / 'grind.db'}"
    store = Store(db)
    store.create_tenant("acme")
    args = _grind_args(db, tiny_dir, steps=3)
    env = {**_env(tmp_path / "home"), "ONTHEJOB_FAULT_PAUSE": "checkpoint-saved"}
    _wait_for_point(_spawn(args, env), "checkpoint-saved")
    dead = store.list_runs("grind")[0]
    assert dead.status == "running"
    out = Path(dead.params["out"])
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 1

    from onthejob.learn import loop

    seen = {}
    original = loop.Trainer._resume

    def resume(self, path):
        seen["start"] = original(self, path)
        return seen["start"]

    monkeypatch.setattr(loop.Trainer, "_resume", resume)
    monkeypatch.setenv("ONTHEJOB_HOME", str(tmp_path / "home"))
    assert main(args) == 0
    assert seen == {"start": 1}  # went on after the killed run's first step
    assert store.get_run(dead.id).status == "interrupted"
    new = store.list_runs("grind")[0]
    assert new.params["resumed_from"] == dead.id and new.status == "done"
    assert new.params["out"] == str(out) and new.params["run_id"] == dead.params["run_id"]
    curve = json.loads((out / "curve.json").read_text())
    assert [h["step"] for h in curve["history"]] == [1, 2, 3]
    adapter = store.list_adapters("tenant", "acme")[0]
    assert adapter.version == 1 and model_adapters.verify(adapter.path) == adapter.checksum


def test_grind_killed_before_registering_its_adapter_does_not_block_the_next(tiny_dir,
                                                                             tmp_path,
                                                                             monkeypatch):
    db = f"sqlite:///{tmp_path / 'grind.db'}"
    store = Store(db)
    store.create_tenant("acme")
    args = _grind_args(db, tiny_dir, steps=1)
    env = {**_env(tmp_path / "home"), "ONTHEJOB_FAULT_PAUSE": "adapter-saved"}
    _wait_for_point(_spawn(args, env), "adapter-saved")
    leftover = tmp_path / "home" / "adapters" / "tenant" / "acme" / "v1"
    assert leftover.is_dir() and store.list_adapters("tenant", "acme") == []
    monkeypatch.setenv("ONTHEJOB_HOME", str(tmp_path / "home"))
    assert main(args) == 0
    assert store.list_runs("grind")[-1].status == "interrupted"
    adapter = store.list_adapters("tenant", "acme")[0]
    assert adapter.version == 1 and model_adapters.verify(adapter.path) == adapter.checksum
    assert [p.name.split(".")[1].split("-")[0] for p in leftover.parent.glob("v1.*")] == [
        "unregistered"]


def test_server_killed_mid_dream_then_the_same_request_resumes_it(taught_dir, tmp_path):
    store, db, sid = _dream_store(tmp_path)
    key = store.create_key("acme")
    port = _free_port()
    home = tmp_path / "home"
    env = {**_env(home), "ONTHEJOB_FAULT_PAUSE": "dream-gated"}
    server = _spawn(["serve", "--model", taught_dir, "--db", db, "--port", str(port)], env)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    request = {"budget": "2steps", "mode": "opsd", "checker": "match"}
    deadline = time.time() + 240  # a loaded 2-core machine starts it slowly
    while True:  # wait for the server to listen
        assert server.poll() is None and time.time() < deadline, "the server did not start"
        try:
            r = httpx.post(f"{base}/v1/sessions/{sid}/dream", json=request, headers=auth)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    assert r.status_code == 202, r.text
    first = r.json()["id"]
    _wait_for_point(server, "dream-gated")  # its tasks are gated; the server dies now
    assert store.get_run(first).status == "running"

    server = _start_server(taught_dir, db, home, port)
    try:
        assert store.get_run(first).status == "interrupted"  # marked when the server started
        shown = httpx.get(f"{base}/v1/dreams/{first}", headers=auth).json()
        assert shown["status"] == "interrupted" and shown["error"]
        r = httpx.post(f"{base}/v1/sessions/{sid}/dream", json=request, headers=auth)
        second = r.json()["id"]
        deadline = time.time() + 300
        while store.get_run(second).status == "running" and time.time() < deadline:
            time.sleep(0.2)
        run = store.get_run(second)
        assert run.status == "done", run.error
        assert run.progress["resumed_from"] == first
        assert store.get_run(first).progress["resumed_by"] == second
        record = json.loads((home / "dreams" / f"{second}.json").read_text())
        assert record["resumed_from"] == first
    finally:
        _kill(server)
