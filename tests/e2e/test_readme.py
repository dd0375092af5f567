"""The README's walkthrough, run as written: its server command, then its curl block, step by step,
each answer checked against what the README shows of it. So the README cannot drift from the
program. The only changes: the port (a free one), the wait (2 s, not 30), the stream cut after 3 s,
and PATH pointing at this test's virtualenv."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_cli import BIN, clean_env, free_port, serve

pytestmark = pytest.mark.e2e

README = Path(__file__).parents[2] / "README.md"


def section(title: str) -> str:
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)


def steps(block: str) -> list[tuple[str, list[str]]]:
    """(command, the README's comment lines shown right after it), in order; a command continued
    with a backslash is one step."""
    found: list[tuple[str, list[str]]] = []
    pending = ""
    for line in block.splitlines():
        if pending:
            pending += "\n" + line
            if not line.endswith("\\"):
                found.append((pending, []))
                pending = ""
        elif line.startswith("# ") and found:
            found[-1][1].append(line[2:])
        elif line.strip() and not line.startswith("#"):
            if line.endswith("\\"):
                pending = line
            else:
                found.append((line, []))
    return found


def as_run_here(command: str, port: int) -> str:
    command = re.sub(r"\s{2,}# .*$", "", command, flags=re.MULTILINE)  # the README's remarks
    command = command.replace("localhost:8080", f"localhost:{port}")
    command = command.replace("export PATH=$PWD/.venv/bin:$PATH", f"export PATH={BIN.parent}:$PATH")
    command = re.sub(r"^sleep 30\b", "sleep 2", command)
    if command.startswith("curl -sN "):  # a stream: cut after 3 s (curl's exit status 28 then)
        command = command.replace("curl -sN ", "curl -sN --max-time 3 ", 1) + " || test $? -eq 28"
    return command


def documented_fields(comment: str) -> dict[str, str | None]:
    """The fields a `# {...}` comment shows: name -> its string value (None: a number, or elided)."""
    fields: dict[str, str | None] = {}
    for name, value in re.findall(r'"(\w+)":("[^"]*"|[^,}]+)', comment):
        literal = value.startswith('"') and "…" not in value
        fields[name] = value.strip('"') if literal else None
    return fields


def test_the_two_commands_are_the_ones_ci_runs_and_the_server_command_installs_then_serves() -> None:
    server_command, test_command = bash_blocks(section("Two commands"))[:2]
    assert server_command.strip() == (
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/usage-ledger serve"
    )
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == test_command.strip()


def test_the_curl_walkthrough_runs_as_written_and_answers_as_shown(tmp_path: Path) -> None:
    port = free_port()
    server = serve(tmp_path, clean_env(LEDGER_PORT=str(port)), port)
    [block] = bash_blocks(section("A whole session with curl"))
    walkthrough = steps(block)
    script = "set -eo pipefail\n" + "".join(
        f"printf '\\n@@step {index}\\n'\n{as_run_here(command, port)}\n"
        for index, (command, _) in enumerate(walkthrough)
    )
    try:
        # Run where the server runs, with nothing configured: the CLI finds the server itself.
        done = subprocess.run(
            ["bash", "-c", script], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=180
        )
    finally:
        server.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    outputs = re.split(r"^@@step \d+\n", done.stdout, flags=re.MULTILINE)[1:]
    assert len(outputs) == len(walkthrough), done.stdout
    shown = 0
    for (command, comments), output in zip(walkthrough, outputs, strict=True):
        text = output.strip()
        if text.startswith("{"):  # a JSON answer (curl's, or the CLI's indented one): never a problem
            answer = json.loads(text)
            assert not {"type", "status", "code"} <= answer.keys(), (command, answer)
        documented = [comment for comment in comments if comment.startswith("{")]
        if documented:
            shown += 1
            answer = json.loads(text)
            for name, value in documented_fields(documented[0]).items():
                assert name in answer, (command, name, answer)
                if value is not None:
                    assert answer[name] == value, (command, name, answer[name], value)
        if command.startswith("curl -sN "):
            assert text.startswith("event: usage\nid: ") and "\ndata: {" in text, text
        if command.startswith("usage-ledger status"):
            assert "usage-ledger shards" in text and "running" in text, text
    assert shown == 2, "the README shows two answers: the usage object and a heartbeat's"


def test_the_readme_is_an_entry_that_links_every_page_of_the_docs() -> None:
    text = README.read_text()
    assert len(text.encode()) < 25_000, "the README is an entry; reference goes to docs/"
    pages = sorted(path.name for path in (README.parent / "docs").glob("*.md"))
    assert pages and not [page for page in pages if f"](docs/{page}" not in text]
    for page in pages:  # and each page links back
        assert "](../README.md)" in (README.parent / "docs" / page).read_text(), page
