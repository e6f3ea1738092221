"""Tests of `looproto.Module`, `Variable` and name scopes.

Most cases are ports of TensorFlow's `tensorflow/python/module/module_test.py`
(a `TF#n` comment marks such a port, numbered in that file's order); the rest test what
looproto adds (dataclass walking, `variables_by_path`, `Variable`'s own API, thread
safety of name scopes). Variables are compared by identity only (`is` / `same`), so a
numpy-style `__eq__` could never make a wrong answer pass.
"""

from __future__ import annotations

import abc
import collections
import copy
import dataclasses
import functools
import itertools
import operator
import re
import threading
import weakref
from typing import Any

import numpy as np
import pytest

import looproto
from looproto import (
    ConfigError,
    Module,
    NameScope,
    ProtocolError,
    ShapeError,
    Variable,
    backends,
    create_global_step,
    current_name_scope,
    name_scope,
    variables_by_path,
)
from looproto.module import camel_to_snake


def same(actual: Any, expected: Any) -> bool:
    """True when two sequences hold the very same objects, in the same order."""
    actual, expected = list(actual), list(expected)
    return len(actual) == len(expected) and all(a is e for a, e in zip(actual, expected))


def same_dict(actual: dict[Any, Any], expected: dict[Any, Any]) -> bool:
    return actual.keys() == expected.keys() and all(actual[k] is expected[k] for k in expected)


def is_variable(obj: Any) -> bool:
    return isinstance(obj, Variable)


def is_module(obj: Any) -> bool:
    return isinstance(obj, Module)


def var(name: str = "v", trainable: bool = True) -> Variable:
    return Variable(1.0, trainable=trainable, name=name)


# ----------------------------------------------------------------------------
# Fixture modules (as in module_test.py)


class RecursiveModule(Module):
    def __init__(self, depth: int, trainable: bool = True) -> None:
        super().__init__(name="badger")
        with self.name_scope:
            self.child = None
            if depth > 1:
                self.child = RecursiveModule(depth - 1, trainable=trainable)
            self.w = Variable(1.0, trainable=trainable, name="mushroom")


class TreeModule(Module):
    def __init__(self, name: str | None = None) -> None:
        super().__init__(name=name)
        self._leaves: list[TreeModule] = []

    @Module.with_name_scope
    def new_leaf(self, name: str | None = None) -> TreeModule:
        leaf = TreeModule(name=name)
        self._leaves.append(leaf)
        return leaf


class ReturnsNameScopeModule(Module):
    @Module.with_name_scope
    def alternative_forward(self) -> str:
        return current_name_scope()

    @Module.with_name_scope
    def __call__(self) -> str:
        return current_name_scope()


class SubclassedReturnsNameScopeModule(ReturnsNameScopeModule):
    @Module.with_name_scope
    def alternative_alternative_forward(self) -> str:
        return current_name_scope()


class ErrorModuleError(Exception):
    pass


class ErrorModule(Module):
    def __init__(self, call_super: bool, raise_in_constructor: bool = True) -> None:
        if call_super:
            super().__init__()
        if raise_in_constructor:
            raise ErrorModuleError("Deliberate error!")

    def __call__(self) -> None:
        raise ErrorModuleError("Deliberate error!")


class MemberType:
    """A marker leaf type for the `_flatten` tests."""


def is_member(obj: Any) -> bool:
    return isinstance(obj, MemberType)


NamedPair = collections.namedtuple("NamedPair", ["first", "second"])


class SimpleModule(Module):
    def __init__(self, create_child: bool = True, container_type: Any = list) -> None:
        super().__init__()
        self.z = MemberType()
        self.a = container_type([MemberType(), MemberType()])
        if create_child:
            self.c = SimpleModule(create_child=False, container_type=container_type)


# ----------------------------------------------------------------------------
# Naming


class TestNaming:
    def test_single_name(self) -> None:  # TF#1
        mod = Module(name="simple")
        assert mod.name == "simple"
        assert mod.name_scope.name == "simple/"

    def test_default_name_is_snake_case_runtime_class(self) -> None:
        assert Module().name == "module"
        assert Module().name_scope.name == "module/"
        assert TreeModule().name == "tree_module"
        assert SubclassedReturnsNameScopeModule().name == ("subclassed_returns_name_scope_module")

    @pytest.mark.parametrize(
        ("camel", "snake"),
        [
            ("Module", "module"),
            ("MyModule", "my_module"),
            ("MLP", "mlp"),
            ("HTTPServer", "http_server"),
            ("LSTMCell", "lstm_cell"),
            ("Conv2D", "conv2_d"),
            ("ResNet50", "res_net50"),
            ("MLP2Layer", "mlp2_layer"),
            ("ABCDef", "abc_def"),
            ("X1Y2", "x1_y2"),
            ("ModuleWithFunctionAnnotatedCall", "module_with_function_annotated_call"),
            ("My_Module", "my__module"),
            ("_PrivateThing", "__private_thing"),
        ],
    )
    def test_camel_to_snake(self, camel: str, snake: str) -> None:
        assert camel_to_snake(camel) == snake
        cls = type(camel, (Module,), {})
        assert cls().name == snake

    def test_name_is_read_only(self) -> None:
        mod = Module(name="simple")
        with pytest.raises(AttributeError):
            mod.name = "other"  # type: ignore[misc]
        assert mod.name == "simple"

    @pytest.mark.parametrize("name", ["simple", "Foo", "_", "_1", "class", "a" * 300, "foo_bar9"])
    def test_valid_names(self, name: str) -> None:
        assert Module(name=name).name == name

    @pytest.mark.parametrize(
        "name",
        ["$Foo", "", "1abc", "foo bar", "foo-bar", "foo.bar", "foo/", "café", "foo\n", "\nfoo"],
    )
    def test_invalid_name(self, name: str) -> None:  # TF#12
        with pytest.raises(ConfigError, match=r"is not a valid module name") as info:
            Module(name=name)
        assert isinstance(info.value, ValueError)
        assert repr(name) in str(info.value)

    def test_invalid_name_opens_no_scope(self) -> None:
        with pytest.raises(ValueError):
            Module(name="$Foo")
        assert current_name_scope() == ""

    @pytest.mark.parametrize("name", [123, b"bytes", ["a"]])
    def test_non_string_name(self, name: Any) -> None:
        with pytest.raises(ProtocolError) as info:
            Module(name=name)
        assert isinstance(info.value, TypeError)

    def test_repr_names_the_module(self) -> None:
        assert "badger" in repr(Module(name="badger"))


# ----------------------------------------------------------------------------
# Name scopes of modules


class TestModuleNameScope:
    def test_construct_in_scope(self) -> None:  # TF#2
        with name_scope("foo"):
            mod = Module(name="bar")
        assert mod.name == "bar"
        assert mod.name_scope.name == "foo/bar/"

    def test_enters_name_scope_in_call(self) -> None:  # TF#3
        mod = ReturnsNameScopeModule()
        for _ in range(3):
            assert mod() == mod.name_scope.name == "returns_name_scope_module/"
        assert current_name_scope() == ""

    def test_enters_name_scope_in_other_method(self) -> None:  # TF#4
        mod = ReturnsNameScopeModule()
        for _ in range(3):
            assert mod.alternative_forward() == mod.name_scope.name
        assert current_name_scope() == ""

    def test_subclassed_module(self) -> None:  # TF#5
        mod = SubclassedReturnsNameScopeModule()
        for _ in range(3):
            assert mod.alternative_forward() == mod.name_scope.name
            assert mod.alternative_alternative_forward() == mod.name_scope.name

    def test_submodule_created_late(self) -> None:  # TF#6
        m = TreeModule()
        assert m.name == "tree_module"
        assert m.name_scope.name == "tree_module/"
        leaf1 = m.new_leaf()
        assert leaf1.name == "tree_module"
        assert leaf1.name_scope.name == "tree_module/tree_module/"
        leaf2 = leaf1.new_leaf(name="twig")
        assert leaf2.name_scope.name == "tree_module/tree_module/twig/"

    def test_does_not_evaluate_property_methods(self) -> None:  # TF#7
        class PropertyThrowingModule(Module):
            def __init__(self) -> None:
                super().__init__()
                self.w = var("w")

            @property
            def raise_assertion_error(self) -> None:
                raise AssertionError("Property should not be evaluated.")

        mod = PropertyThrowingModule()
        with pytest.raises(AssertionError, match="should not be evaluated"):
            mod.raise_assertion_error  # noqa: B018
        # Reflection never calls properties.
        assert same(mod.variables, [mod.w])
        assert mod.submodules == ()
        assert len(list(mod._flatten())) > 0

    def test_overridden_name_scope(self) -> None:  # TF#8
        class ModuleOverridingNameScope(ReturnsNameScopeModule):
            @property
            def name_scope(self) -> NameScope:
                return name_scope("yolo/")

        mod = ModuleOverridingNameScope()
        for _ in range(3):
            assert mod() == "yolo/"
            assert mod.alternative_forward() == "yolo/"

    def test_patched_callable(self) -> None:  # TF#9
        with name_scope("foo"):
            mod = Module(name="bar")
        mod.foo = current_name_scope
        assert mod.foo() == ""
        with name_scope("elsewhere"):
            assert mod.foo() == "elsewhere/"

    def test_property(self) -> None:  # TF#10
        class PropertyModule(Module):
            def __init__(self) -> None:
                super().__init__()
                self._setter_scope_name: str | None = None

            @property
            @Module.with_name_scope
            def some_property(self) -> tuple[str, str | None]:
                return current_name_scope(), self._setter_scope_name

            @some_property.setter
            @Module.with_name_scope
            def some_property(self, my_property: Any) -> None:
                self._setter_scope_name = current_name_scope()

        mod = PropertyModule()
        mod.some_property = (None, None)
        assert mod.some_property == ("property_module/", "property_module/")
        assert current_name_scope() == ""

    def test_property_no_name_scope(self) -> None:  # TF#11
        class PropertyModule(Module):
            def __init__(self) -> None:
                super().__init__()
                self._setter_scope_name: str | None = None

            @property
            def some_property(self) -> tuple[str, str | None]:
                return current_name_scope(), self._setter_scope_name

            @some_property.setter
            def some_property(self, my_property: Any) -> None:
                self._setter_scope_name = current_name_scope()

        mod = PropertyModule()
        mod.some_property = (None, None)
        assert mod.some_property == ("", "")

    def test_modules_not_numbered(self) -> None:  # TF#13 (eager behaviour)
        m1 = RecursiveModule(2)
        m2 = RecursiveModule(2)
        assert m1.name_scope.name == m2.name_scope.name == "badger/"
        assert m1.child.name_scope.name == m2.child.name_scope.name == "badger/badger/"

    def test_ctor_error_closes_name_scope(self) -> None:  # TF#15
        with pytest.raises(ErrorModuleError):
            ErrorModule(call_super=True)
        assert current_name_scope() == ""

    def test_ctor_error_handles_ctor_not_opening_name_scope(self) -> None:  # TF#16
        with pytest.raises(ErrorModuleError):
            ErrorModule(call_super=False)
        assert current_name_scope() == ""

    def test_forward_method_closes_name_scope(self) -> None:  # TF#17
        mod = ErrorModule(call_super=True, raise_in_constructor=False)
        with pytest.raises(ErrorModuleError):
            mod()
        assert current_name_scope() == ""

    def test_decorated_method_closes_name_scope_on_error(self) -> None:
        class Raises(Module):
            @Module.with_name_scope
            def __call__(self) -> None:
                raise ErrorModuleError(current_name_scope())

        with name_scope("outer"):
            with pytest.raises(ErrorModuleError, match=r"^outer/raises/$"):
                Raises()()
            assert current_name_scope() == "outer/"
        assert current_name_scope() == ""

    def test_get_attr_doesnt_enter_name_scope(self) -> None:  # TF#18
        scope_names: list[tuple[str, str]] = []

        class GetAttrModule(Module):
            def __getattr__(self, name: str) -> Any:
                scope_names.append((name, current_name_scope()))
                return super().__getattr__(name)  # type: ignore[misc]

        mod = GetAttrModule()
        with pytest.raises(AttributeError):
            mod.does_not_exist  # noqa: B018
        assert ("does_not_exist", "") in scope_names

    def test_get_attribute_doesnt_enter_name_scope(self) -> None:  # TF#19
        scope_names: list[tuple[str, str]] = []

        class GetAttributeModule(Module):
            def __getattribute__(self, name: str) -> Any:
                scope_names.append((name, current_name_scope()))
                return super().__getattribute__(name)

        mod = GetAttributeModule()
        with pytest.raises(AttributeError):
            mod.does_not_exist  # noqa: B018
        assert ("does_not_exist", "") in scope_names

    def test_name_scope_memoized(self) -> None:  # TF#22
        mod = Module(name="name")
        assert mod.name_scope is mod.name_scope
        assert isinstance(mod.name_scope, NameScope)

    def test_reentering_module_scope_is_absolute(self) -> None:
        with name_scope("foo"):
            mod = Module(name="bar")
        other = Module(name="other")
        with mod.name_scope as s:
            assert s == "foo/bar/" == current_name_scope()
            with mod.name_scope as inner:  # never nests: "foo/bar/", not "foo/bar/foo/bar/"
                assert inner == "foo/bar/"
            assert current_name_scope() == "foo/bar/"
            with other.name_scope:
                assert current_name_scope() == "other/"
                with mod.name_scope:
                    assert current_name_scope() == "foo/bar/"
                assert current_name_scope() == "other/"
        assert current_name_scope() == ""

    def test_scope_captured_at_construction_not_assignment(self) -> None:
        parent = Module(name="parent")
        child = Module(name="child")
        parent.child = child
        assert child.name_scope.name == "child/"
        with parent.name_scope:
            inner = Module(name="child")
        assert inner.name_scope.name == "parent/child/"

    def test_with_name_scope_keeps_metadata(self) -> None:
        class Documented(Module):
            @Module.with_name_scope
            def forward(self, x: int, *, scale: int = 2) -> int:
                """Doubles x."""
                return x * scale

        fn = Documented.forward
        assert fn.__name__ == "forward"
        assert fn.__qualname__.endswith("Documented.forward")
        assert fn.__doc__ == "Doubles x."
        assert fn.__wrapped__.__name__ == "forward"  # type: ignore[attr-defined]
        import inspect

        assert list(inspect.signature(fn).parameters) == ["self", "x", "scale"]
        assert Documented().forward(3, scale=3) == 9

    def test_with_name_scope_under_another_decorator(self) -> None:  # cf. TF#30-32
        def traced(fn: Any) -> Any:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return ("traced", fn(*args, **kwargs))

            return wrapper

        class WithOuterDecorator(Module):
            @traced
            @Module.with_name_scope
            def forward(self) -> str:
                return current_name_scope()

        assert WithOuterDecorator().forward() == ("traced", "with_outer_decorator/")

    def test_variable_created_lazily_in_call(self) -> None:  # docstring, TF#43
        class MyModule(Module):
            @Module.with_name_scope
            def __call__(self, x: float) -> float:
                if not hasattr(self, "w"):
                    self.w = Variable(np.float32(3.0))
                return float(self.w.numpy()) * x

        mod = MyModule()
        assert mod(2.0) == 6.0
        assert mod.w.name == "my_module/Variable:0"
        assert same(mod.variables, [mod.w])


class TestWithNameScopeErrors:
    class NotAFunction:
        def __call__(self, module: Any) -> None:
            pass

    @pytest.mark.parametrize(
        "target",
        [
            pytest.param(int, id="class"),
            pytest.param(staticmethod(lambda self: None), id="staticmethod"),
            pytest.param(classmethod(lambda cls: None), id="classmethod"),
            pytest.param(property(lambda self: None), id="property"),
            pytest.param(NotAFunction(), id="callable-instance"),
            pytest.param(lambda: None, id="no-positional-param"),
            pytest.param(lambda *, self: None, id="keyword-only-self"),
            pytest.param(lambda **kw: None, id="only-kwargs"),
            pytest.param(None, id="None"),
        ],
    )
    def test_rejects_non_methods(self, target: Any) -> None:
        with pytest.raises(ProtocolError) as info:
            Module.with_name_scope(target)
        assert isinstance(info.value, TypeError)

    def test_accepts_var_positional_self(self) -> None:
        class M(Module):
            @Module.with_name_scope
            def forward(*args: Any) -> str:
                return current_name_scope()

        assert M(name="m").forward() == "m/"

    def test_called_on_non_module(self) -> None:
        @Module.with_name_scope
        def forward(self: Any) -> str:
            return current_name_scope()

        class NotAModule:
            pass

        with pytest.raises(ProtocolError, match=r"not a `looproto\.Module`"):
            forward(NotAModule())
        assert current_name_scope() == ""
        assert forward(Module(name="ok")) == "ok/"

    def test_called_before_module_init(self) -> None:
        class Early(Module):
            def __init__(self) -> None:
                self.forward()
                super().__init__()

            @Module.with_name_scope
            def forward(self) -> None:
                pass

        with pytest.raises(ProtocolError):
            Early()
        assert current_name_scope() == ""


# ----------------------------------------------------------------------------
# `name_scope`, `NameScope` and `current_name_scope`


class TestNameScope:
    def test_top_level_is_empty(self) -> None:
        assert current_name_scope() == ""

    def test_nesting_and_restore(self) -> None:
        with name_scope("outer") as outer:
            assert outer == "outer/" == current_name_scope()
            with name_scope("inner") as inner:
                assert inner == "outer/inner/" == current_name_scope()
                with name_scope("deep") as deep:
                    assert deep == "outer/inner/deep/"
                assert current_name_scope() == "outer/inner/"
            assert current_name_scope() == "outer/"
        assert current_name_scope() == ""

    def test_absolute_name_replaces_scope(self) -> None:
        with name_scope("outer"):
            with name_scope("abs/") as s:
                assert s == "abs/" == current_name_scope()
                with name_scope("x") as x:
                    assert x == "abs/x/"
            with name_scope("a/b/") as ab:
                assert ab == "a/b/"
            assert current_name_scope() == "outer/"

    def test_empty_name_clears_scope(self) -> None:
        with name_scope("outer"):
            with name_scope("") as s:
                assert s == "" == current_name_scope()
                assert Variable(0.0, name="v").name == "v:0"
            assert current_name_scope() == "outer/"

    def test_restored_on_exception(self) -> None:
        with pytest.raises(KeyError):
            with name_scope("outer"):
                with name_scope("inner"):
                    raise KeyError
        assert current_name_scope() == ""

    def test_scope_object_is_reentrant(self) -> None:
        scope = name_scope("s")
        assert scope.name == "s"
        with scope as a:
            with scope as b:
                assert (a, b) == ("s/", "s/s/")
            assert current_name_scope() == "s/"
        assert current_name_scope() == ""

    def test_not_uniquified(self) -> None:
        with name_scope("dup") as a:
            pass
        with name_scope("dup") as b:
            pass
        assert a == b == "dup/"

    @pytest.mark.parametrize("bad", [None, 1, b"x"])
    def test_requires_string(self, bad: Any) -> None:
        with pytest.raises(ProtocolError):
            name_scope(bad)

    def test_per_thread(self) -> None:
        entered = threading.Event()
        release = threading.Event()
        seen: dict[str, str] = {}

        def worker() -> None:
            with name_scope("worker") as s:
                seen["entered"] = s
                entered.set()
                release.wait(5)

        thread = threading.Thread(target=worker)
        with name_scope("main"):
            thread.start()
            assert entered.wait(5)
            # The worker's scope is not seen here, and ours was not seen there.
            assert current_name_scope() == "main/"
            assert seen["entered"] == "worker/"
            release.set()
            thread.join(5)
        assert current_name_scope() == ""

    def test_new_thread_starts_at_top_level(self) -> None:
        seen: list[str] = []
        with name_scope("main"):
            thread = threading.Thread(target=lambda: seen.append(Variable(0.0, name="v").name))
            thread.start()
            thread.join(5)
        assert seen == ["v:0"]

    def test_same_module_scope_in_two_threads_interleaved(self) -> None:
        # Thread A enters m.name_scope at top level; thread B enters the SAME scope
        # object from inside "outer/". A exits first. Each thread must get back its
        # own previous scope, whatever order the exits happen in.
        mod = Module(name="m")
        a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
        result: dict[str, Any] = {}

        def thread_a() -> None:
            with mod.name_scope:
                a_in.set()
                b_in.wait(5)
            result["a"] = current_name_scope()
            a_out.set()

        def thread_b() -> None:
            with name_scope("outer"):
                a_in.wait(5)
                with mod.name_scope:
                    result["b_inside"] = current_name_scope()
                    b_in.set()
                    a_out.wait(5)
                result["b"] = current_name_scope()

        threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert result == {"a": "", "b_inside": "m/", "b": "outer/"}

    def test_decorated_method_in_many_threads(self) -> None:
        class Worker(Module):
            @Module.with_name_scope
            def __call__(self, barrier: threading.Barrier) -> str:
                barrier.wait(5)
                return current_name_scope()

        mod = Worker()
        n = 8
        barrier = threading.Barrier(n)
        results: dict[int, tuple[str, str, str]] = {}

        def run(i: int) -> None:
            with name_scope(f"t{i}"):
                inside = mod(barrier)
                after = current_name_scope()
            results[i] = (inside, after, current_name_scope())

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == {i: ("worker/", f"t{i}/", "") for i in range(n)}

    def test_repr(self) -> None:
        assert "outer" in repr(name_scope("outer"))


# ----------------------------------------------------------------------------
# Variables' names


class TestVariableNaming:
    def test_variable_names(self) -> None:  # TF#20
        m = RecursiveModule(3)
        assert m.w.name == "badger/mushroom:0"
        assert m.child.w.name == "badger/badger/mushroom:0"
        assert m.child.child.w.name == "badger/badger/badger/mushroom:0"

    def test_default_and_scoped_names(self) -> None:
        assert Variable(0.0).name == "Variable:0"
        assert Variable(0.0, name="w").name == "w:0"
        with name_scope("s"):
            assert Variable(0.0, name="w").name == "s/w:0"
            assert Variable(0.0).name == "s/Variable:0"
        # Not uniquified.
        with name_scope("s"):
            assert Variable(0.0, name="w").name == Variable(0.0, name="w").name == "s/w:0"

    def test_variables_created_outside_module_scope_have_no_prefix(self) -> None:  # TF#44
        class Dense(Module):
            def __init__(self) -> None:
                super().__init__()
                self.w = Variable(np.zeros((2, 2)), name="w")
                self.b = Variable(np.zeros(2), name="b")

        class MLP(Module):
            def __init__(self) -> None:
                super().__init__()
                with self.name_scope:
                    self.l0 = Dense()
                    self.l1 = Dense()

        d = Dense()
        assert same(d.variables, [d.b, d.w])
        assert [v.name for v in d.variables] == ["b:0", "w:0"]
        mlp = MLP()
        assert same(mlp.variables, [mlp.l0.b, mlp.l0.w, mlp.l1.b, mlp.l1.w])
        assert [v.name for v in mlp.variables] == ["mlp/b:0", "mlp/w:0"] * 2
        assert mlp.l0.name_scope.name == "mlp/dense/"


# ----------------------------------------------------------------------------
# Variable and module tracking


class TestVariableTracking:
    def test_variables(self) -> None:  # TF#23
        m = RecursiveModule(3)
        assert isinstance(m.variables, tuple)
        assert same(m.variables, [m.w, m.child.w, m.child.child.w])
        assert same(m.child.variables, [m.child.w, m.child.child.w])
        assert same(m.child.child.variables, [m.child.child.w])

    def test_trainable_variables(self) -> None:  # TF#24
        m = RecursiveModule(3)
        assert isinstance(m.trainable_variables, tuple)
        assert same(m.trainable_variables, [m.w, m.child.w, m.child.child.w])
        assert same(m.child.trainable_variables, [m.child.w, m.child.child.w])
        assert same(m.child.child.trainable_variables, [m.child.child.w])
        assert m.non_trainable_variables == ()

    def test_trainable_variables_ignores_non_trainable(self) -> None:  # TF#25
        m = RecursiveModule(3, trainable=False)
        assert len(m.trainable_variables) == 0
        assert len(m.child.trainable_variables) == 0
        assert len(m.child.child.trainable_variables) == 0
        assert same(m.non_trainable_variables, [m.w, m.child.w, m.child.child.w])
        assert same(m.child.child.non_trainable_variables, [m.child.child.w])

    def test_trainable_and_non_trainable_partition_variables(self) -> None:
        m = Module(name="m")
        m.a = var("a", trainable=True)
        m.b = var("b", trainable=False)
        m.c = [var("c0", trainable=False), var("c1", trainable=True)]
        m.sub = Module(name="sub")
        m.sub.d = var("d", trainable=True)
        m.sub.e = var("e", trainable=False)
        assert same(m.variables, [m.a, m.b, m.c[0], m.c[1], m.sub.d, m.sub.e])
        assert same(m.trainable_variables, [m.a, m.c[1], m.sub.d])
        assert same(m.non_trainable_variables, [m.b, m.c[0], m.sub.e])
        assert isinstance(m.non_trainable_variables, tuple)

    def test_supports_variable_subclasses(self) -> None:  # TF#26 (distributed variables)
        class MirroredVariable(Variable):
            __slots__ = ()

        class AggregatingVariable(Variable):
            __slots__ = ()

        m = Module(name="m")
        m.a = MirroredVariable(1.0, name="a")
        m.b = AggregatingVariable(2.0, name="b", trainable=False)
        m.c = Variable(3.0, name="c")
        assert same(m.variables, [m.a, m.b, m.c])
        assert same(m.trainable_variables, [m.a, m.c])
        assert same(m.non_trainable_variables, [m.b])

    def test_not_cached(self) -> None:
        m = Module(name="m")
        assert m.variables == ()
        m.w = var("w")
        assert same(m.variables, [m.w])
        del m.w
        assert m.variables == ()

    def test_dedup_variable_reachable_twice(self) -> None:
        m = Module(name="m")
        v = var("v")
        m.a = v
        m.b = [v, {"k": v}]
        m.sub = Module(name="sub")
        m.sub.v = v
        assert same(m.variables, [v])
        assert same(m._flatten(predicate=is_variable), [v])

    def test_equal_but_distinct_not_deduplicated(self) -> None:
        m = Module(name="m")
        m.a = var("same")
        m.b = var("same")
        assert same(m.variables, [m.a, m.b])

    def test_numbers_arrays_and_strings_are_not_variables(self) -> None:
        m = Module(name="m")
        m.x = np.zeros(3)
        m.y = 1.0
        m.z = "w"
        m.n = None
        assert m.variables == ()


class TestModuleTracking:
    def test_submodules(self) -> None:  # TF#28
        m = RecursiveModule(3)
        assert isinstance(m.submodules, tuple)
        assert same(m.submodules, [m.child, m.child.child])
        assert same(m.child.submodules, [m.child.child])
        assert list(m.child.child.submodules) == []

    def test_non_ctor_submodule(self) -> None:  # TF#29
        m = TreeModule()
        leaf1 = m.new_leaf()
        assert set(m.submodules) == {leaf1}
        leaf2 = m.new_leaf()
        assert set(m.submodules) == {leaf1, leaf2}
        assert same(m.submodules, [leaf1, leaf2])

    def test_docstring_example(self) -> None:  # TF#41
        a, b, c = Module(name="a"), Module(name="b"), Module(name="c")
        a.b = b
        b.c = c
        assert same(a.submodules, [b, c])
        assert same(b.submodules, [c])
        assert list(c.submodules) == []

    def test_traversal_order_is_not_breadth_first(self) -> None:
        r = Module(name="r")
        A, B, A1, A2, B1 = (Module(name=n) for n in ["A", "B", "A1", "A2", "B1"])
        r.a = A
        r.b = B
        A.c = A1
        A1.d = A2
        B.e = B1
        assert same(r.submodules, [A, B, A1, A2, B1])
        for mod in (r, A, B, A1, A2, B1):
            mod.v = var(mod.name)
        assert same(r.variables, [r.v, A.v, A1.v, A2.v, B.v, B1.v])

    def test_shared_submodule_reported_at_first_encounter(self) -> None:
        r = Module(name="r")
        A, S = Module(name="A"), Module(name="S")
        r.a = A
        A.x = S
        r.z = S
        A.v = var("A")
        S.v = var("S")
        assert same(r.submodules, [A, S])
        assert same(r.variables, [A.v, S.v])

    def test_self_cycle(self) -> None:
        a = Module(name="a")
        a.me = a
        assert a.submodules == ()
        a.w = var("w")
        assert same(a.variables, [a.w])

    def test_longer_cycle_terminates(self) -> None:
        a, b, c = Module(name="a"), Module(name="b"), Module(name="c")
        a.b, b.c, c.a = b, c, a
        for m in (a, b, c):
            m.w = var(m.name)
        assert same(a.submodules, [b, c])
        assert same(a.variables, [a.w, b.w, c.w])
        assert same(c.submodules, [a, b])

    def test_module_as_dict_key_is_invisible(self) -> None:
        m = Module(name="m")
        key = Module(name="key")
        m.d = {key: 1}
        assert m.submodules == ()

    def test_modules_in_nested_containers(self) -> None:
        m = Module(name="m")
        inner = [Module(name=f"l{i}") for i in range(3)]
        m.layers = {"b": (inner[2],), "a": [[inner[0]], {"x": inner[1]}]}
        assert same(m.submodules, inner)


class TestAbc:
    def test_abstract(self) -> None:  # TF#33
        class AbstractModule(Module, metaclass=abc.ABCMeta):
            @abc.abstractmethod
            def __call__(self) -> None:
                pass

        with pytest.raises(TypeError, match=r"Can't instantiate.*abstract"):
            AbstractModule()

    def test_concrete(self) -> None:  # TF#34
        class AbstractModule(Module, metaclass=abc.ABCMeta):
            @abc.abstractmethod
            def __call__(self, x: float) -> Any:
                pass

        class ConcreteModule(AbstractModule):
            @Module.with_name_scope
            def __call__(self, x: float) -> tuple[float, str]:
                return x**2, current_name_scope()

        mod = ConcreteModule()
        assert mod(2.0) == (4.0, "concrete_module/")
        assert current_name_scope() == ""


# ----------------------------------------------------------------------------
# _flatten


class TestFlatten:
    @pytest.mark.parametrize(
        "container_type",
        [
            pytest.param(NamedPair._make, id="namedtuple"),
            pytest.param(list, id="list"),
            pytest.param(tuple, id="tuple"),
            pytest.param(lambda v: dict(enumerate(v)), id="dict"),
        ],
    )
    def test_flatten(self, container_type: Any) -> None:  # TF#35
        parent = SimpleModule(container_type=container_type)
        child = parent.c
        a = list(parent.a.values()) if isinstance(parent.a, dict) else list(parent.a)
        ca = list(child.a.values()) if isinstance(child.a, dict) else list(child.a)
        assert same(parent._flatten(recursive=False, predicate=is_member), [a[0], a[1], parent.z])
        assert same(
            parent._flatten(predicate=is_member), [a[0], a[1], parent.z, ca[0], ca[1], child.z]
        )

    def test_recursive_false_yields_direct_submodules(self) -> None:
        m = RecursiveModule(3)
        assert same(m._flatten(recursive=False, predicate=is_module), [m.child])
        assert same(m._flatten(recursive=False, predicate=is_variable), [m.w])

    def test_returns_lazy_iterator(self) -> None:
        m = Module(name="m")
        m.layers = {object(): None, object(): None}
        it = m._flatten(predicate=is_variable)  # no error until iterated
        with pytest.raises(ValueError):
            next(iter(it))

    def test_attribute_traversal_key(self) -> None:  # TF#36
        class LayerModule(Module):
            def __init__(self) -> None:
                super().__init__()
                self._trainable_variables = [var("a"), var("b")]
                self._non_trainable_variables = [var("c"), var("d")]
                self._bonus = var("e")

            @property
            def variables(self) -> tuple[Any, ...]:
                def key_function(name: str) -> tuple[int, str]:
                    indexes = {"_trainable_variables": 0, "_non_trainable_variables": 1}
                    return indexes.get(name, 2), name

                return tuple(
                    self._flatten(predicate=is_variable, attribute_traversal_key=key_function)
                )

        mod = LayerModule()
        names = [v.name for v in mod.variables]
        assert names == ["a:0", "b:0", "c:0", "d:0", "e:0"]
        default = [v.name for v in mod._flatten(predicate=is_variable)]
        assert default == ["e:0", "c:0", "d:0", "a:0", "b:0"]

    def test_attribute_traversal_key_passed_to_submodules(self) -> None:
        root, child = Module(name="root"), Module(name="child")
        root.child = child
        child.a, child.b = var("a"), var("b")
        flat = root._flatten(
            predicate=is_variable, attribute_traversal_key=lambda n: [-ord(c) for c in n]
        )
        reverse = [v.name for v in flat]
        assert reverse == ["b:0", "a:0"]

    def test_default_attribute_order_is_plain_string_sort(self) -> None:
        m = Module(name="m")
        for name in ["b", "a", "_c", "B"]:
            setattr(m, name, var(name))
        assert [v.name for v in m.variables] == ["B:0", "_c:0", "a:0", "b:0"]

    def test_dict_values_in_sorted_key_order(self) -> None:
        m = Module(name="m")
        vs = {k: var(k) for k in ["c", "a", "b"]}
        m.d = vs  # insertion order c, a, b
        m.od = collections.OrderedDict((k, var("o" + k)) for k in ["z", "y"])
        m.dd = collections.defaultdict(list, {2: var("d2"), 1: var("d1")})
        names = [v.name for v in m.variables]
        assert names == ["a:0", "b:0", "c:0", "d1:0", "d2:0", "oy:0", "oz:0"]

    def test_attributes_to_ignore(self) -> None:  # TF#37
        class DangerousModule(Module):
            _TF_MODULE_IGNORED_PROPERTIES = frozenset(
                itertools.chain(
                    ("dangerous_submodule", "dangerous_variable"),
                    Module._TF_MODULE_IGNORED_PROPERTIES,
                )
            )

        mod = DangerousModule()
        mod.dangerous_submodule = Module()
        mod.dangerous_submodule.hidden = var("hidden")
        mod.dangerous_variable = var("dangerous")
        mod.normal_variable = var("normal")
        assert mod.submodules == ()
        assert same(mod.variables, [mod.normal_variable])

    def test_ignore_set_is_per_module_class(self) -> None:
        class IgnoresX(Module):
            _TF_MODULE_IGNORED_PROPERTIES = frozenset({"x"})

        root = Module(name="root")
        root.x = var("root_x")  # root's class ignores nothing
        root.child = IgnoresX()
        root.child.x = var("child_x")
        root.child.y = var("child_y")
        assert [v.name for v in root.variables] == ["root_x:0", "child_y:0"]
        # Ignored properties are not descended into.
        root.child.x = Module(name="hidden")
        root.child.x.w = var("w")
        assert same(root.submodules, [root.child])

    def test_class_attributes_and_slots_are_invisible(self) -> None:
        class WithClassAttr(Module):
            shared = Variable(0.0, name="class_level")

        m = WithClassAttr()
        assert m.variables == ()

    def test_with_path(self) -> None:  # TF#38
        mod = Module()
        v = var("v")
        mod.w = v
        mod.encoder = Module()
        mod.encoder.w = [({"k": v}, {"k": v})]
        mod.decoder = mod.encoder
        got = dict(mod._flatten(with_path=True, predicate=is_variable))
        assert same_dict(
            got,
            {
                ("w",): v,
                ("encoder", "w", 0, 0, "k"): v,
                ("encoder", "w", 0, 1, "k"): v,
                ("decoder", "w", 0, 0, "k"): v,
                ("decoder", "w", 0, 1, "k"): v,
            },
        )
        assert same(mod.variables, [v])

    def test_cycles_with_path(self) -> None:  # TF#39
        mod = Module()
        v = var("v")
        mod.w = v
        mod.encoder = Module()
        mod.encoder.w = [({"k": v}, {"k": v})]
        mod.decoder = mod.encoder
        mod.decoder.mod = mod
        got = dict(mod._flatten(with_path=True, predicate=is_variable))
        assert same_dict(
            got,
            {
                ("w",): v,
                ("encoder", "w", 0, 0, "k"): v,
                ("encoder", "w", 0, 1, "k"): v,
                ("decoder", "w", 0, 0, "k"): v,
                ("decoder", "w", 0, 1, "k"): v,
                ("encoder", "mod", "w"): v,
                ("decoder", "mod", "w"): v,
            },
        )

    def test_self_cycle_with_path(self) -> None:
        a = Module(name="a")
        v = var("v")
        a.me = a
        a.w = v
        assert list(a._flatten(with_path=True, predicate=is_variable)) == [
            (("w",), v),
            (("me", "w"), v),
        ]
        got = list(a._flatten(with_path=True, predicate=is_module))
        assert [p for p, _ in got] == [("me",), ("me", "me")]
        assert all(m is a for _, m in got)

    def test_path_order_matches_walk_order(self) -> None:
        r = Module(name="r")
        A, B, A1 = Module(name="A"), Module(name="B"), Module(name="A1")
        r.a, r.b, A.c = A, B, A1
        paths = [p for p, _ in r._flatten(with_path=True, predicate=is_module)]
        assert paths == [("a",), ("b",), ("a", "c")]

    def test_raises_error_with_path(self) -> None:  # TF#40
        m = Module()
        m.layers = {object(): None, object(): None}
        with pytest.raises(ValueError, match="Error processing property 'layers'") as info:
            m.variables  # noqa: B018
        assert isinstance(info.value, ConfigError)
        assert isinstance(info.value.__cause__, TypeError)

    def test_mixed_key_types_raise(self) -> None:
        m = Module()
        m.layers = {1: var("a"), "x": var("b")}
        with pytest.raises(ConfigError, match="Error processing property 'layers'"):
            m.submodules  # noqa: B018

    def test_single_unsortable_key_is_fine(self) -> None:
        m = Module()
        v = var("v")
        m.layers = {object(): v}
        assert same(m.variables, [v])

    def test_docstring_with_path_example(self) -> None:  # TF#42
        m = Module(name="m")
        t = [MemberType() for _ in range(5)]
        m.x = [t[0], t[1]]
        m.y = {"i": t[2], "j": t[3]}
        m.z = t[4]
        got = list(m._flatten(with_path=True, predicate=is_member))
        assert [p for p, _ in got] == [("x", 0), ("x", 1), ("y", "i"), ("y", "j"), ("z",)]
        assert same([leaf for _, leaf in got], t)

    def test_namedtuple_paths_are_field_names(self) -> None:
        m = Module(name="m")
        m.a = NamedPair(first=var("f"), second=var("s"))
        paths = [p for p, _ in m._flatten(with_path=True, predicate=is_variable)]
        assert paths == [("a", "first"), ("a", "second")]

    def test_opaque_leaves_not_traversed(self) -> None:
        class Holder:
            def __init__(self) -> None:
                self.v = var("in_object")

        m = Module(name="m")
        m.obj = Holder()
        m.s = {var("in_set")}
        m.fs = frozenset({var("in_frozenset")})
        m.text = "a string"
        m.arr = np.array([1.0, 2.0])
        assert m.variables == ()

    def test_empty_containers_yield_nothing(self) -> None:
        m = Module(name="m")
        m.a, m.b, m.c = [], {}, ()
        assert m.variables == ()
        paths = [p for p, _ in m._flatten(with_path=True)]
        assert not any(p[0] in ("a", "b", "c") for p in paths)


# ----------------------------------------------------------------------------
# Dataclasses (looproto extra)


@dataclasses.dataclass
class Params:
    w: Variable
    b: Variable
    extra: Any = None


class TestDataclasses:
    def test_dataclass_fields_are_walked_in_declaration_order(self) -> None:
        m = Module(name="m")
        p = Params(w=var("w"), b=var("b"), extra=[var("e")])
        m.params = p
        assert same(m.variables, [p.w, p.b, p.extra[0]])
        got = list(m._flatten(with_path=True, predicate=is_variable))
        assert [path for path, _ in got] == [
            ("params", "w"),
            ("params", "b"),
            ("params", "extra", 0),
        ]

    def test_dataclass_holding_module(self) -> None:
        m = Module(name="m")
        sub = Module(name="sub")
        sub.v = var("v")
        m.params = Params(w=var("w"), b=var("b"), extra=sub)
        assert same(m.submodules, [sub])
        assert same(m.variables, [m.params.w, m.params.b, sub.v])
        assert variables_by_path(m)["params/extra/v"] is sub.v

    def test_dataclass_type_is_a_leaf(self) -> None:
        m = Module(name="m")
        m.cls = Params
        assert m.variables == ()

    def test_module_dataclass_walked_as_module(self) -> None:
        @dataclasses.dataclass(eq=False)
        class DataModule(Module):
            size: int = 3

            def __post_init__(self) -> None:
                super().__init__()
                self.w = var("w")

        m = Module(name="m")
        m.inner = DataModule()
        assert same(m.submodules, [m.inner])
        assert same(m.variables, [m.inner.w])


# ----------------------------------------------------------------------------
# variables_by_path (looproto extra)


class TestVariablesByPath:
    def test_paths(self) -> None:
        m = Module(name="m")
        m.layers = [Module(name="l0"), Module(name="l1")]
        m.layers[0].w = var("w0")
        m.layers[1].w = var("w1")
        m.layers[1].b = var("b1")
        m.step = create_global_step()
        got = variables_by_path(m)
        assert list(got) == ["step", "layers/0/w", "layers/1/b", "layers/1/w"]
        assert same_dict(
            got,
            {
                "layers/0/w": m.layers[0].w,
                "layers/1/b": m.layers[1].b,
                "layers/1/w": m.layers[1].w,
                "step": m.step,
            },
        )

    def test_shared_variable_first_path_wins(self) -> None:
        m = Module(name="m")
        m.encoder = Module(name="encoder")
        m.encoder.w = var("w")
        m.decoder = m.encoder  # "decoder" < "encoder"
        m.z = m.encoder.w
        # The module's own attributes come first (z), then submodules (decoder, encoder).
        assert same_dict(variables_by_path(m), {"z": m.encoder.w})

    def test_shared_submodule_variables_once(self) -> None:
        m = Module(name="m")
        m.encoder = Module(name="encoder")
        m.encoder.w = var("w")
        m.decoder = m.encoder
        got = variables_by_path(m)
        assert same_dict(got, {"decoder/w": m.encoder.w})

    def test_cycle(self) -> None:
        m = Module(name="m")
        m.w = var("w")
        m.me = m
        assert same_dict(variables_by_path(m), {"w": m.w})

    def test_container_root(self) -> None:
        a, b = Module(name="a"), Module(name="b")
        a.w, b.w = var("aw"), var("bw")
        v = var("loose")
        got = variables_by_path({"model": a, "other": [b, v]})
        assert same_dict(got, {"model/w": a.w, "other/0/w": b.w, "other/1": v})
        assert same_dict(variables_by_path(v), {"": v})

    def test_container_root_dedup(self) -> None:
        a = Module(name="a")
        a.w = var("w")
        got = variables_by_path({"x": a, "y": a, "z": a.w})
        assert same_dict(got, {"x/w": a.w})

    def test_predicate(self) -> None:
        m = Module(name="m")
        m.t = var("t", trainable=True)
        m.n = var("n", trainable=False)
        got = variables_by_path(m, predicate=lambda o: isinstance(o, Variable) and o.trainable)
        assert same_dict(got, {"t": m.t})

    def test_ignores_non_variables(self) -> None:
        m = Module(name="m")
        m.sub = Module(name="sub")
        m.x = np.zeros(3)
        assert variables_by_path(m) == {}


# ----------------------------------------------------------------------------
# Variable (looproto's own)


class TestVariable:
    def test_basic_properties(self) -> None:
        w = Variable(np.zeros((2, 3), np.float32), name="w")
        assert w.name == "w:0"
        assert w.shape == (2, 3)
        assert isinstance(w.shape, tuple)
        assert w.dtype == np.dtype("float32")
        assert w.trainable is True
        assert isinstance(w.numpy(), np.ndarray)
        np.testing.assert_array_equal(w.numpy(), np.zeros((2, 3)))
        assert Variable(1.0, trainable=False).trainable is False

    def test_python_scalars(self) -> None:
        assert Variable(1.0).shape == ()
        assert Variable(1.0).dtype == np.float64
        assert Variable(3).dtype.kind == "i"
        assert float(Variable(2.5)) == 2.5
        assert int(Variable(7)) == 7
        assert [10, 20, 30][Variable(1)] == 20  # __index__

    def test_dtype_argument(self) -> None:
        v = Variable([1, 2], dtype=np.float32)
        assert v.dtype == np.float32
        assert v.shape == (2,)

    def test_initial_value_is_copied(self) -> None:
        x = np.zeros(3)
        v = Variable(x)
        x[0] = 5.0
        assert v.numpy()[0] == 0.0

    def test_initial_value_from_variable(self) -> None:
        a = Variable(np.arange(3.0), name="a")
        b = Variable(a, name="b")
        a.assign(np.zeros(3))
        np.testing.assert_array_equal(b.numpy(), np.arange(3.0))
        assert b.name == "b:0"

    def test_numpy_returns_a_copy(self) -> None:
        v = Variable(np.zeros(3))
        v.numpy()[0] = 1.0
        assert v.numpy()[0] == 0.0

    def test_np_array_copies(self) -> None:
        v = Variable(np.zeros(3))
        arr = np.array(v)
        arr[0] = 5.0
        assert v.numpy()[0] == 0.0
        copied = np.array(v, copy=True)
        copied[1] = 5.0
        assert v.numpy()[1] == 0.0
        np.testing.assert_array_equal(np.asarray(v, dtype=np.float32), np.zeros(3, np.float32))

    def test_assign(self) -> None:
        v = Variable(np.zeros((2, 2), np.float32), name="w")
        out = v.assign(np.ones((2, 2), np.float32))
        assert out is v
        np.testing.assert_array_equal(v.numpy(), np.ones((2, 2)))
        assert v.dtype == np.float32

    def test_assign_copies_the_array(self) -> None:
        v = Variable(np.zeros(3))
        x = np.ones(3)
        v.assign(x)
        x[0] = 7.0
        np.testing.assert_array_equal(v.numpy(), np.ones(3))

    def test_assign_from_variable_does_not_alias(self) -> None:
        a = Variable(np.zeros(3), name="a")
        b = Variable(np.ones(3), name="b")
        a.assign(b)
        np.testing.assert_array_equal(a.numpy(), np.ones(3))
        np.asarray(b)[0] = 9.0  # writes into b's buffer, if __array__ exposes it
        assert a.numpy()[0] == 1.0

    def test_value_setter_is_assign(self) -> None:
        v = Variable(np.zeros(2), name="v")
        v.value = np.ones(2)
        np.testing.assert_array_equal(v.value, np.ones(2))
        with pytest.raises(ShapeError):
            v.value = np.ones(3)

    def test_assign_python_numbers_cast_same_kind(self) -> None:
        v = Variable(np.float32(0.0), name="f")
        v.assign(2)  # int -> float: same kind allowed
        assert v.dtype == np.float32
        assert float(v) == 2.0
        v.assign(0.5)
        assert v.dtype == np.float32
        assert float(v) == 0.5
        i = Variable(np.int64(0), name="i")
        i.assign(3)
        assert i.dtype == np.int64
        assert int(i) == 3
        with pytest.raises(ShapeError, match="'i:0'") as info:
            i.assign(0.5)
        assert "int64" in str(info.value)
        assert "float64" in str(info.value)
        assert int(i) == 3

    def test_assign_hook_that_returns_true_stores_the_value_itself(self) -> None:
        # The contract the TensorFlow backend's lifted Variables rely on.
        stored: list[Any] = []

        def hook(variable: Variable, value: Any) -> bool:
            if variable.name == "lifted:0":
                stored.append(value)
                return True
            return False

        backends.assign_hooks.append(hook)
        try:
            lifted = Variable(np.float32(0), name="lifted")
            plain = Variable(np.float32(0), name="plain")
            assert lifted.assign(np.float32(3)) is lifted
            assert plain.assign(np.float32(3)) is plain
        finally:
            backends.assign_hooks.remove(hook)
        assert stored == [np.float32(3)]
        assert float(lifted) == 0.0  # the hook kept it; `assign` wrote nothing
        assert float(plain) == 3.0

    def test_assign_list(self) -> None:
        v = Variable(np.zeros(2, np.float32), name="v")
        v.assign([1, 2])
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v.numpy(), [1.0, 2.0])

    def test_assign_wrong_shape(self) -> None:
        v = Variable(np.zeros((2, 3), np.float32), name="kernel")
        with pytest.raises(ShapeError) as info:
            v.assign(np.zeros((3, 2), np.float32))
        message = str(info.value)
        assert "'kernel:0'" in message
        assert "(3, 2)" in message
        assert "(2, 3)" in message
        assert isinstance(info.value, ValueError)
        np.testing.assert_array_equal(v.numpy(), np.zeros((2, 3)))
        with pytest.raises(ShapeError, match=re.escape("(2, 3)")):
            v.assign(0.0)  # a scalar is not broadcast

    def test_assign_wrong_dtype_array(self) -> None:
        v = Variable(np.zeros(3, np.float32), name="v")
        with pytest.raises(ShapeError) as info:
            v.assign(np.zeros(3, np.float64))
        message = str(info.value)
        assert "'v:0'" in message
        assert "float64" in message
        assert "float32" in message
        assert v.dtype == np.float32

    def test_assign_add_and_sub(self) -> None:
        v = Variable(np.float32(1.0), name="v")
        assert v.assign_add(2) is v
        assert float(v) == 3.0
        assert v.dtype == np.float32
        v.assign_sub(0.5)
        assert float(v) == 2.5
        assert v.dtype == np.float32
        step = create_global_step()
        for _ in range(3):
            step.assign_add(1)
        assert int(step) == 3
        assert step.dtype == np.int64
        assert isinstance(step.value, np.ndarray)
        with pytest.raises(ShapeError, match="global_step:0"):
            step.assign_add(0.5)
        arr = Variable(np.zeros(2), name="arr")
        arr.assign_add(np.ones(2))
        np.testing.assert_array_equal(arr.numpy(), np.ones(2))
        with pytest.raises(ShapeError):
            arr.assign_add(np.ones(3))

    @pytest.mark.parametrize("bad_name", [1, b"w", ["w"]])
    def test_bad_name(self, bad_name: Any) -> None:
        with pytest.raises(ProtocolError):
            Variable(0.0, name=bad_name)

    @pytest.mark.parametrize("bad", [1, "yes", None])
    def test_bad_trainable(self, bad: Any) -> None:
        with pytest.raises(ProtocolError):
            Variable(0.0, trainable=bad)

    def test_numpy_bool_trainable_is_accepted(self) -> None:
        assert Variable(0.0, trainable=np.bool_(False)).trainable is False

    @pytest.mark.parametrize("bad", [object(), {"a": object()}, [object()]])
    def test_bad_initial_value(self, bad: Any) -> None:
        with pytest.raises(ProtocolError):
            Variable(bad)

    def test_repr(self) -> None:
        text = repr(Variable(np.zeros(2, np.float32), name="w"))
        assert "'w:0'" in text
        assert "float32" in text
        assert "(2,)" in text

    def test_not_equal_by_value(self) -> None:
        # Identity semantics: two variables with the same value are distinct objects.
        a, b = Variable(1.0, name="x"), Variable(1.0, name="x")
        assert a is not b
        assert len({id(a), id(b)}) == 2


class TestGlobalStep:
    def test_create_global_step(self) -> None:
        step = create_global_step()
        assert step.name == "global_step:0"
        assert step.dtype == np.int64
        assert step.shape == ()
        assert step.trainable is False
        assert int(step) == 0
        assert create_global_step() is not step

    def test_global_step_in_scope_and_module(self) -> None:
        with name_scope("trainer"):
            step = create_global_step()
        assert step.name == "trainer/global_step:0"
        m = Module(name="m")
        m.step = step
        assert same(m.non_trainable_variables, [step])
        assert m.trainable_variables == ()


class TestComparisons:
    """`tf.Variable`'s comparisons against values; identity between Variables."""

    def test_against_values_elementwise_like_tf_variable(self) -> None:
        step = create_global_step()
        assert step == 0  # what Orbit's code asks of its global step
        assert isinstance(step == 0, np.bool_)
        assert not operator.ne(step, 0)
        step.assign_add(3)
        assert step != 0
        assert (step < 4, step <= 3, step > 2, step >= 3) == (True, True, True, True)
        assert operator.eq(3, step) and operator.gt(4, step)  # reflected: int, then Variable
        w = Variable(np.array([1.0, 2.0, 3.0], np.float32))
        np.testing.assert_array_equal(w == 2.0, [False, True, False])
        np.testing.assert_array_equal(w > np.float32(1.5), [False, True, True])
        np.testing.assert_array_equal(w < Variable(np.full(3, 2.5, np.float32)), [1, 1, 0])

    def test_between_variables_identity_so_containers_keep_working(self) -> None:
        a = Variable(np.zeros((2, 3), np.float32))
        b = Variable(np.zeros((2, 3), np.float32))  # equal values, another variable
        assert a == a and a != b and not operator.eq(a, b)
        assert [a, b].index(b) == 1 and b in [a, b] and a not in [b]
        assert len({a, b, a}) == 2 and {a: 1, b: 2}[b] == 2
        assert hash(a) == hash(a) and hash(a) != hash(b)
        twins: Any = weakref.WeakKeyDictionary({a: "a", b: "b"})
        assert twins[b] == "b"
        m = Module(name="m")
        m.pair = [a, b]
        assert same(m.variables, [a, b])


# ----------------------------------------------------------------------------
# Copying


class TestCopy:
    def test_deepcopy_module(self) -> None:
        m = RecursiveModule(2)
        clone = copy.deepcopy(m)
        assert clone.name_scope.name == "badger/"
        assert clone.child.name_scope.name == "badger/badger/"
        assert all(a is not b for a, b in zip(clone.variables, m.variables))
        assert [v.name for v in clone.variables] == [v.name for v in m.variables]
        clone.w.assign(5.0)
        assert float(m.w) == 1.0
        with clone.name_scope as s:
            assert s == "badger/"
        assert current_name_scope() == ""


def test_public_names_exported() -> None:
    for name in [
        "Module",
        "Variable",
        "NameScope",
        "name_scope",
        "current_name_scope",
        "create_global_step",
        "variables_by_path",
    ]:
        assert getattr(looproto, name) is getattr(looproto.module, name)
