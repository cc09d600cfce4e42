"""One export, end to end, as a pipeline of stages, each a method named for what it does:

    load -> export_graph -> describe -> reference -> cut -> verify -> finish -> (manifest saved)

into a temporary directory that install.py renames into place only once it is complete."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from export.errors import ExportError
from export.install import install_atomically, remove_tree
from export.sources import Source, check_checkpoint_files, open_source, write_tokenizer
from hermes_ort.decoder import dim_sizes
from hermes_ort.manifest import FullModelSpec, Manifest, TensorSpec, check_dataflow

DEFAULT_SEQ_LEN = 128  # the verification sample, where the model has as many positions
VERSIONED_PACKAGES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime")


@dataclass(frozen=True)
class ExportOptions:
    out: Path
    preset: str | None = None
    model: str | None = None  # local checkpoint directory or hub id
    task: str | None = None  # checkpoints only; default: from the architecture
    layers_per_block: int = 1
    seq_len: int | None = None  # None: DEFAULT_SEQ_LEN, or the model's positions if fewer
    seed: int = 0
    opset: int = 17
    force: bool = False
    verify: bool = True
    tolerance: float | None = None  # None: verify.TOLERANCE_FP32
    kv_cache: bool = True  # decoders take and return each layer's past keys/values (generation)
    streaming: bool = False  # --model only: layer by layer from safetensors (streaming.py)
    progress: bool = True


@dataclass(frozen=True)
class ExportResult:
    manifest: Manifest
    out: Path
    elapsed_s: float
    stages_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Signature:
    """The model's inputs and outputs as the manifest states them, and its verification sample."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sample: dict[str, Any]
    seq_len: int


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export_model(opts: ExportOptions) -> ExportResult:
    """Export, cut, verify and atomically install a model directory at `opts.out`."""
    start = time.perf_counter()
    check_options(opts)
    run = _Export(opts)
    manifest = install_atomically(Path(opts.out), opts.force, run.into)
    return ExportResult(manifest, Path(opts.out).absolute(), time.perf_counter() - start, run.laps)


def check_options(opts: ExportOptions) -> None:
    """Everything that can be refused before torch is imported."""
    if (opts.preset is None) == (opts.model is None):
        raise ExportError("give exactly one of --preset NAME or --model PATH_OR_HUB_ID")
    if opts.layers_per_block < 1:
        raise ExportError(f"--layers-per-block must be >= 1, got {opts.layers_per_block}")
    if opts.seq_len is not None and opts.seq_len < 1:
        raise ExportError(f"--seq-len must be >= 1, got {opts.seq_len}")
    if opts.streaming and (opts.model is None or not Path(opts.model).is_dir()):
        raise ExportError("--streaming exports a local checkpoint directory (--model PATH)")
    if opts.streaming and opts.layers_per_block != 1:
        raise ExportError("--streaming exports one layer per block")
    if opts.preset is not None and opts.task is not None:
        raise ExportError("--task applies to --model only (a preset names its task)")
    if opts.preset is not None:
        from export.presets import load_preset

        load_preset(opts.preset)  # an unknown name fails before any heavy import
    else:
        from export.checkpoint import resolve_source

        resolve_source(opts.model)
        check_checkpoint_files(opts.model)


class _Export:
    """The stages of one export into `tmp`, with the seconds each took (`laps`)."""

    def __init__(self, opts: ExportOptions):
        self.opts = opts
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self._last, 3)
        self._last = now

    def into(self, tmp: Path) -> Manifest:
        from export import onnx_export
        from export.stack import find_layer_stack
        from export.streaming import streamed_layers

        self.tmp = tmp
        onnx_export.quiet_libraries()
        source = self.load()
        stack = find_layer_stack(source.model)  # an uncuttable model fails before the export
        signature = self.describe(source)
        whole, full_files = self.export_graph(source, stack)
        signature = self.signature(source, whole, signature)
        reference = self.reference(source, signature)
        streamed = streamed_layers(source.template, stack.path) if source.template else None
        arch = onnx_export.architecture_name(source.model)
        identity = (source.name, source.family, source.task, source.record)
        del source  # the only reference to the torch model: free it before the blocks are built
        gc.collect()
        self.lap("reference_s")
        blocks = self.cut(whole, stack, arch)
        name, family, task, record = identity
        manifest = Manifest(
            name=name,
            family=family,
            task=task,
            source=record,
            inputs=signature.inputs,
            outputs=signature.outputs,
            blocks=tuple(blocks),
            full_model=FullModelSpec("full/model.onnx", tuple(full_files)),
            sample=signature.sample,
            verification={"skipped": True},
            versions=_versions(self.opts.opset),
        )
        check_dataflow(manifest, "exported manifest")
        manifest = self.verify(manifest, reference, signature)
        manifest = self.finish(manifest, streamed)
        manifest.save(tmp)
        return manifest

    def load(self) -> Source:
        o = self.opts
        source = open_source(o.preset, o.model, o.task, o.seed, o.streaming)
        if source.task == "text-generation" and o.kv_cache:
            source = replace(source, task="text-generation-with-past")
        self.lap("load_s")
        return source

    def describe(self, source: Source) -> int:
        """The verification sample's length: --seq-len, else the default the model can hold."""
        config = source.model.config
        positions = getattr(config, "max_position_embeddings", None)  # GPT-2: n_positions too
        wanted = self.opts.seq_len
        if wanted is not None and positions and wanted > positions:
            raise ExportError(f"--seq-len {wanted} exceeds the model's {positions} positions")
        if wanted is None:
            wanted = min(DEFAULT_SEQ_LEN, positions) if positions else DEFAULT_SEQ_LEN
        return wanted

    def export_graph(self, source: Source, stack):
        """optimum's whole-model ONNX, the whole-model files, config and tokenizer."""
        from export import onnx_export
        from export.whole_model import write_full_model

        arch = onnx_export.architecture_name(source.model)
        where = f"{stack.num_layers} x {stack.layer_class} in '{stack.path}'"
        log(f"exporting {arch} ({source.task}, {where})")
        raw = onnx_export.export_whole_model(
            source.model, source.task, self.tmp / ".scratch" / "raw", self.opts.opset
        )
        for extra in ("config.json", "generation_config.json"):  # for tokenizers, generation
            if (raw.parent / extra).is_file():
                os.replace(raw.parent / extra, self.tmp / extra)
        if source.checkpoint is not None:
            write_tokenizer(source.checkpoint, self.tmp)
        self.lap("onnx_export_s")
        whole, files = write_full_model(raw, self.tmp)
        self.lap("full_model_s")
        return whole, files

    def signature(self, source: Source, whole, seq_len: int) -> Signature:
        from export import onnx_export

        shapes = onnx_export.dummy_input_shapes(source.model, source.task, seq_len)
        vocab = getattr(source.model.config, "vocab_size", None)
        inputs = onnx_export.input_specs(whole.graph, shapes, vocab)
        outputs = onnx_export.output_specs(whole.graph)
        sample = {"batch_size": 1, "sequence_length": seq_len}
        if any("past_sequence_length" in t.shape for t in inputs):
            sample["past_sequence_length"] = 0  # one pass = the prompt pass of generation
        positions = getattr(source.model.config, "max_position_embeddings", None)
        if positions and any("sequence_length" in t.shape for t in inputs):
            sample["max_sequence_length"] = int(positions)
        return Signature(inputs, outputs, sample, seq_len)

    def reference(self, source: Source, signature: Signature) -> dict | None:
        """PyTorch's outputs on the verification sample (None with --no-verify)."""
        if not self.opts.verify:
            return None
        from export import verify

        sizes = dim_sizes(signature.sample, 1, signature.seq_len)
        feed = verify.make_sample(signature.inputs, sizes)
        return verify.torch_outputs(source.model, feed, [o.name for o in signature.outputs])

    def cut(self, whole, stack, arch: str):
        from export.blocks import cut_blocks

        o = self.opts
        return cut_blocks(whole, stack, arch, self.tmp, o.layers_per_block, o.progress, self.lap)

    def verify(self, manifest: Manifest, reference: dict | None, sig: Signature) -> Manifest:
        if reference is None:
            return manifest
        from export import verify
        from export.blocks import verify_blocks

        o = self.opts
        tolerance = verify.TOLERANCE_FP32 if o.tolerance is None else o.tolerance
        record = verify_blocks(self.tmp, manifest, reference, sig.seq_len, tolerance, o.progress)
        self.lap("verify_s")
        return replace(manifest, verification=record)

    def finish(self, manifest: Manifest, streamed) -> Manifest:
        """Streaming: every other layer from the checkpoint (and no whole-model file); else the
        whole model with its weights inline too."""
        if streamed is None:
            from export.whole_model import add_inline_full_model

            manifest = add_inline_full_model(manifest, self.tmp)
            self.lap("inline_full_s")
            return manifest
        from export.streaming import copy_checkpoint_config, expand_layers

        template = manifest
        manifest = expand_layers(self.tmp, template, streamed)
        copy_checkpoint_config(Path(self.opts.model), self.tmp)
        remove_tree(self.tmp / "full")  # the template's whole model: not this model
        t, n = streamed.layers, streamed.num_layers
        note = (
            f"the {t}-layer template verified against PyTorch; layers {t}-{n - 1} are its "
            f"last layer's graph with the checkpoint's tensors"
        )
        self.lap("streamed_layers_s")
        return replace(manifest, verification={**template.verification, "streaming": note})


def _versions(opset: int) -> dict[str, Any]:
    versions: dict[str, Any] = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    versions["onnx_opset"] = opset
    return versions
