"""The whole-model export (optimum's per-architecture ONNX configs) and the model's signature."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import onnx

from hermes_ort.core.manifest import TensorSpec
from hermes_ort.export.errors import ExportError

DEFAULT_OPSET = 17  # optimum's legacy (TorchScript) exporter keeps module scopes in node names
# optimum's dynamic dims; every other dim gets fixed. A decoder with a KV cache also takes
# past_sequence_length (0 on the prompt pass) and an attention mask over past + new tokens.
DYNAMIC_DIMS = ("batch_size", "sequence_length", "past_sequence_length", "total_sequence_length")
DIM_ALIASES = {"past_sequence_length + sequence_length": "total_sequence_length"}


def quiet_libraries() -> None:
    """Silence the info logs of transformers/optimum during an export."""
    import transformers
    from optimum.utils import logging as optimum_logging

    transformers.logging.set_verbosity_error()
    optimum_logging.set_verbosity_error()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def positions(model: Any) -> tuple[int | None, str]:
    """How many tokens a sequence can hold, and why, from the config's max_position_embeddings
    (GPT-2's n_positions). RoBERTa-style models (XLM-R, CamemBERT, Longformer, ESM, MPNet, ...)
    number positions from padding_idx + 1 (transformers' create_position_ids_from_input_ids): they
    build their position table with that padding index, and lose padding_idx + 1 positions."""
    total = getattr(model.config, "max_position_embeddings", None)
    if not total:
        return None, ""
    for name, module in model.named_modules():
        pad = getattr(module, "padding_idx", None)
        table = getattr(module, "num_embeddings", None) == total
        if name.endswith("position_embeddings") and table and pad is not None:
            why = f"{total} position embeddings, numbered from after the padding index {pad}"
            return total - pad - 1, why
    return int(total), f"{total} position embeddings"


def architecture_name(model: Any) -> str:
    return type(model).__name__


def export_whole_model(model: Any, task: str, out_dir: Path, opset: int = DEFAULT_OPSET) -> Path:
    """optimum's export of the whole model (no validation: we verify the cut blocks ourselves).

    Returns the path of `model.onnx` (with `model.onnx_data` beside it above 2 GB)."""
    from optimum.exporters.onnx import onnx_export_from_model

    arch = architecture_name(model)
    try:
        custom = _config_with_all_outputs(model, task)
        with contextlib.redirect_stdout(None), warnings.catch_warnings(), _keep_tensor_files():
            warnings.simplefilter("ignore")  # tracer and legacy-exporter deprecation warnings
            onnx_export_from_model(
                model,
                out_dir,
                task=task,
                opset=opset,
                do_validation=False,
                # its tied-weight pass fails > 2 GB: rewrite.tie_transposed_copies does it
                no_post_process=True,
                custom_onnx_configs={"model": custom} if custom else None,
            )
    except Exception as e:  # optimum raises ValueError/KeyError/RuntimeError for unsupported models
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
        raise ExportError(
            f"optimum cannot export architecture '{arch}' for task '{task}': {e}{cause}"
        ) from e
    graphs = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*.onnx"))
    if graphs != ["model.onnx"]:
        raise ExportError(
            f"unsupported architecture '{arch}': optimum exported it as {len(graphs)} graphs "
            f"({', '.join(graphs)}); only single-graph models can be cut into blocks"
        )
    return out_dir / "model.onnx"


@contextlib.contextmanager
def _keep_tensor_files():
    """Above 2 GB torch writes one file per tensor and optimum then loads the whole model into
    memory
    (beside the torch model) only to rewrite those tensors into one file. We write that file
    ourselves (storage.write_full_model reads the per-tensor files), so tell optimum there is no
    external data to consolidate. Without the hook (another optimum version), nothing changes."""
    from optimum.exporters.onnx import convert

    if not hasattr(convert, "check_model_uses_external_data"):
        yield
        return
    with mock.patch.object(convert, "check_model_uses_external_data", lambda model: False):
        yield


def onnx_config(model: Any, task: str):
    """optimum's per-architecture ONNX config (input/output names, dynamic axes, dummy inputs)."""
    from optimum.exporters.onnx import main_export  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    constructor = TasksManager.get_exporter_config_constructor(
        exporter="onnx", model=model, task=task, library_name="transformers"
    )
    return constructor(model.config, task=task)


# Fields of a transformers ModelOutput that are not outputs of a block pipeline.
_NOT_OUTPUTS = ("past_key_values", "hidden_states", "attentions", "cross_attentions")


def _config_with_all_outputs(model: Any, task: str):
    """optimum's feature-extraction config exports only `last_hidden_state`; add the model's other
    tensor outputs (BERT's `pooler_output`). None when there is nothing to add."""
    import torch

    if task != "feature-extraction":
        return None
    config = onnx_config(model, task)
    batch, seq = 2, 7
    dummy = config.generate_dummy_inputs(framework="pt", batch_size=batch, sequence_length=seq)
    with torch.no_grad():
        result = model(**dummy)
    known = config.outputs
    extra = {}
    for name, value in result.items():
        if name in known or name in _NOT_OUTPUTS or not isinstance(value, torch.Tensor):
            continue
        axes = {0: "batch_size"} if value.dim() and value.shape[0] == batch else {}
        if value.dim() > 1 and value.shape[1] == seq:
            axes[1] = "sequence_length"
        extra[name] = axes
    if not extra:
        return None
    base = type(config)
    outputs = property(lambda self: {**base.outputs.fget(self), **extra})
    config.__class__ = type(f"{base.__name__}AllOutputs", (base,), {"outputs": outputs})
    return config


def dummy_input_shapes(model: Any, task: str, seq_len: int) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes at batch 1 and `seq_len`, from optimum's dummy input generators (they
    know e.g. a ViT's channels and image size)."""
    dummy = onnx_config(model, task).generate_dummy_inputs(
        framework="np", batch_size=1, sequence_length=seq_len
    )
    return {name: tuple(np.shape(value)) for name, value in dummy.items()}


def _dtype(elem_type: int) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name


def _sample_kind(name: str, dtype: str, vocab_size: int | None) -> dict[str, Any]:
    if name.endswith("input_ids") and vocab_size:
        return {"kind": "randint", "high": int(vocab_size)}
    if name.endswith("attention_mask"):
        return {"kind": "ones"}
    if name.endswith("position_ids"):
        return {"kind": "arange"}
    if np.issubdtype(np.dtype(dtype), np.floating):
        return {"kind": "normal"}
    return {"kind": "zeros"}  # token_type_ids and other integer ids


def input_specs(
    graph: onnx.GraphProto, shapes: dict[str, tuple[int, ...]], vocab_size: int | None
) -> tuple[TensorSpec, ...]:
    """The model inputs: batch/sequence dims stay symbolic, every other dim is fixed to the value
    of optimum's dummy input (so a ViT's pixel_values are [batch_size, 3, 224, 224])."""
    init_names = {t.name for t in graph.initializer}
    specs = []
    for value in graph.input:
        if value.name in init_names:
            continue
        ttype = value.type.tensor_type
        dims: list[int | str] = []
        for axis, dim in enumerate(ttype.shape.dim):
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            elif dim.dim_param in DYNAMIC_DIMS:
                dims.append(dim.dim_param)
            elif dim.dim_param in DIM_ALIASES:
                dims.append(DIM_ALIASES[dim.dim_param])
            elif value.name in shapes:
                dims.append(int(shapes[value.name][axis]))
            else:
                raise ExportError(f"input '{value.name}': no size known for dim '{dim.dim_param}'")
        dtype = _dtype(ttype.elem_type)
        specs.append(
            TensorSpec(value.name, dtype, tuple(dims), _sample_kind(value.name, dtype, vocab_size))
        )
    return tuple(specs)


def output_specs(graph: onnx.GraphProto) -> tuple[TensorSpec, ...]:
    specs = []
    for value in graph.output:
        ttype = value.type.tensor_type
        dims = tuple(
            int(d.dim_value)
            if d.HasField("dim_value")
            else DIM_ALIASES.get(d.dim_param, d.dim_param or f"{value.name}_dim{i}")
            for i, d in enumerate(ttype.shape.dim)
        )
        specs.append(TensorSpec(value.name, _dtype(ttype.elem_type), dims))
    return tuple(specs)
