"""Developer sessions: `nox -s tests`, `tests_minimal`, `lint`, `docs`, `bench`."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "tests_minimal", "lint"]
nox.options.default_venv_backend = "venv"


@nox.session
def tests(session: nox.Session) -> None:
    """Every test, with TensorFlow, JAX and PyTorch installed (nothing skipped)."""
    session.install("-e", ".[all,dev]")
    # Orbit's own test files (run against `looproto.orbit`); their dependencies would
    # install a second TensorFlow over tensorflow-cpu.
    session.install("--no-deps", "tf-models-official==2.20.0", "tf-keras~=2.21.0")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def tests_minimal(session: nox.Session) -> None:
    """NumPy only: proves the core and the default backend need no framework."""
    session.install("-e", ".", "pytest", "hypothesis")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) and mypy --strict."""
    session.install("-e", ".[dev]")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site: `mkdocs build --strict` into site/ (the docs extra only)."""
    extras = nox.project.load_toml("pyproject.toml")["project"]["optional-dependencies"]
    session.install(*extras["docs"])
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: looproto against hand-written loops, per framework (not in CI)."""
    session.install("-e", ".[all]")
    session.run("python", "-m", "benchmarks", *session.posargs)
