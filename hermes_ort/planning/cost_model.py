"""The cost model: what a plan will cost in memory and time, from a profile or from file sizes.

Memory of a pass (the engine guarantees the shape of it: the daemon lags one block at most):

    peak = baseline + sum(resident blocks) + activations
           + max over streamed block i of
             [live(i) + live(previous streamed) + open(next w-2 streamed)]

`live` is a session's resident bytes once it has run (its touched weight pages plus its own
structures); `open` is a session opened ahead but not yet run (weights mmapped, not yet touched).

A paged block (streaming/paged.py) keeps its session open between passes: its anonymous
remainder counts always, like a small kept block, and its packed copies (file-backed) take its
window slots while prefetched or running. Paged blocks are opened one at a time before the first
pass runs; each holds, for that moment, ORT's own packed copy beside the saved one it compares
it with:

    peak = max(the pass above + sum(paged anon), baseline + sum(paged anon) + largest opening)"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from hermes_ort.core.choices import BlockKind
from hermes_ort.core.manifest import Manifest, last_consumers
from hermes_ort.planning.activation_model import ActivationModel, PassShape, fit_points
from hermes_ort.planning.layer_profile import BlockProfile, Profile
from hermes_ort.planning.paging import PagedCost, estimate_paged, measured_paged
from hermes_ort.planning.schedule import BlockTimes, simulate

SESSION_OVERHEAD_BYTES = 2 << 20  # an open session's own structures, beyond its weights
ACTIVATION_RESERVE_BYTES = 16 << 20  # intermediates and ORT's arena when nothing is measured
ESTIMATE_WARMUP_BYTES = 12 << 20  # ONNX Runtime's code and buffers, faulted in by the first session
SPARSE_FRACTION = 0.5  # a block whose run touches less than this share of its files is sparse
ESTIMATE_BANDWIDTH = 500e6  # bytes/s assumed for read-ahead when nothing is measured
ESTIMATE_COMPUTE = 2.5e9  # weight bytes/s assumed for a run when nothing is measured
ESTIMATE_PACKING = 0.26e9  # bytes/s a session prepacks MatMulNBits weights at (design.md §2.7)
# Plans keep their predicted peak this share below the budget: measured passes differ from the
# prediction by about that much (bert-base, gpt2-medium: up to 2.5% above it).
SAFETY_MARGIN = 0.03
_KEEP_PER_MILLE = round(1000 * (1 - SAFETY_MARGIN))


@dataclass(frozen=True)
class BlockCost:
    """What one block costs, as streamed and as kept. Sizes in bytes, times in seconds."""

    live_bytes: int  # streamed, after it has run (packed where `stream_prepack`)
    open_bytes: int  # opened ahead, not yet run
    resident_bytes: int  # kept between runs (prepacked where `resident_prepack`)
    mapped_live_bytes: int  # an unpacked session's, after it has run
    resident_prepack: bool  # prepacked when kept: faster runs
    # opened prepacked even when streamed: its weights' kernel needs the packed layout (int4
    # MatMulNBits: unpacked, every run dequantizes the whole weight), so its load (the packing)
    # and first run beat the mapped way's; live/open bytes are then packed
    stream_prepack: bool
    sparse: bool  # touches a small part of its weights (embedding lookups): not read ahead,
    # its pages fault in on demand
    stream_times: BlockTimes  # streamed (prepacking per stream_prepack), read ahead
    resident_times: BlockTimes  # as loaded when kept (prepacking per resident_prepack)
    plain_resident_times: BlockTimes  # kept but not prepacked
    prepack_transient_bytes: int = 0  # held for a moment while a prepacked session is created
    # (the mapped originals beside the packed copies), first pass
    # paged (streaming/paged.py): its costs where it can be (None: it cannot), and whether the
    # plan's costs page it (`CostModel.with_paged`)
    paging: PagedCost | None = None
    paged: bool = False

    @property
    def run_bytes(self) -> int:
        """Streamed, while it runs (and after, until the daemon frees it)."""
        return self.paging.packed_bytes if self.paged else self.live_bytes

    @property
    def ahead_bytes(self) -> int:
        """Streamed, loaded ahead of its run (a paged block: prefetched)."""
        return self.paging.packed_bytes if self.paged else self.open_bytes

    @property
    def streamed_times(self) -> BlockTimes:
        return self.paging.times if self.paged else self.stream_times

    def pages_faster(self) -> bool:
        """Paged, a pass costs it less than re-created (a prefetch instead of a creation)."""
        if self.paging is None:
            return False
        p, s = self.paging.times, self.stream_times
        return p.load_s + p.steady_run_s < s.load_s + s.first_run_s

    def kept_plain(self) -> BlockCost:
        """As kept without prepacking: its mapped size and unpacked run times."""
        return replace(
            self,
            resident_bytes=self.mapped_live_bytes,
            resident_times=self.plain_resident_times,
            resident_prepack=False,
        )

    def scaled_runs(self, scale: float) -> BlockCost:
        """Its run times at `scale` times the sample's compute (its loads do not grow)."""

        def runs(t: BlockTimes) -> BlockTimes:
            return replace(
                t, first_run_s=t.first_run_s * scale, steady_run_s=t.steady_run_s * scale
            )

        return replace(
            self,
            stream_times=runs(self.stream_times),
            resident_times=runs(self.resident_times),
            plain_resident_times=runs(self.plain_resident_times),
            paging=replace(self.paging, times=runs(self.paging.times)) if self.paging else None,
        )


@dataclass(frozen=True)
class CostModel:
    baseline_bytes: int  # resident set of the process before any block is opened
    blocks: tuple[BlockCost, ...]  # per manifest block
    activation_bytes: int  # intermediates + tensors in flight, worst block
    source: str = "estimate"
    kept_overhead: float = 0.0  # share added to the kept blocks' bytes (calibrated)
    first_pass_extra_s: float = 0.0  # a fresh process's first pass: ORT's one-time start
    stream_pass_scale: float = 1.0  # repeated passes that stream: calibrated measured/predicted
    # the part of `activation_bytes` that is tensors between blocks (it grows with the whole
    # batch); the rest is a block's own intermediates (they grow with the rows run at once)
    inflight_bytes: int = 0
    fixed_activation_bytes: int = 0  # the part that does not grow with a batch (ORT's own)
    # measured activations at any shape (a profile with probes); None: scaled from the sample
    activations: ActivationModel | None = None
    sample_shape: tuple[int, int] = (1, 1)  # (rows, positions) the costs were made at

    @property
    def count(self) -> int:
        return len(self.blocks)

    @property
    def model_bytes(self) -> int:
        return sum(b.resident_bytes for b in self.blocks)

    def with_prepack(self, prepacked: frozenset[int]) -> CostModel:
        """The costs when only the resident blocks in `prepacked` are prepacked; the others keep
        their weights mmapped (the live size and run times of a streamed block)."""
        return replace(
            self,
            blocks=tuple(
                b if i in prepacked and b.resident_prepack else b.kept_plain()
                for i, b in enumerate(self.blocks)
            ),
        )

    def with_paged(self, paged: frozenset[int]) -> CostModel:
        """The costs when the pageable blocks in `paged` are paged, the others re-created."""
        return replace(
            self,
            blocks=tuple(
                replace(b, paged=b.paging is not None and i in paged)
                for i, b in enumerate(self.blocks)
            ),
        )

    def without_paging(self) -> CostModel:
        """The costs when no block may be paged (paging off, or no cache to save copies in)."""
        return replace(
            self, blocks=tuple(replace(b, paging=None, paged=False) for b in self.blocks)
        )

    @property
    def paged(self) -> frozenset[int]:
        return frozenset(i for i, b in enumerate(self.blocks) if b.paged)

    def paging_choices(self) -> list[frozenset[int]]:
        """Sets of blocks to page, most first: every block that pages faster, then without the
        one whose opening holds the most, and so on, to none."""
        faster = sorted(
            (i for i, b in enumerate(self.blocks) if b.pages_faster()),
            key=lambda i: self.blocks[i].paging.open_bytes,
        )
        return [frozenset(faster[:m]) for m in range(len(faster), -1, -1)]

    def at_batch(self, batch_scale: float, micro_scale: float) -> CostModel:
        """The costs of a batch whose activations and compute are `batch_scale` times the
        sample's, each block run `micro_scale` of the sample's rows at a time (batch.py): the
        tensors between blocks scale with the batch, a block's intermediates with the
        micro-batch, its run time with the batch (as many rows computed, in any chunks)."""
        if batch_scale == 1.0 and micro_scale == 1.0:
            return self
        fixed = self.fixed_activation_bytes
        own = self.activation_bytes - self.inflight_bytes - fixed
        return replace(
            self,
            activation_bytes=int(fixed + own * micro_scale + self.inflight_bytes * batch_scale),
            inflight_bytes=int(self.inflight_bytes * batch_scale),
            blocks=tuple(b.scaled_runs(batch_scale) for b in self.blocks),
        )

    def at_pass(self, shape: PassShape) -> CostModel:
        """The costs of passes of `shape` (batch.py's rows, micro-batch, prefill chunk and logits
        positions): activations from the measured fits where the profile has them, else scaled
        from the sample as `at_batch`; run times with the tokens a pass computes."""
        a = self.activations
        if a is None:
            sample_tokens = self.sample_tokens()
            scale = shape.rows * shape.positions / sample_tokens
            micro = shape.run_rows * shape.positions / sample_tokens
            longer = max(1.0, (shape.attended or shape.positions) / self.sample_positions())
            return self.at_batch(scale * longer, micro * longer)
        scale = shape.rows * shape.positions / (a.sample_rows * a.sample_positions)
        return replace(
            self,
            activation_bytes=a.bytes_at(shape),
            inflight_bytes=a.inflight_at(shape),
            blocks=tuple(b.scaled_runs(scale) for b in self.blocks)
            if scale != 1.0
            else self.blocks,
        )

    def sample_tokens(self) -> int:
        return self.sample_shape[0] * self.sample_shape[1]

    def sample_positions(self) -> int:
        return self.sample_shape[1]

    def min_budget(self) -> int:
        """Smallest budget that can run at all: one streamed block at a time, nothing kept, and
        the safety margin. Of the ways to stream the prepacked blocks (`paging_choices`: paged,
        all or all but those whose opening holds the most, or re-created every pass), the one
        of the smallest peak; on a tie, the one that pages the most."""
        return within_margin(self.min_peak()[0])

    def min_peak(self) -> tuple[int, frozenset[int]]:
        """The least peak of one streamed block at a time, and the blocks it pages."""
        return min(
            ((self.with_paged(s).peak((), 1, 0), s) for s in self.paging_choices()),
            key=lambda x: x[0],
        )

    def peak(self, resident: tuple[int, ...], window: int, lag: int = 1, loaders: int = 1) -> int:
        """Predicted peak RSS. While streamed block i runs, the window's other slots hold the
        previous block (if the daemon may lag) and blocks opened ahead. On the first pass each
        loading agent may be creating a prepacked kept block: the largest transients are added.
        Paged blocks keep their anonymous remainder throughout, and are opened before the first
        pass runs (`opening_peak`)."""
        keep = set(resident)
        b = self.blocks
        streamed = [i for i in range(self.count) if i not in keep]
        worst = 0
        for pos, i in enumerate(streamed):
            cost = b[i].run_bytes
            ahead = window - 1
            if lag and window >= 2 and pos > 0:
                cost += b[streamed[pos - 1]].run_bytes
                ahead -= 1
            cost += sum(b[j].ahead_bytes for j in streamed[pos + 1 : pos + 1 + ahead])
            worst = max(worst, cost)
        kept = int(sum(b[i].resident_bytes for i in keep) * (1 + self.kept_overhead))
        paged = [i for i in streamed if b[i].paged]
        anon = sum(b[i].paging.anon_bytes for i in paged)
        packed = [i for i in keep if b[i].resident_prepack]
        packed += [i for i in streamed if b[i].stream_prepack and not b[i].paged]
        packing = sorted((b[i].prepack_transient_bytes for i in packed), reverse=True)[:loaders]
        running = self.baseline_bytes + kept + anon + worst + self.activation_bytes + sum(packing)
        return max(running, self.opening_peak(paged))

    def opening_peak(self, paged: list[int]) -> int:
        """Peak RSS while the paged blocks are opened, one at a time, before the first pass (no
        other session open, no activations): each keeps its anonymous remainder, and the one
        being opened holds its opening bytes."""
        if not paged:
            return 0
        costs = [self.blocks[i].paging for i in paged]
        hold = max(c.open_bytes - c.anon_bytes for c in costs)
        return self.baseline_bytes + sum(c.anon_bytes for c in costs) + max(0, hold)

    def latency(
        self, loaders: int, window: int, resident: tuple[int, ...], first_pass: bool, lag: int = 1
    ) -> float:
        """A pass's latency; the first pass also opens the paged blocks, one after another."""
        keep = frozenset(resident)
        times = [
            b.resident_times if i in keep else b.streamed_times for i, b in enumerate(self.blocks)
        ]
        simulated = simulate(times, loaders, window, keep, first_pass, lag)
        if first_pass:
            opening = sum(
                b.paging.open_s for i, b in enumerate(self.blocks) if b.paged and i not in keep
            )
            return simulated + opening + self.first_pass_extra_s
        return simulated * (self.stream_pass_scale if len(keep) < self.count else 1.0)

    @classmethod
    def estimate(
        cls, manifest: Manifest, baseline_bytes: int, warmup_pending: bool = False
    ) -> CostModel:
        """Upper bounds from file sizes (every weight page may become resident); rough times.
        `warmup_pending`: this process has opened no session yet (the first one adds ONNX
        Runtime's code and buffers to the baseline)."""
        sizes = [touched_bytes(manifest, i) for i in range(len(manifest.blocks))]
        # table lookups, and head slices reading their rows of a shared table: pages fault in
        # on demand (reading the shared file ahead would read the whole table)
        sparse = tuple(
            b.kind == BlockKind.PROLOGUE or sizes[i] < b.bytes
            for i, b in enumerate(manifest.blocks)
        )
        # MatMulNBits blocks run only prepacked: packed at ~0.26 GB/s of CPU (docs/design.md §2.7)
        # (a head slice reading its rows of a shared table is sparse for reading, packed to run)
        packed = tuple(
            manifest.packed_weights and b.kind != BlockKind.PROLOGUE for b in manifest.blocks
        )
        if warmup_pending:
            baseline_bytes += ESTIMATE_WARMUP_BYTES
        live = tuple(s + SESSION_OVERHEAD_BYTES for s in sizes)
        times = tuple(
            BlockTimes(
                s / ESTIMATE_BANDWIDTH + (s / ESTIMATE_PACKING if pk else 0.0) + 0.003,
                s / ESTIMATE_COMPUTE,
                s / ESTIMATE_COMPUTE,
                s / ESTIMATE_PACKING if pk else 0.0,
            )
            for s, pk in zip(sizes, packed, strict=True)
        )
        return cls(
            baseline_bytes=baseline_bytes,
            blocks=tuple(
                BlockCost(
                    live_bytes=x,
                    open_bytes=x if pk else SESSION_OVERHEAD_BYTES,
                    resident_bytes=x,
                    mapped_live_bytes=x,
                    resident_prepack=pk,
                    stream_prepack=pk,
                    sparse=sp,
                    stream_times=t,
                    resident_times=t,
                    plain_resident_times=t,
                    paging=estimate_paged(
                        s,
                        ESTIMATE_BANDWIDTH,
                        ESTIMATE_COMPUTE,
                        ESTIMATE_PACKING,
                        SESSION_OVERHEAD_BYTES,
                    )
                    if pk
                    else None,
                )
                for x, s, pk, sp, t in zip(live, sizes, packed, sparse, times, strict=True)
            ),
            # in flight: a block's input and output; its own: as much again, and the reserve
            activation_bytes=4 * output_bytes(manifest) + ACTIVATION_RESERVE_BYTES,
            inflight_bytes=2 * output_bytes(manifest),
            fixed_activation_bytes=ACTIVATION_RESERVE_BYTES,
            source="estimate",
            sample_shape=_sample_of(manifest),
        )

    @classmethod
    def from_profile(
        cls,
        manifest: Manifest,
        profile: Profile,
        baseline_bytes: int,
        cold: bool,
        cached: tuple[bool, ...] | None = None,
        warmup_pending: bool = False,
    ) -> CostModel:
        """Measured costs. `cold`: streamed blocks are re-read from storage every pass (the
        daemon drops their pages). `cached`: per block, whether its files are in the page cache
        now, for the first pass (None: as later passes). `warmup_pending`: this process has
        opened no session yet (the first adds the profile's warm-up bytes and start-up time)."""
        blocks = profile.blocks
        prepack = tuple(b.run_prepack_s < b.run_s * 0.97 for b in blocks)
        sparse = tuple(is_sparse(b) for b in blocks)
        packed = tuple(
            streams_prepacked(b, spec.kind) for b, spec in zip(blocks, manifest.blocks, strict=True)
        )
        now = cached or (None,) * len(blocks)

        def read(b, sparse: bool, from_storage: bool) -> tuple[float, float]:  # (time, CPU)
            if sparse:
                return 0.0, 0.0
            if from_storage:
                return b.readahead_cold_s, b.readahead_cold_cpu_s
            return b.readahead_warm_s, b.readahead_warm_s

        def times(
            b, sp: bool, c: bool | None, create: float, run1: float, run: float, later_cold: bool
        ):
            (t, cpu), first = read(b, sp, later_cold), None
            if c is not None:
                first = read(b, sp, not c)[0] + create
            return BlockTimes(t + create, run1, run, cpu + create, first)

        stream = tuple(
            times(b, sp, c, b.create_prepack_s, b.run_prepack_s, b.run_prepack_s, cold)
            if pk
            else times(b, sp, c, b.create_s, b.first_run_s, b.run_s, cold)
            for b, sp, c, pk in zip(blocks, sparse, now, packed, strict=True)
        )
        plain = tuple(
            times(b, False, c, b.create_s, b.first_run_s, b.run_s, False)
            for b, c in zip(blocks, now, strict=True)
        )
        resident = tuple(
            times(b, False, c, b.create_prepack_s, b.run_prepack_s, b.run_prepack_s, False)
            if p
            else q
            for b, p, q, c in zip(blocks, prepack, plain, now, strict=True)
        )
        acts = activation_model(manifest, profile)
        sample = PassShape(profile.batch_size, profile.sequence_length)
        first_extra = 0.0
        if warmup_pending:
            baseline_bytes += profile.warmup_bytes
            first_extra = profile.first_pass_extra_s
        return cls(
            baseline_bytes=baseline_bytes,
            blocks=tuple(
                BlockCost(
                    live_bytes=b.live_prepack_bytes if pk else b.live_bytes,
                    open_bytes=b.live_prepack_bytes if pk else b.open_bytes,
                    resident_bytes=b.live_prepack_bytes if p else b.live_bytes,
                    mapped_live_bytes=b.live_bytes,
                    resident_prepack=p,
                    stream_prepack=pk,
                    sparse=sp,
                    stream_times=st,
                    resident_times=rt,
                    plain_resident_times=pt,
                    prepack_transient_bytes=b.prepack_transient_bytes,
                    paging=measured_paged(b, profile.read_bandwidth_bytes_per_s, cold)
                    if pk
                    else None,
                )
                for b, p, pk, sp, st, rt, pt in zip(
                    blocks, prepack, packed, sparse, stream, resident, plain, strict=True
                )
            ),
            activation_bytes=acts.bytes_at(sample)
            if acts
            else activation_peak(manifest, profile) + profile.engine_overhead_bytes,
            inflight_bytes=inflight_peak(manifest, profile),
            fixed_activation_bytes=profile.engine_overhead_bytes,
            source="profile",
            activations=acts,
            sample_shape=(profile.batch_size, profile.sequence_length),
            kept_overhead=profile.kept_overhead,
            first_pass_extra_s=first_extra,
            stream_pass_scale=profile.stream_pass_scale,
        )


def is_sparse(b: BlockProfile) -> bool:
    """A block whose run touches less than SPARSE_FRACTION of its files (table lookups)."""
    return b.live_bytes < SPARSE_FRACTION * b.file_bytes


def streams_prepacked(b: BlockProfile, kind: BlockKind) -> bool:
    """Streamed, the block opens prepacked (and can be paged): measured faster created prepacked
    and run than mapped (int4 MatMulNBits), and not a table lookup (never worth packing)."""
    faster = b.create_prepack_s + b.run_prepack_s < 0.97 * (b.create_s + b.first_run_s)
    return faster and not (is_sparse(b) and kind == BlockKind.PROLOGUE)


def within_margin(peak: int) -> int:
    """The budget a plan of this predicted peak needs: the least B with room(B) >= peak."""
    return -(-peak * 1000 // _KEEP_PER_MILLE)


def room(budget: int) -> int:
    """The predicted peak a plan may have under `budget`."""
    return budget * _KEEP_PER_MILLE // 1000


def activation_peak(manifest: Manifest, profile: Profile) -> int:
    """Worst block: its transient bytes plus every tensor still in flight while it runs."""
    last = last_consumers(manifest)
    worst = 0
    for i, block in enumerate(profile.blocks):
        in_flight = sum(
            p.output_bytes
            for j, p in enumerate(profile.blocks[: i + 1])
            if any(last.get(t, -1) >= i for t in manifest.blocks[j].outputs)
        )
        worst = max(worst, block.transient_bytes + in_flight)
    return worst


def activation_model(manifest: Manifest, profile: Profile) -> ActivationModel | None:
    """The measured activation model, where every block of the profile was probed."""
    fits = tuple(fit_points(b.activation_points) for b in profile.blocks)
    if any(f is None for f in fits):
        return None
    last = last_consumers(manifest)
    vocab_sized = [_vocab_sized(manifest, i) for i in range(len(profile.blocks))]
    hidden, vocab = [], []
    for i in range(len(profile.blocks)):
        flying = [
            j for j in range(i + 1) if any(last.get(t, -1) >= i for t in manifest.blocks[j].outputs)
        ]
        hidden.append(sum(profile.blocks[j].output_bytes for j in flying if not vocab_sized[j]))
        vocab.append(sum(profile.blocks[j].output_bytes for j in flying if vocab_sized[j]))
    return ActivationModel(
        sample_rows=profile.batch_size,
        sample_positions=profile.sequence_length,
        fits=fits,
        inflight_hidden=tuple(hidden),
        inflight_vocab=tuple(vocab),
        fixed_bytes=profile.engine_overhead_bytes,
    )


def _vocab_sized(manifest: Manifest, i: int) -> bool:
    """A block whose outputs are logits (a head slice, or the block that makes `logits`)."""
    block = manifest.blocks[i]
    return block.kind == BlockKind.HEAD or "logits" in block.outputs


def touched_bytes(manifest: Manifest, i: int) -> int:
    """The bytes block i reads when it runs: its files', but a head slice reads only its rows of
    a shared table (`manifest.head.bytes`) beside its own small files."""
    block, head = manifest.blocks[i], manifest.head
    if block.kind != BlockKind.HEAD or head is None or block.name not in head.blocks:
        return block.bytes
    if all(block.is_own(f) for f in block.files):  # its weights in its own files: all read
        return block.bytes
    own = sum(f.bytes for f in block.files if block.is_own(f))
    return min(block.bytes, own + head.bytes[head.blocks.index(block.name)])


def _sample_of(manifest: Manifest) -> tuple[int, int]:
    s = manifest.sample
    return int(s.get("batch_size", 1)), int(s.get("sequence_length", 1))


def inflight_peak(manifest: Manifest, profile: Profile) -> int:
    """The most bytes of block outputs still in flight while some block runs."""
    last = last_consumers(manifest)
    return max(
        (
            sum(
                p.output_bytes
                for j, p in enumerate(profile.blocks[: i + 1])
                if any(last.get(t, -1) >= i for t in manifest.blocks[j].outputs)
            )
            for i in range(len(profile.blocks))
        ),
        default=0,
    )


def output_bytes(manifest: Manifest) -> int:
    """Bytes of the model's outputs at the manifest's sample shape."""
    sizes = {"batch_size": 1, **manifest.sample}
    total = 0
    for spec in manifest.outputs:
        count = 1
        for d in spec.shape:
            count *= d if isinstance(d, int) and d > 0 else int(sizes.get(str(d), 1))
        total += count * np.dtype(spec.dtype).itemsize
    return total
