"""The package's shape: layers, no framework fact outside `backends/`, no import circle.

* the core (everything but `backends/`, `orbit/`, `run/` and `examples/`) names no
  framework: it imports none, compares no string with a framework's name, and calls no
  method that only a framework's objects have; it asks the backend registry instead;
* the core never imports the layers on top of it (`orbit/`, Orbit's API, which is
  TensorFlow code; `run/`; `examples/`) nor a backend's private files;
* no module imports itself back, through any chain of module-level imports;
* a third-party backend registers with one call, and its objects are discovered;
* no file grows past 500 lines without saying why in its docstring.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import looproto

SRC = Path(looproto.__file__).parent
CORE_EXCLUDED = ("backends", "orbit", "run", "examples")
FRAMEWORKS = frozenset(
    {"tensorflow", "tf", "tf_keras", "keras", "torch", "pytorch", "torchdata", "torch_xla"}
    | {"jax", "jaxlib", "flax", "optax", "grain"}
)
# Methods that only a framework's objects have: calling one is knowing the framework.
FRAMEWORK_METHODS = frozenset(
    {"detach", "cpu", "cuda", "as_numpy_dtype", "state_dict", "load_state_dict"}
    | {"block_until_ready", "named_parameters", "inside_function", "is_compiling"}
)
MAX_LINES = 500


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _is_core(name: str) -> bool:
    parts = name.split(".")
    # `python -m looproto` is the command line: the application layer's entry point.
    return len(parts) < 2 or parts[1] not in (*CORE_EXCLUDED, "__main__")


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _names_framework(text: str) -> bool:
    return text in FRAMEWORKS or (text.partition(".")[0] in FRAMEWORKS - {"tf"} and "." in text)


def _imported(node: ast.AST, module: str) -> list[str]:
    """The absolute module names an import statement names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".")[: -node.level]
            base = ".".join([*package, base] if base else package)
        return [base] + [f"{base}.{alias.name}" for alias in node.names]
    return []


def test_the_core_names_no_framework() -> None:
    found = []
    for name, path in _modules():
        if not _is_core(name):
            continue
        tree = ast.parse(path.read_text(), str(path))
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            where = f"{path.relative_to(SRC.parent)}:{getattr(node, 'lineno', '?')}"
            for imported in _imported(node, name):
                if imported.partition(".")[0] in FRAMEWORKS:
                    found.append(f"{where}: imports {imported}")
            is_text = isinstance(node, ast.Constant) and isinstance(node.value, str)
            if is_text and id(node) not in docstrings and _names_framework(node.value):
                found.append(f"{where}: the string {node.value!r}")
            if isinstance(node, ast.Attribute) and node.attr in FRAMEWORK_METHODS:
                found.append(f"{where}: .{node.attr}")
            if isinstance(node, ast.Constant) and node.value in FRAMEWORK_METHODS:
                found.append(f"{where}: the string {node.value!r} (a framework's method)")
    assert not found, "Framework facts outside backends/:\n" + "\n".join(found)


def test_the_core_imports_neither_the_app_layer_nor_backend_internals() -> None:
    found = []
    for name, path in _modules():
        if not _is_core(name):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):  # function-level imports too
            for imported in _imported(node, name):
                parts = imported.split(".")
                if parts[0] != "looproto" or len(parts) < 2:
                    continue
                app = parts[1] in ("orbit", "run", "examples")
                private = parts[1] == "backends" and any(p.startswith("_") for p in parts[2:])
                specific = parts[1] == "backends" and len(parts) > 2 and parts[2] in FRAMEWORKS
                if app or private or specific:
                    found.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {imported}")
    assert not found, "The core reaches past the registry:\n" + "\n".join(found)


def _module_level_imports(tree: ast.Module, module: str, known: set[str]) -> Iterator[str]:
    """The modules an import that runs with the module loads (TYPE_CHECKING included).

    `from package import submodule` loads the submodule; its package is its parent,
    loaded first by any import, and is not counted as an edge.
    """
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        stack.extend(ast.iter_child_nodes(node))
        names = _imported(node, module)
        if not names:
            continue
        if isinstance(node, ast.ImportFrom):
            base, *members = names
            submodules = [m for m in members if m in known]
            yield from submodules
            if len(submodules) < len(members):
                yield base
        else:
            yield from names


def test_no_import_circle() -> None:
    modules = dict(_modules())
    known = set(modules)
    graph = {
        name: {
            target
            for target in _module_level_imports(ast.parse(path.read_text()), name, known)
            if target in known and target != name
        }
        for name, path in modules.items()
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "Import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_file_is_long_without_a_reason() -> None:
    long = []
    for _, path in _modules():
        text = path.read_text()
        lines = text.count("\n")
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_LINES and "lines" not in docstring:
            long.append(f"{path.relative_to(SRC.parent)}: {lines} lines")
    assert not long, "Files over 500 lines whose docstring gives no reason:\n" + "\n".join(long)


@pytest.mark.parametrize("package", ["numpy", "jax", "tensorflow", "torch"])
def test_a_backend_package_imports_no_framework_until_asked(package: str) -> None:
    # The registration, the launcher and the package's `__all__` need no framework;
    # each public name imports its file (and the framework) when it is first read.
    code = f"""
        import json, sys
        import looproto.backends.{package} as pkg
        from looproto import backends
        heavy = {sorted(FRAMEWORKS - {"tf", "pytorch"})!r}
        loaded = sorted(n for n in sys.modules if n.partition(".")[0] in heavy)
        print(json.dumps({{"loaded": loaded, "all": list(pkg.__all__),
                          "registered": "{package}" in backends.available()}}))
    """
    report = _child(code)
    assert report["loaded"] == []
    assert report["registered"]
    assert report["all"] == sorted(report["all"])
    module = __import__(f"looproto.backends.{package}", fromlist=["_"])
    if package != "numpy":
        pytest.importorskip(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def _child(code: str, **env: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env={**_environ(), **env},
    )
    assert result.returncode == 0, result.stderr
    parsed: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


THIRD_PARTY = {
    # A "framework" of its own: a tensor type and a container of tensors.
    "strictfw/__init__.py": """
        import numpy as np

        class Tensor:
            def __init__(self, value, trainable=True):
                self.value = np.asarray(value, np.float32)
                self.trainable = trainable

        class Layer:
            def __init__(self):
                self.kernel = Tensor(np.ones((2, 2)))
                self.bias = Tensor(np.zeros(2), trainable=False)
    """,
    # Its looproto backend, registered with one call when the package is imported.
    "strict_backend/__init__.py": """
        import contextlib

        import numpy as np

        import strictfw
        from looproto import backends
        from looproto.backends.numpy import NumpyBackend

        class StrictBackend(NumpyBackend):
            name = "strict"

            def is_variable(self, obj):
                return isinstance(obj, strictfw.Tensor) or super().is_variable(obj)

            def is_trainable(self, obj):
                return bool(obj.trainable)

            def expand(self, obj):
                if isinstance(obj, strictfw.Layer):
                    return [(("kernel",), obj.kernel), (("bias",), obj.bias)]
                return None

            def to_numpy(self, value):
                return np.array(value.value if isinstance(value, strictfw.Tensor) else value)

            def assign(self, variable, array):
                if isinstance(variable, strictfw.Tensor):
                    variable.value[...] = array
                else:
                    super().assign(variable, array)

            def name_scope(self, scope):
                return contextlib.nullcontext()

        BACKEND = StrictBackend()
        backends.register(BACKEND, packages=("strictfw",), aliases=("strict_numpy",))
    """,
    # Found by name too, without the package being imported first.
    "strict_backend-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: strict-backend\n"
    "Version: 1.0\n",
    "strict_backend-1.0.dist-info/entry_points.txt": "[looproto.backends]\n"
    "strict = strict_backend:BACKEND\n",
}


def test_a_third_party_backend_registers_with_one_call(tmp_path: Path) -> None:
    for relative, text in THIRD_PARTY.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    code = """
        import json
        import numpy as np
        import looproto
        from looproto import backends, testing

        # Asked for by name: the entry point imports the package, which registers.
        backend = backends.get("strict")
        import strictfw

        module = looproto.Module(name="m")
        module.layer = strictfw.Layer()
        module.step = looproto.create_global_step()
        paths = sorted(looproto.variables_by_path(module))
        trainable = sorted(
            p for p, v in looproto.variables_by_path(module).items()
            if looproto.module.is_trainable(v)
        )
        testing.check_backend(backend, make_variable=looproto.Variable)
        print(json.dumps({
            "name": backend.name,
            "alias": backends.get("strict_numpy") is backend,
            "available": "strict" in backends.available(),
            "found": [b.name for b in backends.for_object(module.layer.kernel)],
            "paths": paths,
            "trainable": trainable,
        }))
    """
    report = _child(code, PYTHONPATH=str(tmp_path))
    assert report == {
        "name": "strict",
        "alias": True,
        "available": True,
        "found": ["strict"],
        "paths": ["layer/bias", "layer/kernel", "step"],
        "trainable": ["layer/kernel"],
    }
