"""The knowledge benchmark end to end at --smoke size on the tiny model: report, JSON, plots."""

import json
import math

import pytest
import torch

from onthejob.bench.knowledge import retention
from onthejob.bench.measures import kv_cache_bytes
from onthejob.cli import main
from onthejob.model import tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    # One thread: on a CPU shared with other jobs it is several times faster than two.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _data(tmp_path):
    articles = []
    for i in range(1002):
        articles.append({"title": f"Place {i}", "context": f"Place {i} was founded by Ada Lind "
                         f"in {1800 + i}. It lies on the river Orm and has {i} bridges.",
                         "questions": [{"question": f"Who founded Place {i}?", "answer": "Ada Lind"},
                                       {"question": f"When was Place {i} founded?",
                                        "answer": str(1800 + i)}]})
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(articles))
    return str(path)


def test_smoke_writes_consistent_report_json_and_plots(tmp_path, tiny_dir):
    out = tmp_path / "runs" / "knowledge"
    assert main(["bench", "knowledge", "--smoke", "--split", "dev", "--data", _data(tmp_path),
                 "--model", tiny_dir, "--methods", "opsd,sft,notes", "--threads", "1",
                 "--out", str(out) + "/"]) == 0
    result = json.loads((out / "report.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert result["seeds"] == [0, 1] and result["questions"] == 2
    assert set(result["methods"]) == {"opsd", "sft", "notes"}
    # 1 session x 3 methods x 2 seeds, plus one extra lr for sft and opsd
    assert len(result["runs"]) == 3 * 2 + 2
    for m, v in result["methods"].items():
        assert v["transfer"]["n"] in (0, 2) and set(v["per_seed"]) == {"0", "1"}
        after = [p["after"] for p in v["per_seed"].values()]
        assert v["after"] == pytest.approx(sum(after) / 2)
        runs = [r for r in result["runs"] if r["method"] == m and r["lr"] == 1e-3]
        assert v["after"] == pytest.approx(sum(r["after"] for r in runs) / 2 / result["questions"])
        assert len(runs) == 2 and {r["seed"] for r in runs} == {0, 1}
        # forgetting probes on the first seed; KL to base on every run
        by_seed = {r["seed"]: r["forgetting"] for r in runs}
        assert by_seed[0]["general"] is not None and by_seed[1]["general"] is None
        assert all(f["kl_to_base"] is not None for f in by_seed.values())
        c = v["cost"]
        assert c["adapter_bytes"] > 0 and c["kv_cache_bytes"] > 0
        # The method's cost is its runs' mean, and a run's time includes its training time.
        assert c["seconds"] == pytest.approx(sum(r["cost"]["seconds"] for r in runs) / 2)
        assert all(r["cost"]["seconds"] >= r["cost"]["train_seconds"] for r in runs)
        assert c["peak_mb"] > 0
    assert result["methods"]["opsd"]["cost"]["tokens_teacher"] > 0
    assert result["methods"]["sft"]["cost"]["tokens_teacher"] == 0
    assert {(p["method"], p["lr"]) for p in result["sweep"]} == {
        ("sft", 1e-3), ("sft", 3e-3), ("opsd", 1e-3), ("opsd", 3e-3)}
    seq = result["sequential"]["opsd"]
    assert [len(row) for row in seq["correct"]] == [1, 2]
    assert len(seq["retention"]) == 2 and seq["versions"][1]["parent"] == 1
    assert set(seq["forgetting"]) == {"reading", "general", "general_answers", "kl_to_base"}
    assert result["probe_sizes"] == {"reading_items": 2, "general_items": 3}
    md = (out / "report.md").read_text()
    for name in ("transfer.png", "retention.png", "gain-vs-forgetting.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md
    assert "transfer ratio" in md and "Sequential consolidation" in md


def test_prefix_output_and_no_extras(tmp_path, tiny_dir):
    out = tmp_path / "k"
    assert main(["bench", "knowledge", "--smoke", "--split", "dev", "--data", _data(tmp_path),
                 "--model", tiny_dir, "--methods", "sft", "--seeds", "1", "--threads", "1", "--lrs", "",
                 "--sequential", "0", "--practice", "rule,span", "--span-phrasings", "2",
                 "--out", str(out)]) == 0
    result = json.loads((tmp_path / "k.json").read_text())
    assert result["sweep"] == [] and result["sequential"] == {} and len(result["runs"]) == 1
    assert result["config"]["practice_kinds"] == ["rule", "span"]
    assert result["config"]["span_phrasings"] == 2
    assert (tmp_path / "k-transfer.png").exists() and not (tmp_path / "k-retention.png").exists()
    assert "k-transfer.png" in (tmp_path / "k.md").read_text()


def test_joint_consolidates_several_sessions_into_one_adapter_per_method(tmp_path, tiny_dir):
    out = tmp_path / "j"
    assert main(["bench", "knowledge", "--smoke", "--split", "dev", "--data", _data(tmp_path),
                 "--model", tiny_dir, "--methods", "opsd,sft", "--sessions", "0", "--seeds", "1",
                 "--lrs", "", "--sequential", "0", "--joint", "3", "--joint-steps", "2",
                 "--anchor-target", "teacher", "--threads", "1", "--out", str(out) + "/"]) == 0
    result = json.loads((out / "report.json").read_text())
    assert result["runs"] == [] and result["methods"] == {}
    joint = result["joint"]
    assert joint["sessions"] == [0, 1, 2] and joint["questions"] == [2, 2, 2]
    assert result["config"]["opsd"]["anchor_target"] == "teacher"
    for m in ("opsd", "sft"):
        v = joint["methods"][m]
        assert len(v["per_session"]) == 3 and len(v["loss_curve"]) == 2
        assert v["after"] == pytest.approx(sum(v["per_session"]) / 6)
        gap = joint["in_context"] - joint["base"]
        if gap > 0:
            assert v["transfer_ratio"] == pytest.approx((v["after"] - joint["base"]) / gap)
        assert v["cost"]["kv_cache_bytes"] > 0
        assert v["cost"]["seconds"] >= v["cost"]["train_seconds"]
        assert set(v) >= {"reading_drop_pts", "general_drop_pts", "kl_to_base"}
    assert joint["methods"]["opsd"]["cost"]["tokens_teacher"] > 0
    md = (out / "report.md").read_text()
    assert "Joint consolidation: 3 sessions" in md and "](joint.png)" in md
    assert "## Transfer ratio" not in md  # no independent part was run
    assert (out / "joint.png").read_bytes()[:4] == b"\x89PNG"
    # the questions split by whether the practice material asks their fact: the two parts
    # add up to every question, and each part's after is that part's own share
    for m in ("opsd", "sft"):
        bc = joint["methods"][m]["by_coverage"]
        assert bc["covered"]["questions"] + bc["uncovered"]["questions"] == 6
        assert 0.0 <= joint["coverage"] <= 1.0
        assert bc["covered"]["questions"] == pytest.approx(6 * joint["coverage"])
    assert joint["articles"] == [0, 1, 2]
    # practice recall: the training prompts with a known span, asked after training (and of
    # the base before it): a share of the same prompts, named in the report
    base_recall = joint["base_practice_recall"]
    assert 0 < base_recall["prompts"] <= sum(joint["practice_prompts"])
    for m in ("opsd", "sft"):
        r = joint["methods"][m]["practice_recall"]
        assert r["prompts"] == base_recall["prompts"] and 0.0 <= r["recall"] <= 1.0
    assert "Practice recall:" in md and "; the base " in md
    # fit and transfer: the covered questions whose lesson was asked, split by whether it was
    # fit; the two parts are never more than the covered questions
    for m in ("opsd", "sft"):
        bf = joint["methods"][m]["by_fit"]
        assert bf["fit"]["questions"] + bf["unfit"]["questions"] <= (
            joint["methods"][m]["by_coverage"]["covered"]["questions"])
    assert "Fit and transfer:" in md
    # the general questions each method lost are listed, each right on the base
    for m in ("opsd", "sft"):
        lost = joint["methods"][m]["general_lost"]
        right_before = {q for q, _, r in result["forgetting_base"]["general_answers"] if r}
        assert all(q in right_before for q, _, _ in lost)
    # what a run stopped before its report would have left: the joint methods done so far
    partial = json.loads((out / "report-partial.json").read_text())
    assert partial["joint"]["methods"]["sft"]["after"] == joint["methods"]["sft"]["after"]


def test_retention_pools_gain_by_lag():
    base = [0, 1, 0]
    correct = [[2], [1, 3], [2, 2, 1]]  # gains at lag 0: 2, 2, 1
    kept = retention(correct, base)
    assert kept[0] == 1.0
    assert kept[1] == pytest.approx(((1 - 0) + (2 - 1)) / (2 + 2))
    assert kept[2] == pytest.approx((2 - 0) / 2)
    assert retention([[0]], [0]) == [None]


def test_kv_cache_bytes_formula():
    lm = tiny_model(seed=0)
    c = lm.model.config  # 2 layers, 2 kv heads, head_dim 16
    assert kv_cache_bytes(c, 100, 4) == 2 * 2 * 2 * 16 * 100 * 4
    assert not math.isnan(kv_cache_bytes(c, 1, 2))


def test_joint_runs_the_ablation_variants_dream_and_compact_on_cowork_sessions(tmp_path, tiny_dir):
    out = tmp_path / "a"
    methods = "opsd,opsd-onpolicy-fkl,opsd-onpolicy-rkl,opsd-then-onpolicy,dream,compact"
    assert main(["bench", "knowledge", "--smoke", "--split", "dev", "--data", _data(tmp_path),
                 "--model", tiny_dir, "--methods", methods, "--sessions", "0", "--seeds", "1",
                 "--lrs", "", "--sequential", "0", "--joint", "2", "--joint-steps", "2",
                 "--threads", "1", "--out", str(out) + "/"]) == 0
    joint = json.loads((out / "report.json").read_text())["joint"]
    assert set(joint["methods"]) == set(methods.split(","))
    assert 0.0 <= joint["coverage"] <= 1.0 and all(n > 0 for n in joint["practice_prompts"])
    on_policy = joint["methods"]["opsd-onpolicy-fkl"]["cost"]["teacher_rows"]
    assert on_policy["teacher_answers"] == 0  # on-policy rows: the teacher only scores
    assert joint["methods"]["opsd"]["cost"]["teacher_rows"]["teacher_answers"] > 0
    compact = joint["methods"]["compact"]
    assert compact["kl_to_base"] == 0.0 and compact["reading_drop_pts"] == 0.0
    for m in joint["methods"].values():
        assert "transfer_ratio_em" in m and "after_em" in m


def test_cowork_session_has_the_models_own_answer_and_no_title_reaches_practice(tiny_dir):
    from onthejob.bench.knowledge import COWORK_REPLY, session_for
    from onthejob.learn.practice import practice_prompts
    from onthejob.model import load_model

    lm = load_model(tiny_dir)
    article = {"title": "Zorblat", "context": "The river Orm was bridged in 1820 by Ada Lind."}
    turns = session_for(article, lm)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert article["context"] in turns[0]["content"] and turns[3]["content"] == COWORK_REPLY
    prompts = practice_prompts(None, turns)
    assert any(p.answer == "1820" for p in prompts)


def test_first_and_stride_pick_articles_inside_the_split():
    from onthejob.bench.knowledge import article_numbers, load_articles

    assert article_numbers("test", 40, stride=5) == list(range(200, 400, 5))
    assert article_numbers("dev", 5, first=148) == [148, 149, 150, 151, 152]
    assert article_numbers("dev", 10, first=195) == [195, 196, 197, 198, 199]  # never past 199
    # the extra range: no split's articles, and never the retention probes' 1000+
    assert article_numbers("extra", 3, first=174) == [574, 575, 576]
    assert article_numbers("extra", 9, first=598) == [998, 999]
    data = [{"title": f"t{i}", "context": "c", "questions": []} for i in range(400)]
    got = load_articles(data, "test", 3, first=1, stride=50)
    assert [a["number"] for a in got] == [201, 251, 301] and got[0]["title"] == "t201"
    with pytest.raises(ValueError, match="--stride"):
        article_numbers("dev", 3, stride=0)
    with pytest.raises(ValueError, match="no articles"):
        load_articles(data, "dev", 3, first=200)


def _two_rounds(tmp_path, tiny_dir, methods: str, out) -> dict:
    """The joint part only, 3 sessions in 2 rounds of 2 steps: the report's joint methods."""
    assert main(["bench", "knowledge", "--smoke", "--split", "dev", "--data", _data(tmp_path),
                 "--model", tiny_dir, "--methods", methods, "--sessions", "0",
                 "--seeds", "1", "--lrs", "", "--sequential", "0", "--joint", "3", "--rounds", "2",
                 "--joint-steps", "2", "--threads", "1", "--out", str(out) + "/"]) == 0
    return json.loads((out / "report.json").read_text())["joint"]["methods"]


def test_joint_in_rounds_chains_versions_and_reports_each_round(tmp_path, tiny_dir):
    from onthejob.bench.knowledge import batches

    assert batches(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert batches([1, 2], 5) == [[1], [2]] and batches([1, 2, 3], 1) == [[1, 2, 3]]
    out = tmp_path / "r"
    methods = _two_rounds(tmp_path, tiny_dir, "opsd,compact,sft,notes", out)
    assert [len(methods[m]["rounds"]) for m in ("sft", "notes", "compact")] == [1, 1, 0]
    v = methods["opsd"]
    # round 1 trained sessions 0-1 (asked their 4 questions), round 2 session 2, as a child
    [r1] = v["rounds"]
    assert (r1["round"], r1["sessions"], r1["questions"]) == (1, 2, 4)
    assert len(r1["per_session"]) == 2 and sum(r1["per_session"]) == r1["after"]
    assert v["cost"]["steps"] == 4 and len(v["loss_curve"]) == 4  # 2 steps a round
    assert "Consolidated in 2 rounds" in (out / "report.md").read_text()


def test_stacked_rounds_train_a_fresh_adapter_over_the_frozen_earlier_ones(tmp_path, tiny_dir):
    methods = _two_rounds(tmp_path, tiny_dir, "opsd,opsd-stacked", tmp_path / "s")
    child, stack = methods["opsd"], methods["opsd-stacked"]
    assert len(stack["rounds"]) == 1 and stack["cost"]["steps"] == 4
    # a child is one adapter; a stack of two rounds is served as both
    assert stack["cost"]["adapter_bytes"] > 1.9 * child["cost"]["adapter_bytes"]


def test_practice_recall_asks_the_trained_prompts_with_a_known_span_without_their_hint(monkeypatch):
    from types import SimpleNamespace

    from onthejob.bench import knowledge as kb
    from onthejob.learn.evaluate import ANSWER_HINT, QaResult
    from onthejob.learn.practice import PracticePrompt

    practice = [PracticePrompt("When was it built?" + ANSWER_HINT, "rule", answer="1889"),
                PracticePrompt("Who built it?" + ANSWER_HINT, "span", answer="Eiffel"),
                PracticePrompt("What do you know about Paris?", "topic"),  # no known span
                PracticePrompt("Not trained?" + ANSWER_HINT, "rule", answer="x")]  # not a probe
    session = SimpleNamespace(practice=practice, probes=[p.text for p in practice[:3]])
    asked = []

    def fake_answer(lm, questions, golds, batch=16):
        asked.extend(zip(questions, golds, strict=True))
        right = [g == "1889" for g in golds]
        return QaResult(["1889" if r else "no" for r in right], right, [float(r) for r in right])

    monkeypatch.setattr(kb, "answer", fake_answer)
    got = kb.practice_recall(None, [session])
    assert (got["prompts"], got["recall"]) == (2, 0.5)
    assert got["by_kind"] == {"rule": {"prompts": 1, "recall": 1.0},
                              "span": {"prompts": 1, "recall": 0.0}}
    assert got["spans"] == [[["1889", True], ["Eiffel", False]]]
    assert asked == [("When was it built?", "1889"), ("Who built it?", "Eiffel")]
    assert kb.practice_recall(None, [SimpleNamespace(practice=[], probes=[])])["prompts"] == 0


def test_by_fit_splits_covered_questions_by_whether_their_lesson_was_answered():
    from types import SimpleNamespace

    from onthejob.bench import knowledge as kb

    def qa(*right):
        return SimpleNamespace(correct=list(right))

    session = SimpleNamespace(golds=["1889", "Gustave Eiffel", "Paris"],
                              base=qa(False, False, False), in_context=qa(True, True, False))
    recall = {"spans": [[["1889", True], ["Eiffel", False], ["the tower", True]]]}
    got = kb.by_fit([session], recall, [[True, False, False]])
    # 1889: its lesson was answered (fit), and the question after training too
    assert got["fit"] == {"questions": 1, "base": 0.0, "in_context": 1.0, "after": 1.0,
                          "transfer_ratio": 1.0}
    # "Eiffel" matches "Gustave Eiffel" (F1 0.67) and was not answered: not fit; "Paris" has
    # no lesson and is in neither part
    assert got["unfit"]["questions"] == 1 and got["unfit"]["after"] == 0.0
    assert kb.by_fit([session], None, [[True, False, False]]) == {}
    assert kb.by_fit([session], recall, None) == {}


def test_general_lost_lists_what_was_right_before_and_wrong_after():
    from onthejob.bench import knowledge as kb

    before = {"general_answers": [["Capital of France?", "Paris", True],
                                  ["2 + 2?", "5", False], ["Largest ocean?", "Pacific", True]]}
    after = {"general_answers": [["Capital of France?", "Lyon", False],
                                 ["2 + 2?", "4", True], ["Largest ocean?", "the Pacific", True]]}
    assert kb.general_lost(before, after) == [["Capital of France?", "Paris", "Lyon"]]
    assert kb.general_lost({}, after) == []
