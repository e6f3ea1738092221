"""The documentation's code runs: every ```python block of README.md and docs/**/*.md.

Each page is one test. Its blocks run in order, in one namespace (a reader runs them top
to bottom), in a fresh temporary working directory. A block that imports a framework
that is not installed skips the rest of its page, since later blocks may build on it.
Tracebacks point at the Markdown file and line.

A block may opt out with `<!-- skip-test -->` on the line before its fence. That is only
for Orbit / TensorFlow Models code, which cannot run here, so such a block must import or
use `orbit` or `official`; it must still be valid Python.

If mkdocs and its plugins are installed, the site must also build with `--strict`.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from looproto import backends

ROOT = Path(__file__).resolve().parent.parent
ALL_PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

SKIP_MARKER = "<!-- skip-test -->"
# Top-level packages a block may need that are optional here: a block importing one of
# these skips when it is missing. Any other failed import is a real error.
OPTIONAL_PACKAGES = frozenset(
    {"jax", "jaxlib", "flax", "optax", "tensorflow", "keras", "tf_keras", "torch"}
)
# What the `skip-test` marker is for: code of these projects cannot run here.
UNRUNNABLE_PACKAGES = frozenset({"orbit", "official"})

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    path: Path
    line: int  # 1-based line of the first line of code
    language: str
    code: str
    skip: bool

    @property
    def where(self) -> str:
        return f"{_display(self.path)}:{self.line}"


def _display(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def code_blocks(path: Path) -> Iterator[Block]:
    """Yields the fenced code blocks of the Markdown file `path`, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence = len(match["indent"]), match["fence"]
        language = match["info"].strip().split(" ")[0].lower()
        previous = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        if j == len(lines):
            raise AssertionError(f"{_display(path)}:{i + 1}: unclosed code fence")
        yield Block(path, i + 2, language, "\n".join(body) + "\n", previous == SKIP_MARKER)
        i = j + 1


def imported_packages(tree: ast.AST) -> set[str]:
    """Top-level package names that `tree` imports."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.partition(".")[0])
    return names


def uses_unrunnable(tree: ast.AST) -> bool:
    """Whether `tree` imports or uses a name of Orbit or TensorFlow Models."""
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    return bool((names | imported_packages(tree)) & UNRUNNABLE_PACKAGES)


def python_blocks(path: Path) -> list[Block]:
    return [block for block in code_blocks(path) if block.language in ("python", "py")]


PAGES = [path for path in ALL_PAGES if python_blocks(path)]


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary working directory; process state the snippets may change is restored."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)  # snippets choose their own backend
    monkeypatch.setattr(sys, "argv", ["docs-snippet"])
    saved_environ = dict(os.environ)
    logger = logging.getLogger("looproto")
    saved_level = logger.level
    # The registry a page may add to (`backends.register`). The shipped backends register
    # once per process, on first use: before the snapshot, or restoring it would drop them.
    backends.available()
    registries: list[Any] = [
        backends._entries,
        backends._aliases,
        backends._by_type,
        backends._waiting,
        backends.assign_hooks,
        backends._scope_hooks,
        backends._gates,
    ]
    saved = [registry.copy() for registry in registries]
    yield tmp_path
    logger.setLevel(saved_level)
    os.environ.clear()
    os.environ.update(saved_environ)
    for registry, contents in zip(registries, saved):
        registry.clear()
        if isinstance(registry, dict):
            registry.update(contents)
        else:
            registry.extend(contents)


def installed(name: str) -> bool:
    """Whether module `name` (dotted names too) can be imported, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def run_page(path: Path, namespace: dict[str, object]) -> None:
    """Runs the python blocks of `path` in order in `namespace` (see the module docstring)."""
    for block in python_blocks(path):
        # Pad with blank lines so that tracebacks give the line in the Markdown file.
        source = "\n" * (block.line - 1) + block.code
        tree = compile(source, str(block.path), "exec", ast.PyCF_ONLY_AST)
        packages = imported_packages(tree)
        if block.skip:
            assert uses_unrunnable(tree), (
                f"{block.where}: `{SKIP_MARKER}` is only for Orbit / TensorFlow Models code "
                f"(a block that imports or uses {sorted(UNRUNNABLE_PACKAGES)}). Make this "
                "block run instead."
            )
            continue
        missing = sorted(name for name in packages & OPTIONAL_PACKAGES if not installed(name))
        if missing:
            pytest.skip(f"{block.where} needs {', '.join(missing)}, which is not installed")
        exec(compile(tree, str(block.path), "exec"), namespace)


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_code_runs(path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real module, as a user's script is: Dynamo imports the module a function's
    # globals name when it inlines that function.
    page = types.ModuleType("__docs__")
    monkeypatch.setitem(sys.modules, page.__name__, page)
    run_page(path, page.__dict__)


def test_missing_framework_skips_the_rest_of_its_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx = 1\n```\n"
        "```python\nimport torch.nn\n```\n"
        "```python\nraise RuntimeError('must not run')\n```\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(sys.modules[__name__], "installed", lambda package: package != "torch")
    namespace: dict[str, object] = {}
    with pytest.raises(pytest.skip.Exception, match=r"page\.md:5 needs torch"):
        run_page(page, namespace)
    assert namespace["x"] == 1


def test_failing_block_reports_the_markdown_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("Text.\n\n```python\nok = True\nassert not ok\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError) as info:
        run_page(page, {})
    assert (info.traceback[-1].path, info.traceback[-1].lineno + 1) == (page, 5)


def test_skip_marker_is_only_for_orbit_code(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        f"{SKIP_MARKER}\n```python\nfrom orbit import Controller\n```\n"
        f"{SKIP_MARKER}\n```python\nimport numpy\nraise RuntimeError\n```\n",
        encoding="utf-8",
    )
    with pytest.raises(AssertionError, match=r"page\.md:7: `<!-- skip-test -->` is only for"):
        run_page(page, {})


@pytest.mark.parametrize("path", ALL_PAGES, ids=[str(p.relative_to(ROOT)) for p in ALL_PAGES])
def test_skip_markers_sit_right_before_python_blocks(path: Path) -> None:
    markers = path.read_text(encoding="utf-8").count(SKIP_MARKER)
    skipped = [block for block in code_blocks(path) if block.skip]
    assert all(block.language in ("python", "py") for block in skipped), [
        block.where for block in skipped
    ]
    assert markers == len(skipped), f"{_display(path)}: a `{SKIP_MARKER}` is not before a fence"


def test_readme_trainer_in_30_lines_is_tested() -> None:
    # The README's showcase must stay a block this suite runs, not a skipped one.
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## A trainer in 30 lines" in text
    section = text.split("## A trainer in 30 lines", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in python_blocks(ROOT / "README.md") if b.code.strip() in section]
    assert len(blocks) == 1
    assert not blocks[0].skip
    assert "controller.train(" in blocks[0].code


def test_block_parser_finds_languages_markers_and_lines(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n"
        "```python\n"
        "a = 1\n"
        "```\n"
        "<!-- skip-test -->\n"
        "\n"
        "```python\n"
        "import orbit\n"
        "```\n"
        "- item\n"
        "    ```bash\n"
        "    echo hi\n"
        "    ```\n",
        encoding="utf-8",
    )
    blocks = list(code_blocks(page))
    assert [(b.language, b.line, b.skip, b.code) for b in blocks] == [
        ("python", 3, False, "a = 1\n"),
        ("python", 8, True, "import orbit\n"),
        ("bash", 12, False, "echo hi\n"),
    ]


@pytest.mark.skipif(
    not all(installed(m) for m in ("mkdocs", "material", "mkdocstrings_handlers.python")),
    reason="needs mkdocs, mkdocs-material and mkdocstrings[python]: pip install -e '.[docs]'",
)
def test_site_builds_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "api" / "controller" / "index.html").is_file()


def test_every_test_the_reliability_table_names_exists() -> None:
    """Each row of docs/reliability.md's table of faults names tests that exist."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    table = text.split("## Every fault, what you see, and what it costs")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) > 20
    for row in rows[1:]:  # after the header
        tested = row.rstrip(" |").rsplit(" | ", 1)[1]
        names = re.findall(r"`((?:[\w/]+\.py)?(?:::\w+)?)`", tested)
        assert names or tested == "same", row
        current = None
        for name in names:
            path, _, function = name.partition("::")
            current = ROOT / "tests" / path if path else current
            assert current is not None and current.exists(), (row, name)
            if function:
                assert f"def {function}(" in current.read_text(), (row, name)


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    # `.ci/run` marks the README's test command; the two must not drift apart.
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(ci) if line.startswith("# --- the README's test"))
    end = next(i for i in range(start + 1, len(ci)) if ci[i].strip() == "# ---")
    ci_command = [line for line in ci[start + 1 : end] if line.strip()]
    readme = [
        block.code.strip()
        for block in code_blocks(ROOT / "README.md")
        if block.language == "bash" and "-m pytest" in block.code
    ]
    assert readme == ["\n".join(ci_command)]
