"""The error contract: everything a user can trigger raises a HermesError subclass whose message
names the file, tensor, block or budget at fault. Nothing else is raised on purpose."""


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
    shell reports it (core/cpython.py says why a flag is cleared first)."""
    from hermes_ort.core.cpython import clear_unhandled_interrupt

    clear_unhandled_interrupt()
    return 130
