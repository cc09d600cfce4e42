"""Build, on x86-64, what the emulated aarch64 board checks (`make test-arm`).

    .venv/bin/python arm/make_fixtures.py OUT_DIR

OUT_DIR/
  models/NAME/            tiny-bert, tiny-vit, tiny-gpt2, tiny-llama-int4, tiny-bert-int8 (exported
                          here), toy (tests/toy_model.py)
  models/NAME.inputs.npz  sample inputs (batch 2, padded where the model has an attention_mask)
  models/NAME.full-x86.npz  the x86-64 `full` outputs for them: the board's reference
  toy/KEY/, toy/KEY.weights.npz  every toy variant the tests build (the board has no `onnx`)
  fixtures.json           host versions, budget refusals on x86, the ops the blocks use

Rebuilt only when a source it depends on changes (the fingerprint in fixtures.json).
"""

from __future__ import annotations

import ast
import hashlib
import json
import platform
import re
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

PRESETS = {  # fixture name -> export arguments
    "tiny-bert": ["--preset", "tiny-bert"],
    "tiny-vit": ["--preset", "tiny-vit"],
    "tiny-gpt2": ["--preset", "tiny-gpt2"],
    # quantized blocks: which kernels run on the Cortex-A72 (no dot product: MatMulNBits' int8
    # activations fall back to fp32 compute) and how far they land from x86-64's
    "tiny-llama-int4": ["--preset", "tiny-llama", "--quantize", "int4", "--quant-block-size", "16"],
    "tiny-bert-int8": ["--preset", "tiny-bert", "--quantize", "int8"],
}
TOY_DEFAULTS = {"layers": 4, "hidden": 32, "vocab": 50, "seed": 0}  # write_toy_model's defaults
TOO_SMALL_BUDGET = "1MB"
BATCH, SEQ = 2, 16
# contrib ops / domains only x86 builds of ONNX Runtime have (ORT_ENABLE_ALL layout transforms)
X86_ONLY_DOMAINS = ("com.microsoft.nchwc",)
X86_ONLY_OPS = ("ReorderInput", "ReorderOutput", "NchwcConv", "NchwcMaxPool", "NchwcAveragePool")
SIZE_PATTERN = (
    r"(?<!\w)\d+(\.\d+)?"  # sizes in a refusal message; keeps block names like 'layer_01'
)


def fingerprint() -> str:
    """Hash of every source the fixtures depend on, plus the host's package versions."""
    from importlib.metadata import version

    h = hashlib.sha256(" ".join(version(p) for p in ("onnxruntime", "torch", "onnx")).encode())
    files = [
        *sorted((REPO / "hermes_ort").rglob("*.py")),  # the exporter (hermes_ort/export) too
        *sorted((REPO / "tests").rglob("*.py")),
        *sorted((REPO / "hermes_ort/presets").glob("tiny-*.json")),
        Path(__file__),
    ]
    for path in files:
        h.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def toy_key(layers: int, hidden: int, vocab: int, seed: int) -> str:
    return f"toy-L{layers}-H{hidden}-V{vocab}-S{seed}"


def toy_variants() -> list[dict]:
    """Every `write_toy_model(...)` call in tests/ with literal keyword arguments, and the
    default."""
    found = [dict(TOY_DEFAULTS)]
    for path in sorted((REPO / "tests").rglob("*.py")):
        try:
            tree = ast.parse(path.read_text())
        except SyntaxError as e:
            print(f"make_fixtures: skipping {path}: {e}", file=sys.stderr)
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "write_toy_model":
                args = dict(TOY_DEFAULTS)
                try:
                    for i, value in enumerate(node.args[1:]):  # positional after `out`
                        args[list(TOY_DEFAULTS)[i]] = ast.literal_eval(value)
                    for kw in node.keywords:
                        if kw.arg in TOY_DEFAULTS:
                            args[kw.arg] = ast.literal_eval(kw.value)
                except ValueError:
                    print(
                        f"make_fixtures: {path}:{node.lineno}: write_toy_model(...) with "
                        "non-literal arguments is not prebuilt",
                        file=sys.stderr,
                    )
                    continue
                if args not in found:
                    found.append(args)
    return found


def write_toys(out: Path) -> None:
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from toy_model import write_toy_model

    for args in toy_variants():
        model_dir = write_toy_model(out / toy_key(**args), **args)
        full = onnx.load(str(model_dir / "full/model.onnx"))
        weights = {
            t.name: numpy_helper.to_array(t, base_dir=str(model_dir / "full"))
            for t in full.graph.initializer
        }
        np.savez(out / f"{toy_key(**args)}.weights.npz", **weights)


def export_presets(models: Path) -> None:
    from hermes_ort.export.cli import main as export_main  # what `python -m hermes_ort.export` runs

    for name, args in PRESETS.items():
        t0 = time.perf_counter()
        code = export_main([*args, "--out", str(models / name), "--quiet", "--full-model"])
        if code:
            sys.exit(f"make_fixtures: exporting {name} failed (exit {code})")
        print(f"  exported {name} in {time.perf_counter() - t0:.1f} s", flush=True)


def feeds_for(model) -> dict:
    feeds = model.sample_inputs(batch_size=BATCH, sequence_length=SEQ, seed=1)
    if "attention_mask" in feeds and feeds["attention_mask"].ndim == 2:
        feeds["attention_mask"][1, SEQ // 2 :] = 0  # padding: the routed mask matters
    return feeds


def normalise(message: str) -> str:
    """A refusal message with its sizes blanked: the baseline RSS differs between machines."""
    return re.sub(SIZE_PATTERN, "N", message)


def reference(models: Path) -> dict:
    """Sample inputs, x86 `full` outputs, and how a too-small budget is refused, per model."""
    import numpy as np

    import hermes_ort

    records = {}
    for model_dir in sorted(p for p in models.iterdir() if p.is_dir()):
        name = model_dir.name
        with hermes_ort.load(model_dir, strategy="full") as model:
            feeds = feeds_for(model)
            outputs = model.run(feeds)
        np.savez(models / f"{name}.inputs.npz", **feeds)
        np.savez(models / f"{name}.full-x86.npz", **outputs)
        refusals = {}
        for strategy in hermes_ort.STRATEGIES:
            try:
                hermes_ort.load(
                    model_dir, memory_budget=TOO_SMALL_BUDGET, strategy=strategy
                ).close()
                refusals[strategy] = None
            except hermes_ort.BudgetError as e:
                refusals[strategy] = normalise(str(e))
        records[name] = {"outputs": sorted(outputs), "budget_refusals": refusals}
    return records


def block_ops(models: Path) -> dict:
    """domain -> sorted op types, over every block graph of every model (read with `onnx`)."""
    import onnx

    ops: dict[str, dict[str, list[str]]] = {}
    for path in sorted(models.glob("*/blocks/*.onnx")):
        graph = onnx.load(str(path), load_external_data=False).graph
        per = ops.setdefault(path.parent.parent.name, {})
        for node in graph.node:
            per.setdefault(node.domain or "ai.onnx", [])
            if node.op_type not in per[node.domain or "ai.onnx"]:
                per[node.domain or "ai.onnx"].append(node.op_type)
    return {m: {d: sorted(v) for d, v in sorted(per.items())} for m, per in ops.items()}


def x86_only(ops: dict) -> list[str]:
    return sorted(
        f"{model}: {domain}.{op}"
        for model, per in ops.items()
        for domain, names in per.items()
        for op in names
        if domain in X86_ONLY_DOMAINS or op in X86_ONLY_OPS
    )


def build(out: Path) -> dict:
    import numpy as np
    import onnxruntime

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "models").mkdir(parents=True)
    (tmp / "toy").mkdir()
    write_toys(tmp / "toy")
    shutil.copytree(tmp / "toy" / toy_key(**TOY_DEFAULTS), tmp / "models" / "toy")
    export_presets(tmp / "models")
    models = reference(tmp / "models")
    ops = block_ops(tmp / "models")
    info = {
        "fingerprint": fingerprint(),
        "host": {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
        },
        "batch_size": BATCH,
        "sequence_length": SEQ,
        "too_small_budget": TOO_SMALL_BUDGET,
        "size_pattern": SIZE_PATTERN,
        "models": models,
        "block_ops": ops,
        "x86_only_ops": x86_only(ops),
        "toy_variants": [toy_key(**a) for a in toy_variants()],
    }
    (tmp / "fixtures.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()
    done = out / "fixtures.json"
    if done.exists() and json.loads(done.read_text()).get("fingerprint") == fingerprint():
        info = json.loads(done.read_text())
        print(f"fixtures up to date in {out}")
    else:
        t0 = time.perf_counter()
        info = build(out)
        print(f"fixtures built in {out} in {time.perf_counter() - t0:.1f} s")
    print(f"  models: {', '.join(info['models'])}; toy variants: {', '.join(info['toy_variants'])}")
    for model, per in info["block_ops"].items():
        contrib = {d: v for d, v in per.items() if d != "ai.onnx"}
        print(
            f"  {model} block ops: {sum(len(v) for v in per.values())} types; "
            f"non-standard: {json.dumps(contrib) if contrib else 'none'}"
        )
    if info["x86_only_ops"]:
        print(f"make_fixtures: x86-only ops in the blocks: {info['x86_only_ops']}", file=sys.stderr)
        return 1
    print("  x86-only ops in the blocks: none")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
