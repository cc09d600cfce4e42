"""The error contract: everything a user can trigger raises a HermesError subclass whose message
names the file, tensor, block or budget at fault. Nothing else is raised on purpose."""

import ctypes


class HermesError(Exception):
    """Base of all hermes-ort errors."""


class OptionError(HermesError, ValueError):
    """An option has a value the runtime does not know: a budget string, a strategy, an objective,
    a verify mode, a load path."""


class ManifestError(HermesError):
    """manifest.json is missing, malformed, of an unknown schema, or points outside the model."""


class IntegrityError(HermesError):
    """A block file is missing, has the wrong size, or its bytes do not match the manifest."""


class InputError(HermesError, ValueError):
    """An input to run/generate has the wrong name, dtype, rank or shape, or an input file is not
    what was expected."""


class BudgetError(HermesError):
    """The memory budget cannot hold the largest block plus its activations."""


class LoadError(HermesError):
    """A loading agent failed to create a block's session."""


class RunFailed(HermesError):
    """ONNX Runtime failed while running a block (named)."""


class ProfileError(HermesError):
    """Profiling or calibrating a model on this machine failed (the step is named)."""


class ChildFailed(HermesError):
    """A fresh Python process (calibration, a benchmark's child) failed or timed out."""


class TokenizerError(HermesError):
    """No tokenizer could be found or loaded for a model."""


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
