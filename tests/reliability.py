"""``make reliability``: run the fault tests and write reports/RELIABILITY.md from them.

Each fault test carries ``@pytest.mark.reliability(fault, outcome)`` (on the test or on one
parametrized case). This module is both the pytest plugin that collects those rows with
each test's result and time, and the script that runs pytest with it and renders the table:

    python -m tests.reliability [reports/RELIABILITY.md]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAULT_TESTS = ["tests/test_faults_kill.py", "tests/test_faults_io.py", "tests/test_faults_inputs.py",
               "tests/test_faults_security.py", "tests/test_faults_properties.py"]
_ROWS_ENV = "DEPTHPROBE_RELIABILITY_JSON"
_rows: dict[str, dict] = {}


def _row_of(item) -> dict | None:
    marker = item.get_closest_marker("reliability")
    if marker is None:
        return None
    fault, outcome = marker.args
    callspec = getattr(item, "callspec", None)
    if callspec is not None and marker not in item.own_markers:  # one marker shared by several cases
        fault = f"{fault} [{callspec.id}]"
    return {"test": item.nodeid, "fault": fault, "outcome": outcome, "result": "not run", "seconds": 0.0}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    row = _rows.get(item.nodeid) or _row_of(item)
    if row is None:
        return
    _rows[item.nodeid] = row
    row["seconds"] += report.duration
    if report.when == "call" or report.outcome != "passed":
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else "skipped"
            row["result"] = f"skipped ({reason.removeprefix('Skipped: ')})"
        elif row["result"] in ("not run", "passed"):
            row["result"] = report.outcome


def pytest_sessionfinish(session):
    path = os.environ.get(_ROWS_ENV)
    if path:
        Path(path).write_text(json.dumps(list(_rows.values()), indent=1))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: list[dict], command: str, seconds: float) -> str:
    passed = sum(r["result"] == "passed" for r in rows)
    lines = [
        "# Reliability: faults and hostile inputs tried",
        "",
        "Every row is a test in `tests/test_faults_*.py` (marked `@pytest.mark.reliability`): the fault or bad",
        "input it creates, the outcome it asserts, and its result in the run that wrote this file.",
        f"Regenerate with `make reliability` (`{command}`).",
        "",
        f"Last run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {len(rows)} rows, {passed} passed, "
        f"{seconds:.0f} s on this machine ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.0f} at the end).",
        "",
        "| # | Fault or input tried | Required outcome | Result | Test (s) |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        name = r["test"].split("::", 1)[1]
        file = r["test"].split("::", 1)[0].removeprefix("tests/")
        lines.append(f"| {i} | {_cell(r['fault'])} | {_cell(r['outcome'])} | {r['result']} | "
                     f"`{file}::{_cell(name)}` ({r['seconds']:.1f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    target = Path(argv[0]) if argv else ROOT / "reports" / "RELIABILITY.md"
    rows_file = target.with_suffix(".rows.json")
    env = {**os.environ, _ROWS_ENV: str(rows_file), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "tests.reliability", *FAULT_TESTS]
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env)
    rows = json.loads(rows_file.read_text())
    rows_file.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(rows, "python -m tests.reliability", time.perf_counter() - t0))
    print(f"{len(rows)} rows written to {target}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
