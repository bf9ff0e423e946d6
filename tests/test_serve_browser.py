"""The search page at ``/`` in a real headless browser: a real `pecm serve` process (``--port 0``, a token,
two indexes) driven through Debian's chromium + chromedriver with selenium. Token prompt on 401, text search
(cards' ids and R / sim / C equal to the API's JSON for the same query, thumbnails and report texts), index
switching, "more like this", image upload.

Skipped (with the reason) only when selenium, chromium or chromedriver is not installed; `.ci/run` installs
them. ``PECM_CHROMIUM`` / ``PECM_CHROMEDRIVER`` override the binaries' paths."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.browser

pytest.importorskip("httpx")
pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium==4.50.0)")

import httpx  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402
from serve_fixtures import REPORTS, build_archive, second_index, wait_for_server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "browser-token-0123456789"
WAIT_S = 20


def _binary(env: str, *names: str):
    if os.environ.get(env):
        return os.environ[env]
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    return None


CHROMIUM = _binary("PECM_CHROMIUM", "chromium", "chromium-browser")
CHROMEDRIVER = _binary("PECM_CHROMEDRIVER", "chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "the browser test needs chromium and chromedriver (apt-get install chromium chromium-driver); "
        f"found chromium={CHROMIUM}, chromedriver={CHROMEDRIVER}",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def launched(browser_start, tmp_path_factory):
    """The archive and a `pecm serve` process starting on it (the browser starts while it loads)."""
    root = tmp_path_factory.mktemp("browser")
    a = build_archive(root)
    from pecm.index import ArchiveIndex

    with ArchiveIndex.open(a["index"]) as ix:
        K, D = ix.K, ix.D
    a["other"] = second_index(root / "other", K, D)
    (root / "token").write_text(TOKEN + "\n")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "pecm", "serve", a["index"], a["other"], "--checkpoint", a["ckpt"]]
    cmd += ["--port", "0", "--token-file", str(root / "token")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        yield a, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server(launched, browser):
    """The archive dict with ``url`` once the server answers /health."""
    a, proc = launched
    return {**a, "url": wait_for_server(proc)}


@pytest.fixture(scope="module")
def browser_start(tmp_path_factory):
    """Headless chromium, started in a thread while the archive is built and the server loads."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--no-first-run",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        opts.add_argument(arg)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    pool = ThreadPoolExecutor(1)
    fut = pool.submit(webdriver.Chrome, options=opts, service=service)
    pool.shutdown(wait=False)
    try:
        yield fut
    finally:
        drv = fut.result() if fut.exception() is None else None
        if drv is not None:
            drv.quit()


@pytest.fixture(scope="module")
def browser(browser_start, launched):
    drv = browser_start.result(timeout=60)
    drv.set_page_load_timeout(WAIT_S)
    return drv


def api(server, body):
    r = httpx.post(server["url"] + "/search", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait(drv, cond, what):
    try:
        return WebDriverWait(drv, WAIT_S, poll_frequency=0.05).until(lambda d: cond(d))
    except TimeoutException:
        status = drv.find_element(By.ID, "status").text
        raise AssertionError(f"timed out waiting for {what}; page status: {status!r}") from None


def seq(drv) -> int:
    return int(drv.find_element(By.ID, "results").get_attribute("data-seq"))


def wait_results(drv, before: int):
    wait(drv, lambda d: seq(d) > before, "new results")
    return drv.find_elements(By.CSS_SELECTOR, "#results .card")


def open_page(drv, server, token=TOKEN):
    """Load the page with ``token`` in sessionStorage (None: none), wait for the index list."""
    drv.get(server["url"] + "/")
    drv.execute_script(
        "sessionStorage.clear()" if token is None else f"sessionStorage.setItem('pecm-serve-token', {token!r})"
    )
    drv.refresh()
    if token == TOKEN:
        wait(drv, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-indexes") == "2", "the indexes")


def enter_token(drv, token):
    wait(drv, lambda d: d.find_element(By.ID, "token-overlay").is_displayed(), "the token prompt")
    box = drv.find_element(By.ID, "token-input")
    box.clear()
    box.send_keys(token)
    drv.find_element(By.ID, "token-ok").click()


SNAPSHOT = """return Array.from(document.querySelectorAll('#results .card')).map((c) => {
  const img = c.querySelector('.media img'), rep = c.querySelector('.media .report');
  return {id: c.dataset.id, score: c.dataset.score, sim: c.dataset.sim, conf: c.dataset.conf,
          shown: ['score', 'sim', 'conf'].map((k) => c.querySelector('dd.' + k).textContent),
          report: rep ? rep.textContent : null,
          img: img ? {alt: img.alt, src: img.src, ok: img.complete && img.naturalWidth > 0,
                      size: [img.naturalWidth, img.naturalHeight]} : null};
});"""


def snapshot(drv):
    """What the result cards show, in one round trip to the browser."""
    return drv.execute_script(SNAPSHOT)


def same_as_api(drv, res):
    """The cards show the API's hits in order: ids, exact R / sim / C (data-*), their 4-decimal text, an
    image for image items and the report text for reports."""
    hits, cards = res["results"], snapshot(drv)
    assert len(cards) == len(hits)
    for card, h in zip(cards, hits):
        assert int(card["id"]) == h["id"]
        for key in ("score", "sim", "conf"):
            assert float(card[key]) == h[key]  # JS Number -> shortest repr -> float: exact
        assert card["shown"] == [f"{h[key]:.4f}" for key in ("score", "sim", "conf")]
        md = h["metadata"]
        if md.get("modality") == "image":
            assert card["img"]["alt"] == f"item {h['id']}" and card["report"] is None
        else:
            assert card["report"] == md["text"] and card["img"] is None


def thumbs_loaded(drv, server):
    """Every image card's thumbnail loaded (a blob: URL fetched with the token) at its file's pixel size."""
    from PIL import Image

    wait(drv, lambda d: all(c["img"]["ok"] for c in snapshot(d) if c["img"]), "thumbnails")
    shown = [c for c in snapshot(drv) if c["img"]]
    assert shown, "no image hits to check"
    for card in shown:
        assert card["img"]["src"].startswith("blob:")
        with Image.open(server["images"][int(card["id"])]) as im:  # image items are ids 0..7, in file order
            assert card["img"]["size"] == list(im.size)


def test_token_prompt_on_401(browser, server):
    open_page(browser, server, token=None)  # /indexes -> 401 -> the prompt
    wait(browser, lambda d: d.find_element(By.ID, "token-overlay").is_displayed(), "the token prompt")
    assert "needs a token" in browser.find_element(By.ID, "token-msg").text
    enter_token(browser, "wrong-token-0123456789")  # /indexes -> 401 -> the prompt again
    wait(browser, lambda d: "refused" in d.find_element(By.ID, "token-msg").text, "the 'refused' prompt")
    enter_token(browser, TOKEN)
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-indexes") == "2", "the indexes")
    assert not browser.find_element(By.ID, "token-overlay").is_displayed()
    names = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "index")).options]
    assert names == ["arch", "other"]
    assert browser.execute_script("return sessionStorage.getItem('pecm-serve-token')") == TOKEN
    browser.refresh()  # entered once: the reloaded page uses the stored token
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-indexes") == "2", "the indexes")
    assert not browser.find_element(By.ID, "token-overlay").is_displayed()
    # a search that gets a 401 (the stored token went stale) prompts, then is retried with the new token
    browser.execute_script("sessionStorage.setItem('pecm-serve-token', 'stale-token-0123456789')")
    before = seq(browser)
    browser.find_element(By.ID, "text").clear()
    browser.find_element(By.ID, "text").send_keys(REPORTS[0])
    browser.find_element(By.ID, "text-search").click()
    enter_token(browser, TOKEN)
    wait_results(browser, before)
    same_as_api(browser, api(server, {"index": "arch", "text": REPORTS[0], "k": 10}))


def test_text_search_switch_index_more_like_this(browser, server):
    open_page(browser, server)
    k = 6
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys(str(k))
    browser.find_element(By.ID, "text").clear()
    browser.find_element(By.ID, "text").send_keys(REPORTS[1])
    before = seq(browser)
    browser.find_element(By.ID, "text-search").click()
    cards = wait_results(browser, before)
    assert len(cards) == k
    res = api(server, {"index": "arch", "text": REPORTS[1], "k": k})
    same_as_api(browser, res)

    # switching the index re-runs the query there
    before = seq(browser)
    Select(browser.find_element(By.ID, "index")).select_by_value("other")
    cards = wait_results(browser, before)
    assert browser.find_element(By.ID, "results").get_attribute("data-index") == "other"
    same_as_api(browser, api(server, {"index": "other", "text": REPORTS[1], "k": k}))

    # more like this on the third hit: that item comes first
    target = int(cards[2].get_attribute("data-id"))
    before = seq(browser)
    cards[2].find_element(By.CSS_SELECTOR, "button.more").click()
    cards = wait_results(browser, before)
    assert int(cards[0].get_attribute("data-id")) == target
    same_as_api(browser, api(server, {"index": "other", "id": target, "k": k}))

    # back on the mixed index, all 14 items: more like this on an image hit shows that image first
    Select(browser.find_element(By.ID, "index")).select_by_value("arch")
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("14")
    before = seq(browser)
    browser.find_element(By.ID, "text-search").click()
    cards = wait_results(browser, before)
    same_as_api(browser, api(server, {"index": "arch", "text": REPORTS[1], "k": 14}))
    thumbs_loaded(browser, server)
    pos = next(i for i, c in enumerate(snapshot(browser)) if c["img"] and i > 0)
    target = int(cards[pos].get_attribute("data-id"))
    before = seq(browser)
    cards[pos].find_element(By.CSS_SELECTOR, "button.more").click()
    cards = wait_results(browser, before)
    assert int(cards[0].get_attribute("data-id")) == target
    same_as_api(browser, api(server, {"index": "arch", "id": target, "k": 14}))
    thumbs_loaded(browser, server)


def test_image_upload_search(browser, server):
    open_page(browser, server)
    path = server["images"][4]
    browser.find_element(By.ID, "file").send_keys(path)
    wait(browser, lambda d: d.find_element(By.ID, "preview").is_displayed(), "the preview")
    before = seq(browser)
    browser.find_element(By.ID, "image-search").click()
    wait_results(browser, before)
    with open(path, "rb") as f:
        image = base64.b64encode(f.read()).decode()
    res = api(server, {"index": "arch", "image": image, "k": 10})
    same_as_api(browser, res)
    assert res["results"][0]["id"] == 4  # the uploaded file is item 4 itself
    thumbs_loaded(browser, server)


def test_page_escapes_server_text(browser, server):
    """A report holding markup is shown as text: no element is created from it."""
    evil = '<img src=x onerror="document.body.dataset.pwned=1"><b id="evil">bold</b>'
    r = httpx.post(
        server["url"] + "/items",
        json={"index": "other", "items": [{"text": evil, "metadata": {"site": 9}}]},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    new_id = r.json()["ids"][0]
    open_page(browser, server)
    Select(browser.find_element(By.ID, "index")).select_by_value("other")
    browser.find_element(By.ID, "text").clear()
    browser.find_element(By.ID, "text").send_keys(evil)
    before = seq(browser)
    browser.find_element(By.ID, "text-search").click()
    wait_results(browser, before)
    card = next(c for c in snapshot(browser) if int(c["id"]) == new_id)
    assert card["report"] == evil
    assert not browser.find_elements(By.ID, "evil")
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-pwned") is None
