"""Run one configuration in a fresh Python process and collect its JSON record.

Peak memory is only comparable between configurations when each starts from an empty process. The
child loads nothing heavy before its first run, so the first run's peak RSS is the process's peak."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hermes_ort.errors import HermesError


def run_fresh(
    model_dir: str | Path,
    strategy: str,
    budget: str | int | None = None,
    repeat: int = 1,
    extra: tuple[str, ...] = (),
    prefix: tuple[str, ...] = (),
    timeout_s: float = 1800,
) -> dict[str, Any]:
    """`python -m hermes_ort run MODEL_DIR --json` in a child; returns its record plus
    `process_wall_s` and `returncode` (non-zero: `error` says why)."""
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "hermes_ort",
        "run",
        str(model_dir),
        "--strategy",
        strategy,
        "--repeat",
        str(repeat),
        "--json",
        *extra,
    ]
    if budget is not None:
        cmd += ["--budget", str(budget)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise HermesError(
            f"{strategy} on '{model_dir}' did not finish in {timeout_s:.0f} s"
        ) from None
    wall = time.perf_counter() - t0
    record: dict[str, Any] = {}
    if proc.returncode == 0:
        record = json.loads(out.strip().splitlines()[-1])
    else:
        record["error"] = (err.strip().splitlines() or ["killed"])[-1]
    record.update(returncode=proc.returncode, process_wall_s=wall, command=cmd)
    return record
