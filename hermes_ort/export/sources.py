"""Where an export's model comes from, as one typed Source: a named preset (random weights), a local
checkpoint directory, a hub id (where a network exists), a GGUF file (gguf/), or, streaming, a small
template of a local checkpoint whose other layers are read one at a time later (streaming.py)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermes_ort.core.choices import Choice
from hermes_ort.export.errors import ExportError
from hermes_ort.export.logs import say

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",  # its chat_template, special tokens
    "special_tokens_map.json",
    "chat_template.jinja",  # a chat template saved on its own (transformers >= 4.50)
)
# sentence-transformers' description of an embedding model: its modules (pooling, normalize) and
# how texts are cut; each module's own config.json (1_Pooling/config.json) is copied too
SENTENCE_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


class WeightsDtype(Choice):
    """--dtype: what a checkpoint's weights become in the blocks."""

    AUTO = "auto"  # as the checkpoint holds them: a GGUF's own blocks kept, else float32
    FP32 = "fp32"  # every weight float32 (a GGUF's dequantized)


@dataclass(frozen=True)
class Source:
    model: Any  # the torch model to export (streaming: the template)
    task: str  # optimum's task name, without "-with-past"
    family: str  # the config's model_type
    name: str
    record: dict[str, Any]  # the manifest's "source"
    checkpoint: str | None = None  # a checkpoint directory or hub id (tokenizer, config files)
    template: Any = None  # streaming.Template: the checkpoint the other layers are read from
    gguf: Any = None  # gguf.source.GGUFModel: a GGUF's own blocks and tokenizer (--model X.gguf)


def open_source(
    preset: str | None, model: str | None, task: str | None, seed: int, streaming: bool
) -> Source:
    """Load the model an export starts from."""
    if streaming:
        from hermes_ort.export.streaming import load_template

        ref = Path(model)
        say(f"streaming '{ref}': a small template first, then the other layers one by one")
        template = load_template(ref, task)
        record = {"kind": "checkpoint", "path": str(ref), "streaming": True}
        family = template.model.config.model_type
        return Source(template.model, template.task, family, ref.name, record, str(ref), template)
    if preset is not None:
        from hermes_ort.export.presets import build_random_model, load_preset

        spec = load_preset(preset)
        say(f"building preset '{spec.name}' ({spec.model_class}, random weights, seed {seed})")
        record = {"kind": "preset", "name": spec.name, "seed": seed}
        return Source(build_random_model(spec, seed), spec.task, spec.family, spec.name, record)
    from hermes_ort.export.checkpoint import load_checkpoint, resolve_source
    from hermes_ort.export.gguf.reader import find_gguf

    ref = resolve_source(model)
    gguf = find_gguf(ref)
    if gguf is not None:
        from hermes_ort.export.gguf.source import open_gguf_source

        torch_model, arch, record, kept = open_gguf_source(gguf)
        return Source(torch_model, "text-generation", arch, gguf.stem, record, gguf=kept)
    say(f"loading checkpoint '{ref}'")
    torch_model, task = load_checkpoint(ref, task)
    local = Path(ref).is_dir()
    record = {"kind": "checkpoint", "path": ref} if local else {"kind": "hub", "name": ref}
    return Source(torch_model, task, torch_model.config.model_type, Path(ref).name, record, ref)


def check_checkpoint_files(ref: str) -> None:
    """A local checkpoint's safetensors files (or its GGUF file) are whole (header, then exactly
    the data it describes): a truncated or damaged file is named before torch is imported."""
    from hermes_ort.export.gguf.reader import find_gguf, open_gguf

    gguf = find_gguf(ref)
    if gguf is not None:
        open_gguf(gguf)
        return
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
        described = 8 + n + max(ends, default=0)
        if described != size:
            raise ExportError(
                f"checkpoint file '{f}' is truncated or damaged: {size} bytes, its header "
                f"describes {described}"
            )


def write_tokenizer(ref: str, out: Path) -> None:
    """The checkpoint's tokenizer as `tokenizer.json` (what the runtime loads with `tokenizers`):
    copied, or saved from transformers' fast tokenizer when the checkpoint has only slow files;
    with its configuration (chat template) and sentence-transformers' files."""
    local = Path(ref)
    if local.is_dir():  # the configs (chat template, special tokens) beside slow files too
        write_sentence_files(local, out)
        for name in TOKENIZER_FILES:
            if (local / name).is_file():
                shutil.copyfile(local / name, out / name)
        if (local / "tokenizer.json").is_file():
            return
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ref)
    except Exception:  # no tokenizer files at all: generate() takes token ids
        say("no tokenizer in the checkpoint: the model takes token ids only")
        return
    if getattr(tokenizer, "is_fast", False):
        tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))


def write_sentence_files(local: Path, out: Path) -> None:
    """A sentence-transformers checkpoint's files (the runtime's `embed` pools as they say)."""
    for name in SENTENCE_FILES:
        if (local / name).is_file():
            shutil.copyfile(local / name, out / name)
    try:
        modules = json.loads((local / "modules.json").read_text())
        paths = [m.get("path") for m in modules if isinstance(m, dict)]
    except (OSError, ValueError, TypeError):  # none, or not a list: the runtime says so
        return
    for path in paths:
        config = local / str(path or "") / "config.json"
        if path and config.is_file() and local.resolve() in config.resolve().parents:
            (out / path).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(config, out / path / "config.json")
