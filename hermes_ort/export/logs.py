"""What an export prints: its progress lines on stderr, and with --quiet nothing but errors.

The libraries' own logs are cut to errors whatever the flag: ONNX Runtime's quantizers in
quantize.py (they log every node), transformers/optimum/torch.onnx in onnx_export.quiet_libraries.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

ORT_WARNING, ORT_ERROR = 2, 3  # ONNX Runtime's logger severities (2, warning, is its default)
_quiet = [False]


def say(message: str) -> None:
    """A progress line on stderr (none under `quiet`)."""
    if not _quiet[0]:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet(enabled: bool):
    """With `enabled`, for the export's duration: no progress lines, no Python warnings, and ONNX
    Runtime's C++ logger (it writes to stderr itself) at errors only."""
    if not enabled:
        yield
        return
    import onnxruntime as ort

    _quiet[0] = True
    ort.set_default_logger_severity(ORT_ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _quiet[0] = False
        ort.set_default_logger_severity(ORT_WARNING)  # no getter to restore from: its default
