"""One export, end to end: load -> whole-model ONNX -> cut -> optimise/store -> verify -> manifest.

Everything is written into a temporary directory next to the output (`.NAME.tmp-PID-XXXX`) that is
renamed into place only once verified; on any failure or interrupt it is removed, and what an
export killed outright left is removed by the next export of the same output.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import glob
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from export.errors import ExportError
from hermes_ort.decoder import dim_sizes
from hermes_ort.manifest import MANIFEST_NAME, BlockSpec, FullModelSpec, Manifest, check_dataflow

DEFAULT_SEQ_LEN = 128
VERSIONED_PACKAGES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime")


@dataclass(frozen=True)
class ExportOptions:
    out: Path
    preset: str | None = None
    model: str | None = None  # local checkpoint directory or hub id
    task: str | None = None  # checkpoints only; default: from the architecture
    layers_per_block: int = 1
    seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0
    opset: int = 17
    force: bool = False
    verify: bool = True
    tolerance: float | None = None  # None: verify.TOLERANCE_FP32
    kv_cache: bool = True  # decoders take and return each layer's past keys/values (generation)
    streaming: bool = False  # --model only: layer by layer from safetensors (export/streaming.py)
    progress: bool = True


@dataclass(frozen=True)
class ExportResult:
    manifest: Manifest
    out: Path
    elapsed_s: float
    stages_s: dict[str, float] = field(default_factory=dict)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export_model(opts: ExportOptions) -> ExportResult:
    """Export, cut, verify and atomically install a model directory at `opts.out`."""
    from export.storage import remove_tree

    start = time.perf_counter()
    _check_options(opts)
    out = Path(opts.out).absolute()
    if opts.model is not None:
        _check_checkpoint_files(opts.model)
    _remove_stale(out)
    _check_out(out, opts.force)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # the pid in the name: a later export can tell the leftovers of a killed one (_remove_stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        manifest, stages = _export_into(tmp, opts)
        _install(tmp, out)
    except BaseException as e:
        _clear_frames(e)
        explained = _explained(e, out) if isinstance(e, (ExportError, OSError)) else e
        if explained is e:
            raise
        raise explained from e
    finally:
        if tmp is not None and tmp.exists():
            remove_tree(tmp)
    return ExportResult(manifest, out, time.perf_counter() - start, stages)


def _clear_frames(e: BaseException) -> None:
    """Drop the locals of the failed stages' frames (of `e` and the errors it chains): they hold
    ORT sessions and mappings of files in the temporary directory, whose disk space would stay
    taken, deleted, for as long as anyone keeps the error."""
    todo, seen = [e], set()
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        todo += [err.__cause__, err.__context__]


DISK_FULL_BYTES = 1 << 20  # less free than this when an export fails: the disk filled up


def _explained(e: ExportError | OSError, out: Path) -> ExportError:
    """The failure as an ExportError; a full disk is named as such, whatever the writer said
    (ORT reports one as "Protobuf serialization failed", optimum as an export failure)."""
    try:
        free = shutil.disk_usage(out.parent).free  # before the temporary directory is removed
    except OSError:
        free = None
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (
        free is not None and free < DISK_FULL_BYTES
    ):
        return ExportError(
            f"no space left on the device holding '{out.parent}' ({free} bytes free) while "
            f"exporting: {e}; nothing was kept"
        )
    if isinstance(e, OSError):
        return ExportError(f"cannot write the export of '{out}': {e}; nothing was kept")
    return e


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: Path) -> None:
    """What an export of `out` that was killed outright (SIGKILL, the OOM killer) left beside it:
    its temporary directory is removed; the previous model it had swapped out is put back if
    nothing replaced it, else removed. Only leftovers of processes that no longer exist."""
    from export.storage import remove_tree

    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*-*"):
        kind, _, rest = path.name[len(out.name) + 2 :].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not (out.exists() or out.is_symlink()):
            os.rename(path, out)
        else:
            remove_tree(path)


def _check_checkpoint_files(ref: str) -> None:
    """A local checkpoint's safetensors files are whole (header, then exactly the data it
    describes): a truncated or damaged file is named before torch is imported."""
    path = Path(ref).expanduser()
    if not path.is_dir():
        return
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if size < 8 or n > size - 8:
                    raise ValueError("its header runs past the end of the file")
                header = json.loads(fh.read(n))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise ExportError(f"checkpoint file '{f}' is damaged: {e}") from None
        if 8 + n + max(ends, default=0) != size:
            raise ExportError(
                f"checkpoint file '{f}' is truncated or damaged: {size} bytes, its header "
                f"describes {8 + n + max(ends, default=0)}"
            )


def _check_options(opts: ExportOptions) -> None:
    if (opts.preset is None) == (opts.model is None):
        raise ExportError("give exactly one of --preset NAME or --model PATH_OR_HUB_ID")
    if opts.layers_per_block < 1:
        raise ExportError(f"--layers-per-block must be >= 1, got {opts.layers_per_block}")
    if opts.seq_len < 1:
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


def _check_out(out: Path, force: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise ExportError(f"'{out}' already exists; pass --force to replace it")
    if (
        not out.is_dir()
        or out.is_symlink()
        or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())
    ):
        raise ExportError(
            f"'{out}' exists and is not a hermes-ort model directory; refusing to replace it"
        )


def _install(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is swapped out first and removed after."""
    from export.storage import remove_tree

    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        remove_tree(old)


def _load_model(opts: ExportOptions) -> tuple[Any, str, str, str, dict[str, Any]]:
    """(torch model, task, family, name, manifest source)."""
    if opts.preset is not None:
        from export.presets import build_random_model, load_preset

        preset = load_preset(opts.preset)
        log(
            f"building preset '{preset.name}' ({preset.model_class}, random weights, seed {opts.seed})"
        )
        model = build_random_model(preset, opts.seed)
        source = {"kind": "preset", "name": preset.name, "seed": opts.seed}
        return model, preset.task, preset.family, preset.name, source
    from export.checkpoint import load_checkpoint, resolve_source

    ref = resolve_source(opts.model)
    log(f"loading checkpoint '{ref}'")
    model, task = load_checkpoint(ref, opts.task)
    local = Path(ref).is_dir()
    source = {"kind": "checkpoint", "path": ref} if local else {"kind": "hub", "name": ref}
    return model, task, model.config.model_type, Path(ref).name, source


def _versions(opset: int) -> dict[str, Any]:
    versions: dict[str, Any] = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    versions["onnx_opset"] = opset
    return versions


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="block", file=sys.stderr, disable=not enabled, leave=False
    )


class _Clock:
    """Seconds spent in each stage, for the summary."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = round(now - self._last, 3)
        self._last = now


def _export_into(tmp: Path, opts: ExportOptions) -> tuple[Manifest, dict[str, float]]:
    from export import onnx_export, verify
    from export.stack import find_layer_stack

    clock = _Clock()
    onnx_export.quiet_libraries()
    streamed = None
    if opts.streaming:
        from export.streaming import load_template

        ref = Path(opts.model)
        log(f"streaming '{ref}': a small template first, then the other layers one by one")
        model, task, num_layers, checkpoint = load_template(ref, opts.task)
        family, name = model.config.model_type, ref.name
        source = {"kind": "checkpoint", "path": str(ref), "streaming": True}
        streamed = (num_layers, checkpoint)
    else:
        model, task, family, name, source = _load_model(opts)
    if task == "text-generation" and opts.kv_cache:
        task = "text-generation-with-past"
    arch = onnx_export.architecture_name(model)
    stack = find_layer_stack(model)  # an uncuttable model fails before the long export
    max_positions = getattr(model.config, "max_position_embeddings", None)  # GPT-2: n_positions
    if max_positions and opts.seq_len > max_positions:
        raise ExportError(f"--seq-len {opts.seq_len} exceeds the model's {max_positions} positions")
    clock.lap("load_s")

    log(f"exporting {arch} ({task}, {stack.num_layers} x {stack.layer_class} in '{stack.path}')")
    scratch = tmp / ".scratch"
    raw = onnx_export.export_whole_model(model, task, scratch / "raw", opts.opset)
    for extra in ("config.json", "generation_config.json"):  # for tokenizers/generation later
        if (raw.parent / extra).is_file():
            os.replace(raw.parent / extra, tmp / extra)
    if source["kind"] != "preset":
        _write_tokenizer(source.get("path") or source["name"], tmp)
    clock.lap("onnx_export_s")
    whole, full_files = _write_full_model(raw, tmp)
    clock.lap("full_model_s")

    shapes = onnx_export.dummy_input_shapes(model, task, opts.seq_len)
    vocab = getattr(model.config, "vocab_size", None)
    inputs = onnx_export.input_specs(whole.graph, shapes, vocab)
    outputs = onnx_export.output_specs(whole.graph)
    sample = {"batch_size": 1, "sequence_length": opts.seq_len}
    if any("past_sequence_length" in t.shape for t in inputs):
        sample["past_sequence_length"] = 0  # one pass = the prompt pass of generation
    if max_positions and any("sequence_length" in t.shape for t in inputs):
        sample["max_sequence_length"] = int(max_positions)
    reference = None
    if opts.verify:
        feed = verify.make_sample(inputs, dim_sizes(sample, 1, opts.seq_len))
        reference = verify.torch_outputs(model, feed, [o.name for o in outputs])
    if streamed is not None:  # the last template layer's parameters, to find in its ONNX block
        prefix = f"{stack.path}.{stack.num_layers - 1}."
        params = {
            k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)
        }
        streamed = (*streamed, stack.path, params)
    del model  # the only reference: free it before the blocks are built
    gc.collect()
    clock.lap("reference_s")

    blocks = _cut_and_store(whole, stack, arch, tmp, opts, clock)
    manifest = Manifest(
        name=name,
        family=family,
        task=task,
        source=source,
        inputs=inputs,
        outputs=outputs,
        blocks=tuple(blocks),
        full_model=FullModelSpec("full/model.onnx", tuple(full_files)),
        sample=sample,
        verification={"skipped": True},
        versions=_versions(opts.opset),
    )
    check_dataflow(manifest, "exported manifest")
    if reference is not None:
        manifest = replace(manifest, verification=_verify(tmp, manifest, reference, opts))
        clock.lap("verify_s")
    if streamed is not None:
        manifest = _expand_streamed(tmp, manifest, streamed, opts)
        clock.lap("streamed_layers_s")
    else:
        manifest = _add_inline_full_model(manifest, tmp)
        clock.lap("inline_full_s")
    manifest.save(tmp)
    return manifest, clock.stages


def _expand_streamed(tmp: Path, template: Manifest, streamed, opts: ExportOptions) -> Manifest:
    """The verified 2-layer template -> every layer, read one at a time from the checkpoint."""
    from export.storage import remove_tree
    from export.streaming import TEMPLATE_LAYERS, copy_checkpoint_config, expand_layers

    num_layers, checkpoint, stack_path, params = streamed
    manifest = expand_layers(tmp, template, num_layers, stack_path, params, checkpoint)
    copy_checkpoint_config(Path(opts.model), tmp)
    remove_tree(tmp / "full")  # the template's whole model: not this model
    note = (
        f"the {TEMPLATE_LAYERS}-layer template verified against PyTorch; layers "
        f"{TEMPLATE_LAYERS}-{num_layers - 1} are its last layer's graph with the checkpoint's tensors"
    )
    return replace(manifest, verification={**template.verification, "streaming": note})


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _write_tokenizer(ref: str, tmp: Path) -> None:
    """The checkpoint's tokenizer as `tokenizer.json` (what the runtime loads with `tokenizers`):
    copied, or saved from transformers' fast tokenizer when the checkpoint has only slow files."""
    import shutil

    local = Path(ref)
    if local.is_dir() and (local / "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            if (local / name).is_file():
                shutil.copyfile(local / name, tmp / name)
        return
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ref)
    except Exception:  # no tokenizer files at all: generate() takes token ids
        log("no tokenizer in the checkpoint: the model takes token ids only")
        return
    if getattr(tokenizer, "is_fast", False):
        tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))


def _write_full_model(raw: Path, tmp: Path):
    """optimum's export as full/model.onnx + aligned data, its tied weights stored once.

    Returns the model (tensors pointing into full/model.onnx_data) and its files."""
    import onnx

    from export.rewrite import tie_transposed_copies
    from export.storage import TensorReader, remove_tree, write_full_model

    whole = onnx.load(str(raw), load_external_data=False)
    reader = TensorReader()
    try:
        tied = tie_transposed_copies(whole.graph, lambda t: reader.read(t, raw.parent))
    finally:
        reader.close()
    if tied:
        log(f"tied weights: dropped the exporter's copies {tied}")
    files = write_full_model(whole, raw.parent, tmp / "full" / "model.onnx", tmp)
    remove_tree(raw.parent)
    return whole, files


INLINE_LIMIT_BYTES = 2_000_000_000  # protobuf's 2 GB: above it optimum writes external data too


def _add_inline_full_model(manifest: Manifest, tmp: Path) -> Manifest:
    """The whole model as users of optimum get it below 2 GB: one .onnx with the weights inside
    (`full` opens it; ORT then copies every weight into the heap). The external-data copy stays
    for `full-mmap`."""
    import onnx

    from export.storage import write_model

    external = manifest.full_model
    if external.bytes >= INLINE_LIMIT_BYTES:
        return replace(manifest, full_model_mmap=external)
    whole = onnx.load(str(tmp / external.path))  # weights loaded into the proto: saved inline
    spec = FullModelSpec(
        "full/model_inline.onnx", (write_model(whole, tmp / "full" / "model_inline.onnx", tmp),)
    )
    return replace(manifest, full_model=spec, full_model_mmap=external)


def _cut_and_store(
    whole, stack, arch: str, tmp: Path, opts: ExportOptions, clock: _Clock
) -> list[BlockSpec]:
    """Plan the blocks, optimise each with ORT, lay them out in blocks/."""
    import onnx

    from export.cut import block_model, plan_blocks, value_types
    from export.rewrite import fuse_transposed_weight_matmuls, remove_dead_nodes
    from export.storage import optimise_block, remove_tree, store_blocks

    whole = onnx.shape_inference.infer_shapes(whole)
    types = value_types(whole)
    fused = fuse_transposed_weight_matmuls(whole.graph)
    if fused:
        log(f"{fused} MatMul(x, Transpose(W)) -> FusedMatMul(x, W, transB=1): W is read in place")
    remove_dead_nodes(whole.graph)
    plans = plan_blocks(whole.graph, stack, opts.layers_per_block, arch)
    clock.lap("cut_s")

    opt_dir = tmp / ".scratch" / "opt"
    opt_dir.mkdir(parents=True)
    optimised = []
    with _progress(len(plans), "optimise blocks", opts.progress) as bar:
        for plan in plans:
            src = tmp / "full" / f".cut-{plan.name}.onnx"  # beside model.onnx_data, its weights
            onnx.save_model(block_model(whole, plan, types), str(src))
            optimise_block(src, opt_dir / f"{plan.name}.onnx")
            src.unlink()
            optimised.append((plan.name, opt_dir / f"{plan.name}.onnx"))
            bar.update(1)
    clock.lap("optimise_s")
    stored = store_blocks(optimised, tmp / "blocks", tmp)
    remove_tree(tmp / ".scratch")
    clock.lap("store_s")

    blocks = []
    for plan, block in zip(plans, stored, strict=True):
        if block.outputs != plan.outputs:
            raise ExportError(
                f"block '{plan.name}': ORT changed its outputs {plan.outputs} -> {block.outputs}"
            )
        blocks.append(
            BlockSpec(
                plan.name,
                plan.kind,
                plan.layers,
                block.path,
                block.inputs,
                block.outputs,
                block.files,
            )
        )
    return blocks


def _verify(tmp: Path, manifest: Manifest, reference: dict, opts: ExportOptions) -> dict[str, Any]:
    from export import verify

    tolerance = verify.TOLERANCE_FP32 if opts.tolerance is None else opts.tolerance
    feed = verify.make_sample(manifest.inputs, dim_sizes(manifest.sample, 1, opts.seq_len))
    with _progress(len(manifest.blocks), "verify blocks", opts.progress) as bar:
        got = verify.run_blocks(tmp, manifest, feed, step=lambda _: bar.update(1))
    diffs = verify.max_abs_diff(got, reference)
    full_diffs = verify.max_abs_diff(verify.run_full(tmp, manifest, feed), reference)
    worst = max(diffs, key=diffs.get)
    worst_full = max(full_diffs, key=full_diffs.get)
    log(
        f"verified against PyTorch: blocks max abs diff {diffs[worst]:.3g} ('{worst}'), "
        f"full model {full_diffs[worst_full]:.3g} (tolerance {tolerance:g})"
    )
    for what, d, key in (("chained blocks", diffs, worst), ("full model", full_diffs, worst_full)):
        if not d[key] <= tolerance:
            raise ExportError(
                f"verification failed: {what} differ from PyTorch on output '{key}' by {d[key]:.3g} "
                f"> tolerance {tolerance:g}"
            )
    return {
        "reference": "pytorch",
        "max_abs_diff": diffs[worst],
        "tolerance": tolerance,
        "outputs_max_abs_diff": diffs,
        "full_model_max_abs_diff": full_diffs[worst_full],
        "sample_seed": verify.SAMPLE_SEED,
    }
