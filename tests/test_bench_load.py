"""The load benchmark at a tiny size: a real server process, concurrent clients, streamed and
not; nothing acknowledged is lost, nothing is stored twice, no 5xx. On PostgreSQL too when
ONTHEJOB_TEST_PG_URL is set."""

from __future__ import annotations

import json
import os

import pytest

from onthejob.bench.load import LoadConfig, run
from onthejob.cli import main

PG_URL = os.environ.get("ONTHEJOB_TEST_PG_URL")


def _check(result) -> None:
    assert result.statuses == {"200": result.config["clients"] * result.config["requests"]}
    assert result.server_errors == 0
    assert result.acknowledged == 2 * sum(result.statuses.values())
    assert result.lost == 0 and result.duplicated == 0
    assert result.stored == result.acknowledged
    assert 0 < result.percentile(50) <= result.percentile(99)


def test_load_bench_loses_nothing_on_sqlite(tmp_path, capsys):
    out = tmp_path / "load.md"
    assert main(["bench", "load", "--clients", "3", "--requests", "3", "--max-tokens", "3",
                 "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["lost"] == 0 and summary["server_errors"] == 0
    assert summary["acknowledged"] == summary["stored"] == 18
    assert "acknowledged but lost | 0" in out.read_text()


@pytest.mark.skipif(not PG_URL, reason="ONTHEJOB_TEST_PG_URL is unset (.ci/run starts a PostgreSQL)")
def test_load_bench_loses_nothing_on_postgresql():
    _check(run(LoadConfig(clients=3, requests=3, max_tokens=3, db=PG_URL), say=lambda s: None))


def test_streams_bench_measures_one_and_many_streams(tmp_path):
    out = tmp_path / "streams.md"
    assert main(["bench", "streams", "--model", "tiny", "--streams", "3", "--max-tokens", "5",
                 "--batching", "continuous", "--out", str(out)]) == 0
    [result] = json.loads(out.with_suffix(".json").read_text())
    assert result["one"]["streams"] == 1 and result["many"]["streams"] == 3
    assert 0 < result["many"]["tokens"] <= 15 and 0 < result["one"]["tokens"] <= 5
    many = result["many"]
    assert 0 < many["ttft_p50_s"] <= many["ttft_p99_s"] <= many["latency_p99_s"]
    assert many["tokens_per_s_all"] > 0 and result["scaling"] > 0
    # the server says which precision --precision auto picked, and the report shows it
    assert result["precision"] in ("float32", "bfloat16")
    assert f"| torch ({result['precision']}) | continuous | 3 |" in out.read_text()
    assert main(["bench", "streams", "--batching", "eager", "--out", str(out)]) == 2


def test_chosen_precision_is_read_from_the_server_log():
    from onthejob.bench.streams import chosen_precision

    log = "loading\nprecision bfloat16: measured tokens/s at batch 1: float32 40.1, bfloat16 60.2\n"
    assert chosen_precision(log) == "bfloat16"
    assert chosen_precision("precision float32: bf16 is not native here") == "float32"
    assert chosen_precision("no such line") == ""
