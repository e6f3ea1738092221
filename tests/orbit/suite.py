"""Orbit's own test files, run against `looproto.orbit` (imports renamed) or real Orbit.

Orbit's code is not ours to carry, so nothing of it is in this repository: `build`
copies the test files of the installed `tf-models-official` wheel (`orbit/...`) into a
temporary directory at test time, rewriting every `orbit` import to `looproto.orbit`
for a run against looproto (`import orbit` -> `from looproto import orbit`,
`from orbit.x import y` -> `from looproto.orbit.x import y`; nothing else changes),
or unchanged for the control run against real Orbit. `run` runs them in one pytest
subprocess, with `suite_conftest.py` as their conftest, and returns each file's
outcomes from pytest's JUnit XML.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import looproto

HERE = Path(__file__).parent
# Orbit's test files, as the issue lists them (paths inside the `orbit` package).
TEST_FILES = (
    "controller_test.py",
    "standard_runner_test.py",
    "actions/*_test.py",
    "utils/*_test.py",
    "examples/single_task/*_test.py",
)
EXAMPLE_DIR = "examples/single_task"
# The per-file tables of the runs of this pytest session (`conftest.py` prints them).
REPORTS: list[str] = []
# tf.test.TestCase has a `test_session` method that pytest collects and TensorFlow skips.
NOT_A_TEST = "test_session"

_IMPORT = re.compile(r"^(?P<indent>\s*)import orbit(?:\.[\w.]+)?\s*$")
_FROM = re.compile(r"^(?P<indent>\s*)from orbit(?P<sub>(?:\.\w+)*) import (?P<names>.+)$")


def orbit_package() -> Path | None:
    """The installed `orbit` package (from the tf-models-official wheel), or None."""
    spec = importlib.util.find_spec("orbit")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def rename_imports(source: str) -> str:
    """`source` with every import of `orbit` made an import of `looproto.orbit`.

    Raises:
        ValueError: An import of `orbit` has a form this does not rewrite.
    """
    lines = []
    for line in source.splitlines(keepends=True):
        text = line.rstrip("\r\n")
        ending = line[len(text) :]
        if match := _IMPORT.match(text):
            text = f"{match['indent']}from looproto import orbit"
        elif match := _FROM.match(text):
            text = f"{match['indent']}from looproto.orbit{match['sub']} import {match['names']}"
        lines.append(text + ending)
    renamed = "".join(lines)
    for node in ast.walk(ast.parse(renamed)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        if any(name == "orbit" or name.startswith("orbit.") for name in names):
            raise ValueError(f"an import of orbit left as it was: line {node.lineno}")
    return renamed


def test_files(package: Path) -> list[Path]:
    """Orbit's test files in the installed package, relative to it."""
    found: list[Path] = []
    for pattern in TEST_FILES:
        found.extend(sorted(p.relative_to(package) for p in package.glob(pattern)))
    return found


def write_examples(examples: Path) -> Path:
    """Writes Orbit's `single_task` example, imports renamed, as `examples/single_task/`.

    Returns `examples`, the directory to make the package `looproto.orbit.examples`
    (see `register_examples`).
    """
    package = orbit_package()
    assert package is not None, "the tf-models-official wheel is not installed"
    (examples / "single_task").mkdir(parents=True)
    (examples / "single_task" / "__init__.py").write_text("")
    for source_path in sorted((package / EXAMPLE_DIR).glob("*.py")):
        if source_path.name == "__init__.py" or source_path.name.endswith("_test.py"):
            continue
        text = rename_imports(source_path.read_text())
        (examples / "single_task" / source_path.name).write_text(text)
    return examples


def build(directory: Path, *, against: str) -> None:
    """Writes Orbit's test files and their conftest into `directory`.

    Args:
        directory: An empty directory.
        against: `"looproto"` (imports renamed, the example importable as
            `looproto.orbit.examples.single_task`, the gauge tests skipped) or `"orbit"`
            (the files unchanged: the control run).
    """
    package = orbit_package()
    assert package is not None, "the tf-models-official wheel is not installed"
    renamed = against == "looproto"
    tests = directory / "tests"
    for relative in test_files(package):
        target = tests / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        source = (package / relative).read_text()
        target.write_text(rename_imports(source) if renamed else source)
    settings: dict[str, object] = {"shims": str(HERE / "shims"), "skip_gauge": renamed}
    if renamed:
        settings["examples"] = str(write_examples(directory / "examples"))
    shutil.copyfile(HERE / "suite_conftest.py", directory / "conftest.py")
    (directory / "suite.json").write_text(json.dumps(settings))
    (directory / "pytest.ini").write_text("[pytest]\n")


@dataclasses.dataclass
class FileOutcome:
    """The outcomes of one test file."""

    passed: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.passed) + len(self.failed) + len(self.skipped)


@dataclasses.dataclass
class SuiteResult:
    """Outcomes by test file (paths inside `orbit/`), and pytest's output."""

    files: dict[str, FileOutcome]
    output: str
    returncode: int

    def counts(self) -> dict[str, tuple[int, int, int, int]]:
        """`{file: (passed, failed, skipped, total)}`."""
        return {
            name: (len(o.passed), len(o.failed), len(o.skipped), o.total)
            for name, o in self.files.items()
        }

    def table(self, title: str) -> str:
        """The per-file counts as text."""
        rows = [title, f"  {'file':<52} passed failed skipped"]
        totals = [0, 0, 0]
        for name, (passed, failed, skipped, _) in sorted(self.counts().items()):
            rows.append(f"  {name:<52} {passed:>6} {failed:>6} {skipped:>7}")
            totals = [totals[0] + passed, totals[1] + failed, totals[2] + skipped]
        rows.append(f"  {'total':<52} {totals[0]:>6} {totals[1]:>6} {totals[2]:>7}")
        return "\n".join(rows)


def run(directory: Path, timeout: float = 900) -> SuiteResult:
    """Runs the files `build` wrote into `directory` in one pytest subprocess."""
    env = dict(os.environ)
    src = str(Path(looproto.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    report = directory / "junit.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "tests",
        "-q",
        "-p",
        "no:cacheprovider",
        "-c",
        "pytest.ini",
        "--rootdir",
        str(directory),
        "--import-mode=importlib",
        "-o",
        "junit_family=xunit1",
        f"--junitxml={report}",
    ]
    done = subprocess.run(
        command, cwd=directory, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = done.stdout + done.stderr
    files: dict[str, FileOutcome] = {}
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            name = case.get("name", "")
            if name == NOT_A_TEST:
                continue
            path = case.get("file", "?").removeprefix("tests/")
            outcome = files.setdefault(path, FileOutcome())
            test = f"{case.get('classname', '').rpartition('.')[2]}.{name}"
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            skipped = case.find("skipped")
            if problem is not None:
                outcome.failed[test] = (problem.get("message") or "")[:500]
            elif skipped is not None:
                outcome.skipped[test] = skipped.get("message") or ""
            else:
                outcome.passed.append(test)
    return SuiteResult(files=files, output=output, returncode=done.returncode)
