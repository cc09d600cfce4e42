"""`Model`: what every model `hermes_ort.load` returns has, on one board (`HermesModel`) or over
several (`ClusterModel`); tests/test_protocol.py keeps both classes' signatures in step with it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from hermes_ort.core.manifest import Manifest
from hermes_ort.generation.token_loop import GenerationStats
from hermes_ort.tensors.kv_cache import DecoderSignature

_M = TypeVar("_M", bound="Model")


@runtime_checkable
class Model(Protocol):
    """A model opened for inference: `run`, `generate`, `chat`, `embed`, their stats, `close`
    (or `with`)."""

    @property
    def model_dir(self) -> Path: ...

    @property
    def manifest(self) -> Manifest: ...

    @property
    def decoder(self) -> DecoderSignature | None:
        """The KV cache's signature; None if the model cannot `generate`."""

    @property
    def plan(self) -> object:
        """How it runs: a `Plan` on one board, a `StagePlan` (stages on boards) on a cluster."""

    @property
    def stats(self) -> object:
        """The last `run`: a `RunStats` on one board, {"latency_s", "requests"} on a cluster."""

    @property
    def generation_stats(self) -> GenerationStats | None: ...

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        streamer: Callable[[int], Any] | None = None,
    ) -> Any: ...

    def chat(
        self,
        messages: Any,
        max_new_tokens: int = 256,
        system: str | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        streamer: Callable[[str], Any] | None = None,
    ) -> str:
        """The assistant's reply (generation/chat.py's `chat_reply` over `generate`)."""

    def embed(self, texts: Any, normalize: bool | None = None, batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings [n, dim] (runtime/embedding.py's `embed_texts` over `run`)."""

    def sample_inputs(
        self, batch_size: int = 1, sequence_length: int | None = None, seed: int = 0
    ) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...

    def __enter__(self: _M) -> _M: ...

    def __exit__(self, *exc: object) -> None: ...
