"""Prints the per-file counts of Orbit's test suite (`test_orbit_suite.py`) after a run."""

from __future__ import annotations

from typing import Any

from .suite import REPORTS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if REPORTS:
        terminalreporter.section("Orbit's test suite")
        for report in REPORTS:
            terminalreporter.write_line(report)
