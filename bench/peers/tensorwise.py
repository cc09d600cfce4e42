"""`python -m bench.peers.tensorwise PRESET_JSON OUT`: a random-weight checkpoint too large to
build as a torch model on this machine (Llama-2-7B shapes: 27 GB as fp32), written tensor by
tensor into 2 GB safetensors shards in the preset's `tensorwise_dtype`, as a preset is made:
Linear weights N(0, 0.02) plus N(0, 0.02) noise, norms 1 plus the noise."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SHARD_BYTES = 2 << 30


def write(preset: Path, out: Path) -> dict:
    import torch
    import transformers
    from safetensors.torch import save_file

    spec = json.loads(preset.read_text())
    dtype = getattr(torch, spec["tensorwise_dtype"])
    config = getattr(transformers, spec["config_class"])(**spec["config"])
    config.torch_dtype = spec["tensorwise_dtype"]
    config.architectures = [spec["model_class"]]  # llama.cpp's converter reads it
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    with torch.device("meta"):  # shapes only
        model = getattr(transformers, spec["model_class"])(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    index: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(set(index.values())):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator) * 0.02
        base = (
            torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
        )
        shard[key] = (base + noise).to(dtype)
        size += shard[key].numel() * shard[key].element_size()
        if size > SHARD_BYTES:
            flush()
    flush()
    total = sum(torch.Size(s).numel() for s in shapes.values()) * torch.finfo(dtype).bits // 8
    doc = {"metadata": {"total_size": total}, "weight_map": index}
    (out / "model.safetensors.index.json").write_text(json.dumps(doc))
    return {"vocab": config.vocab_size, "tensors": len(shapes), "bytes": total}


if __name__ == "__main__":
    from hermes_ort.measure.fresh_process import child_main

    sys.exit(child_main(lambda argv: write(Path(argv[0]), Path(argv[1]))))
