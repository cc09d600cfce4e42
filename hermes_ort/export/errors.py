"""The exporter's errors: one class, a HermesError, whose message names the model, file, block or
option at fault (the runtime never raises it)."""

from hermes_ort.core.errors import HermesError


class ExportError(HermesError):
    """The exporter could not load, export, cut or verify a model, or write its directory."""
