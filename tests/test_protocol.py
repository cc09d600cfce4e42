"""`hermes_ort.runtime.protocol.Model`: both models `hermes_ort.load` returns have every member
it lists, methods with the same parameters (names, kinds, defaults), so that a change to one
class's signature that the other does not follow fails here. No Ray needed."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

import hermes_ort
from hermes_ort.cluster.driver import ClusterModel
from hermes_ort.runtime.model import HermesModel
from hermes_ort.runtime.protocol import Model

CLASSES = [HermesModel, ClusterModel]


def members(protocol: type) -> dict[str, object]:
    """The protocol's own members: its properties and methods (with `__enter__`/`__exit__`)."""
    return {
        name: value
        for name, value in vars(protocol).items()
        if isinstance(value, property)
        or (
            inspect.isfunction(value)
            and (not name.startswith("_") or name in {"__enter__", "__exit__"})
        )
    }


def instance_attributes(cls: type) -> set[str]:
    """Names `__init__` assigns on `self` (the attributes every instance has)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    names = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for t in targets:
            if (
                isinstance(t, ast.Attribute)
                and isinstance(t.value, ast.Name)
                and t.value.id == "self"
            ):
                names.add(t.attr)
    return names


def parameters(function) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_the_protocol_lists_what_a_model_is_used_for():
    assert set(members(Model)) == {
        "model_dir",
        "manifest",
        "decoder",
        "plan",
        "stats",
        "generation_stats",
        "run",
        "generate",
        "chat",
        "embed",
        "sample_inputs",
        "close",
        "__enter__",
        "__exit__",
    }


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_each_model_has_every_member_with_the_protocol_s_signature(cls):
    for name, member in members(Model).items():
        if isinstance(member, property):  # data: set by __init__ (or a property of the class)
            own = inspect.getattr_static(cls, name, None)
            assert name in instance_attributes(cls) or isinstance(own, property), (cls, name)
            continue
        method = inspect.getattr_static(cls, name, None)
        assert inspect.isfunction(method), f"{cls.__name__}.{name} is not a method"
        want = parameters(member)
        got = parameters(method)
        # the protocol's parameters, in order, then only optional keyword-only ones of its own
        assert got[: len(want)] == want, f"{cls.__name__}.{name}{inspect.signature(method)}"
        for p_name, kind, default in got[len(want) :]:
            assert (
                kind is inspect.Parameter.KEYWORD_ONLY and default is not inspect.Parameter.empty
            ), f"{cls.__name__}.{name}: extra parameter '{p_name}' must be keyword-only, optional"


def test_a_model_loaded_here_is_a_model(toy_dir):
    with hermes_ort.load(toy_dir) as model:
        assert isinstance(model, Model)
