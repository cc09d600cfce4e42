"""Load a Hugging Face checkpoint: a local directory (config.json + weights) or a hub id."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hermes_ort.export.errors import ExportError

HUB_TIMEOUT_S = 3.0


def hub_reachable(timeout_s: float = HUB_TIMEOUT_S) -> bool:
    """False when HF_HUB_OFFLINE is set or huggingface.co does not answer within `timeout_s`
    (DNS included: the probe runs in a daemon thread, so a hanging resolver cannot hang us)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def _looks_like_path(ref: str) -> bool:
    # hub ids are "name" or "org/name"
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref


def resolve_source(ref: str) -> str:
    """A local checkpoint directory, a GGUF file (or a directory holding one and no config.json),
    or a hub id when the hub can be reached; else ExportError."""
    from hermes_ort.export.gguf.reader import find_gguf

    gguf = find_gguf(ref)
    if gguf is not None:
        return str(gguf)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ExportError(
                f"'{ref}' has no config.json: not a Hugging Face checkpoint directory"
            )
        return str(path.resolve())
    if path.exists():
        raise ExportError(
            f"checkpoint '{ref}' is a file; expected a directory with config.json or a .gguf file"
        )
    if _looks_like_path(ref):
        raise ExportError(f"checkpoint directory '{ref}' not found")
    if not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # nothing below may try the network and hang
        raise ExportError(
            f"checkpoint directory '{ref}' not found (and the hub is unreachable / offline, "
            f"so it cannot be downloaded as a hub id)"
        )
    return ref


def infer_task(model_cls) -> str | None:
    """The export task of a transformers model class, as optimum names it: found in optimum's
    task -> {model type: class} tables. optimum's own inference misses classes listed in a tuple
    there (DeiT's image classification: DeiTForImageClassification and ...WithTeacher)."""
    from optimum.exporters.tasks import TasksManager

    try:
        return TasksManager.infer_task_from_model(model_cls).replace("-with-past", "")
    except (KeyError, ValueError):
        pass
    name = model_cls.__name__
    for task, mapping in TasksManager._TRANSFORMERS_TASKS_TO_MODEL_MAPPINGS.items():
        for classes in mapping.values():
            if name == classes or (isinstance(classes, tuple) and name in classes):
                return task
    return None


def load_checkpoint(
    ref: str, task: str | None = None, weights: bool = True, **config_overrides: Any
):
    """(model, task) for a resolved source. The task defaults to the one of the checkpoint's
    architecture (config.json `architectures[0]`), always without past key values."""
    import torch
    import transformers
    from optimum.exporters.tasks import TasksManager

    try:
        config = transformers.AutoConfig.from_pretrained(ref, **config_overrides)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read the config of '{ref}': {e}") from None
    archs = getattr(config, "architectures", None) or []
    if task is not None:
        task = TasksManager.map_from_synonym(task.replace("-with-past", ""))
        try:
            model_cls = TasksManager.get_model_class_for_task(task, model_type=config.model_type)
        except (KeyError, ValueError) as e:
            raise ExportError(f"unsupported task '{task}' for '{config.model_type}': {e}") from None
    else:
        if not archs:
            raise ExportError(f"'{ref}': config.json names no architecture; pass --task")
        model_cls = getattr(transformers, archs[0], None)
        if model_cls is None:
            raise ExportError(
                f"unsupported architecture '{archs[0]}': not in transformers "
                f"{transformers.__version__}"
            )
        task = infer_task(model_cls)
        if task is None:
            raise ExportError(
                f"unsupported architecture '{archs[0]}': no export task known for it; pass --task"
            )
    if not weights:  # the architecture only (random init): the caller loads what it needs
        return model_cls(config).to(torch.float32).eval(), task
    try:
        model = model_cls.from_pretrained(ref, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise ExportError(f"cannot load the weights of '{ref}': {e}") from None
    return model.eval(), task
