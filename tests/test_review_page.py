"""The review page (/review) in-process with FastAPI's TestClient: every route, sign-in and its
cookie, CSRF refusals, tenant isolation, escaping of what users wrote, the review rules shared
with the API, and the learning page's runs, gate words, charts, activation and rollback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from review_fixtures import XSS_IMG, XSS_PROBE, XSS_SCRIPT, build_world, csrf_of, fake_adapter

from onthejob.serve.app import create_app
from onthejob.serve.web import auth
from onthejob.serve.web.views import gate_words, run_view
from onthejob.store import Store


@pytest.fixture
def page(tiny_lm, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'review.db'}")
    world = build_world(store, tmp_path / "adapters")
    figures = tmp_path / "figures"
    (figures / "knowledge").mkdir(parents=True)
    (figures / "curve.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    (figures / "knowledge" / "transfer.png").write_bytes(b"\x89PNG\r\n\x1a\nsub")
    (tmp_path / "secret.png").write_bytes(b"not a figure")
    app = create_app(tiny_lm, store, figures=figures)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client, world
    store.close()


def sign_in(client: TestClient, key: str):
    form = client.get("/review/signin")
    assert form.status_code == 200
    return client.post("/review/signin", data={"csrf": csrf_of(form.text), "key": key},
                       follow_redirects=False)


def signed_in(client: TestClient, key: str) -> TestClient:
    assert sign_in(client, key).status_code == 303
    return client


def test_every_page_needs_sign_in(page):
    client, world = page
    for path in ("/review", f"/review/sessions/{world.bluefin}", "/review/learning",
                 "/review/learning/rollback", f"/review/learning/adapters/{world.adapters[1]}/activate",
                 "/review/figures", "/review/figures/curve.png"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/review/signin", path
    r = client.post(f"/review/sessions/{world.probe}/review",
                    data={"verdict": "up", "csrf": "x"}, follow_redirects=False)
    assert r.status_code == 303 and world.store.get_review("acme", world.probe) is None
    assert client.get("/", follow_redirects=False).headers["location"] == "/review"


def test_sign_in_keeps_the_key_in_a_strict_httponly_cookie(page):
    client, world = page
    r = sign_in(client, world.keys["acme"])
    assert r.status_code == 303 and r.headers["location"] == "/review"
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith(auth.KEY_COOKIE))
    flags = cookie.lower()
    assert "httponly" in flags and "samesite=strict" in flags and "path=/review" in flags
    r = client.get("/review")
    assert r.status_code == 200 and "Project Bluefin launch plan" in r.text
    assert "<span class=\"tenant\"" in r.text and ">acme<" in r.text


def test_a_wrong_or_revoked_key_does_not_sign_in(page):
    client, world = page
    r = sign_in(client, "otj-not-a-real-key")
    assert r.status_code == 401 and "not valid" in r.text
    assert not any(c.startswith(auth.KEY_COOKIE) for c in r.headers.get_list("set-cookie"))
    assert client.get("/review", follow_redirects=False).status_code == 303
    signed_in(client, world.keys["acme"])
    world.store.revoke_key("acme", world.keys["acme"][:12])
    r = client.get("/review", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/review/signin"
    assert any(c.startswith(f'{auth.KEY_COOKIE}=""') for c in r.headers.get_list("set-cookie"))


def test_sign_in_form_needs_its_own_token(page):
    client, world = page
    client.get("/review/signin")
    r = client.post("/review/signin", data={"csrf": "guessed", "key": world.keys["acme"]},
                    follow_redirects=False)
    assert r.status_code == 403 and "security token" in r.text
    fresh = TestClient(client.app, base_url="http://127.0.0.1")  # no sign-in cookie at all
    r = fresh.post("/review/signin", data={"csrf": "", "key": world.keys["acme"]},
                   follow_redirects=False)
    assert r.status_code == 403


def test_every_form_post_without_the_right_csrf_token_is_refused(page):
    client, world = page
    signed_in(client, world.keys["acme"])
    other_token = auth.csrf_for_key(world.keys["globex"])
    v1, v3 = world.adapters[1], world.adapters[3]
    posts = [(f"/review/sessions/{world.probe}/review", {"verdict": "up", "text": "x"}),
             (f"/review/learning/adapters/{v1}/activate", {}),
             ("/review/learning/rollback", {}),
             ("/review/signout", {})]
    for path, data in posts:
        for token in (None, "", "0" * 64, other_token):
            body = {"x": "1", **data} if token is None else {**data, "csrf": token}
            r = client.post(path, data=body, follow_redirects=False)
            assert r.status_code == 403, (path, token)
    assert world.store.get_review("acme", world.probe) is None
    assert world.store.active_adapter("acme").id == v3
    assert client.get("/review").status_code == 200  # still signed in


def test_sign_out(page):
    client, world = page
    signed_in(client, world.keys["acme"])
    token = csrf_of(client.get("/review").text)
    r = client.post("/review/signout", data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/review/signin"
    assert client.get("/review", follow_redirects=False).status_code == 303


def test_sessions_list_status_length_review_date_and_filters(page):
    client, world = page
    signed_in(client, world.keys["acme"])
    html = client.get("/review").text
    for title in ("Project Bluefin launch plan", "Release checklist"):
        assert title in html
    assert "Globex secret plans" not in html
    assert "7 messages" in html and "2 messages" in html
    assert "▲ up" in html and "not reviewed" in html and "learned into v1" in html
    assert "ended" in html and "open" in html and " UTC" in html
    unreviewed = client.get("/review?show=unreviewed").text
    assert "XSS probe" in unreviewed and "Project Bluefin" in unreviewed
    assert "Release checklist" not in unreviewed
    opened = client.get("/review?show=open").text
    assert "XSS probe" in opened and "Project Bluefin" not in opened
    assert client.get("/review?show=bogus").status_code == 400


def test_sessions_list_pages(page, monkeypatch):
    client, world = page
    from onthejob.serve.web import pages

    monkeypatch.setattr(pages, "PAGE_SIZE", 2)
    signed_in(client, world.keys["acme"])
    first = client.get("/review").text
    assert "older →" in first and "← newer" not in first
    second = client.get("/review?offset=2").text
    assert "← newer" in second and "older →" not in second
    titles = ("XSS probe", "Release checklist", "Project Bluefin")
    assert sum(t in first for t in titles) == 2 and sum(t in second for t in titles) == 1


def test_another_tenants_session_is_404(page):
    client, world = page
    signed_in(client, world.keys["globex"])
    assert client.get(f"/review/sessions/{world.other}").status_code == 200
    r = client.get(f"/review/sessions/{world.bluefin}")
    assert r.status_code == 404 and "Bluefin" not in r.text and "Oslo" not in r.text
    assert client.get("/review/sessions/not-a-uuid").status_code == 404
    token = csrf_of(client.get("/review").text)
    r = client.post(f"/review/sessions/{world.probe}/review",
                    data={"csrf": token, "verdict": "down"}, follow_redirects=False)
    assert r.status_code == 404 and world.store.get_review("acme", world.probe) is None
    r = client.post(f"/review/learning/adapters/{world.adapters[1]}/activate",
                    data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 404 and world.store.active_adapter("acme").id == world.adapters[3]
    assert client.get(f"/review/learning/adapters/{world.adapters[1]}/activate").status_code == 404
    learning = client.get("/review/learning").text
    assert "No adapter yet" in learning and "did not learn" not in learning


def test_xss_probe_renders_as_text(page):
    client, world = page
    signed_in(client, world.keys["acme"])
    token = csrf_of(client.get("/review").text)
    client.post(f"/review/sessions/{world.probe}/review",
                data={"csrf": token, "verdict": "down", "text": XSS_IMG}, follow_redirects=False)
    for path in (f"/review/sessions/{world.probe}", "/review", "/review?show=open"):
        r = client.get(path)
        assert "<script" not in r.text.lower(), path
        assert "<img src=x" not in r.text and "onerror=\"" not in r.text, path
        assert "script-src" not in r.headers["content-security-policy"]  # default-src 'none'
        assert "default-src 'none'" in r.headers["content-security-policy"]
    html = client.get(f"/review/sessions/{world.probe}").text
    assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=&#34;document.title=&#39;pwned&#39;&#34;&gt;" in html \
        or "&lt;img src=x onerror=&quot;document.title='pwned'&quot;&gt;" in html
    assert XSS_SCRIPT not in html and XSS_PROBE not in html


def test_transcript_shows_markdown_tool_calls_observations_and_compactions(page):
    client, world = page
    signed_in(client, world.keys["acme"])
    html = client.get(f"/review/sessions/{world.bluefin}").text
    assert "<strong>Bluefin</strong>" in html  # markdown, rendered
    assert "kind-tool_call" in html and "search_docs(" in html and "&#34;query&#34;" in html
    assert "kind-observation" in html and "tool result for call_1" in html
    assert "launch.md: Bluefin, Oslo" in html
    assert "kind-compaction" in html and "the model&#39;s summary" in html
    assert html.index("search_docs(") < html.index("launch.md") < html.index("Who leads it?")


def test_review_in_place_changeable_until_consolidated(page):
    client, world = page
    signed_in(client, world.keys["acme"])
    html = client.get(f"/review/sessions/{world.bluefin}").text
    assert "Save review" in html
    token = csrf_of(html)
    r = client.post(f"/review/sessions/{world.bluefin}/review",
                    data={"csrf": token, "verdict": "up", "text": "Good.\r\nRemember Oslo."},
                    follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == f"/review/sessions/{world.bluefin}?saved=up"
    saved = world.store.get_review("acme", world.bluefin)
    assert (saved.verdict, saved.text) == ("up", "Good.\nRemember Oslo.")
    page_after = client.get(r.headers["location"]).text
    assert "Review saved: thumbs up" in page_after and "Change review" in page_after
    assert re.search(r'value="up" required checked>', page_after)
    assert not re.search(r'value="down"[^>]*checked', page_after)
    r = client.post(f"/review/sessions/{world.bluefin}/review",
                    data={"csrf": token, "verdict": "down", "text": "Wrong city."},
                    follow_redirects=False)
    assert r.status_code == 303 and world.store.get_review("acme", world.bluefin).verdict == "down"
    # The API sees the same review: one store, one rule.
    api = client.get(f"/v1/sessions/{world.bluefin}",
                     headers={"Authorization": f"Bearer {world.keys['acme']}"}).json()
    assert api["review"]["verdict"] == "down" and api["review"]["text"] == "Wrong city."
    # Consolidated: the review can no longer change, here as in the API.
    html = client.get(f"/review/sessions/{world.learned}").text
    assert "can no longer change" in html and "Save review" not in html and "<form method=\"post\" action=\"/review/sessions" not in html
    r = client.post(f"/review/sessions/{world.learned}/review",
                    data={"csrf": token, "verdict": "down", "text": "changed my mind"},
                    follow_redirects=False)
    assert r.status_code == 409 and "can no longer change" in r.text
    kept = world.store.get_review("acme", world.learned)
    assert (kept.verdict, kept.text) == ("up", "Right: tagging comes last.")
    api = client.post(f"/v1/sessions/{world.learned}/review", json={"verdict": "down"},
                      headers={"Authorization": f"Bearer {world.keys['acme']}"})
    assert api.status_code == 409


def test_review_needs_a_verdict_and_fits_the_api_limit(page):
    client, world = page
    signed_in(client, world.keys["acme"])
    token = csrf_of(client.get("/review").text)
    url = f"/review/sessions/{world.probe}/review"
    for data in ({"csrf": token}, {"csrf": token, "verdict": "meh"},
                 {"csrf": token, "verdict": "up", "text": "x" * 20_001},
                 {"csrf": token, "verdict": "up", "text": "a\x00b"}):
        r = client.post(url, data=data, follow_redirects=False)
        assert r.status_code == 400 and "Review not saved" in r.text, data.get("verdict")
    assert world.store.get_review("acme", world.probe) is None


def test_form_posts_are_bounded_and_url_encoded(tiny_lm, tmp_path):
    from onthejob.serve.http import Limits

    store = Store(f"sqlite:///{tmp_path / 'small.db'}")
    world = build_world(store, tmp_path / "adapters")
    app = create_app(tiny_lm, store, limits=Limits(max_body_bytes=4096))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        signed_in(client, world.keys["acme"])
        token = auth.csrf_for_key(world.keys["acme"])
        url = f"/review/sessions/{world.probe}/review"
        form = {"content-type": "application/x-www-form-urlencoded"}
        big = f"csrf={token}&verdict=up&text={'a' * 5000}".encode()
        assert client.post(url, content=big, headers=form).status_code == 413

        def chunks():  # no Content-Length: the limit holds while reading
            yield f"csrf={token}&verdict=up&text=".encode()
            for _ in range(10):
                yield b"a" * 1000

        assert client.post(url, content=chunks(), headers=form).status_code == 413
        many = "&".join(f"f{i}=x" for i in range(20)) + f"&csrf={token}&verdict=up"
        assert client.post(url, content=many.encode(), headers=form).status_code == 400
        multipart = client.post(url, data={"csrf": token, "verdict": "up"},
                                files={"f": ("a.txt", b"abc")})
        assert multipart.status_code == 415
        assert store.get_review("acme", world.probe) is None
        ok = client.post(url, content=f"csrf={token}&verdict=up&text=%FF".encode(),
                         headers=form, follow_redirects=False)
        assert ok.status_code == 303 and store.get_review("acme", world.probe).text == "\ufffd"
    store.close()


def test_learning_page_runs_adapters_gate_words_and_chart(page):
    client, world = page
    signed_in(client, world.keys["acme"])
    html = client.get("/review/learning").text
    assert "run 1" in html and "done: promoted" in html and "step 16 of 16 (100%)" in html
    assert "loss 0.420" in html and "made adapter v3" in html
    assert 'http-equiv="refresh"' not in html  # nothing running: no reloading
    assert "Serving now: <strong>v3</strong>" in html
    assert "parent v1" in html and "parent base model" in html
    assert "learned: +0.116 on held-back probes (F1 0.20 → 0.32), needs ≥ +0.02" in html
    assert "forgot: KL 0.214 to the base (≤ 0.50), reading +0.000" in html
    assert "rejected: did not learn: held-back probe F1 gain +0.004 &lt; 0.02" in html
    assert "serving now: learned (gain +0.090)" in html
    assert html.count("<svg") == 3 and html.count("<circle") == 9  # 3 panels x 3 versions
    assert html.count('stroke-dasharray="4 3"') == 3  # each panel shows the gate's threshold
    assert f"/review/learning/adapters/{world.adapters[1]}/activate" in html
    assert f"/review/learning/adapters/{world.adapters[3]}/activate" not in html  # active
    assert "/review/learning/rollback" in html


def test_a_running_consolidation_shows_live_progress(page):
    client, world = page
    signed_in(client, world.keys["acme"])
    run = world.store.create_run("consolidate", "acme",
                                 params={"method": "opsd", "train": {"steps": 40}})
    world.store.update_run(run.id, progress={"step": 10, "loss": 1.25, "s_per_step": 2.0,
                                             "eta_s": 60.0})
    html = client.get("/review/learning").text
    assert '<meta http-equiv="refresh" content="5">' in html
    assert 'max="40" value="10"' in html and "step 10 of 40 (25%)" in html
    assert "about 60 s left" in html
    world.store.update_run(run.id, progress={"step": 30, "eta_s": 20.0})
    html = client.get("/review/learning").text
    assert "step 30 of 40 (75%)" in html and "about 20 s left" in html
    world.store.update_run(run.id, status="failed", error="ValueError: out of memory")
    html = client.get("/review/learning").text
    assert 'http-equiv="refresh"' not in html and "ValueError: out of memory" in html


def test_activate_asks_first_then_activates_the_checked_version(page):
    client, world = page
    signed_in(client, world.keys["acme"])
    v1, v2, v3 = (world.adapters[v] for v in (1, 2, 3))
    confirm = client.get(f"/review/learning/adapters/{v1}/activate")
    assert confirm.status_code == 200 and "Activate v1?" in confirm.text
    assert "v3, active now, is retired" in confirm.text
    assert world.store.active_adapter("acme").id == v3  # asking changes nothing
    rejected = client.get(f"/review/learning/adapters/{v2}/activate").text
    assert "The gate rejected this version" in rejected
    r = client.post(f"/review/learning/adapters/{v1}/activate",
                    data={"csrf": csrf_of(confirm.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/review/learning?activated=1"
    assert world.store.active_adapter("acme").id == v1
    assert world.store.get_adapter(v3).status == "retired"
    assert "Version 1 is active" in client.get(r.headers["location"]).text
    # A version whose files no longer match the registry is not activated.
    with open(world.store.get_adapter(v3).path + "/adapter_model.safetensors", "ab") as f:
        f.write(b"tampered")
    r = client.post(f"/review/learning/adapters/{v3}/activate",
                    data={"csrf": csrf_of(confirm.text)}, follow_redirects=False)
    assert r.status_code == 409 and "corrupt" in r.text
    assert world.store.active_adapter("acme").id == v1


def test_activation_refuses_files_swapped_for_another_valid_adapter(page, tmp_path):
    client, world = page
    signed_in(client, world.keys["acme"])
    v1 = world.store.get_adapter(world.adapters[1])
    other, _ = fake_adapter(tmp_path / "elsewhere")
    for name in ("adapter_config.json", "adapter_model.safetensors", "checksum.sha256"):
        with open(f"{other}/{name}", "rb") as src, open(f"{v1.path}/{name}", "wb") as dst:
            dst.write(src.read())
    token = auth.csrf_for_key(world.keys["acme"])
    r = client.post(f"/review/learning/adapters/{v1.id}/activate", data={"csrf": token},
                    follow_redirects=False)
    assert r.status_code == 409 and "does not match the registry" in r.text
    assert world.store.active_adapter("acme").id == world.adapters[3]


def test_rollback_asks_first_then_restores_the_parent(page):
    client, world = page
    signed_in(client, world.keys["acme"])
    confirm = client.get("/review/learning/rollback")
    assert confirm.status_code == 200 and "Roll back v3?" in confirm.text
    assert "its parent <strong>v1</strong> becomes active" in confirm.text
    assert world.store.active_adapter("acme").id == world.adapters[3]
    r = client.post("/review/learning/rollback", data={"csrf": csrf_of(confirm.text)},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/review/learning?rolled_back=1"
    assert world.store.active_adapter("acme").id == world.adapters[1]
    assert "Rolled back: version 1 is active" in client.get(r.headers["location"]).text
    confirm = client.get("/review/learning/rollback")
    assert "the base model serves (v1 has no parent)" in confirm.text
    client.post("/review/learning/rollback", data={"csrf": csrf_of(confirm.text)})
    assert world.store.active_adapter("acme") is None
    assert client.get("/review/learning/rollback").status_code == 409
    r = client.post("/review/learning/rollback", data={"csrf": csrf_of(confirm.text)},
                    follow_redirects=False)
    assert r.status_code == 409 and "Nothing to roll back" in r.text


def test_figures_are_listed_and_served_and_nothing_else(page):
    client, world = page
    signed_in(client, world.keys["acme"])
    html = client.get("/review/figures").text
    assert 'src="/review/figures/curve.png"' in html
    assert 'src="/review/figures/knowledge/transfer.png"' in html
    r = client.get("/review/figures/curve.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.endswith(b"fake")
    assert client.get("/review/figures/knowledge/transfer.png").content.endswith(b"sub")
    for name in ("../secret.png", "..%2Fsecret.png", "nope.png", "knowledge"):
        assert client.get(f"/review/figures/{name}").status_code == 404, name


def test_the_real_benchmark_plots_are_found_in_a_checkout(tiny_lm, tmp_path):
    from onthejob import config
    from onthejob.serve.web.pages import figure_files

    folder = Path(__file__).resolve().parents[1] / "docs" / "results"
    plots = {p.relative_to(folder).as_posix() for p in folder.rglob("*.png")}
    found = figure_files(config.figures_dir())
    assert plots and plots <= set(found)


def test_pages_fit_a_phone_and_the_style_sheet_is_served(page):
    client, world = page
    signed_in(client, world.keys["acme"])
    for path in ("/review", f"/review/sessions/{world.bluefin}", "/review/learning",
                 "/review/figures", "/review/learning/rollback"):
        html = client.get(path).text
        assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    css = client.get("/review/static/page.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "@media (max-width: 640px)" in css.text


def test_gate_words_and_run_progress_from_records():
    from datetime import UTC, datetime

    from onthejob.store import Adapter, Run

    now = datetime.now(UTC)
    adapter = Adapter(1, "tenant", "acme", 2, 1, "active", "opsd", "/x", "c",
                      {"gain": 0.18, "kl_to_base": 0.22, "retention_drop": 0.0}, "ok", now)
    assert gate_words(adapter) == ("learned: +0.180 on held-back probes; "
                                   "forgot: KL 0.220 to the base, reading +0.000")
    bare = Adapter(1, "tenant", "acme", 1, None, "candidate", "sft", "/x", "c", {}, "", now)
    assert gate_words(bare) == "no gate numbers recorded"
    run = Run(1, "dream", "acme", "running", {"train": {"steps": 8}}, {"phase": "writing"},
              "", now, None, now)
    view = run_view(run)
    assert (view.step, view.of, view.phase, view.percent) == (None, 8, "writing", None)


def test_store_reviews_of_and_the_reviewed_filter(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    world = build_world(store, tmp_path / "adapters")
    assert set(store.reviews_of("acme", [world.learned, world.bluefin, world.other, "x"])) \
        == {world.learned}
    assert store.reviews_of("globex", [world.learned]) == {}
    unreviewed = {s.id for s in store.list_sessions("acme", reviewed=False)}
    assert unreviewed == {world.bluefin, world.probe}
    assert {s.id for s in store.list_sessions("acme", reviewed=True)} == {world.learned}
    store.close()


def test_figures_are_found_at_any_depth_and_never_outside_the_folder(tmp_path):
    from onthejob.serve.web.pages import figure_files

    png = b"\x89PNG\r\n\x1a\n"
    folder = tmp_path / "results"
    (folder / "run" / "p1").mkdir(parents=True)
    (folder / "top.png").write_bytes(png)
    (folder / "run" / "p1" / "joint.png").write_bytes(png)
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "private.png").write_bytes(png)
    (folder / "link").symlink_to(outside, target_is_directory=True)
    assert set(figure_files(folder)) == {"top.png", "run/p1/joint.png"}
