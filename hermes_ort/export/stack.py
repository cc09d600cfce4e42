"""Find the transformer stack of a torch model from its own module structure.

The stack is the longest `nn.ModuleList` whose children all share one class (`bert.encoder.layer`,
`vit.encoder.layer`, `transformer.h`, ...): no per-architecture table, so other encoder/decoder
architectures of the same shape cut without new code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hermes_ort.export.errors import ExportError


@dataclass(frozen=True)
class LayerStack:
    path: str  # module path of the ModuleList: "transformer.h"
    num_layers: int
    layer_class: str

    @property
    def scope(self) -> str:
        """Node-name prefix of the legacy ONNX exporter: layer i's nodes start "{scope}.{i}/"."""
        return "/" + self.path.replace(".", "/")


def find_layer_stack(model: Any) -> LayerStack:
    from torch import nn

    arch = type(model).__name__
    candidates = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            classes = {type(child) for child in module}
            if len(classes) == 1:
                candidates.append(LayerStack(path, len(module), next(iter(classes)).__name__))
    if not candidates:
        raise ExportError(
            f"unsupported architecture '{arch}': it has no repeated layer list "
            f"(an nn.ModuleList of one layer class) to cut into blocks"
        )
    longest = max(c.num_layers for c in candidates)
    best = [c for c in candidates if c.num_layers == longest]
    if len(best) > 1:
        paths = ", ".join(c.path for c in best)
        raise ExportError(
            f"unsupported architecture '{arch}': several layer lists of {longest} layers "
            f"({paths}); "
            f"cannot tell which one is the transformer stack"
        )
    return best[0]
