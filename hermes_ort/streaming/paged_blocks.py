"""An engine's paged blocks (paged.py): opened once, one at a time, before the first pass that
needs them (a block's saved packed copy made first where the cache lacks it); kept open across
passes and handed on to the next engine of the same model; closed with the last.

A block that cannot be paged (its copy cannot be saved or opened: PackedCopyError, or a full
disk) is not a failure of the model: it is re-created every pass as a streamed prepacked block,
with a PagingFallback warning naming it, and not tried again by this model."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from hermes_ort.core.manifest import Manifest
from hermes_ort.core.trace import Trace
from hermes_ort.planning.plan import Plan
from hermes_ort.streaming.integrity import Verifier
from hermes_ort.streaming.loader import drop_own_files, open_paged_block
from hermes_ort.streaming.packed_copies import PackedCopyError
from hermes_ort.streaming.paged import PagedSession


class PagingFallback(UserWarning):
    """A block the plan pages could not be paged: it is re-created every pass instead."""


class PagedBlocks:
    """Block index -> its open PagedSession; `failed`: blocks re-created instead."""

    def __init__(
        self, verifier: Verifier, trace: Trace | None = None, cache_dir: Path | None = None
    ):
        self.verifier = verifier
        self.trace = trace or Trace(enabled=False)
        self.cache_dir = cache_dir  # None: packed_copies.default_cache_dir()
        self.open: dict[int, PagedSession] = {}
        self.failed: set[int] = set()

    def retain(self, plan: Plan) -> None:
        """Close the sessions of blocks `plan` does not page (a new plan of the same model)."""
        for i in [i for i in self.open if not (i < len(plan.blocks) and plan.blocks[i].paged)]:
            self.open.pop(i).close()

    def open_all(self, manifest: Manifest, plan: Plan) -> None:
        """Open every block the plan pages that is not open yet, one at a time (the cost model's
        opening peak: one block's opening beside the others' anonymous remainders)."""
        for i, how in enumerate(plan.blocks):
            if not how.paged or i in self.open or i in self.failed:
                continue
            spec = manifest.blocks[i]
            t0 = time.perf_counter()
            try:
                self.open[i] = open_paged_block(self.verifier, spec, how.settings, self.cache_dir)
            except (PackedCopyError, OSError) as e:
                self.failed.add(i)
                warnings.warn(
                    f"block '{spec.name}' cannot be paged ({e}); its session is re-created "
                    "every pass instead",
                    PagingFallback,
                    stacklevel=2,
                )
                continue
            self.trace.add(spec.name, "create", t0)
            if how.drop_pages:  # the originals its copy was saved from
                drop_own_files(spec, self.verifier.model_dir)

    def close(self) -> None:
        for paged in self.open.values():
            paged.close()
        self.open.clear()
