"""The memory browser in a real browser: Debian's chromium driven by selenium, against a
real kvmem-http on 127.0.0.1:0 over a real database.

Screenshots of the main views go to ``test-output/browser/`` (``$KVMEM_TEST_OUTPUT``
overrides the folder).  Every wait is on a condition in the page, never a fixed sleep.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

import http_server
import kvmem
from testutil import HERE, Child, child_env, http_json

OUTPUT = Path(os.environ.get("KVMEM_TEST_OUTPUT", os.path.join(HERE, "test-output")),
              "browser")
XSS = '<img src=x onerror="window.kvmemXss=1">'


class Page:
    """The browser on one kvmem-http, with the waits the tests share."""

    def __init__(self, driver: webdriver.Chrome, port: int) -> None:
        self.driver, self.port = driver, port

    def open(self, path: str = "/") -> None:
        self.driver.get(f"http://127.0.0.1:{self.port}{path}")

    def until(self, condition: Callable[[], Any], what: str, timeout: float = 15) -> Any:
        return WebDriverWait(self.driver, timeout).until(lambda _: condition(), what)

    def by_id(self, element_id: str) -> WebElement:
        return self.driver.find_element(By.ID, element_id)

    def ready(self) -> None:
        """The page has loaded the namespaces (its first API call)."""
        self.until(lambda: self.driver.find_elements(By.CSS_SELECTOR, "#namespace option"),
                   "the namespace list")

    def status(self) -> str:
        return self.by_id("status").text

    def wait_status(self, text: str) -> str:
        return str(self.until(lambda: text in self.status() and self.status(),
                              f"status containing {text!r}"))

    def rows(self) -> list[str]:
        """The keys of the list's rows, read in one script (a refresh can replace them)."""
        return list(self.driver.execute_script(
            "return [...document.querySelectorAll('#list tbody tr')].map(r => r.dataset.key)"))

    def wait_rows(self, keys: list[str]) -> None:
        self.until(lambda: self.rows() == keys, f"rows {keys[:5]}...")

    def type(self, element_id: str, text: str) -> None:
        field = self.by_id(element_id)
        field.clear()
        field.send_keys(text)

    def click(self, element_id: str) -> None:
        self.by_id(element_id).click()

    def accept_confirm(self) -> str:
        alert = self.until(lambda: _alert(self.driver), "a confirm dialog")
        text = str(alert.text)
        alert.accept()
        return text

    def open_row(self, key: str) -> None:
        self.until(lambda: key in self.rows(), f"a row for {key!r}")
        row = self.driver.execute_script(
            "return [...document.querySelectorAll('#list tbody tr')]"
            ".find(r => r.dataset.key === arguments[0])", key)
        row.click()
        self.until(lambda: self.by_id("d-key").text == key, f"the detail of {key!r}")

    def create(self, key: str, value: str, tags: str = "", ttl: str = "") -> None:
        """Fill the New memory form and press Create (the caller waits for its status)."""
        self.click("show-new")
        self.type("n-key", key)
        self.type("n-value", value)
        self.type("n-tags", tags)
        self.type("n-ttl", ttl)
        self.click("create")

    def screenshot(self, name: str) -> None:
        OUTPUT.mkdir(parents=True, exist_ok=True)
        assert self.driver.save_screenshot(str(OUTPUT / f"{name}.png"))

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return http_json(self.port, method, path, body)


def _alert(driver: webdriver.Chrome) -> Any:
    try:
        alert = driver.switch_to.alert
        alert.text  # noqa: B018  (raises when there is none)
        return alert
    except NoAlertPresentException:
        return None


def _chrome() -> webdriver.Chrome:
    binary = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    assert binary and driver_path, "the browser tests need Debian's chromium and " \
        "chromium-driver (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1280,900", "--disable-gpu"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options,
                            service=webdriver.ChromeService(executable_path=driver_path))


@pytest.fixture(scope="module")
def driver() -> Iterator[webdriver.Chrome]:
    chrome = _chrome()
    try:
        yield chrome
    finally:
        chrome.quit()


def _serve(tmp_path: Path, *flags: str, **env: str) -> int:
    tmp_path.mkdir(exist_ok=True)
    child = Child("serve_http", "--db", str(tmp_path / "kv.db"), "--port", "0", *flags,
                  env=child_env(**env))
    return int(child.expect("listening on http://127.0.0.1:").rsplit(":", 1)[1])


@pytest.fixture
def page(tmp_path: Path, driver: webdriver.Chrome) -> Iterator[Page]:
    driver.set_window_size(1280, 900)
    result = Page(driver, _serve(tmp_path))
    yield result
    driver.execute_script("sessionStorage.clear()")


def _key(key: str) -> str:
    return urllib.parse.quote(key, safe="")


# ------------------------------------------------------------------------------ tests ----


def test_create_search_edit_with_conflict_reinforce_delete(page: Page) -> None:
    others = [{"op": "set", "key": f"note/{i}", "value": f"unrelated note {i}"} for i in range(4)]
    assert page.api("POST", "/v1/batch", {"ops": others})[0] == 200
    page.open()
    page.ready()
    page.create("user/tea", '{"likes": "green tea"}', tags="prefs, drinks")
    page.wait_status("Created user/tea")
    status, stored = page.api("GET", "/v1/memories/user%2Ftea")
    assert status == 200 and stored["value"] == {"likes": "green tea"}
    assert stored["tags"] == ["prefs", "drinks"] and stored["version"] == 1
    page.screenshot("detail")

    page.type("search", "green tea")
    page.click("go")
    page.wait_rows(["user/tea"])
    assert page.by_id("score-head").is_displayed()
    score = page.driver.find_element(By.CSS_SELECTOR, "#list tbody tr td:nth-child(5)").text
    assert float(score) > 0
    page.screenshot("search")

    page.open_row("user/tea")
    assert page.by_id("d-version").text == "1"
    # A second writer changes it while the page shows version 1.
    status, _ = page.api("PUT", "/v1/memories/user%2Ftea",
                         {"value": {"likes": "oolong"}, "tags": ["prefs"]})
    assert status == 200
    page.type("d-value", '{"likes": "sencha"}')
    page.click("save")
    message = page.wait_status("Not saved")
    assert "now at version 2" in message and "you edited version 1" in message
    assert page.api("GET", "/v1/memories/user%2Ftea")[1]["value"] == {"likes": "oolong"}

    page.open_row("user/tea")  # opening reads the memory as it is now
    page.until(lambda: page.by_id("d-version").text == "2", "version 2 shown")
    assert page.by_id("d-value").get_attribute("value") == '{\n  "likes": "oolong"\n}'

    page.type("d-value", '{"likes": "sencha"}')
    page.type("d-tags", "prefs")
    page.click("save")
    page.wait_status("Saved user/tea: version 3")
    saved = page.api("GET", "/v1/memories/user%2Ftea")[1]
    assert saved["value"] == {"likes": "sencha"} and saved["version"] == 3

    page.click("reinforce")
    page.wait_status("Reinforced user/tea")
    page.click("delete")
    assert "user/tea" in page.accept_confirm()
    page.wait_status("Deleted user/tea")
    assert page.api("GET", "/v1/memories/user%2Ftea")[0] == 404


def test_archive_and_restore(tmp_path: Path, driver: webdriver.Chrome) -> None:
    # Archived once its strength falls below 0.5: a second after it was written.
    page = Page(driver, _serve(tmp_path, "--decay-interval-s", "0.05",
                               "--archive-threshold", "0.5"))
    status, _ = page.api("PUT", "/v1/memories/fading", {"value": "soon archived",
                                                        "half_life_seconds": 1})
    assert status == 201
    deadline = time.monotonic() + 15  # the server's prune pass archives it
    while not (archived := page.api("GET", "/v1/memories?archived=true")[1]["items"]):
        assert time.monotonic() < deadline, "never archived"
        time.sleep(0.02)
    page.open()
    page.ready()
    page.click("archived")
    page.click("go")
    page.open_row("fading")
    assert page.by_id("d-state").text == "archived" and page.by_id("restore").is_displayed()
    assert not page.by_id("reinforce").is_displayed()
    assert float(page.by_id("d-strength-text").text) < 0.5
    page.screenshot("archived")
    page.click("restore")
    page.wait_status("Restored fading")
    # The page shows the memory the restore returned: live, strengthened by the boost.
    assert page.by_id("d-state").text == "live"
    assert float(page.by_id("d-strength-text").text) > 0.45  # the boost is 0.5
    # A slow machine's next prune pass may have archived it again; either way the restore
    # reinforced it after it was archived.
    status, found = page.api("GET", "/v1/memories?archived=true")
    live = page.api("GET", "/v1/memories/fading")[1]
    after = live if "key" in live else found["items"][0]
    assert after["last_reinforced_at"] > archived[0]["last_reinforced_at"]


def test_bulk_forget_dry_run_then_for_real(page: Page) -> None:
    ops = [{"op": "set", "key": f"tmp/{i:02d}", "value": i} for i in range(30)]
    ops += [{"op": "set", "key": "keep/one", "value": "stays"},
            {"op": "set", "key": "tmpx", "value": "not under tmp/"}]
    assert page.api("POST", "/v1/batch", {"ops": ops})[0] == 200
    page.open()
    page.ready()
    page.click("show-forget")
    page.type("f-prefix", "tmp/")
    page.click("dry-run")
    page.until(lambda: page.by_id("f-summary").text.startswith("30 memories"), "dry run")
    listed = [li.text for li in page.driver.find_elements(By.CSS_SELECTOR, "#f-keys li")]
    assert listed == [f"tmp/{i:02d}" for i in range(30)]
    page.screenshot("forget-dry-run")
    assert len(page.api("GET", "/v1/memories?prefix=tmp%2F&limit=100")[1]["items"]) == 30
    page.click("forget-now")
    page.accept_confirm()
    page.wait_status("Forgot 30 memories")
    keys = {m["key"] for m in page.api("GET", "/v1/memories?limit=100")[1]["items"]}
    assert keys == {"keep/one", "tmpx"}


def test_pages_through_250_memories(page: Page) -> None:
    for start in range(0, 250, 125):
        ops = [{"op": "set", "key": f"m/{i:03d}", "value": i} for i in range(start, start + 125)]
        assert page.api("POST", "/v1/batch", {"ops": ops})[0] == 200
    page.open()
    for n in range(5):
        page.wait_rows([f"m/{i:03d}" for i in range(50 * n, 50 * n + 50)])
        assert page.by_id("count").text == f"page {n + 1}: 50 memories"
        if n < 4:
            page.click("more")
    assert not page.by_id("more").is_displayed()
    page.click("prev")
    page.wait_rows([f"m/{i:03d}" for i in range(150, 200)])
    page.screenshot("list")


def _no_markup(page: Page) -> None:
    """No element made from the hostile text anywhere in the page (the CSP would stop its
    script, so this is what shows that it was never parsed as HTML)."""
    assert page.driver.execute_script("return document.querySelectorAll('img').length") == 0
    assert page.driver.execute_script("return window.kvmemXss") is None
    assert _alert(page.driver) is None


def test_hostile_text_is_shown_as_text_and_runs_nothing(page: Page) -> None:
    status, _ = page.api("PUT", f"/v1/memories/{_key(XSS)}",
                         {"value": {XSS: XSS}, "tags": [XSS]})
    assert status == 201
    page.open()
    page.open_row(XSS)  # the list and the detail
    assert page.by_id("d-key").text == XSS
    assert json.loads(page.by_id("d-value").get_attribute("value") or "") == {XSS: XSS}
    assert page.by_id("d-tags").get_attribute("value") == XSS
    cells = page.driver.find_elements(By.CSS_SELECTOR, "#list tbody tr td")
    assert [c.text for c in cells[:2]] == [XSS, XSS]
    _no_markup(page)
    page.type("search", "img")  # search results
    page.click("go")
    page.wait_rows([XSS])
    page.click("reinforce")  # a status line that echoes the key
    page.wait_status(f"Reinforced {XSS}")
    page.click("show-forget")  # the forget list
    page.type("f-prefix", "<img")
    page.click("dry-run")
    page.until(lambda: [li.text for li in page.driver.find_elements(
        By.CSS_SELECTOR, "#f-keys li")] == [XSS], "the hostile key listed as text")
    _no_markup(page)


def test_token_is_asked_for_kept_in_the_tab_and_a_wrong_one_refused(
        tmp_path: Path, driver: webdriver.Chrome) -> None:
    page = Page(driver, _serve(tmp_path, KVMEM_TOKEN="s3cret-token"))
    page.open()
    page.until(lambda: page.by_id("token").is_displayed(), "the token form")
    assert "401" in page.status()
    page.type("t-token", "wrong")
    page.click("token-save")
    page.until(lambda: page.by_id("token").is_displayed() and "401" in page.status(),
               "the wrong token refused")
    page.type("t-token", "s3cret-token")
    page.click("token-save")
    page.until(lambda: "default (0 live" in page.by_id("namespace").text, "namespaces")
    assert driver.execute_script("return sessionStorage.getItem('kvmem-token')") == \
        "s3cret-token"
    assert driver.execute_script("return localStorage.length") == 0
    driver.execute_script("sessionStorage.clear()")


def test_keyboard_and_a_narrow_window(page: Page) -> None:
    assert page.api("PUT", "/v1/memories/k", {"value": "by keyboard"})[0] == 201
    page.driver.set_window_size(420, 900)
    page.open()
    page.wait_rows(["k"])
    row = page.driver.find_element(By.CSS_SELECTOR, "#list tbody tr")
    row.send_keys(Keys.ENTER)  # rows take focus (tabindex) and open on Enter
    page.until(lambda: page.by_id("d-key").text == "k", "the detail opened by Enter")
    width = page.driver.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], width  # nothing wider than the window
    page.screenshot("narrow")
    page.by_id("d-value").send_keys(Keys.ESCAPE)
    page.until(lambda: not page.by_id("detail").is_displayed(), "Escape closes the detail")


def test_api_page_is_rendered_from_openapi(page: Page) -> None:
    page.open("/docs")
    page.until(lambda: page.driver.find_elements(By.CSS_SELECTOR, "section.operation h2"),
               "operations")
    titles = [h.text for h in page.driver.find_elements(By.CSS_SELECTOR, "section.operation h2")]
    spec = page.api("GET", "/openapi.json")[1]
    expected = [f"{method.upper()} {path}" for path, item in spec["paths"].items()
                for method in item if method in ("get", "put", "post", "delete")]
    assert [t for t in titles if not t.startswith(("HEAD", "OPTIONS"))] == expected
    assert "DELETE /v1/memories" in titles
    page.screenshot("docs")


# ---------------------------------------------------- the page's HTTP, without a browser ----


def _raw(port: int, method: str, path: str,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@pytest.fixture
def served(tmp_path: Path) -> int:
    """A kvmem-http with a token and one CORS origin (every child ends with its test)."""
    return _serve(tmp_path / "served", "--cors-origin", "https://app.example.com",
                  KVMEM_TOKEN="t0ken")


@pytest.mark.parametrize(("path", "content_type"), [
    ("/", "text/html"), ("/docs", "text/html"), ("/static/app.js", "text/javascript"),
    ("/static/docs.js", "text/javascript"), ("/static/style.css", "text/css")])
def test_pages_need_no_token_and_carry_a_strict_policy(served: int, path: str,
                                                       content_type: str) -> None:
    status, headers, body = _raw(served, "GET", path)
    assert status == 200 and headers["Content-Type"].startswith(content_type)
    policy = headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert body and int(headers["Content-Length"]) == len(body)
    head_status, head_headers, head_body = _raw(served, "HEAD", path)
    assert (head_status, head_body) == (200, b"")
    assert head_headers["Content-Length"] == headers["Content-Length"]


def test_pages_hold_no_inline_script_or_style() -> None:
    for name in ("index.html", "docs.html"):
        html = Path(HERE, "kvmem_web", name).read_text(encoding="utf-8")
        assert re.findall(r"<script\b[^>]*>", html) == [
            f'<script src="/static/{"app" if name == "index.html" else "docs"}.js" defer>']
        assert "<style" not in html and not re.search(r"\son[a-z]+=", html)
        assert "style=" not in html
    for name in ("app.js", "docs.js"):  # every text goes in with textContent or value
        script = Path(HERE, "kvmem_web", name).read_text(encoding="utf-8")
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                     "eval(", "new Function", "setTimeout(\"", "srcdoc"):
            assert sink not in script, (name, sink)


def test_head_on_every_get_route_and_options_everywhere(served: int) -> None:
    auth = {"Authorization": "Bearer t0ken"}
    conn = http.client.HTTPConnection("127.0.0.1", served, timeout=30)
    conn.request("PUT", "/v1/memories/k", '{"value": "tea"}',
                 {**auth, "Content-Type": "application/json"})
    assert conn.getresponse().status == 201
    conn.close()
    for route in http_server.ROUTES:
        path = route.path.replace("{key}", "k") + ("?q=tea" if "search" in route.path else "")
        if route.method == "GET":
            got = _raw(served, "GET", path, auth)
            head = _raw(served, "HEAD", path, auth)
            assert head[0] == got[0] and head[2] == b"", (path, head)
            if path not in ("/healthz", "/v1/stats"):  # their figures move between calls
                assert head[1]["Content-Length"] == got[1]["Content-Length"], path
            assert head[1].get("ETag") == got[1].get("ETag"), path
            assert got[0] == 200, (path, got)
        status, headers, body = _raw(served, "OPTIONS", path)  # no token: as a preflight
        assert status == 200, (path, body)
        allowed = {r.method for r in http_server.ROUTES if r.path == route.path}
        assert set(headers["Allow"].split(", ")) == allowed | {"OPTIONS"} | (
            {"HEAD"} if "GET" in allowed else set())
        assert json.loads(body)["allow"] == headers["Allow"].split(", ")
    status, headers, _ = _raw(served, "POST", "/")
    assert status == 405 and headers["Allow"] == "GET, HEAD, OPTIONS"


def test_no_cors_headers_unless_the_origin_was_named(tmp_path: Path, served: int) -> None:
    plain = _serve(tmp_path / "plain")
    for port, origin in ((plain, "https://app.example.com"), (served, "https://evil.example")):
        for method in ("GET", "OPTIONS"):
            status, headers, _ = _raw(port, method, "/v1/namespaces", {
                "Origin": origin, "Access-Control-Request-Method": "DELETE",
                "Authorization": "Bearer t0ken"})
            assert not any(h.lower().startswith("access-control-") for h in headers), headers
            assert status == 403  # a foreign page's request is refused outright
    status, headers, _ = _raw(served, "OPTIONS", "/v1/memories", {
        "Origin": "https://app.example.com", "Access-Control-Request-Method": "DELETE",
        "Access-Control-Request-Headers": "authorization"})
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "DELETE" in headers["Access-Control-Allow-Methods"]
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    status, headers, _ = _raw(served, "GET", "/v1/namespaces", {
        "Origin": "https://app.example.com", "Authorization": "Bearer t0ken"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "ETag" in headers["Access-Control-Expose-Headers"]
    status, headers, _ = _raw(served, "GET", "/v1/namespaces",
                              {"Origin": "https://app.example.com"})  # CORS is not auth
    assert status == 401 and headers["Access-Control-Allow-Origin"] == "https://app.example.com"


def test_cors_origin_is_repeatable(tmp_path: Path) -> None:
    port = _serve(tmp_path, "--cors-origin", "https://a.example",
                  "--cors-origin", "http://localhost:3000")
    for origin in ("https://a.example", "http://localhost:3000"):
        status, headers, _ = _raw(port, "GET", "/v1/namespaces", {"Origin": origin})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == origin


@pytest.mark.parametrize("bad", ["app.example.com", "ftp://a.example", "http://a.com:99999",
                                 "http://a.com:0", "http://a.com:x", "https://", "http://a/b"])
def test_cors_origin_must_be_an_origin(bad: str) -> None:
    with pytest.raises(kvmem.ConfigError, match="is not an origin"):
        kvmem.Config.build(environ={}, flags={"cors_origins": bad})
    same = {"HTTP://A.Example": "http://a.example", "http://a.example:80": "http://a.example",
            "https://a.example:443/": "https://a.example", "http://[::1]:8080": "http://[::1]:8080"}
    for given, sent in same.items():  # as a browser sends it in Origin
        assert kvmem.Config.build(environ={}, flags={"cors_origins": given}).cors_origins == sent
    config = kvmem.Config.build(environ={}, flags={
        "cors_origins": "https://a.example/, http://127.0.0.1:3000"})
    assert config.cors_origins == "https://a.example,http://127.0.0.1:3000"


def test_saving_keeps_what_was_not_edited(page: Page) -> None:
    tags = ["a,b", " padded "]
    assert page.api("PUT", "/v1/memories/t", {"value": "v", "tags": tags})[0] == 201
    page.open()
    page.open_row("t")
    page.click("save")
    page.wait_status("Nothing to save")
    assert page.api("GET", "/v1/memories/t")[1]["version"] == 1
    page.type("d-value", '"w"')
    page.click("save")
    page.wait_status("Saved t: version 2")
    saved = page.api("GET", "/v1/memories/t")[1]
    assert (saved["value"], saved["tags"]) == ("w", tags)  # untouched tags as they were


def test_a_ttl_that_is_no_number_is_refused(page: Page) -> None:
    page.open()
    page.ready()
    page.create("ttl", '"v"', ttl="1h")
    page.wait_status("The TTL must be a number of seconds")
    assert page.api("GET", "/v1/memories/ttl")[0] == 404
