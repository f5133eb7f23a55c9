"""The README's curl walkthrough, run in order against a live kvmem-http.

Every ``curl`` line of the block after ``<!-- walkthrough -->`` ends with a comment that
starts with the HTTP status it gets; the test runs the block's lines in order with the real
``curl`` (on the server's port instead of 8765) and checks each status.  A list or search
answer must hold items unless its comment says ``[]``, and the keys a comment names
(``user/tea``) must be among them: so an example cannot quietly return an empty list.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from testutil import HERE, Child

MARKER = "<!-- walkthrough -->"


@dataclasses.dataclass(frozen=True)
class Step:
    command: str  # one shell command, continuation lines joined
    status: int | None  # None: not a curl request (a variable, say)
    comment: str


def _complete(text: str) -> bool:
    """Whether ``text`` is a whole shell command: no open quote, no trailing backslash."""
    if text.rstrip().endswith("\\"):
        return False
    try:
        shlex.split(text, comments=True)
    except ValueError:  # an open quote: the command goes on on the next line
        return False
    return True


def walkthrough(readme: str) -> list[Step]:
    """The steps of the README's walkthrough block."""
    _, found, rest = readme.partition(MARKER)
    assert found, f"README.md has no {MARKER} block"
    block = re.match(r"\s*```sh\n(.*?)\n```", rest, re.S)
    assert block, f"no ```sh block right after {MARKER}"
    steps, pending = [], ""
    for line in block.group(1).splitlines():
        pending = f"{pending}\n{line}" if pending else line
        if not pending.strip() or not _complete(pending):
            continue
        command, _, comment = pending.rpartition("  # ")
        if not command.strip():  # no comment on this command
            command, comment = pending, ""
        status = re.match(r"\s*(\d{3})\b", comment)
        if command.lstrip().startswith("curl"):
            assert status, f"a curl example without its status in a comment: {pending!r}"
        steps.append(Step(command.strip(), int(status.group(1)) if status else None,
                          comment.strip()))
        pending = ""
    assert not pending.strip(), f"an unfinished command at the end: {pending!r}"
    return steps


def test_walkthrough_is_found_and_every_request_documents_its_status() -> None:
    steps = walkthrough(Path(HERE, "README.md").read_text(encoding="utf-8"))
    requests = [step for step in steps if step.status is not None]
    assert len(requests) >= 15, [step.command for step in steps]
    with_items = [step for step in requests if "[]" not in step.comment
                  and re.search(r"/v1/(search|memories\?|namespaces)", step.command)]
    assert len(with_items) >= 4  # the lists and searches this test checks for items


def test_readme_walkthrough_runs_in_order(tmp_path: Path) -> None:
    curl = shutil.which("curl")
    assert curl, "the README walkthrough test needs curl (.ci/run installs it)"
    steps = walkthrough(Path(HERE, "README.md").read_text(encoding="utf-8"))
    server = Child("serve_http", "--db", str(tmp_path / "kv.db"), "--port", "0")
    port = int(server.expect("listening on http://127.0.0.1:").rsplit(":", 1)[1])
    preamble: list[str] = []
    body = tmp_path / "body"
    for n, step in enumerate(steps, 1):
        command = step.command.replace("localhost:8765", f"127.0.0.1:{port}")
        if step.status is None:
            preamble.append(command)
            continue
        command = re.sub(r"^curl ", f"curl -sS -o {shlex.quote(str(body))} -w '%{{http_code}}' ",
                         command)
        result = subprocess.run(["bash", "-c", "\n".join(["set -eu", *preamble, command])],
                                capture_output=True, text=True, timeout=30, cwd=tmp_path,
                                env={**os.environ, "LC_ALL": "C.UTF-8"})
        answer = body.read_text(encoding="utf-8") if body.exists() else ""
        where = f"step {n}: {step.command}\n  # {step.comment}\n-> {result.stdout} {answer}"
        assert result.returncode == 0, where + result.stderr
        assert int(result.stdout) == step.status, where
        data = json.loads(answer) if answer.startswith("{") else None
        if isinstance(data, dict) and isinstance(data.get("items"), list):
            keys = {item.get("key", item.get("namespace")) for item in data["items"]}
            if "[]" in step.comment:
                assert not keys, where
            else:
                assert keys, where
                for named in re.findall(r"\b(?:user|team)/\w+", step.comment):
                    assert named in keys, where
        body.unlink(missing_ok=True)
    server.proc.terminate()
    assert server.wait() == 0
