"""The tensors of one pass, routed between blocks by name.

A block may read tensors from several blocks back (the exported BERT computes its additive mask
once, in layer 0, and every later layer reads it), so tensors are kept by name and each
intermediate is dropped right after its last consumer has run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hermes_ort.core.manifest import Manifest, last_consumers


class Tensors:
    """The model inputs, then every block's outputs, until no later block reads them."""

    def __init__(self, manifest: Manifest, feeds: dict[str, np.ndarray]):
        self.manifest = manifest
        self.last_use = last_consumers(manifest)
        self.wanted = set(manifest.output_names)
        self.values: dict[str, np.ndarray] = dict(feeds)

    def inputs_of(self, index: int) -> dict[str, np.ndarray]:
        return {name: self.values[name] for name in self.manifest.blocks[index].inputs}

    def put(self, index: int, values: Sequence[np.ndarray]) -> None:
        """Block `index`'s outputs in; out what no block after it reads (model outputs stay)."""
        self.values.update(zip(self.manifest.blocks[index].outputs, values, strict=True))
        done = [
            n for n in self.values if self.last_use.get(n, -1) <= index and n not in self.wanted
        ]
        for name in done:
            del self.values[name]

    def outputs(self) -> dict[str, np.ndarray]:
        return {name: self.values[name] for name in self.manifest.output_names}

    def clear(self) -> None:
        self.values.clear()
