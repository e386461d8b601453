"""The review page in a real browser: headless Chromium from Debian's packages, driven by
Selenium through Debian's chromedriver (nothing is downloaded). The server runs under uvicorn
on 127.0.0.1, on a port the OS picks, and stops at the end of each test. Each test writes a
screenshot to docs/screenshots/.

Skipped, saying why, where chromium or chromium-driver is missing
(`apt-get install -y chromium chromium-driver`; .ci/run installs them)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from review_fixtures import XSS_PROBE, build_world

from onthejob.serve.app import create_app
from onthejob.serve.web import auth
from onthejob.store import Store

CHROMIUM = os.environ.get("ONTHEJOB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ONTHEJOB_CHROMEDRIVER", "/usr/bin/chromedriver")
SHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
DESKTOP, PHONE = (1100, 800), (390, 844)


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        return (f"no headless browser: {CHROMIUM} or {CHROMEDRIVER} is missing; install "
                "Debian's with `apt-get install -y chromium chromium-driver` (.ci/run does)")
    return None


if (_why := _missing()) is not None:
    if os.environ.get("ONTHEJOB_REQUIRE_BROWSER"):  # CI: a browser test must run, not skip
        raise RuntimeError(f"ONTHEJOB_REQUIRE_BROWSER is set but {_why}")
    pytest.skip(_why, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402


class LocalServer:
    """The app under uvicorn on 127.0.0.1 and a free port, in a thread; stop() ends it."""

    def __init__(self, app) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       daemon=True)

    def start(self) -> LocalServer:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start within 20 s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.socket.close()
        assert not self.thread.is_alive(), "the test server did not stop"


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--hide-scrollbars", f"--window-size={DESKTOP[0]},{DESKTOP[1]}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def site(tiny_lm, tmp_path, browser):
    store = Store(f"sqlite:///{tmp_path / 'browser.db'}")
    world = build_world(store, tmp_path / "adapters")
    server = LocalServer(create_app(tiny_lm, store)).start()
    browser.delete_all_cookies()
    browser.set_window_size(*DESKTOP)
    yield browser, server.url, world
    server.stop()
    store.close()


def shoot(driver, name: str, size: tuple[int, int] = DESKTOP) -> Path:
    """A screenshot of the whole page (the window grows to its height) in docs/screenshots."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size[0], min(max(size[1], height + 20), 4000))
    path = SHOTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    driver.set_window_size(*size)
    return path


def click(driver, css: str | None = None, *, link: str | None = None,
          partial: str | None = None) -> None:
    """Click a button or link that loads a page at a new address, and wait until it has loaded."""
    if css is not None:
        element = driver.find_element(By.CSS_SELECTOR, css)
    elif link is not None:
        element = driver.find_element(By.LINK_TEXT, link)
    else:
        element = driver.find_element(By.PARTIAL_LINK_TEXT, partial)
    before = driver.current_url  # every click here loads a page at another address
    element.click()
    wait = WebDriverWait(driver, 20, ignored_exceptions=(WebDriverException,))
    wait.until(lambda d: d.current_url != before)
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")


def sign_in(driver, url: str, key: str) -> None:
    driver.get(f"{url}/review/signin")
    driver.find_element(By.ID, "key").send_keys(key)
    click(driver, "form button[type=submit]")
    assert driver.find_element(By.TAG_NAME, "h1").text == "Sessions"


def text_of(driver) -> str:
    return driver.find_element(By.TAG_NAME, "main").text


def test_sign_in_open_a_session_and_review_it(site):
    driver, url, world = site
    driver.get(f"{url}/review")
    assert driver.current_url == f"{url}/review/signin"
    driver.find_element(By.ID, "key").send_keys(world.keys["acme"])
    shoot(driver, "signin")
    click(driver, "form button[type=submit]")
    cookie = driver.get_cookie(auth.KEY_COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert "Project Bluefin launch plan" in text_of(driver)
    shoot(driver, "sessions")
    click(driver, link="Project Bluefin launch plan")
    main = text_of(driver)
    assert "search_docs(" in main and "launch.md: Bluefin, Oslo" in main
    assert "compaction: the model's summary" in main
    driver.find_element(By.CSS_SELECTOR, "input[name=verdict][value=up]").click()
    driver.find_element(By.ID, "text").send_keys("Correct. Remember: Bluefin launches in Oslo.")
    click(driver, "#review button[type=submit]")
    assert "Review saved: thumbs up." in text_of(driver)
    saved = world.store.get_review("acme", world.bluefin)
    assert (saved.verdict, saved.text) == ("up", "Correct. Remember: Bluefin launches in Oslo.")
    shoot(driver, "session-reviewed")
    driver.find_element(By.CSS_SELECTOR, "input[name=verdict][value=down]").click()
    click(driver, "#review button[type=submit]")
    assert world.store.get_review("acme", world.bluefin).verdict == "down"  # still changeable


def test_unreviewed_filter_and_xss_probe_stays_text(site):
    driver, url, world = site
    sign_in(driver, url, world.keys["acme"])
    click(driver, link="unreviewed")
    listed = text_of(driver)
    assert "Release checklist" not in listed and "Project Bluefin" in listed
    click(driver, partial="XSS probe")
    assert driver.title != "pwned"
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - raises when no alert opened
    assert XSS_PROBE in text_of(driver)  # shown, character for character, as text
    assert not driver.find_elements(By.CSS_SELECTOR, "main script, main img")
    shoot(driver, "xss-probe")


def test_roll_back_an_adapter_after_confirming(site):
    driver, url, world = site
    sign_in(driver, url, world.keys["acme"])
    click(driver, link="Learning")
    main = text_of(driver)
    assert "Serving now: v3" in main and "learned: +0.116 on held-back probes" in main
    assert driver.find_elements(By.CSS_SELECTOR, "figure.chart svg circle")
    shoot(driver, "learning")
    click(driver, partial="Roll back v3")
    assert "Roll back v3?" in text_of(driver)
    assert world.store.active_adapter("acme").id == world.adapters[3]  # not before confirming
    shoot(driver, "rollback-confirm")
    click(driver, "form.row button[type=submit]")
    assert "Rolled back: version 1 is active" in text_of(driver)
    assert world.store.active_adapter("acme").id == world.adapters[1]
    assert world.store.get_adapter(world.adapters[3]).status == "retired"


def test_another_tenants_session_page_is_404(site):
    driver, url, world = site
    sign_in(driver, url, world.keys["globex"])
    assert "Project Bluefin" not in text_of(driver)
    driver.get(f"{url}/review/sessions/{world.bluefin}")
    assert driver.find_element(By.TAG_NAME, "h1").text == "No such session"
    assert "Oslo" not in text_of(driver)
    shoot(driver, "other-tenant-404")
    cookie = driver.get_cookie(auth.KEY_COOKIE)["value"]
    r = httpx.get(f"{url}/review/sessions/{world.bluefin}",
                  cookies={auth.KEY_COOKIE: cookie})
    assert r.status_code == 404
    r = httpx.get(f"{url}/review/sessions/{world.other}", cookies={auth.KEY_COOKIE: cookie})
    assert r.status_code == 200


def test_phone_sized_window_and_figures(site):
    driver, url, world = site
    sign_in(driver, url, world.keys["acme"])
    driver.set_window_size(*PHONE)
    for path, name in ((f"/review/sessions/{world.bluefin}", "session-phone"),
                       ("/review", "sessions-phone"), ("/review/learning", "learning-phone")):
        driver.get(url + path)
        wide = driver.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth")
        assert wide <= 0, f"{path} scrolls sideways by {wide}px on a {PHONE[0]}px window"
        shoot(driver, name, PHONE)
    driver.set_window_size(*DESKTOP)
    driver.get(f"{url}/review/figures")
    images = driver.find_elements(By.CSS_SELECTOR, ".figures img")
    assert images, "the figures page shows no plot"
    loaded = driver.execute_script(
        "return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length")
    assert loaded == len(images)
    shoot(driver, "figures")
