"""`hermes-ort serve`'s options, checked once before the model is opened."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hermes_ort.core.errors import OptionError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_BODY_BYTES = 1 << 20  # a request body larger than this gets 413


@dataclass(frozen=True)
class ServeOptions:
    model_dir: Path
    budget: int | str | None = None  # as load's memory_budget ("min", "200MB", bytes)
    strategy: str = "pipeload"
    paging: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    name: str | None = None  # the model's id in the API (default: the manifest's name)
    max_batch: int = 8  # requests decoding together
    max_queue: int = 64  # requests waiting for a row; more get 503 with Retry-After
    ctx: int | None = None  # positions a request may reach (default: serving_context)
    kv_cache_bytes: int | None = None  # the KV cache pool (default: served_model.kv_pool)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_timeout_s: float = 30.0  # SIGTERM: requests in flight get this long to finish

    def check(self) -> ServeOptions:
        """OptionError naming the first option that cannot work."""
        if self.host not in LOOPBACK and not self.api_key:
            raise OptionError(
                f"--host {self.host} serves other machines: give --api-key KEY too (clients send "
                f"it as 'Authorization: Bearer KEY'), or serve on 127.0.0.1"
            )
        if not 0 <= self.port <= 65535:
            raise OptionError(f"--port must be 0..65535, got {self.port}")
        for flag, value, least in (
            ("--max-batch", self.max_batch, 1),
            ("--max-queue", self.max_queue, 0),
            ("--ctx", self.ctx, 2),
            ("--max-body", self.max_body_bytes, 1024),
        ):
            if value is not None and value < least:
                raise OptionError(f"{flag} must be at least {least}, got {value}")
        if self.max_batch > 64:
            raise OptionError(f"--max-batch must be at most 64, got {self.max_batch}")
        if self.shutdown_timeout_s < 0:
            raise OptionError(f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout_s}")
        return self
