"""The MCP conformance suite (``@modelcontextprotocol/conformance``, pinned in ``package.json``)
against ``atomictools serve --transport http``.

The suite runs every server scenario it has (``--suite all``: the active ones and the pending
ones) as an independent TypeScript client against one server on a free loopback port, with
``conformance-expected-failures.yml`` as its baseline. A scenario fails when one of its checks
is a FAILURE or a WARNING (the suite's own rule). This test then holds the suite to the list:

- every scenario that is not listed must pass (initialize, ping, logging/setLevel, tools/list,
  several concurrent SSE streams, DNS-rebinding protection, ...);
- every listed scenario must fail: one that passes is stale and must leave the list;
- every entry must name a scenario of this suite version and give its reason.

The suite needs Node >= 22, so it runs on the pinned Node 22 binary (``node22``).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import summary_report
from tests.server.test_http import RunningServer, start_http_server

HERE = Path(__file__).parent
EXPECTED_FAILURES = HERE / "conformance-expected-failures.yml"
SUITE_TIMEOUT = 120
RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d-\d{3}Z$")
ENTRY = re.compile(r"^\s+-\s+(?P<scenario>[a-z0-9-]+)\s*(?:#\s*(?P<reason>.*?))?\s*$")


def suite_command(node22: Path, node_modules: Path, *args: str) -> list[str]:
    script = node_modules / "@modelcontextprotocol/conformance/dist/index.js"
    assert script.exists(), f"npm ci did not install the conformance suite ({script} is missing)"
    return [str(node22), str(script), *args]


def expected_failures() -> dict[str, str]:
    """Scenario -> reason, from the ``server:`` list of the baseline file."""
    entries: dict[str, str] = {}
    section = None
    for line in EXPECTED_FAILURES.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            section = line.split(":", 1)[0].strip()
            continue
        match = ENTRY.match(line)
        assert match, f"not a `  - scenario  # reason` line: {line!r}"
        assert section == "server", f"{match['scenario']} is not under `server:`"
        assert match["reason"], f"{match['scenario']}: give the reason after `#`"
        assert match["scenario"] not in entries, f"{match['scenario']} is listed twice"
        entries[match["scenario"]] = match["reason"]
    return entries


def server_scenarios(node22: Path, node_modules: Path) -> set[str]:
    done = subprocess.run(
        suite_command(node22, node_modules, "list", "--server"),
        capture_output=True,
        text=True,
        timeout=SUITE_TIMEOUT,
        check=True,
    )
    return set(re.findall(r"^\s+- ([a-z0-9-]+)", done.stdout, re.MULTILINE))


def scenario_results(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Scenario -> its checks, from the suite's ``OUT/server-<scenario>-<time>/checks.json``."""
    results: dict[str, list[dict[str, Any]]] = {}
    for directory in sorted(out.iterdir()):
        match = RESULT_DIR.match(directory.name)
        assert match, f"unexpected entry in the suite's output: {directory.name}"
        assert match["scenario"] not in results, f"{match['scenario']} ran twice"
        results[match["scenario"]] = json.loads((directory / "checks.json").read_text())
    return results


def failed(checks: list[dict[str, Any]]) -> bool:
    return any(check["status"] in ("FAILURE", "WARNING") for check in checks)


def problems(checks: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"{check['id']}: {check['status']} {check.get('errorMessage') or ''}".strip()
        for check in checks
        if check["status"] in ("FAILURE", "WARNING")
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    state = tmp_path / "state"
    state.mkdir()
    yield from start_http_server(tmp_path, "--state-dir", str(state))


def test_conformance_suite(
    server: RunningServer,
    node22: Path,
    node_modules: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    expected = expected_failures()
    known = server_scenarios(node22, node_modules)
    assert known, "the suite lists no server scenarios"
    assert set(expected) <= known, f"not scenarios of this suite: {set(expected) - known}"

    out = tmp_path / "results"
    done = subprocess.run(
        suite_command(
            node22,
            node_modules,
            "server",
            "--url",
            server.url,
            "--suite",
            "all",
            "--expected-failures",
            str(EXPECTED_FAILURES),
            "--output-dir",
            str(out),
        ),
        capture_output=True,
        text=True,
        timeout=SUITE_TIMEOUT,
        cwd=tmp_path,
        check=False,
    )
    log = f"suite exit {done.returncode}\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    results = scenario_results(out)
    assert set(results) == known, f"scenarios that did not run: {known - set(results)}\n{log}"

    failing = {name for name, checks in results.items() if failed(checks)}
    verdict = [
        f"should pass but failed: {name}: {problems(results[name])}"
        for name in sorted(failing - set(expected))
    ]
    verdict.extend(
        f"listed in {EXPECTED_FAILURES.name} but passed (remove it): {name}"
        for name in sorted(set(expected) - failing)
    )
    assert not verdict, "\n".join([*verdict, log, server.stderr()[-3000:]])
    assert done.returncode == 0, log  # the suite's own baseline check agrees
    assert server.proc.poll() is None, f"the server died:\n{server.stderr()}"

    report = summary_report(request.config, "MCP conformance suite")
    passing = sorted(known - failing)
    report.add(f"{len(passing)} scenarios pass: {', '.join(passing)}")
    report.add(f"{len(expected)} expected failures (fixtures we do not have): {EXPECTED_FAILURES}")
