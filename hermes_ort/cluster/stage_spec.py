"""A stage of a model spread over several boards, as data: the contiguous blocks [first, last)
and the tensors it takes and hands on. Its manifest is cut from the whole model's, so the
single-board planner and engine run it as a model of their own (stage_runner.py).

Between stages travel only the tensors later stages read (hidden states, BERT's additive mask),
the model inputs later stages read (input ids, the attention mask), and the model outputs. A
decoder's KV cache never travels: each stage keeps its own layers' cache, per request."""

from __future__ import annotations

from dataclasses import dataclass, replace

from hermes_ort.core.errors import OptionError
from hermes_ort.core.manifest import Manifest, TensorSpec
from hermes_ort.planning.layer_profile import Profile
from hermes_ort.tensors.kv_cache import decoder_signature


@dataclass(frozen=True)
class StageSpec:
    """What stage `index` takes in and hands on, as tensor names."""

    index: int
    first: int  # its first block
    last: int  # one past its last block
    takes: tuple[str, ...]  # from the previous stage (or the caller, for stage 0)
    hands_on: tuple[str, ...]  # to the next stage (or the caller, for the last)
    cache: tuple[tuple[str, str], ...]  # (past input, present output) it keeps per request


def stage_specs(manifest: Manifest, cuts: tuple[int, ...]) -> tuple[StageSpec, ...]:
    """The stages of a split: `cuts` are the first blocks of stages 1.. (stage 0 starts at 0)."""
    n = len(manifest.blocks)
    bounds = (0, *cuts, n)
    if any(b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
        raise OptionError(f"stage cuts {cuts} must rise strictly within the {n} blocks")
    allowed = allowed_cuts(manifest)
    for c in cuts:
        if c not in allowed:
            raise OptionError(
                f"a stage cannot start at block '{manifest.blocks[c].name}': a KV cache slot is "
                f"read on both sides of it (a prologue reads the past length off layer 0's "
                f"cache); cuts allowed: {sorted(allowed)}"
            )
    return tuple(
        stage_spec(manifest, s, first, last)
        for s, (first, last) in enumerate(zip(bounds, bounds[1:], strict=False))
    )


def allowed_cuts(manifest: Manifest) -> frozenset[int]:
    """Blocks a stage may start at: not inside the span of blocks that read one KV cache slot's
    past or make its present (a decoder's prologue reads layer 0's past for the past length; the
    cache of a slot lives on one board, so all of them must be on it)."""
    sig = decoder_signature(manifest)
    spans = []
    for slot in sig.slots if sig else ():
        touch = [
            i
            for i, b in enumerate(manifest.blocks)
            if slot.past in b.inputs or slot.present in b.outputs
        ]
        if touch:
            spans.append((min(touch), max(touch)))
    n = len(manifest.blocks)
    return frozenset(c for c in range(1, n) if not any(lo < c <= hi for lo, hi in spans))


def stage_spec(manifest: Manifest, index: int, first: int, last: int) -> StageSpec:
    """Blocks [first, last) as stage `index`: it takes what earlier stages (or the caller) have
    and it or anything after it reads; it hands on what anything after it, or the caller, reads.
    A decoder's presents stay on the stage (its cache), as do its pasts."""
    sig = decoder_signature(manifest)
    kept = {s.past: s.present for s in sig.slots} if sig else {}
    presents = set(kept.values())
    blocks = manifest.blocks[first:last]
    wanted = {t for t in manifest.output_names if t not in presents}
    later = {t for b in manifest.blocks[last:] for t in b.inputs} | wanted
    reads = {t for b in blocks for t in b.inputs}
    before = [t for t in manifest.input_names if t not in kept]
    before += [t for b in manifest.blocks[:first] for t in b.outputs if t not in presents]
    takes = tuple(dict.fromkeys(t for t in before if t in reads or t in later))
    produced = [t for b in blocks for t in b.outputs]
    hands_on = tuple(dict.fromkeys(t for t in (*takes, *produced) if t in later))
    made = {t for b in blocks for t in b.outputs}
    cache = tuple(
        (p, kept[p]) for p in sorted(reads & set(kept), key=_layer_order) if kept[p] in made
    )
    return StageSpec(index, first, last, takes, hands_on, cache)


def _layer_order(past: str) -> tuple[int, str]:
    _, layer, kind = past.split(".")
    return int(layer), kind


def stage_manifest(manifest: Manifest, spec: StageSpec) -> Manifest:
    """The stage as a model: its blocks; its inputs what it takes plus its cache's pasts; its
    outputs what it hands on plus its cache's presents. Tensors that no manifest describes
    (between blocks) get an empty shape: the caller gives each stage the request's batch shape
    (`StageRunner.run`)."""
    model_inputs = {t.name: t for t in manifest.inputs}
    model_outputs = {t.name: t for t in manifest.outputs}
    pasts = [p for p, _ in spec.cache]

    def described(name: str, known: dict[str, TensorSpec]) -> TensorSpec:
        return known.get(name) or TensorSpec(name, "float32", ())

    return replace(
        manifest,
        name=f"{manifest.name}[stage {spec.index}]",
        blocks=manifest.blocks[spec.first : spec.last],
        inputs=tuple(described(t, model_inputs) for t in (*spec.takes, *pasts)),
        outputs=tuple(
            described(t, model_outputs) for t in (*spec.hands_on, *(p for _, p in spec.cache))
        ),
        full_model=None,
        full_model_mmap=None,
    )


def stage_profile(profile: Profile | None, spec: StageSpec) -> Profile | None:
    return (
        None if profile is None else replace(profile, blocks=profile.blocks[spec.first : spec.last])
    )
