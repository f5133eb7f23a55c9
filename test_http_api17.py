"""The HTTP API's daily-use details (#17): the request log, ETag and If-Match, Location,
the %2F hint, booleans, times, not-found messages and unknown parameters.  A real server
on 127.0.0.1:0 (in this process, or a real kvmem-http process for the log's levels), real
HTTP requests.  A test that takes conftest's ``db`` (``api`` does) runs on both backends."""

from __future__ import annotations

import contextlib
import datetime
import logging
import re
import signal
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

import http_server
import kvmem
import kvmem_cli
from test_http import Client, assert_error, open_store, raw_exchange, read_responses, serving
from testutil import Child, Clock, child_env

CONFIG = kvmem.Config.build(environ={})
TOKEN = "tok-Zq81-never-in-the-log"
SPEC = http_server.openapi_document(CONFIG)
MEMORY = "/v1/memories/{key}"


class Served:
    """A server over a store with a clock the test moves, and a client for it."""

    def __init__(self, store: kvmem_cli.AnyStore, server: http_server.Server, clock: Clock,
                 token: str | None) -> None:
        self.store, self.server, self.clock = store, server, clock
        self.port = int(server.server_address[1])
        self.client = Client(self.port, token)

    def request(self, method: str, path: str, body: Any = None, *,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        return self.client.request(method, path, body, headers=headers)


@contextlib.contextmanager
def serve(db: str, *, token: str = "", decay: bool = False, **flags: str) -> Iterator[Served]:
    """A server in this process over a store on ``db`` with the settings ``flags``."""
    clock = Clock(time.time())
    with open_store(db, clock=clock, decay=decay, **flags) as store, \
            serving(store, token) as server:
        served = Served(store, server, clock, token or None)
        try:
            yield served
        finally:
            served.client.close()


@pytest.fixture
def api(db: str) -> Iterator[Served]:
    with serve(db) as served:
        yield served


def documented_headers(method: str, template: str, status: int) -> set[str]:
    """The response headers OpenAPI documents for ``method template`` answering ``status``."""
    response = SPEC["paths"][template][method.lower()]["responses"][str(status)]
    return set(response.get("headers", {}))


def memory_answer(result: tuple[int, dict[str, str], Any], method: str, template: str,
                  status: int) -> dict[str, Any]:
    """A memory answered with ``status``: its ETag is its version, a 201's Location reads
    it, and the headers sent are the ones documented."""
    got, headers, body = result
    assert got == status, result
    assert headers["ETag"] == f'"{body["version"]}"', headers
    sent = {name for name in ("ETag", "Location") if name in headers}
    assert sent == documented_headers(method, template, status), (sent, method, status)
    return dict(body)


def unchanged(api: Served, key: str, version: int, value: Any) -> None:
    memory = api.store.get(key)
    assert memory is not None and (memory.version, memory.value) == (version, value)


# ---------------------------------------------------------------------- request log ----

ACCESS = "kvmem.http.access"
LINE = re.compile(r"(\S+) (\S+) (\d{3}) (\d+\.\d)ms id=([0-9a-f]{12})")


def access_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, int, str]]:
    """The access log's lines so far: (method, path, status, request id)."""
    out = []
    for record in caplog.records:
        if record.name == ACCESS:
            assert record.levelno == logging.INFO
            found = LINE.fullmatch(record.getMessage())
            assert found, record.getMessage()
            out.append((found[1], found[2], int(found[3]), found[5]))
    return out


def request_id(headers: dict[str, str], body: Any) -> str:
    if isinstance(body, dict) and "error" in body:
        assert headers.get("X-Request-Id", body["error"]["request_id"]) \
            == body["error"]["request_id"]
        return str(body["error"]["request_id"])
    return headers["X-Request-Id"]


def raw_answer(port: int, data: bytes) -> tuple[int, str]:
    """Send raw bytes; the status and request id of the one answer."""
    responses = read_responses(raw_exchange(port, data))
    assert len(responses) == 1, responses
    body = responses[0].json()
    return responses[0].status, str(body["error"]["request_id"])


def test_each_answer_is_one_access_line_without_query_or_token(
        db: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, every level: nothing may leak anywhere
    with serve(db, token=TOKEN) as api:
        port, wrong = api.port, Client(api.port, "wrong-Zq81-token")
        expected: list[tuple[str, str, int, str]] = []

        def call(client: Client, method: str, path: str, body: Any = None,
                 status: int = 200, **headers: str) -> None:
            got, sent, answer = client.request(method, path, body, headers=headers or None)
            assert got == status, (method, path, answer)
            expected.append((method, path.partition("?")[0], status, request_id(sent, answer)))
            assert access_lines(caplog) == expected  # written before the answer was sent

        call(api.client, "PUT", "/v1/memories/user%2Ftea?namespace=ns1", {"value": "green"},
             201)
        call(api.client, "GET", "/v1/search?q=private+words+Zq81&namespace=ns1")
        call(api.client, "GET", "/v1/memories?cursor=Zq81cursor&limit=5", status=400)
        call(api.client, "GET", "/v1/memories/absent", status=404)
        call(api.client, "DELETE", "/v1/memories/user%2Ftea?namespace=ns1", status=409,
             **{"If-Match": '"7"'})
        call(api.client, "PATCH", "/v1/memories/a", status=405)
        call(api.client, "GET", "/v1/memories?archived=Zq81", status=400)
        call(Client(port), "GET", "/healthz")  # no token needed
        call(Client(port), "GET", "/v1/stats", status=401)
        call(wrong, "GET", "/v1/stats", status=401)
        # Refused by http.server's parser, and by the event loop before any handler.
        for data, method, path, status in (
                (b"BREW /pot HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "BREW", "/pot", 405),
                (b"GET /v1/stats HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n",
                 "GET", "/v1/stats", 431),
                (b"GET /v1/memories/\x1b[31mred?q=Zq81 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n",
                 "GET", "/v1/memories/%1B[31mred", 400)):
            got, rid = raw_answer(port, data)
            assert got == status
            expected.append((method, path, status, rid))
            assert access_lines(caplog) == expected
        wrong.close()
    # Each answer was one line, with its method, path, status, time and request id.
    assert access_lines(caplog) == expected and len(expected) == 13
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for secret in (TOKEN, "wrong-Zq81-token", "Zq81", "private", "\x1b"):
        assert secret not in logged, secret


def test_the_access_log_is_silenced_by_its_level(
        api: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.WARNING, logger=ACCESS)
    assert api.request("PUT", "/v1/memories/a", {"value": 1})[0] == 201
    assert api.request("GET", "/v1/memories/b")[0] == 404
    assert raw_answer(api.port, b"BREW /pot HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")[0] == 405
    assert access_lines(caplog) == []
    caplog.set_level(logging.INFO, logger=ACCESS)
    assert api.request("GET", "/v1/memories/a")[0] == 200
    assert [line[:3] for line in access_lines(caplog)] == [("GET", "/v1/memories/a", 200)]


def run_server(db: str, namespace: str, level: str, *flags: str) -> tuple[str, list[str]]:
    """A kvmem-http process at ``--log-level level`` (and ``flags``) with a token: a few
    requests (a write in ``namespace``), then SIGTERM; its stderr, and the request ids it
    answered."""
    child = Child("serve_http", "--db", db, "--port", "0", "--log-level", level, *flags,
                  env=child_env(KVMEM_TOKEN=TOKEN))
    port = int(child.expect("listening on http://127.0.0.1:").rsplit(":", 1)[1])
    client = Client(port, TOKEN)
    ids = []
    for method, path, body, status in (
            ("PUT", f"/v1/memories/k?namespace={namespace}", {"value": 1}, 201),
            ("GET", "/v1/search?q=Zq81", None, 200),
            ("GET", "/v1/memories/nope", None, 404)):
        got, headers, answer = client.request(method, path, body)
        assert got == status, answer
        ids.append(request_id(headers, answer))
    client.close()
    child.proc.send_signal(signal.SIGTERM)
    assert child.wait() == 0, child.stderr
    return child.stderr, ids


def test_log_level_of_the_process_switches_the_access_log(db: str) -> None:
    stderr, ids = run_server(db, "info", "INFO")
    lines = [line for line in stderr.splitlines() if f" {ACCESS} " in line]
    assert [line.split(f" {ACCESS} INFO ", 1)[1].rsplit(" ", 2)[0] for line in lines] == [
        "PUT /v1/memories/k 201", "GET /v1/search 200", "GET /v1/memories/nope 404"]
    assert [line.rsplit("id=", 1)[1] for line in lines] == ids
    assert TOKEN not in stderr and "Zq81" not in stderr
    stderr, _ = run_server(db, "warning", "WARNING")
    assert ACCESS not in stderr and TOKEN not in stderr
    stderr, _ = run_server(db, "off", "INFO", "--access-log", "off")
    assert ACCESS not in stderr and "kvmem-http listening on" in stderr  # INFO, but no log


# ------------------------------------------------------------ ETag, If-Match, Location ----


def test_memory_answers_carry_etag_and_a_201_its_location(api: Served) -> None:
    created = memory_answer(api.request("PUT", "/v1/memories/user%2Ftea", {"value": 1}), "PUT",
                            MEMORY, 201)
    status, headers, _ = api.request("PUT", "/v1/memories/user%2Ftea", {"value": 1})
    assert api.request("GET", "/v1/memories/user%2Ftea")[1]["ETag"] == '"2"'
    assert "Location" not in headers and headers["ETag"] == '"2"' and status == 200
    result = api.request("PUT", "/v1/memories/caf%C3%A9%20%2F%3F%25?namespace=ns.1",
                         {"value": 2})
    memory_answer(result, "PUT", MEMORY, 201)
    location = result[1]["Location"]
    assert location == "/v1/memories/caf%C3%A9%20%2F%3F%25?namespace=ns.1"
    read = memory_answer(api.request("GET", location), "GET", MEMORY, 200)
    assert (read["key"], read["namespace"]) == ("café /?%", "ns.1")
    assert created["key"] == "user/tea"
    assert api.request("PUT", "/v1/memories/user%2Ftea", {"value": 1})[1]["ETag"] == '"3"'
    reinforced = memory_answer(api.request("POST", "/v1/memories/user%2Ftea/reinforce"),
                               "POST", "/v1/memories/{key}/reinforce", 200)
    assert reinforced["version"] == 3  # a reinforce does not change the content
    memory_answer(api.request("GET", "/v1/memories/user%2Ftea"), "GET", MEMORY, 200)
    status, headers, _ = api.request("POST", "/v1/batch", {"ops": [
        {"op": "set", "key": "b", "value": 1}]})
    assert status == 200 and "ETag" not in headers and "Location" not in headers


def test_if_match_is_if_version(api: Served) -> None:
    api.request("PUT", "/v1/memories/k", {"value": "one"})
    result = api.request("PUT", "/v1/memories/k", {"value": "two"}, headers={"If-Match": '"1"'})
    assert memory_answer(result, "PUT", MEMORY, 200)["version"] == 2
    for method, body in (("PUT", {"value": "lost"}), ("DELETE", None)):
        result = api.request(method, "/v1/memories/k", body, headers={"If-Match": '"1"'})
        assert_error(result, 409, "version_conflict")
        assert result[2]["error"]["current_version"] == 2
        # the same answer as if_version gives
        same = api.request(method, "/v1/memories/k" + ("?if_version=1" if body is None else ""),
                           None if body is None else {**body, "if_version": 1})
        assert (same[0], same[2]["error"]["message"], same[2]["error"]["current_version"]) \
            == (result[0], result[2]["error"]["message"], 2)
        unchanged(api, "k", 2, "two")
    result = api.request("DELETE", "/v1/memories/k", headers={"If-Match": '"2"'})
    assert result[0] == 200 and result[2] == {"deleted": True} and api.store.get("k") is None
    result = api.request("DELETE", "/v1/memories/k", headers={"If-Match": '"2"'})
    assert_error(result, 409, "version_conflict")
    assert result[2]["error"]["current_version"] == 0


def test_if_match_star_means_it_exists_and_if_none_match_star_that_it_does_not(
        api: Served) -> None:
    star, none = {"If-Match": "*"}, {"If-None-Match": "*"}
    for method, body in (("PUT", {"value": 1}), ("DELETE", None)):
        result = api.request(method, "/v1/memories/k", body, headers=star)
        assert_error(result, 409, "version_conflict")
        assert result[2]["error"]["current_version"] == 0
    assert api.store.get("k") is None  # not created
    assert memory_answer(api.request("PUT", "/v1/memories/k", {"value": 1}, headers=none),
                         "PUT", MEMORY, 201)["version"] == 1
    result = api.request("PUT", "/v1/memories/k", {"value": 2}, headers=none)
    assert_error(result, 409, "version_conflict")
    assert result[2]["error"]["current_version"] == 1
    unchanged(api, "k", 1, 1)
    assert memory_answer(api.request("PUT", "/v1/memories/k", {"value": 3}, headers=star),
                         "PUT", MEMORY, 200)["version"] == 2
    # As for if_version: an archived memory exists, an expired one does not.
    api.request("PUT", "/v1/memories/faded", {"value": 1, "half_life_seconds": 1})
    api.clock.advance(60)
    api.store.prune()
    assert [m.key for m in api.store.list(archived=True).items] == ["faded"]
    api.request("PUT", "/v1/memories/gone", {"value": 1, "ttl_seconds": 5})
    api.clock.advance(10)  # expired, not yet pruned
    restored = api.request("PUT", "/v1/memories/faded", {"value": 2}, headers=star)
    assert memory_answer(restored, "PUT", MEMORY, 200)["archived"] is False
    assert_error(api.request("PUT", "/v1/memories/gone", {"value": 2}, headers=star), 409,
                 "version_conflict")
    assert api.request("DELETE", "/v1/memories/k", headers=star)[:3:2] == (200, {"deleted": True})


@pytest.mark.parametrize(("method", "path", "headers", "body", "words"), [
    ("PUT", "/v1/memories/k", {"If-Match": "2"}, {"value": 9}, "double quotes"),
    ("PUT", "/v1/memories/k", {"If-Match": 'W/"2"'}, {"value": 9}, "weak"),
    ("PUT", "/v1/memories/k", {"If-Match": '"abc"'}, {"value": 9}, "double quotes"),
    ("PUT", "/v1/memories/k", {"If-Match": ""}, {"value": 9}, "double quotes"),
    ("PUT", "/v1/memories/k", {"If-Match": '"2", "3"'}, {"value": 9}, "one ETag"),
    ("PUT", "/v1/memories/k", {"If-Match": '"0"'}, {"value": 9}, "If-None-Match: *"),
    ("PUT", "/v1/memories/k", {"If-Match": '"' + "9" * 19 + '"'}, {"value": 9}, "quotes"),
    ("PUT", "/v1/memories/k", {"If-None-Match": '"2"'}, {"value": 9}, "only *"),
    ("PUT", "/v1/memories/k", {"If-Match": '"2"', "If-None-Match": "*"}, {"value": 9},
     "not both"),
    ("DELETE", "/v1/memories/k", {"If-None-Match": "*"}, None, "PUT /v1/memories/{key} only"),
    ("POST", "/v1/memories/k/reinforce", {"If-Match": '"2"'}, None, "DELETE /v1/memories/{key}"),
    ("POST", "/v1/batch", {"If-Match": '"2"'}, {"ops": [{"op": "delete", "key": "k"}]},
     "honoured on PUT"),
    # If-Match and if_version together must agree.
    ("PUT", "/v1/memories/k", {"If-Match": '"2"'}, {"value": 9, "if_version": 1}, "disagree"),
    ("PUT", "/v1/memories/k", {"If-Match": '"2"'}, {"value": 9, "if_version": "2"}, "disagree"),
    ("PUT", "/v1/memories/k", {"If-Match": "*"}, {"value": 9, "if_version": 2}, "disagree"),
    ("PUT", "/v1/memories/k", {"If-None-Match": "*"}, {"value": 9, "if_version": 2},
     "disagree"),
    ("DELETE", "/v1/memories/k?if_version=1", {"If-Match": '"2"'}, None, "disagree"),
    ("DELETE", "/v1/memories/k?if_version=2", {"If-Match": "*"}, None, "disagree"),
])
def test_bad_preconditions_are_400_and_change_nothing(
        api: Served, method: str, path: str, headers: dict[str, str], body: Any,
        words: str) -> None:
    api.request("PUT", "/v1/memories/k", {"value": 1})
    api.request("PUT", "/v1/memories/k", {"value": 2})
    message = assert_error(api.request(method, path, body, headers=headers), 400,
                           "invalid_request")
    assert words in message, message
    unchanged(api, "k", 2, 2)


def test_preconditions_that_agree_and_on_get(api: Served) -> None:
    api.request("PUT", "/v1/memories/k", {"value": 1})
    result = api.request("PUT", "/v1/memories/k", {"value": 2, "if_version": 1},
                         headers={"If-Match": '"1"'})
    assert memory_answer(result, "PUT", MEMORY, 200)["version"] == 2
    assert api.request("GET", "/v1/memories/k", headers={"If-Match": '"1"',
                                                         "If-None-Match": '"2"'})[0] == 200
    result = api.request("DELETE", "/v1/memories/k?if_version=2", headers={"If-Match": '"2"'})
    assert result[:3:2] == (200, {"deleted": True})


def test_openapi_documents_the_headers() -> None:
    def parameters(method: str, template: str) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in SPEC["paths"][template][method]["parameters"]
                if p["in"] == "header"}

    assert set(parameters("put", MEMORY)) == {"If-Match", "If-None-Match"}
    assert set(parameters("delete", MEMORY)) == {"If-Match"}
    assert all(not parameters(method, path) for path, operations in SPEC["paths"].items()
               for method in operations if (method, path) not in {("put", MEMORY),
                                                                   ("delete", MEMORY)})
    assert documented_headers("PUT", MEMORY, 201) == {"ETag", "Location"}
    assert documented_headers("PUT", MEMORY, 200) == {"ETag"}
    assert documented_headers("GET", MEMORY, 200) == {"ETag"}
    assert documented_headers("POST", "/v1/memories/{key}/reinforce", 200) == {"ETag"}
    assert documented_headers("GET", "/v1/memories", 200) == set()


# ----------------------------------------------------------------- the %2F hint ----


@pytest.mark.parametrize(("method", "path", "status", "hinted"), [
    ("GET", "/v1/memories/user/coffee", 404, "/v1/memories/user%2Fcoffee"),
    ("PUT", "/v1/memories/user/coffee", 404, "/v1/memories/user%2Fcoffee"),
    ("DELETE", "/v1/memories/a/b/c?namespace=x", 404, "/v1/memories/a%2Fb%2Fc"),
    ("POST", "/v1/memories/user/coffee/reinforce", 404, "/v1/memories/user%2Fcoffee/reinforce"),
    ("GET", "/v1/memories/user/reinforce", 405, "/v1/memories/user%2Freinforce"),
])
def test_a_slash_in_a_key_gets_the_path_to_use(api: Served, method: str, path: str,
                                               status: int, hinted: str) -> None:
    message = assert_error(api.request(method, path, {"value": 1} if method == "PUT" else None),
                           status, "not_found" if status == 404 else "method_not_allowed")
    assert message.endswith(f"a key containing '/' must be sent as %2F: {hinted}"), message
    # the hint is right: that path is the memory's
    api.store.set(hinted.removeprefix("/v1/memories/").removesuffix("/reinforce")
                  .replace("%2F", "/"), 1)
    used = "POST" if hinted.endswith("/reinforce") else "GET"
    assert api.request(used, hinted)[0] == 200


def test_no_slash_hint_elsewhere(api: Served) -> None:
    for method, path in (("GET", "/v1/nothing/a/b"), ("GET", "/v1/memories/"),
                         ("POST", "/v1/memories/a/b"), ("GET", "/v1/memories//")):
        result = api.request(method, path)
        assert result[0] in (404, 405) and "%2F" not in result[2]["error"]["message"], result


# ---------------------------------------------------------------- booleans ----

BOOLEAN_PARAMS = [(route, param["name"]) for route in http_server.ROUTES
                  for param in route.query
                  if isinstance(param["schema"], dict) and param["schema"]["type"] == "boolean"]


def test_the_boolean_parameters_are_found() -> None:
    assert [(r.method, r.path, name) for r, name in BOOLEAN_PARAMS] == [
        ("GET", "/v1/memories", "archived"), ("DELETE", "/v1/memories", "dry_run")]


def _boolean_answer(api: Served, route: http_server.Route, name: str,
                    word: str) -> tuple[int, Any]:
    """What the route does with ``name=word``: for archived, the keys listed; for dry_run,
    whether the forget of prefix "live" deleted it (False when it only reported)."""
    if name == "archived":
        status, _, body = api.request("GET", f"{route.path}?{name}={word}")
        return status, body if status != 200 else [m["key"] for m in body["items"]]
    api.request("PUT", "/v1/memories/live", {"value": 1})
    status, _, body = api.request("DELETE", f"{route.path}?prefix=live&{name}={word}")
    return status, body if status != 200 else body["deleted"] == 0


@pytest.mark.parametrize(("word", "value"), [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("Yes", True), ("YES", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("NO", False),
    ("on", True), ("On", True), ("off", False), ("OFF", False),
])
def test_every_boolean_parameter_takes_the_same_words(api: Served, word: str,
                                                      value: bool) -> None:
    api.request("PUT", "/v1/memories/live", {"value": 1})
    api.request("PUT", "/v1/memories/faded", {"value": 1, "half_life_seconds": 1})
    api.clock.advance(60)
    api.store.prune()
    for route, name in BOOLEAN_PARAMS:
        status, answer = _boolean_answer(api, route, name, word)
        assert status == 200, answer
        if name == "archived":
            assert answer == (["faded"] if value else ["live"])
        else:
            assert answer is value  # dry_run=true deletes nothing


BAD_WORDS = ["maybe", "", "2", "tru", "y", "t", "enabled", "%E2%9C%93"]


@pytest.mark.parametrize("word", BAD_WORDS)
def test_any_other_boolean_is_400_naming_the_parameter(api: Served, word: str) -> None:
    for route, name in BOOLEAN_PARAMS:
        message = assert_error(api.request(route.method, f"{route.path}?prefix=&{name}={word}"
                                           if name == "dry_run" else
                                           f"{route.path}?{name}={word}"), 400,
                               "invalid_request")
        assert f"query parameter {name!r} must be one of true, false, 1, 0, yes, no, on, " \
            "off (any case)" in message, message


def test_the_boolean_words_are_those_of_the_settings() -> None:
    """A boolean setting (KVMEM_QUICK_CHECK) and a boolean parameter take the same words."""
    for word, value in http_server.BOOLEAN_WORDS.items():
        for spelled in (word, word.upper(), word.title()):
            flags = {"quick_check": spelled}
            assert kvmem.Config.build(environ={}, flags=flags).quick_check is value
    for word in BAD_WORDS[:-1]:
        with pytest.raises(kvmem.ConfigError):
            kvmem.Config.build(environ={}, flags={"quick_check": word})


# ------------------------------------------------------------------- times ----

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def numbers(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(value, dict):
        for name, inner in value.items():
            yield from numbers(inner, f"{path}.{name}")
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from numbers(inner, f"{path}[{i}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path, value


def test_every_time_in_stats_is_rfc3339(db: str, backend: str) -> None:
    with serve(db, decay=True, decay_interval_s="0.2", checkpoint_poll_s="0.02") as api:
        deadline = time.monotonic() + 20
        while True:  # until each background part has a time to show
            # (writes until the checkpointer, which looks every 20 ms, sees the WAL change
            # at least ACTIVE_POLL_S after it began, and asks for a checkpoint)
            api.request("PUT", "/v1/memories/k", {"value": 1})
            stats = api.request("GET", "/v1/stats")[2]
            if stats["decay"]["runs"] and stats["last_prune"] and (
                    backend == "postgresql"  # no checkpointer, no group commit: a COMMIT each
                    or (stats["checkpointer"]["last_time"]
                        and stats["group_commit"]["last_checkpoint"])):
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.01)
        times = [stats["last_prune"]["at"], stats["decay"]["last_result"]["at"]]
        if backend == "sqlite":
            times += [stats["checkpointer"]["last_time"],
                      stats["group_commit"]["last_checkpoint"]["at"]]
        for text in times:
            assert isinstance(text, str) and RFC3339.fullmatch(text), times
            moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
            assert abs(moment.timestamp() - time.time()) < 3600, text
        # and no number left that is a Unix time (2001 to 2096)
        assert [(path, n) for path, n in numbers(stats) if 1e9 < n < 4e9] == []
        memory = api.request("GET", "/v1/memories/k")[2]
        assert all(RFC3339.fullmatch(memory[name]) for name in ("created_at", "updated_at",
                                                                 "last_reinforced_at"))


# ----------------------------------------------------- not found, unknown parameters ----


def test_a_missing_memory_is_one_message_on_every_route(api: Served) -> None:
    key, namespace = "no/such key", "ns1"
    path = f"/v1/memories/{quote(key, safe='')}?namespace={namespace}"
    messages = {assert_error(api.request(method, path), 404, "not_found")
                for method, path in (("GET", path), ("DELETE", path),
                                     ("POST", path.replace("?", "/reinforce?")))}
    assert messages == {f"no memory {key!r} in namespace {namespace!r}"}


def test_namespace_where_it_is_not_taken_says_where_to_look(api: Served) -> None:
    for route in http_server.ROUTES:
        if any(p["name"] == "namespace" for p in route.query):
            continue
        path = route.path.replace("{key}", "k")
        message = assert_error(api.request(route.method, f"{path}?namespace=ns1"), 400,
                               "invalid_request")
        assert message == (f"unknown query parameter 'namespace': {route.method} {route.path}"
                           " is not per namespace (GET /v1/namespaces counts the memories of"
                           " each)"), message
    assert {r.path for r in http_server.ROUTES if not any(
        p["name"] == "namespace" for p in r.query)} == {"/v1/namespaces", "/v1/stats",
                                                        "/healthz", "/openapi.json"}


def test_every_route_refuses_an_unknown_parameter(api: Served) -> None:
    api.request("PUT", "/v1/memories/k", {"value": 1})
    for route in http_server.ROUTES:
        body = {"value": 2} if route.method == "PUT" else (
            {"ops": [{"op": "delete", "key": "k"}]} if route.body else None)
        path = route.path.replace("{key}", "k")
        message = assert_error(api.request(route.method, f"{path}?q=tea&colour=red"
                                           if route.path == "/v1/search" else
                                           f"{path}?colour=red", body), 400, "invalid_request")
        assert message == "unknown query parameter 'colour'", (route.path, message)
    unchanged(api, "k", 1, 1)


@pytest.mark.parametrize("value", ["--5", "-", "+1", "1e3", " 1", "1 ", "%D9%A3", "%2D%2D5",
                                   "9" * 19, "0x10"])
def test_an_integer_parameter_is_digits_or_a_400(api: Served, value: str) -> None:
    for path in (f"/v1/memories?limit={value}", f"/v1/search?q=a&limit={value}"):
        assert_error(api.request("GET", path.replace(" ", "%20")), 400, "invalid_request")
    api.request("PUT", "/v1/memories/x", {"value": 1})
    assert_error(api.request("DELETE", f"/v1/memories/x?if_version={value}".replace(" ", "%20")),
                 400, "invalid_request")
    assert api.request("GET", "/v1/memories/x")[0] == 200


@pytest.mark.parametrize("header", ['"01"', '"001"', '"1 "', '" 1"'])
def test_if_match_is_the_etag_byte_for_byte(api: Served, header: str) -> None:
    api.request("PUT", "/v1/memories/x", {"value": 1})
    status, _, body = api.request("PUT", "/v1/memories/x", {"value": 2},
                                  headers={"If-Match": header})
    assert status == 400, body
    assert api.request("GET", "/v1/memories/x")[2]["value"] == 1


@pytest.mark.parametrize(("target", "shown"), [
    ("http://user:hunter2@127.0.0.1/v1/stats", "http://127.0.0.1/v1/stats"),
    ("/v1/memories/k#frag=secret", "/v1/memories/k"),
    ("/v1/search?q=secret#x", "/v1/search"),
])
def test_the_log_never_shows_userinfo_or_a_fragment(target: str, shown: str) -> None:
    assert http_server.loggable_path(target) == shown
