"""Progress of a bench run: a tqdm bar on a terminal (tqdm is optional), else one line per
configuration (CI logs)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None):
        self.total = total
        self.count = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.bar = None
        if enabled and self.stream.isatty():
            try:
                import tqdm

                tqdm.tqdm.monitor_interval = 0  # no monitor thread: children are forked
                self.bar = tqdm.tqdm(total=total, unit="run", file=self.stream, dynamic_ncols=True)
            except ImportError:
                pass

    def start(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(what, refresh=True)

    def done(self, what: str, result: str) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(result, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            elapsed = time.monotonic() - self.t0
            print(
                f"[{self.count}/{self.total} {elapsed:5.0f}s] {what}: {result}",
                file=self.stream,
                flush=True,
            )

    def note(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        elif self.enabled:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
