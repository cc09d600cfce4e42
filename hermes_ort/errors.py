"""Every error hermes-ort raises on purpose derives from HermesError, and its message names the
file, tensor, block or budget at fault."""

import ctypes


class HermesError(Exception):
    """Base of all hermes-ort errors."""


class ManifestError(HermesError):
    """manifest.json is missing, malformed, of an unknown schema, or points outside the model dir."""


class IntegrityError(HermesError):
    """A block file is missing, has the wrong size, or its bytes do not match the manifest."""


class InputError(HermesError, ValueError):
    """An input to run/generate has the wrong name, dtype, rank or shape."""


class BudgetError(HermesError):
    """The memory budget cannot hold the largest block plus its activations."""


class LoadError(HermesError):
    """A loading agent failed to create a block's session."""


class ExportError(HermesError):
    """The exporter could not export, cut or verify a model."""


class RunFailed(HermesError):
    """ONNX Runtime failed while running a block (named)."""


def interrupted_status() -> int:
    """The exit status of a command that caught Ctrl-C (or SIGTERM) and cleaned up: 130, as a
    shell reports it. CPython 3.11 would instead kill the process with SIGINT at exit (status -2
    to a parent process) if the interrupt landed inside an `exec` of a string, which dataclasses
    run for every class defined during imports: that leaves a flag set, cleared here."""
    try:
        flag = ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt")
    except (ValueError, AttributeError):  # other Pythons: no such flag
        return 130
    flag.value = 0
    return 130
