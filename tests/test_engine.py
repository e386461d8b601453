"""Generation engines (model/engine.py): the torch engine applies each request's adapters, and
the server's worker generates only through the engine it was given."""

from __future__ import annotations

import threading

import pytest
import torch

from onthejob.model import Completion, SamplingParams, generate, render_ids, tiny_model
from onthejob.model.adapters import LoraSpec, random_lora, save, use_adapter
from onthejob.model.engine import TorchEngine, make_engine
from onthejob.serve.engine import Engine

PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


def _adapter(lm, name: str, seed: int, folder) -> str:
    random_lora(lm, name, LoraSpec(rank=4, alpha=8), seed=seed, scale=0.5)
    path = str(folder / name)
    save(lm.model, name, path)
    return path


@pytest.fixture
def lm_and_adapters(tmp_path):
    lm = tiny_model(seed=2)
    paths = [_adapter(lm, "t1", 1, tmp_path), _adapter(lm, "t2", 2, tmp_path)]
    lm.model = lm.model.unload()
    return lm, paths


def test_each_request_gets_its_own_adapter(lm_and_adapters):
    lm, (a, b) = lm_and_adapters
    prompts = [render_ids(lm.tokenizer, [{"role": "user", "content": q}]) for q in ("hi", "2+2?")]
    expected = {}
    for key, paths in (("a", [a]), ("b", [b]), ("ab", [a, b]), ("base", [])):
        use_adapter(lm, paths or None)
        expected[key] = [c.token_ids for c in generate(lm, prompts, PARAMS, fast=False)]
    assert len({tuple(map(tuple, v)) for v in expected.values()}) == 4  # all four differ
    engine = TorchEngine(lm)
    # Interleaved tenants: each call sees exactly its own adapters, never the previous call's.
    for key, paths in (("a", [a]), ("b", [b]), ("base", []), ("ab", [a, b]), ("a", [a])):
        got = [c.token_ids for c in engine.generate(prompts, PARAMS, paths)]
        assert got == expected[key], key
        pieces = list(engine.stream(prompts[0], PARAMS, paths))
        assert pieces[-1].token_ids == expected[key][0], key


class _Recording:
    """A GenerationEngine that answers without a model and records what it was asked."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def generate(self, prompts, params, adapters=()):
        self.calls.append(("generate", tuple(adapters)))
        return [Completion(list(p), [1], [0.0], "x", "length") for p in prompts]

    def stream(self, prompt, params, adapters=()):
        self.calls.append(("stream", tuple(adapters)))
        yield "y"
        yield Completion(list(prompt), [2], [0.0], "y", "stop")


def test_the_server_worker_generates_through_its_engine(tiny_lm):
    backend = _Recording()
    engine = Engine(tiny_lm, backend=backend)
    try:
        done = engine.submit([1, 2], SamplingParams(max_tokens=2), adapters=["/x"]).result(60)
        pieces: list[str] = []
        streamed = engine.submit_stream([3], SamplingParams(max_tokens=2), ["/y"], pieces.append,
                                        threading.Event()).result(60)
    finally:
        engine.close()
    assert done.text == "x" and streamed.text == "y" and pieces == ["y"]
    assert backend.calls == [("generate", ("/x",)), ("stream", ("/y",))]


def test_unknown_engine_or_precision_is_refused(tiny_lm):
    with pytest.raises(ValueError, match="unknown engine .vllm.: choose one of .*torch"):
        make_engine("vllm", tiny_lm)
    with pytest.raises(ValueError, match="precision"):
        make_engine("torch", tiny_lm, precision="int4")


def test_two_tenants_streaming_at_once_each_get_their_own_adapter(lm_and_adapters):
    """Continuous batching keeps one batch per adapter set: the server's worker steps them in
    turn, and neither tenant's stream ever sees the other's adapter."""
    lm, (a, b) = lm_and_adapters
    prompt = render_ids(lm.tokenizer, [{"role": "user", "content": "hi"}])
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = {}
    for key, paths in (("a", [a]), ("b", [b]), ("base", [])):
        use_adapter(lm, paths or None)
        alone[key] = generate(lm, [prompt], params, fast=False)[0].token_ids
    engine = Engine(lm)
    assert engine.continuous
    pieces: dict[str, list[str]] = {"a": [], "b": [], "base": []}
    try:
        with engine.lock:  # all three start together
            futures = {key: engine.submit_stream(prompt, params, paths, pieces[key].append,
                                                 threading.Event())
                       for key, paths in (("a", [a]), ("b", [b]), ("base", []))}
        done = {key: f.result(timeout=60) for key, f in futures.items()}
    finally:
        engine.close()
    for key in done:
        assert done[key].token_ids == alone[key], key
        assert "".join(pieces[key]) == done[key].text
    assert engine.batches_run == 3 * 12  # three batches stepped in turn


def test_precision_checks_say_what_cannot_run_and_what_is_emulated(monkeypatch):
    from onthejob.model import engine as eng

    cpu = torch.device("cpu")
    monkeypatch.setattr(eng, "native_bf16", lambda device: False)
    assert eng.precision_problem("float32", cpu) is None
    assert eng.precision_problem("bfloat16", cpu) is None  # emulated, but it runs
    assert "emulated" in eng.precision_warning("bfloat16", cpu)
    assert eng.precision_warning("float32", cpu) is None
    assert "unknown precision" in eng.precision_problem("fp8", cpu)
    monkeypatch.setattr(eng, "int8_works", lambda: False)
    assert "_weight_int8pack_mm" in eng.precision_problem("int8", cpu)
    monkeypatch.setattr(eng, "int8_works", lambda: True)
    assert eng.precision_problem("int8", cpu) is None
    monkeypatch.setattr(eng, "native_bf16", lambda device: True)
    assert eng.precision_warning("bfloat16", cpu) is None


def test_auto_precision_keeps_float32_unless_a_lower_one_is_faster_at_batch_1_and_8(monkeypatch):
    from onthejob.model import engine as eng

    lm = tiny_model(seed=0)
    monkeypatch.setattr(eng, "int8_works", lambda: False)
    monkeypatch.setattr(eng, "PRECISIONS", {"float32": torch.float32, "int8": torch.int8})
    assert eng.pick_precision(lm) == ("float32", {})  # nothing lower can run: nothing timed
    monkeypatch.undo()
    # a real measurement on this machine: every rate positive, the choice follows them
    name, rates = eng.pick_precision(lm)
    usable = {"float32", "bfloat16"} | ({"int8"} if eng.int8_works() else set())
    assert set(rates) == usable | {f"{n}@{eng.AUTO_BATCH}" for n in usable}
    assert min(rates.values()) > 0
    good = [n for n in usable - {"float32"} if rates[n] >= eng.AUTO_MARGIN * rates["float32"]
            and rates[f"{n}@8"] >= rates["float32@8"]]
    assert name == (max(good, key=rates.__getitem__) if good else "float32")
    assert lm.decode_dtype == torch.float32  # timing leaves the model as it was
    monkeypatch.setattr(eng, "int8_works", lambda: True)
    # rates against float32's 100 at batch 1 and 400 at batch 8
    for bf16, int8, want in (((100, 900), (105, 900), "float32"),  # not 1.1x faster alone
                             ((115, 900), (105, 900), "bfloat16"),
                             ((115, 900), (180, 900), "int8"),
                             ((200, 300), (180, 900), "int8"),  # bf16 slower in a batch
                             ((200, 300), (180, 390), "float32")):
        table = {torch.bfloat16: bf16, torch.int8: int8, torch.float32: (100, 400)}
        monkeypatch.setattr(eng, "decode_rate", lambda lm, dtype, batch=1, table=table: (
            float(table[dtype][batch > 1])))
        assert eng.pick_precision(lm)[0] == want
    # each rate is the median of AUTO_REPEATS timings: one slow moment does not decide
    calls = iter([100, 400, 300, 900, 100, 400, 40, 900, 100, 400, 300, 900])  # bf16 dips once
    monkeypatch.setattr(eng, "PRECISIONS", {"float32": torch.float32, "bfloat16": torch.bfloat16})
    monkeypatch.setattr(eng, "precision_problem", lambda name, device: None)
    monkeypatch.setattr(eng, "decode_rate", lambda lm, dtype, batch=1: float(next(calls)))
    assert eng.pick_precision(lm) == ("bfloat16", {"float32": 100.0, "float32@8": 400.0,
                                                   "bfloat16": 300.0, "bfloat16@8": 900.0})


def test_run_in_thread_returns_or_raises_in_the_caller_and_its_thread_ends():
    from onthejob.model.threads import run_in_thread

    seen = []
    assert run_in_thread(lambda: seen.append(threading.current_thread()) or 7) == 7
    assert seen[0] is not threading.main_thread() and not seen[0].is_alive()
    with pytest.raises(KeyError, match="boom"):
        run_in_thread(lambda: {}["boom"])


def test_auto_precision_times_off_the_main_thread(monkeypatch):
    """Timing in the main thread would leave it an OpenMP pool that slows the engine thread
    afterwards (model/threads.py)."""
    from onthejob.model import engine as eng

    where = []
    monkeypatch.setattr(eng, "decode_rate", lambda lm, dtype, batch=1: (
        where.append(threading.current_thread()) or 100.0))
    eng.pick_precision(tiny_model(seed=0))
    assert where and threading.main_thread() not in where


def test_serve_warns_of_emulated_bf16_and_refuses_a_missing_int8_kernel(monkeypatch, capsys):
    import argparse

    from onthejob.model import engine as eng
    from onthejob.serve.cli import _backend

    monkeypatch.setattr(eng, "native_bf16", lambda device: False)
    monkeypatch.setattr(eng, "int8_works", lambda: False)
    lm = tiny_model(seed=0)
    assert _backend(argparse.Namespace(engine="torch", precision="int8"), lm) is None
    err = capsys.readouterr().err
    assert "--precision int8 needs torch's CPU weight-only int8 kernel" in err
    assert "use float32" in err
    assert _backend(argparse.Namespace(engine="torch", precision="bfloat16"), lm) is not None
    assert "emulated on this CPU" in capsys.readouterr().err
    assert _backend(argparse.Namespace(engine="torch", precision="float32"), lm) is not None
    assert capsys.readouterr().err == ""


def test_compile_is_refused_for_an_engine_that_cannot_compile(capsys):
    import argparse

    from onthejob.serve.cli import _backend

    args = argparse.Namespace(engine="llamacpp", precision="float32", compile=True)
    assert _backend(args, tiny_model(seed=0)) is None
    assert "--compile is for the torch engine" in capsys.readouterr().err
