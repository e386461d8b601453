"""`onthejob bench generate` on the tiny model: the engine path and the plain generate() path
(what an older checkout is measured with) give the same greedy tokens, and the report says so."""

import json

import pytest

from onthejob.bench.generate import compare, markdown, run
from onthejob.cli import main


def test_engine_and_plain_generate_agree_and_report(tiny_dir):
    before = run(None, ["float32"], batches=[1, 8], tokens=4, repeats=1, model=tiny_dir)
    after = run("torch", ["float32"], batches=[1, 8], tokens=4, repeats=1, model=tiny_dir)
    speed = compare(after, before)["torch float32"]
    assert speed["greedy_identical"] == "8/8"
    assert set(speed["speedup"]) == {"1", "8"} and all(v > 0 for v in speed["speedup"].values())
    text = markdown(after, before, "onthejob bench generate", "python generate.py")
    assert "generate speedup batch 8: " in text and "| 8/8 |" in text


def test_cli_writes_both_files(tiny_dir, tmp_path):
    before = run(None, ["float32"], batches=[1, 8], tokens=2, repeats=1, model=tiny_dir)
    (tmp_path / "before.json").write_text(json.dumps(before))
    out = tmp_path / "gen"
    assert main(["bench", "generate", "--model", tiny_dir, "--precisions", "float32",
                 "--batches", "1,8", "--tokens", "2", "--repeats", "1",
                 "--before", str(tmp_path / "before.json"), "--shared-context", "0",
                 "--out", str(out)]) == 0
    written = json.loads((tmp_path / "gen.json").read_text())
    assert written["compare"]["torch float32"]["greedy_identical"] == "8/8"
    assert "generate speedup batch 8:" in (tmp_path / "gen.md").read_text()
    assert main(["bench", "generate", "--engine", "nope", "--out", str(out)]) == 2


def test_the_shared_context_figure_compares_encoding_it_once_with_every_row_whole(tiny_dir,
                                                                                  tmp_path):
    out = tmp_path / "shared"
    assert main(["bench", "generate", "--model", tiny_dir, "--only-shared", "--shared-context",
                 "64", "--tokens", "3", "--out", str(out)]) == 0
    r = json.loads((tmp_path / "shared.json").read_text())["shared"]
    assert r["rows"] == 16 and r["context_tokens"] > r["shared_tokens"] >= 64
    assert r["shared_tok_s"] > 0 and r["whole_tok_s"] > 0 and r["speedup"] > 0
    assert r["identical"] == 16  # the same tokens either way
    assert "Teacher rows" in (tmp_path / "shared.md").read_text()


@pytest.mark.slow  # compiles the tiny model's decode steps
def test_compiled_runs_are_measured_beside_eager_and_agree(tiny_dir):
    result = run("torch", ["float32"], batches=[1, 8], tokens=4, repeats=1, model=tiny_dir,
                 compiled=True)
    assert list(result["runs"]) == ["torch float32", "torch float32 compiled"]
    compiled = result["runs"]["torch float32 compiled"]
    assert compiled["compile_s"] > 0 and "compile_s" not in result["runs"]["torch float32"]
    assert result["agreement"]["torch float32 compiled"]["identical"] == "8/8"
    assert "torch float32 compiled: compiled in " in markdown(result, None, "cmd", "cmd")
