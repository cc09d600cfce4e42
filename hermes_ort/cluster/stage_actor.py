"""The Ray actor on each board (`StageActor`): reports the board (its memory, Ray's own share of
it, the stored layer profile), then opens and runs its stage (stage_runner.py)."""

from __future__ import annotations

from hermes_ort.cluster.connect import import_ray, is_head
from hermes_ort.cluster.stage_spec import StageSpec
from hermes_ort.planning.layer_profile import read_profile

RAY_PROCESS_NAMES = ("gcs_server",)  # on the head, beside the raylet's own processes


class StageActor:
    """Lives in a Ray worker on one board: reports the board, then opens and runs one stage."""

    def __init__(self):
        self.runner = None

    def probe(self) -> dict:
        """This board: its name, CPUs, the RSS of Ray's other processes here, this worker's own
        RSS (the stage's baseline), and the memory it could still give a stage."""
        import psutil

        import hermes_ort.cluster.stage_runner  # noqa: F401 - the stage's baseline: ONNX Runtime loaded
        from hermes_ort.core.machine import available_memory, cgroup_memory_limit, default_threads
        from hermes_ort.streaming.memory import rss_bytes

        me = psutil.Process()
        ray_pids: set[int] = set()
        raylet = me.parent()
        if raylet is not None:
            ray_pids.add(raylet.pid)
            ray_pids |= {p.pid for p in raylet.children(recursive=True)}
        head = is_head()
        if head:
            for p in psutil.process_iter(["name"]):
                if p.info["name"] in RAY_PROCESS_NAMES:
                    ray_pids.add(p.pid)
        ray_pids.discard(me.pid)
        ray_bytes = 0
        for pid in ray_pids:
            try:
                ray_bytes += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
        own = rss_bytes()
        free = [x for x in (available_memory(),) if x is not None]
        free = [f + own for f in free]
        limit = cgroup_memory_limit()
        if limit is not None:
            free.append(limit - ray_bytes)
        return {
            "node_id": import_ray().get_runtime_context().get_node_id(),
            "cpus": default_threads(),
            "ray_bytes": ray_bytes,
            "baseline_bytes": own,
            "free_bytes": min(free) if free else None,
            "head": head,
        }

    def profile(self, model_dir: str):
        """The layer profile stored beside the model if it matches this board (machine, cores,
        ONNX Runtime), else None: what the split plans this board's stages with."""
        return read_profile(model_dir)

    def open(self, model_dir: str, spec: StageSpec, budget: int, verify: str) -> dict:
        from hermes_ort.cluster.stage_runner import StageRunner

        self.runner = StageRunner(model_dir, spec, budget, verify=verify)
        return self.runner.plan.to_json()

    def run(self, feeds: dict, request=None, cache: dict | None = None, shape=None) -> dict:
        return self.runner.run(feeds, request, cache, shape)

    def begin(self, rows: int, prompt: int, positions: int, in_flight: int) -> None:
        self.runner.begin(rows, prompt, positions, in_flight)

    def end(self, request: str) -> None:
        self.runner.end(request)

    def stats(self) -> dict:
        s = self.runner.stats
        return {
            "latency_s": s.latency_s if s else None,
            "peak_rss_bytes": s.peak_rss_bytes if s else None,
            "bytes_read": s.bytes_read if s else None,
            "cache_bytes": self.runner.cache_bytes(),
        }

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None
