"""A model over several boards on a local Ray cluster (`ray.cluster_utils.Cluster`: a head and
three worker nodes on 127.0.0.1, the way Ray's own tests run one): outputs equal one board's
`full` within 1e-5, greedy tokens equal, a board killed mid-run named promptly, damaged files
named before anything runs. Skipped (visibly) without the `cluster` extra."""

from __future__ import annotations

import os
import shutil
import threading
import time

# Ray binds to the machine's address unless told this is a one-machine cluster: loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np
import pytest

try:  # tests/ on sys.path (pytest's default import mode) or tests/ as a package
    import export_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx

import hermes_ort
from hermes_ort.cluster.connect import ClusterError
from hermes_ort.core.errors import BudgetError, IntegrityError, OptionError
from hermes_ort.core.manifest import load_manifest
from hermes_ort.runtime.protocol import Model

ray = pytest.importorskip("ray", reason="the cluster tests need Ray: pip install '.[cluster]'")

ENCODERS = ["tiny-bert", "tiny-vit"]
DECODERS = ["tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-mistral"]
BOARDS = ["board-0", "board-1", "board-2"]
BUDGET = "700MB"  # per board, Ray's own processes there included (~215 MB measured)
NODE = dict(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=80 << 20)


NODE_CAP = 1_000_000_000  # each worker node's memory cgroup, where cgroups exist (v1, root)


def cap_node(node, groups: list) -> None:
    """Put a node's processes (raylet, agents; the workers it starts later follow them) into a
    memory cgroup of their own capped at NODE_CAP; nothing where cgroups are not usable."""
    from bench import cgroups

    base, _ = cgroups.controller_base("memory")
    if base is None:
        return
    group = cgroups.MemoryGroup(base, "node", NODE_CAP)
    groups.append(group)
    for infos in node.all_processes.values():
        for info in infos:
            group.write("cgroup.procs", str(info.process.pid))


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    groups: list = []
    c = Cluster(
        initialize_head=True,
        head_node_args=dict(NODE, num_cpus=0, include_dashboard=False),
    )
    try:
        for name in BOARDS:
            cap_node(c.add_node(node_name=name, **NODE), groups)
        c.wait_for_nodes()
        c.groups = groups
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        for g in groups:
            g.remove()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    pytest.importorskip("torch", reason="exporting needs torch")
    root = tmp_path_factory.mktemp("cluster-models")
    for name in ENCODERS + DECODERS:
        assert fx.export_cli(root / name, "--preset", name) == 0
    return {name: root / name for name in ENCODERS + DECODERS}


def test_the_model_is_split_over_every_board(cluster, exported):
    with hermes_ort.load(exported["tiny-gpt2"], cluster=cluster.address, memory_budget=BUDGET) as m:
        assert isinstance(m, Model)  # as one board's HermesModel (tests/test_protocol.py)
        stages = m.plan.stages
        assert [s.board.name for s in stages] != [] and {s.board.name for s in stages} == set(
            BOARDS
        )
        assert stages[0].first == 0 and stages[-1].last == len(load_manifest(m.model_dir).blocks)
        for a, b in zip(stages, stages[1:], strict=False):
            assert a.last == b.first
        for s in stages:  # Ray's own processes measured on the board and taken off its budget
            assert s.board.ray_bytes > 20 << 20
            assert s.board.budget_bytes == 700_000_000 - s.board.ray_bytes
            assert s.predicted_peak_bytes <= s.board.budget_bytes
        peaks = [st["peak_rss_bytes"] for st in (m.run(m_feeds(m)), m.stage_stats())[1]]
        for s, peak in zip(stages, peaks, strict=True):
            assert peak <= s.board.budget_bytes
    for g in cluster.groups:  # each node stayed within its cgroup's cap: nothing was killed
        assert g.stats().oom_kills == 0 and g.stats().peak_bytes <= NODE_CAP


def m_feeds(model):
    from hermes_ort.tensors.inputs import sample_inputs

    return sample_inputs(model.manifest, 1, 6, seed=3)


@pytest.mark.parametrize("name", ENCODERS)
def test_an_encoder_over_the_boards_equals_full(cluster, exported, name):
    d = exported[name]
    with hermes_ort.load(d, strategy="full") as full:
        one = full.sample_inputs(batch_size=1, seed=1)
        batch = full.sample_inputs(batch_size=5, seed=2)
        want_one, want_batch = full.run(one), full.run(batch)
    with hermes_ort.load(d, cluster=cluster.address, memory_budget=BUDGET) as m:
        got_one = m.run(one)
        got_batch = m.run(batch)  # rows split into requests in flight, joined in order
        assert m.stats["requests"] == 3
        many = m.run_many([one, batch])
    pairs = ((want_one, got_one), (want_batch, got_batch), (want_one, many[0]))
    for want, got in (*pairs, (want_batch, many[1])):
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", DECODERS)
def test_a_decoder_over_the_boards_generates_full_s_tokens(cluster, exported, name):
    d = exported[name]
    prompts = [[5, 17, 99, 3, 42, 7], [9, 8], [250, 11, 3], [4, 4, 4, 4]]
    with hermes_ort.load(d, strategy="full") as full:
        want = full.generate(prompts[0], 12, eos_token_id=[])
        takes_positions = full.decoder.takes_position_ids
        alone = [full.generate(p, 8, eos_token_id=[]) for p in prompts]
    with hermes_ort.load(d, cluster=cluster.address, memory_budget=BUDGET) as m:
        got = m.generate(prompts[0], 12, eos_token_id=[])
        np.testing.assert_array_equal(got, want)
        assert m.generation_stats.new_tokens == 12
        caches = [st["cache_bytes"] for st in m.stage_stats()]
        assert caches == [0] * len(caches)  # each generation's cache freed on its boards
        if takes_positions:  # prompts of different lengths, in flight at once
            batch = m.generate(prompts, 8, eos_token_id=[])
            for a, b in zip(alone, batch, strict=True):
                np.testing.assert_array_equal(a, b)


def test_a_streamer_sees_each_pass_s_tokens_over_the_boards(cluster, exported):
    with hermes_ort.load(exported["tiny-gpt2"], cluster=cluster.address, memory_budget=BUDGET) as m:
        seen: list = []
        got = m.generate([5, 17, 99], 6, eos_token_id=[], streamer=seen.append)
        assert seen == [int(t) for t in got[3:]]
        rows: list = []  # a batch: one group (in_flight 1), each pass's tokens of every row
        batch = m.generate([[5, 17], [9, 8]], 3, eos_token_id=[], streamer=rows.append)
        assert rows == [[int(batch[0][2 + i]), int(batch[1][2 + i])] for i in range(3)]
        with pytest.raises(OptionError, match="streamer"):
            m.generate([[5, 17], [9, 8]], 2, eos_token_id=[], streamer=print, in_flight=2)


def test_groups_generated_at_once_add_up_to_one_call_s_stats():
    from hermes_ort.generation.token_loop import GenerationStats, combined_stats

    a = GenerationStats(3, 8, 0.5, 2.0, 3.0, 0, 0, 100, "eos", batch_size=2)
    b = GenerationStats(4, 6, 0.7, 2.2, 2.0, 0, 0, 50, "max_new_tokens", batch_size=2)
    s = combined_stats([a, b], 2.5)
    assert (s.prompt_tokens, s.new_tokens, s.batch_size, s.cache_bytes) == (7, 14, 4, 150)
    assert s.time_to_first_token_s == 0.7 and s.stopped_by == "max_new_tokens"
    assert s.decode_tokens_per_s == pytest.approx((14 - 4) / (2.5 - 0.7))
    assert combined_stats([a], 2.0).stopped_by == "eos"


def test_the_kv_cache_stays_on_each_board(cluster, exported):
    """Each stage keeps its own layers' cache: what comes back to the caller is the logits."""
    d = exported["tiny-llama"]
    with hermes_ort.load(d, cluster=cluster.address, memory_budget=BUDGET) as m:
        specs = m.placement.specs
        blocks = m.manifest.blocks
        assert not any(name.startswith("present.") for spec in specs for name in spec.hands_on)
        kept = [p for spec in specs for p, _ in spec.cache]
        assert sorted(kept) == sorted(s.past for s in m.decoder.slots)  # each slot on one board
        for spec in specs:  # on the board whose blocks read its past and make its present
            made = {t for b in blocks[spec.first : spec.last] for t in b.outputs}
            for past, present in spec.cache:
                assert present in made
                assert all(past not in b.inputs for b in blocks[: spec.first] + blocks[spec.last :])


def test_a_budget_below_ray_s_own_processes_is_refused_by_board(cluster, exported):
    with pytest.raises(BudgetError, match=r"board 'board-\d'.*after Ray's own processes"):
        hermes_ort.load(exported["tiny-bert"], cluster=cluster.address, memory_budget="150MB")


def test_unknown_boards_and_options_are_named(cluster, exported):
    d = exported["tiny-bert"]
    with pytest.raises(ClusterError, match=r"\['nope'\] are not alive.*board-0"):
        hermes_ort.load(d, cluster=cluster.address, boards=["nope"])
    with pytest.raises(OptionError, match="unknown board"):
        hermes_ort.load(d, cluster=cluster.address, memory_budget={"nope": "1GB"})
    with pytest.raises(OptionError, match="one board's"):
        hermes_ort.load(d, cluster=cluster.address, strategy="full")
    with pytest.raises(OptionError, match="one board's"):
        hermes_ort.load(d, cluster=cluster.address, window=2)


def test_no_cluster_at_the_address_is_named_at_once(exported):
    with pytest.raises(ClusterError, match="no Ray cluster answers at '127.0.0.1:9'"):
        hermes_ort.load(exported["tiny-bert"], cluster="127.0.0.1:9")


def test_a_damaged_stage_file_is_named_before_anything_runs(cluster, exported, tmp_path):
    d = shutil.copytree(exported["tiny-bert"], tmp_path / "m")
    m = load_manifest(d)
    victim = m.blocks[-2].files[-1].path
    data = bytearray((d / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / victim).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"board 'board-\d' \(stage \d.*'{victim}'"):
        hermes_ort.load(d, cluster=cluster.address, memory_budget=BUDGET)


def test_a_board_killed_mid_run_is_named_and_the_rest_take_the_model(cluster, exported):
    """A fourth node joins, holds a stage, and is removed while requests are in flight: the
    caller gets a ClusterError naming that board and its stage (no hang); the model is then
    placed again on the boards that remain, with the same outputs."""
    d = exported["tiny-bert"]
    node = cluster.add_node(node_name="board-x", **NODE)
    cluster.wait_for_nodes()
    with hermes_ort.load(d, strategy="full") as full:
        feeds = full.sample_inputs(batch_size=1)
        want = full.run(feeds)
    m = hermes_ort.load(
        d,
        cluster=cluster.address,
        memory_budget=BUDGET,
        boards=["board-0", "board-x"],
        timeout_s=60,
    )
    x_stage = next(s.index for s in m.plan.stages if s.board.name == "board-x")
    stop = threading.Event()
    errors: list[BaseException] = []

    def keep_running():
        try:
            while not stop.is_set():
                m.run_many([feeds] * 8)
        except BaseException as e:  # noqa: BLE001 - what the caller sees
            errors.append(e)

    t = threading.Thread(target=keep_running)
    t.start()
    time.sleep(1.0)
    cluster.remove_node(node)
    t.join(timeout=90)
    stop.set()
    assert not t.is_alive(), "the run hung after its board died"
    assert errors and isinstance(errors[0], ClusterError)
    assert f"board 'board-x' (stage {x_stage}" in str(errors[0])
    assert "died or left the cluster" in str(errors[0])
    m.close()
    with hermes_ort.load(d, cluster=cluster.address, memory_budget=BUDGET) as again:
        assert "board-x" not in {s.board.name for s in again.plan.stages}
        got = again.run(feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5)


def test_the_cli_plans_runs_and_generates_on_the_cluster(cluster, exported, capsys):
    from hermes_ort.cli.main import main

    d = str(exported["tiny-llama"])
    assert main(["plan", d, "--cluster", cluster.address, "--budget", BUDGET]) == 0
    out = capsys.readouterr().out
    assert "3 stage(s)" in out and "board 'board-0'" in out
    assert main(["run", str(exported["tiny-bert"]), "--cluster", cluster.address]) == 0
    assert "stage 2 on 'board-" in capsys.readouterr().out
    assert (
        main(
            [
                "generate",
                d,
                "--ids",
                "5,17,99",
                "--max-new-tokens",
                "4",
                "--cluster",
                cluster.address,
                "--json",
            ]
        )
        == 0
    )
    record = __import__("json").loads(capsys.readouterr().out)
    with hermes_ort.load(d, strategy="full") as full:
        want = full.generate([5, 17, 99], 4)
    assert record["new_ids"] == [int(t) for t in want[3:]]
    assert main(["run", d, "--cluster", cluster.address, "--window", "2"]) == 2
    assert "not with --cluster" in capsys.readouterr().err
