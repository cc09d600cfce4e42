"""The two places hermes-ort reaches into CPython's private API, isolated here with the reason
for each (tests/test_cpython.py pins both). Nothing else in the package may use a private name
of the standard library or the interpreter."""

from __future__ import annotations

import ctypes
import threading


def release_if_held(cond: threading.Condition) -> None:
    """Release `cond` while the calling thread still holds it.

    Ctrl-C landing just as a thread took a Condition's lock can leave it held: the interrupt
    fires between the acquire and the `with` block, so no `__exit__` runs. The block engine
    calls this where nothing of its own holds the lock; a hold left is such a leak, and kept,
    the daemon's callbacks would wait on it forever (seen: test_ctrl_c_during_a_run hung in 2 of
    ~14 full runs). A Condition's default lock is an RLock, whose owner only its private
    `_is_owned` tells (`locked()` would also see another thread's legitimate hold)."""
    while cond._is_owned():  # type: ignore[attr-defined]
        cond.release()


def clear_unhandled_interrupt() -> None:
    """Clear CPython's `_Py_UnhandledKeyboardInterrupt` flag.

    A command that caught Ctrl-C (or SIGTERM) and cleaned up exits 130, as a shell reports it.
    CPython 3.11 would instead kill the process with SIGINT at exit (status -2 to a parent) if
    the interrupt landed inside an `exec` of a string, which dataclasses run for every class
    defined during imports: that leaves this flag set. Other Pythons have no such flag."""
    try:
        flag = ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt")
    except (ValueError, AttributeError):
        return
    flag.value = 0
