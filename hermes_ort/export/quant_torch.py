"""The PyTorch twin of a quantized export: a torch model's weights replaced, in place, by what
quant_graph.py stores for them, quantized then dequantized (nbits.dequantize).

The weights quant_graph quantizes are those of the MatMuls with constant weights (torch's Linear
and transformers' Conv1D) and of the Gathers of constant tables (nn.Embedding, when embeddings
are quantized); its bits follow the same rule (the LM head and the tables: head_bits), and its
rounding treats each (row, block) alone, so the fused graph's packed QKV holds exactly the
dequantized q, k and v found here."""

from __future__ import annotations

import numpy as np

from hermes_ort.export.nbits import dequantize
from hermes_ort.export.quant_graph import Rounding, quantize_matrix


def fake_quantize(model, r: Rounding) -> None:
    """Every Linear / Conv1D weight (and embedding table) of `model` as the export holds it."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = _head(model)
    head_weight = getattr(head, "weight", None)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    if not r.embeddings and head_weight is not None and id(head_weight) in tables:
        # the blocks quantize the tied head and leave the lookup fp32: untie them here too
        head.weight = torch.nn.Parameter(head_weight.detach().clone(), requires_grad=False)
        head_weight = head.weight
    done: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                if not r.embeddings:
                    continue
                transposed = False
            elif isinstance(module, torch.nn.Linear):
                transposed = False
            elif isinstance(module, Conv1D):
                transposed = True  # [in, out]: the ONNX MatMul's own layout
            else:
                continue
            p = module.weight
            if id(p) in done or p.dim() != 2:
                continue
            done.add(id(p))
            bits, algorithm = r.of(p is head_weight or id(p) in tables)
            p.copy_(_fake(p.detach().float().numpy(), transposed, bits, algorithm, r, p.dtype))


def _head(model):
    """The module writing the model's `logits` (quant_graph's head: the node writing them): found
    by running the model once on a tiny input and matching its output; else the LM head
    transformers names (get_output_embeddings); None for a model without logits."""
    import torch

    named = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    outputs: dict[int, tuple] = {}  # id -> (tensor, module): the tensor kept, its id unique

    def seen(module, args, out) -> None:  # None: the output is left as it is
        outputs.setdefault(id(out), (out, module))

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_hook(seen) for m in linears]
    try:
        with torch.no_grad():
            out = model(**_probe_input(model))
        logits = out.get("logits") if hasattr(out, "get") else None
        if logits is None:
            return None
        return outputs[id(logits)][1] if id(logits) in outputs else named
    except Exception:  # a model this probe cannot feed: the named head
        return named
    finally:
        for h in hooks:
            h.remove()


def _probe_input(model) -> dict:
    import torch

    config = model.config
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = config.image_size
        return {"pixel_values": torch.zeros(1, config.num_channels, size, size)}
    return {"input_ids": torch.tensor([[1, 2, 3]])}


def _fake(w: np.ndarray, transposed: bool, bits: int, algorithm, r: Rounding, dtype):
    import torch

    nk = w.T if transposed else w
    q = quantize_matrix(nk, bits, r.block_size, algorithm)
    if q is None:  # the export keeps it fp32 too
        return torch.from_numpy(w.copy()).to(dtype)
    back = dequantize(q)
    return torch.from_numpy(np.ascontiguousarray(back.T if transposed else back)).to(dtype)
