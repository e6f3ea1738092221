"""`import looproto` stays light: no framework is imported, and `__all__` is sound.

Import *speed* is measured in the benchmarks, not asserted here; these tests check
the cause of a slow import instead (a framework pulled in by `import looproto`), and
print the measured time for information.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import looproto

HEAVY_MODULES = ("jax", "jaxlib", "torch", "tensorflow", "orbax", "tensorboardX", "tensorstore")


def _run_child(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_does_not_import_frameworks() -> None:
    out = _run_child(
        f"""
        import json, sys, time
        start = time.perf_counter()
        import looproto
        elapsed = time.perf_counter() - start
        heavy = {HEAVY_MODULES!r}
        loaded = sorted(
            name for name in sys.modules
            if name.partition(".")[0] in heavy or name.startswith("looproto.orbit")
        )
        print(json.dumps({{"loaded": loaded, "elapsed": elapsed}}))
        """
    )
    report = json.loads(out.strip().splitlines()[-1])
    assert report["loaded"] == []  # nor `looproto.orbit`, which is TensorFlow code


def test_using_module_and_variable_imports_no_framework() -> None:
    # Building modules, walking them and entering scopes must not load a framework
    # either (backends are loaded only when a framework's object is met).
    out = _run_child(
        f"""
        import json, sys
        import numpy as np
        import looproto
        m = looproto.Module(name="m")
        with m.name_scope:
            m.w = looproto.Variable(np.zeros(3), name="w")
        m.step = looproto.create_global_step()
        m.step.assign_add(1)
        names = [v.name for v in m.variables]
        paths = sorted(looproto.variables_by_path(m))
        heavy = {HEAVY_MODULES!r}
        loaded = sorted(n for n in sys.modules if n.partition(".")[0] in heavy)
        print(json.dumps({{"loaded": loaded, "names": names, "paths": paths}}))
        """
    )
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {
        "loaded": [],
        "names": ["global_step:0", "m/w:0"],
        "paths": ["step", "w"],
    }


def test_report_import_time() -> None:
    """Prints `import looproto` wall time (best of 3 fresh interpreters). No assertion."""
    times = []
    for _ in range(3):
        out = _run_child(
            """
            import time
            start = time.perf_counter()
            import looproto
            print(time.perf_counter() - start)
            """
        )
        times.append(float(out.strip().splitlines()[-1]))
    print(f"import looproto: best of 3 = {min(times) * 1000:.1f} ms (numpy included)")


def test_all_names_resolve() -> None:
    assert looproto.__all__
    for name in looproto.__all__:
        assert hasattr(looproto, name), name
        assert getattr(looproto, name) is not None, name


def test_all_is_sorted_and_unique() -> None:
    assert list(looproto.__all__) == sorted(looproto.__all__)
    assert len(set(looproto.__all__)) == len(looproto.__all__)


def test_star_import_matches_all() -> None:
    namespace: dict[str, object] = {}
    exec("from looproto import *", namespace)
    exported = {name for name in namespace if name != "__builtins__"}
    assert exported == set(looproto.__all__)


def test_version() -> None:
    assert isinstance(looproto.__version__, str)
    assert looproto.__version__
