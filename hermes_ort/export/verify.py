"""Verification: the chained blocks (and the full model file, when kept) against the PyTorch
model, on real text where the model has a tokenizer.

- fp32: every output within a tolerance relative to its scale (max abs diff / max |reference|):
  real logits are tens in size, so an absolute 1e-4 refused exports that equal PyTorch to 5 digits
  of perplexity.
- quantized: against a PyTorch model holding the same quantized-then-dequantized weights (only the
  kernels' int8 activations differ), so a broken graph fails on random and real weights alike;
  quality against fp32 is reported (perplexity and top-1 agreement on the text; cosine), not gated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from hermes_ort.core.manifest import Manifest, TensorSpec
from hermes_ort.export.errors import ExportError
from hermes_ort.export.logs import say
from hermes_ort.tensors.dataflow import Tensors

TOLERANCE_FP32 = 1e-4  # relative: max abs diff / max |reference|, per output
# a quantized model's main output against PyTorch with the same (dequantized) weights: the
# kernels' int8 activations (accuracy level 4) are the only difference. SmolLM2-135M as
# imported from its GGUF loses 6e-4 to 1e-3 of cosine to them; a broken graph (Q/K rows not
# un-permuted, one layer's weight scrambled) 0.03-0.3
SAME_WEIGHTS_COSINE = 0.995
SAMPLE_SEED = 0
SAMPLE_TEXT = Path(__file__).with_name("sample_text.txt")  # real English, package data


def text_ids(model_dir: Path, length: int, high: int | None) -> np.ndarray | None:
    """SAMPLE_TEXT tokenized by the model's own tokenizer (its tokenizer.json in `model_dir`),
    repeated to `length` ids; None without a tokenizer or where an id is past the vocabulary."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(path)).encode(SAMPLE_TEXT.read_text()).ids
    except Exception:  # a tokenizer `tokenizers` cannot load: random ids, as without one
        return None
    if not ids or (high is not None and max(ids) >= high):
        return None
    return np.resize(np.asarray(ids, np.int64), length)


def make_sample(
    inputs: Sequence[TensorSpec],
    sizes: dict[str, int],
    seed: int = SAMPLE_SEED,
    ids: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """A value for every model input, following each input's `sample` description; `ids`
    (real text, [positions]) for `input_ids` where given."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in inputs:
        try:
            shape = tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)
        except KeyError as e:
            raise ExportError(f"input '{spec.name}': no sample size for dim {e}") from None
        dtype = np.dtype(spec.dtype)
        kind = (spec.sample or {}).get("kind", "zeros")
        if spec.name == "input_ids" and ids is not None and len(shape) == 2:
            value = np.broadcast_to(np.resize(ids, shape[1]), shape).astype(dtype)
        elif kind == "randint":
            value = rng.integers(0, spec.sample["high"], size=shape).astype(dtype)
        elif kind == "ones":
            value = np.ones(shape, dtype)
        elif kind == "arange":
            value = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        elif kind == "normal":
            value = rng.standard_normal(shape).astype(dtype)
        else:
            value = np.zeros(shape, dtype)
        feed[spec.name] = value
    return feed


def torch_outputs(
    model: Any, feed: dict[str, np.ndarray], names: Iterable[str]
) -> dict[str, np.ndarray]:
    import torch

    # An empty KV cache is the same as none (transformers wants a Cache object, not arrays).
    kwargs = {
        k: torch.from_numpy(v)
        for k, v in feed.items()
        if not (k.startswith("past_key_values.") and v.size == 0)
    }
    try:
        with torch.no_grad():
            out = model(**kwargs)
        return {name: _output(out, name).detach().numpy().copy() for name in names}
    except (KeyError, TypeError, RuntimeError) as e:
        raise ExportError(f"cannot run the PyTorch model on the sample input: {e!r}") from None


def _output(out: Any, name: str):
    """A named output; `present.i.key/value` are layer i of the returned KV cache."""
    if not name.startswith("present."):
        return out[name]
    _, layer, kind = name.split(".")
    cache = out["past_key_values"]
    if hasattr(cache, "layers"):  # transformers >= 4.56: one entry per layer
        entry = cache.layers[int(layer)]
        return entry.keys if kind == "key" else entry.values
    return cache[int(layer)][0 if kind == "key" else 1]


def session_options(packed: bool = False) -> ort.SessionOptions:
    """No spinning thread pools; fp32 blocks unpacked (weights stay mmapped: fast to open,
    small). `packed`: prepacking on, as the runtime opens MatMulNBits blocks — only the packed
    kernel quantizes activations to int8 (accuracy level 4); unpacked, it computes in fp32 and
    the verification would not see what the runtime runs."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not packed:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def run_blocks(
    model_dir: Path,
    manifest: Manifest,
    feed: dict[str, np.ndarray],
    step: Callable[[str], None] | None = None,
) -> dict[str, np.ndarray]:
    """Chain the blocks one session at a time, routing tensors by name (the runtime's dataflow);
    each intermediate tensor is dropped after its last consumer."""
    tensors = Tensors(manifest, feed)
    for i, block in enumerate(manifest.blocks):
        try:
            session = ort.InferenceSession(
                str(model_dir / block.path),
                session_options(manifest.packed_weights),
                providers=["CPUExecutionProvider"],
            )
            values = session.run(list(block.outputs), tensors.inputs_of(i))
        except Exception as e:  # onnxruntime's Fail/InvalidArgument/... types
            raise ExportError(f"verification failed: block '{block.name}' does not run: {e}") from e
        del session
        tensors.put(i, values)
        if step:
            step(block.name)
    return tensors.outputs()


def run_full(
    model_dir: Path, manifest: Manifest, feed: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    path = model_dir / manifest.full_model.path
    try:
        session = ort.InferenceSession(
            str(path), session_options(manifest.packed_weights), providers=["CPUExecutionProvider"]
        )
        values = session.run(list(manifest.output_names), feed)
    except Exception as e:  # onnxruntime's Fail/InvalidArgument/... types
        raise ExportError(f"verification failed: the full model does not run: {e}") from e
    return dict(zip(manifest.output_names, values, strict=True))


def max_abs_diff(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, float]:
    diffs = {}
    for name, ref in want.items():
        if got[name].shape != ref.shape:
            raise ExportError(
                f"output '{name}': shape {got[name].shape} differs from PyTorch's {ref.shape}"
            )
        diffs[name] = float(np.max(np.abs(got[name].astype(np.float64) - ref))) if ref.size else 0.0
    return diffs


def accuracy(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per output: max abs diff and cosine similarity with the reference; for logits, how often
    the top-1 over the vocabulary agrees."""
    out = {}
    max_abs = max_abs_diff(got, want)
    for name, ref in want.items():
        a, b = got[name].astype(np.float64).reshape(-1), ref.astype(np.float64).reshape(-1)
        norm = float(np.linalg.norm(a) * np.linalg.norm(b))
        record = {"max_abs_diff": max_abs[name], "cosine": float(a @ b / norm) if norm else 1.0}
        if name == "logits":
            record["top1"] = float(np.mean(got[name].argmax(-1) == ref.argmax(-1)))
        out[name] = record
    return out


def relative_diffs(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, float]:
    """Per output: max abs diff / max |reference| (the reference's scale; 1 where it is 0)."""
    diffs = max_abs_diff(got, want)
    out = {}
    for name, ref in want.items():
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        out[name] = diffs[name] / (scale or 1.0)
    return out


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean negative log-likelihood) of ids[1:] under logits[:-1] ([1, T, V], [1, T])."""
    x = logits[0, :-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    log_probs = x - np.log(np.exp(x).sum(-1, keepdims=True))
    targets = ids[0, 1:]
    return float(np.exp(-log_probs[np.arange(len(targets)), targets].mean()))


def quality(got: dict[str, np.ndarray], fp32: dict[str, np.ndarray], main: str, ids) -> dict:
    """What a user judges a quantized model by, against fp32 on the verification text: for
    logits, perplexity (both, and the ratio) and top-1 agreement; else the output's cosine."""
    record = accuracy(got, fp32)[main]
    if main == "logits" and ids is not None:
        ppl, ref = perplexity(got[main], ids), perplexity(fp32[main], ids)
        record.update(perplexity=ppl, perplexity_fp32=ref, perplexity_ratio=ppl / ref)
    return record


@dataclass(frozen=True)
class References:
    """What the exported model is checked against, on one sample (`feed`)."""

    feed: dict[str, np.ndarray]
    fp32: dict[str, np.ndarray]  # PyTorch, the source's own weights
    same_weights: dict[str, np.ndarray] | None = None  # quantized: the dequantized weights
    ids: np.ndarray | None = None  # the sample's token ids when they are real text ([1, T])


def verify_export(
    model_dir: Path,
    manifest: Manifest,
    refs: References,
    tolerance: float,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The chained blocks (and the whole-model file, when the export keeps one) against PyTorch;
    the manifest's `verification` record, or ExportError naming the output past its bound."""
    got = run_blocks(model_dir, manifest, refs.feed, step=progress)
    full = run_full(model_dir, manifest, refs.feed) if manifest.full_model else None
    text = "real text" if refs.ids is not None else "random ids"
    if manifest.quantization:
        return _quantized(manifest, got, full, refs, text)
    record = {"reference": "pytorch", "sample": text, "tolerance_relative": tolerance}
    for what, outputs in (("chained blocks", got), ("full model", full)):
        if outputs is None:
            continue
        rel, absolute = relative_diffs(outputs, refs.fp32), max_abs_diff(outputs, refs.fp32)
        worst = max(rel, key=rel.get)
        say(
            f"verified against PyTorch on {text}: {what} max abs diff {absolute[worst]:.3g} on "
            f"'{worst}', {rel[worst]:.2g} of its scale (tolerance {tolerance:g})"
        )
        if not rel[worst] <= tolerance:
            raise ExportError(
                f"verification failed: {what} differ from PyTorch on output '{worst}' by "
                f"{absolute[worst]:.3g}, {rel[worst]:.3g} of its largest value > tolerance "
                f"{tolerance:g} (--tolerance sets another)"
            )
        key = "blocks" if outputs is got else "full_model"
        record[f"{key}_max_relative_diff"] = rel[worst]
        record[f"{key}_max_abs_diff"] = absolute
    record["max_abs_diff"] = max(record["blocks_max_abs_diff"].values())
    main = manifest.output_names[0]
    if main == "logits" and refs.ids is not None:
        record["perplexity"] = perplexity(got[main], refs.ids)
        record["perplexity_pytorch"] = perplexity(refs.fp32[main], refs.ids)
    return record


def _quantized(manifest: Manifest, got, full, refs: References, text: str) -> dict[str, Any]:
    from hermes_ort.export.quantize import check_accuracy, floor_of

    mode = manifest.quantization["mode"]
    main = manifest.output_names[0]  # logits, last_hidden_state
    report = quality(got, refs.fp32, main, refs.ids)
    record: dict[str, Any] = {"reference": "pytorch", "sample": text, "quantized": mode}
    if refs.same_weights is not None:  # the graph's correctness, tightly
        same = accuracy(got, refs.same_weights)[main]
        record.update(same_weights=same, same_weights_cosine_floor=SAME_WEIGHTS_COSINE)
        check = f"cosine {same['cosine']:.5f} with PyTorch on the same weights"
        if not same["cosine"] >= SAME_WEIGHTS_COSINE:
            raise ExportError(
                f"verification failed: the {mode} model's '{main}' has cosine "
                f"{same['cosine']:.5f} with PyTorch holding the same dequantized weights, below "
                f"{SAME_WEIGHTS_COSINE}: the graph is wrong, not the rounding"
            )
    asked = manifest.quantization.get("accuracy_floor")
    if refs.same_weights is None or asked is not None:  # a floor against fp32: the one asked
        floor = asked or floor_of(manifest.quantization)  # for, or the mode's without a twin
        check_accuracy(mode, report["cosine"], main, floor)
        record["cosine_floor"] = floor
        check = f"cosine {report['cosine']:.5f} with fp32 (floor {floor})"
    if full is not None:
        record["blocks_vs_full_max_abs_diff"] = max(max_abs_diff(got, full).values())
    record["quality"] = report
    record["max_abs_diff"] = report["max_abs_diff"]
    ppl = ""
    if "perplexity_ratio" in report:
        ppl = (
            f"; perplexity on {text} {report['perplexity']:.2f} vs fp32 "
            f"{report['perplexity_fp32']:.2f} ({report['perplexity_ratio']:.3f}x)"
        )
    top1 = f", top-1 agreement {report['top1']:.1%}" if "top1" in report else ""
    say(f"verified ({mode}): '{main}' {check}{ppl}{top1}")
    return record
