"""One export, end to end, as a pipeline of stages, each a method named for what it does:

    load -> export_graph -> describe -> reference -> cut -> slice_head -> verify -> finish
    -> (manifest saved)

into a temporary directory that install.py renames into place only once it is complete."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from hermes_ort.core.manifest import FullModelSpec, Manifest, TensorSpec, check_dataflow
from hermes_ort.export.errors import ExportError
from hermes_ort.export.install import install_atomically, remove_tree
from hermes_ort.export.logs import quiet, say
from hermes_ort.export.sources import Source, check_checkpoint_files, open_source, write_tokenizer
from hermes_ort.tensors.kv_cache import dim_sizes

DEFAULT_SEQ_LEN = 128  # the verification sample, where the model has as many positions
GRAPHS = ("auto", "optimum", "fused")
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
    progress: bool = True  # progress lines and bars; False (--quiet): nothing but errors
    quantization: Any = None  # quantize.Quantization, or None: fp32
    graph: str = "auto"  # "optimum" | "fused" (fused.py) | "auto": fused to quantize a Llama
    dtype: str = "auto"  # sources.WeightsDtype: "fp32" dequantizes a GGUF; "auto" keeps its blocks
    # also keep the whole-model files the `full` / `full-mmap` baselines open (full/): by default
    # a model directory holds its blocks only (the weights once)
    full_model: bool = False
    # a causal LM's head as HEAD blocks, each the logits of one vocabulary slice (head.py): a
    # number of slices (1: the head stays in the epilogue), or "auto": as many as keep each
    # slice's weights within the largest layer block's
    head_slices: int | str = "auto"


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


def export_model(opts: ExportOptions) -> ExportResult:
    """Export, cut, verify and atomically install a model directory at `opts.out`."""
    start = time.perf_counter()
    check_options(opts)
    run = _Export(opts)
    with quiet(not opts.progress):
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
    if opts.graph not in GRAPHS:
        raise ExportError(f"--graph {opts.graph}: choose from {', '.join(GRAPHS)}")
    n = opts.head_slices
    if n != "auto" and (type(n) is not int or n < 1):
        raise ExportError(f"--head-slices must be a number >= 1 or auto, got {n!r}")
    if opts.preset is not None:
        from hermes_ort.export.presets import load_preset

        load_preset(opts.preset)  # an unknown name fails before any heavy import
    else:
        from hermes_ort.export.checkpoint import resolve_source

        resolve_source(opts.model)
        check_checkpoint_files(opts.model)
    _check_weights_dtype(opts)


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
        from hermes_ort.export import onnx_export
        from hermes_ort.export.stack import find_layer_stack
        from hermes_ort.export.streaming import streamed_layers

        self.tmp = tmp
        onnx_export.quiet_libraries()
        source = self.load()
        self.check_head_slices(source)
        if self.opts.quantization is not None:
            q = self.opts.quantization.for_model(decoder=source.task.startswith("text-generation"))
            self.opts = replace(self.opts, quantization=q)
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
            quantization=self.opts.quantization.to_json() if self.opts.quantization else None,
        )
        check_dataflow(manifest, "exported manifest")
        manifest = self.quantize_whole(manifest)
        manifest = self.slice_head(manifest)
        manifest = self.verify(manifest, reference, signature)
        manifest = self.finish(manifest, streamed)
        remove_tree(tmp / ".scratch")  # the stages empty their parts of it; the folder goes here
        manifest.save(tmp)
        return manifest

    def load(self) -> Source:
        o = self.opts
        source = open_source(o.preset, o.model, o.task, o.seed, o.streaming)
        if source.task == "text-generation" and o.kv_cache:
            source = replace(source, task="text-generation-with-past")
        self.kept = _kept_gguf(source, o)
        if self.kept is not None:  # the manifest's record; quantize.py then leaves the blocks
            self.opts = replace(o, quantization=self.kept)
        self.lap("load_s")
        return source

    def check_head_slices(self, source: Source) -> None:
        """A number of head slices against the model, before it is exported ("auto" leaves
        what it cannot slice whole)."""
        n = self.opts.head_slices
        if n in (1, "auto"):
            return
        if not _causal(source.task):
            raise ExportError(
                f"--head-slices {n} slices a causal LM's head over its vocabulary; "
                f"'{source.name}' is {source.task}"
            )
        vocab = getattr(source.model.config, "vocab_size", None)
        if vocab is not None and n > vocab:
            raise ExportError(
                f"--head-slices {n} exceeds the vocabulary of '{source.name}' ({vocab} tokens)"
            )

    def describe(self, source: Source) -> int:
        """The verification sample's length: --seq-len, else the default the model can hold."""
        from hermes_ort.export.onnx_export import positions as model_positions

        positions, why = model_positions(source.model)
        wanted = self.opts.seq_len
        if wanted is not None and positions and wanted > positions:
            raise ExportError(
                f"--seq-len {wanted} exceeds the {positions} tokens model '{source.name}' can "
                f"hold ({why}): give --seq-len {positions} or less"
            )
        if wanted is None:
            wanted = min(DEFAULT_SEQ_LEN, positions) if positions else DEFAULT_SEQ_LEN
        return wanted

    def fused(self, source: Source) -> bool:
        """Whether the graph is built by fused.py: asked, or "auto" and a quantized decoder of
        a family it knows (with its KV cache)."""
        from hermes_ort.export.fused import FAMILIES

        family = source.model.config.model_type
        if self.opts.graph == "fused":
            if family not in FAMILIES or not source.task.endswith("-with-past"):
                raise ExportError(
                    f"--graph fused builds {', '.join(FAMILIES)} decoders with their KV cache, "
                    f"not '{family}' ({source.task})"
                )
            return True
        auto = self.opts.graph == "auto" and self.opts.quantization is not None
        return auto and family in FAMILIES and source.task.endswith("-with-past")

    def export_graph(self, source: Source, stack):
        """The whole-model ONNX (optimum's, or the fused graph), the whole-model files, config
        and tokenizer."""
        from hermes_ort.export import onnx_export
        from hermes_ort.export.whole_model import write_full_model

        arch = onnx_export.architecture_name(source.model)
        where = f"{stack.num_layers} x {stack.layer_class} in '{stack.path}'"
        raw_dir = self.tmp / ".scratch" / "raw"
        self.is_fused = self.fused(source)
        if self.opts.streaming and self.opts.quantization and not self.is_fused:
            raise ExportError(
                "--streaming --quantize builds its layers with the fused graph (--graph fused): "
                "llama, mistral and qwen2 decoders"
            )
        if self.is_fused:
            say(f"building the fused graph of {arch} ({source.task}, {where})")
            kept = self.kept is not None
            raw = _fused_graph(
                source,
                raw_dir,
                self.opts.opset,
                packed=source.gguf.weights.packed if kept else None,
            )
        else:
            say(f"exporting {arch} ({source.task}, {where})")
            raw = onnx_export.export_whole_model(
                source.model, source.task, raw_dir, self.opts.opset
            )
        for extra in ("config.json", "generation_config.json"):  # for tokenizers, generation
            if (raw.parent / extra).is_file():
                os.replace(raw.parent / extra, self.tmp / extra)
        if source.checkpoint is not None:
            write_tokenizer(source.checkpoint, self.tmp)
        if source.gguf is not None:
            source.gguf.write_tokenizer(self.tmp)
        self.lap("onnx_export_s")
        whole, files = write_full_model(raw, self.tmp)
        self.lap("full_model_s")
        return whole, files

    def signature(self, source: Source, whole, seq_len: int) -> Signature:
        from hermes_ort.export import onnx_export

        shapes = onnx_export.dummy_input_shapes(source.model, source.task, seq_len)
        vocab = getattr(source.model.config, "vocab_size", None)
        inputs = onnx_export.input_specs(whole.graph, shapes, vocab)
        outputs = onnx_export.output_specs(whole.graph)
        sample = {"batch_size": 1, "sequence_length": seq_len}
        if any("past_sequence_length" in t.shape for t in inputs):
            sample["past_sequence_length"] = 0  # one pass = the prompt pass of generation
        positions, _ = onnx_export.positions(source.model)
        if positions and any("sequence_length" in t.shape for t in inputs):
            sample["max_sequence_length"] = positions
        return Signature(inputs, outputs, sample, seq_len)

    def reference(self, source: Source, signature: Signature):
        """PyTorch's outputs on the verification sample (None with --no-verify): real text in
        the model's own tokenizer where the export has one. Quantized: also PyTorch's with the
        weights quantized and dequantized as the export holds them (where the method says how)."""
        if not self.opts.verify:
            return None
        from hermes_ort.export import verify

        sizes = dim_sizes(signature.sample, 1, signature.seq_len)
        vocab = getattr(source.model.config, "vocab_size", None)
        ids = verify.text_ids(self.tmp, signature.seq_len, vocab)
        feed = verify.make_sample(signature.inputs, sizes, ids=ids)
        names = [o.name for o in signature.outputs]
        fp32 = verify.torch_outputs(source.model, feed, names)
        same = None
        q = self.opts.quantization
        if q is not None and not self.opts.streaming:
            from hermes_ort.export import quantize

            fake = getattr(quantize, "fake_quantize_model", None)
            if fake is not None and fake(source.model, q):  # False: no exact twin for q
                same = verify.torch_outputs(source.model, feed, names)
        text = None if ids is None or "input_ids" not in feed else feed["input_ids"][:1]
        return verify.References(feed, fp32, same, text)

    def cut(self, whole, stack, arch: str):
        from hermes_ort.export.blocks import cut_blocks

        o = self.opts
        return cut_blocks(
            whole, stack, arch, self.tmp, o.layers_per_block, o.progress, self.lap, o.quantization
        )

    def quantize_whole(self, manifest: Manifest) -> Manifest:
        """The whole-model file quantized as the blocks were (same algorithm, same weights), when
        it is kept (--full-model)."""
        if not self.opts.full_model:
            return manifest
        if self.opts.quantization is None or manifest.full_model is None:
            return manifest
        from hermes_ort.export.whole_model import quantize_full_model

        manifest = quantize_full_model(manifest, self.tmp, self.opts.quantization)
        self.lap("quantize_full_s")
        return manifest

    def slice_head(self, manifest: Manifest) -> Manifest:
        """The epilogue's LM head cut into HEAD blocks over the vocabulary (head.py); the
        whole-model files keep theirs. After the GGUF and quantized paths (the head is then
        MatMulNBits), before verification (the sliced blocks are what is checked)."""
        if self.opts.head_slices == 1 or not _causal(manifest.task):
            return manifest
        from hermes_ort.export.head import slice_head

        manifest = slice_head(self.tmp, manifest, self.opts.head_slices)
        self.lap("head_s")
        return manifest

    def verify(self, manifest: Manifest, reference, sig: Signature) -> Manifest:
        if reference is None:
            return manifest
        from hermes_ort.export import verify
        from hermes_ort.export.blocks import progress_bar

        o = self.opts
        tolerance = verify.TOLERANCE_FP32 if o.tolerance is None else o.tolerance
        # the whole-model file is checked only where it is kept (--full-model)
        checked = manifest if o.full_model else replace(manifest, full_model=None)
        with progress_bar(len(manifest.blocks), "verify blocks", o.progress) as bar:
            step = lambda _: bar.update(1)  # noqa: E731
            record = verify.verify_export(self.tmp, checked, reference, tolerance, step)
        self.lap("verify_s")
        return replace(manifest, verification=record)

    def finish(self, manifest: Manifest, streamed) -> Manifest:
        """Streaming: every other layer from the checkpoint (and no whole-model file); else the
        blocks only, or with --full-model the whole model too, its weights inline as well."""
        if streamed is None and not self.opts.full_model:
            remove_tree(self.tmp / "full")  # the graph the blocks were cut from: not shipped
            return replace(manifest, full_model=None, full_model_mmap=None)
        if streamed is None:
            from hermes_ort.export.whole_model import add_inline_full_model

            manifest = add_inline_full_model(manifest, self.tmp)
            self.lap("inline_full_s")
            return manifest
        from hermes_ort.export.streaming import copy_checkpoint_config, expand_fused, expand_layers

        template = manifest
        if self.is_fused:
            manifest = expand_fused(self.tmp, template, streamed, self.opts.quantization)
        else:
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


def _causal(task: str) -> bool:
    """A causal LM's task: the ones whose last block writes `logits` over a vocabulary."""
    return task.startswith("text-generation")


def _check_weights_dtype(opts: ExportOptions) -> None:
    """--dtype against the other options, before torch is imported."""
    from hermes_ort.export.gguf.reader import find_gguf
    from hermes_ort.export.nbits import OFFSET_MIN_OPSET
    from hermes_ort.export.sources import WeightsDtype

    if opts.dtype not in set(WeightsDtype):
        raise ExportError(f"--dtype {opts.dtype}: choose from {', '.join(WeightsDtype)}")
    if opts.dtype == WeightsDtype.FP32 and opts.quantization is not None:
        raise ExportError(
            f"--dtype fp32 keeps every weight float32 and --quantize {opts.quantization.mode} "
            "quantizes them: give one of the two"
        )
    if opts.model is None or find_gguf(opts.model) is None:
        return
    if opts.streaming:
        raise ExportError("--streaming reads safetensors checkpoints, not a GGUF file")
    as_is = opts.dtype == WeightsDtype.AUTO and opts.quantization is None
    if as_is and opts.graph == "optimum":
        raise ExportError(
            "a GGUF's own blocks are kept by the fused graph: --graph optimum needs --dtype fp32 "
            "(or --quantize)"
        )
    if as_is and opts.opset < OFFSET_MIN_OPSET:
        raise ExportError(
            f"a GGUF's own blocks add per-block offsets (Q4_1, K-quants), which need opset >= "
            f"{OFFSET_MIN_OPSET}: --opset {opts.opset} is too old"
        )
    if as_is and not opts.kv_cache:
        raise ExportError(
            "a GGUF's own blocks are kept by the fused graph, which has the KV cache: "
            "--no-kv-cache needs --dtype fp32"
        )


def _kept_gguf(source: Source, opts: ExportOptions):
    """A GGUF exported as is (no --dtype fp32, no --quantize): the record of what is kept
    (gguf.source.KeptQuantization), else None."""
    from hermes_ort.export.sources import WeightsDtype

    if source.gguf is None or opts.quantization is not None or opts.dtype == WeightsDtype.FP32:
        return None
    kept = source.gguf.kept()
    types = ", ".join(f"{k} as {v}" for k, v in kept.types.items())
    say(f"keeping the GGUF's weights as they are: {types}")
    return kept


def _fused_graph(source: Source, raw_dir: Path, opset: int, packed=None) -> Path:
    """fused.py's graph of the source's weights, saved as raw_dir/model.onnx + its data;
    `packed`: the weights kept in MatMulNBits form (a GGUF's own blocks), by name."""
    import json

    from hermes_ort.export.fused import Shape, torch_tensors, whole_model
    from hermes_ort.export.storage import save_with_data

    config = source.model.config.to_dict()
    model = whole_model(Shape.of(config), torch_tensors(source.model), opset, packed)
    raw_dir.mkdir(parents=True, exist_ok=True)
    save_with_data(model, raw_dir / "model.onnx", "model.onnx_data")
    source.model.config.to_json_file(raw_dir / "config.json")
    generation = getattr(source.model, "generation_config", None)
    if generation is not None:
        (raw_dir / "generation_config.json").write_text(json.dumps(generation.to_dict()))
    return raw_dir / "model.onnx"


def _versions(opset: int) -> dict[str, Any]:
    versions: dict[str, Any] = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    versions["onnx_opset"] = opset
    return versions
