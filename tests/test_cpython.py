"""The private-API workarounds in hermes_ort/core/cpython.py do what they say, and no other
module of the package uses a private name of the standard library or the interpreter."""

from __future__ import annotations

import ast
import ctypes
import threading
from pathlib import Path

import pytest

import hermes_ort
from hermes_ort.core.cpython import clear_unhandled_interrupt, release_if_held


def test_a_hold_left_by_this_thread_is_released_and_another_threads_is_not():
    cond = threading.Condition()
    cond.acquire()
    cond.acquire()  # an RLock: held twice, as a leak inside a `with` may leave it
    release_if_held(cond)
    taken = []
    t = threading.Thread(target=lambda: taken.append(cond.acquire(timeout=2)))
    t.start()
    t.join()
    assert taken == [True]  # the other thread got it: nothing of ours is left
    release_if_held(cond)  # held by that (finished) thread, not this one: left alone
    assert not cond.acquire(timeout=0.05)


def test_the_unhandled_interrupt_flag_is_cleared():
    try:
        flag = ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt")
    except (ValueError, AttributeError):
        pytest.skip("this Python has no _Py_UnhandledKeyboardInterrupt")
    before = flag.value
    try:
        flag.value = 1
        clear_unhandled_interrupt()
        assert flag.value == 0
    finally:
        flag.value = before


def test_no_other_module_uses_a_private_name_of_threading_or_ctypes_pythonapi():
    package = Path(hermes_ort.__file__).parent
    for path in package.rglob("*.py"):
        if path.name == "cpython.py":
            continue
        text = path.read_text()
        assert "pythonapi" not in text, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute) and node.attr in {"_is_owned", "_release_save"}:
                raise AssertionError(f"{path}: {node.attr}")
