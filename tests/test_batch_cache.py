"""The running batch's KV cache (tensors/batch_cache.py): rows that join between decode steps and
leave when done give each request the tokens it gets alone, on both graphs (optimum's, which
appends after the whole past: rows left-padded; the fused graph's GroupQueryAttention, which
writes after each row's length: rows right-padded); ballast keeps every pass at two rows or more;
a row that leaves gives its memory back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

try:
    import export_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx

import hermes_ort
from hermes_ort.core.choices import CacheLayout
from hermes_ort.generation.token_loop import prompt_positions, step_feeds
from hermes_ort.tensors.batch_cache import BatchCache, cache_layout
from hermes_ort.tensors.kv_cache import CacheSlot, DecoderSignature
from hermes_ort.tensors.prefill import uses_group_query_attention

SIG = DecoderSignature(
    slots=(
        CacheSlot("past_key_values.0.key", "present.0.key", 2, 4, "float32"),
        CacheSlot("past_key_values.0.value", "present.0.value", 2, 4, "float32"),
    ),
    takes_position_ids=True,
    logits="logits",
    max_positions=None,
)


def _row(length: int, fill: float) -> dict[str, np.ndarray]:
    return {s.past: np.full((1, 2, length, 4), fill, np.float32) for s in SIG.slots}


@pytest.mark.parametrize("layout", list(CacheLayout))
def test_masks_and_positions_follow_the_layout(layout):
    cache = BatchCache(SIG, layout)
    cache.add(_row(3, 1.0))
    cache.add(_row(5, 2.0))
    feeds = cache.step_feeds([7, 8])
    key = feeds["past_key_values.0.key"]  # [2, 2, 5, 4]
    if layout == CacheLayout.CONCAT:  # left-padded: the short row's real positions last
        assert feeds["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6]
        assert (key[0, :, :2] == 0).all() and (key[0, :, 2:] == 1).all()
    else:  # right-padded: real positions first, then the new one
        assert feeds["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
        assert (key[0, :, :3] == 1).all() and (key[0, :, 3:] == 0).all()
    assert feeds["position_ids"].tolist() == [[3], [5]]
    assert feeds["input_ids"].tolist() == [[7], [8]]


@pytest.mark.parametrize("layout", list(CacheLayout))
def test_ballast_fills_a_lone_row_and_goes_when_a_second_joins(layout):
    cache = BatchCache(SIG, layout, min_rows=2)
    cache.add(_row(4, 1.0))
    assert (cache.rows, cache.batch_rows) == (1, 2)
    feeds = cache.step_feeds([5])
    assert feeds["input_ids"].tolist() == [[5], [0]]
    assert feeds["attention_mask"][1].sum() == 1  # the ballast attends to its new position only
    assert feeds["position_ids"].tolist() == [[4], [0]]
    cache.add(_row(2, 2.0))
    assert (cache.rows, cache.batch_rows) == (2, 2)
    cache.remove(0)
    assert (cache.rows, cache.batch_rows, cache.width) == (1, 2, 2)
    cache.remove(0)
    assert (cache.rows, cache.batch_rows, cache.nbytes) == (0, 0, 0)


@pytest.mark.parametrize("layout", list(CacheLayout))
def test_the_longest_row_leaving_gives_its_positions_back(layout):
    cache = BatchCache(SIG, layout, min_rows=1)
    cache.add(_row(2, 1.0))
    cache.add(_row(50, 2.0))
    cache.add(_row(3, 3.0))
    held = cache.nbytes
    cache.remove(1)
    assert cache.width == 3 and cache.lengths == [2, 3]
    assert cache.nbytes == held * 2 * 3 // (3 * 50)  # two rows of three positions, not 50
    value = cache.arrays["past_key_values.0.value"]
    real = value[0, :, -2:] if layout == CacheLayout.CONCAT else value[0, :, :2]
    assert (real == 1).all()  # the short row's positions survived the trim


def test_cache_layout_of_each_graph():
    assert cache_layout(True) == CacheLayout.SEQLENS
    assert cache_layout(False) == CacheLayout.CONCAT


# -- on exported decoders: joining, leaving, and each row's tokens as alone --

GRAPHS = {
    "optimum": ["--preset", "tiny-llama"],  # fp32: optimum's graph, position_ids
    "fused": ["--preset", "tiny-llama", "--quantize", "int4"],  # GroupQueryAttention, MatMulNBits
}


@pytest.fixture(scope="module", params=list(GRAPHS))
def decoder(request, tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="exporting needs torch (not on the aarch64 board)")
    out = tmp_path_factory.mktemp("batch-cache") / request.param
    assert fx.export_cli(out, *GRAPHS[request.param]) == 0
    return out


class Greedy:
    """Prefill alone, then decode steps over a BatchCache, greedy, as the server runs them."""

    def __init__(self, model_dir: Path) -> None:
        self.model = hermes_ort.load(model_dir)
        self.sig = self.model.decoder
        gqa = uses_group_query_attention(model_dir, self.model.manifest)
        self.layout = cache_layout(gqa)

    def prefill(self, prompt: list[int]) -> tuple[dict[str, np.ndarray], int]:
        ids = np.array([prompt], np.int64)
        mask = np.ones_like(ids)
        feeds = step_feeds(self.sig, ids, mask, prompt_positions(mask), self.sig.empty_cache(1))
        out = self.model.run(feeds, last_logits=True)
        cache = {s.past: out[s.present] for s in self.sig.slots}
        return cache, int(np.argmax(out["logits"][0, -1]))

    def step(self, cache: BatchCache, last: list[int]) -> list[int]:
        out = self.model.run(cache.step_feeds(last), last_logits=True)
        cache.update(out)
        return [int(t) for t in np.argmax(out["logits"][: cache.rows, -1], axis=-1)]

    def alone(self, prompt: list[int], n: int) -> list[int]:
        cache = BatchCache(self.sig, self.layout)
        past, token = self.prefill(prompt)
        cache.add(past)
        tokens = [token]
        while len(tokens) < n:
            tokens += self.step(cache, [tokens[-1]])
        return tokens


def test_rows_joining_and_leaving_get_their_tokens_alone(decoder):
    greedy = Greedy(decoder)
    rng = np.random.default_rng(0)
    vocab = greedy.model.manifest.outputs[0].shape[-1]
    lengths, joins, new = (5, 17, 9, 30), (0, 2, 3, 7), 10  # prompt lengths, the step each joins
    prompts = [rng.integers(3, vocab, size=n).tolist() for n in lengths]
    alone = [greedy.alone(p, new) for p in prompts]
    cache = BatchCache(greedy.sig, greedy.layout)
    running: list[tuple[int, list[int]]] = []  # (prompt index, tokens so far), row by row
    finished: dict[int, list[int]] = {}
    for step in range(max(joins) + new + 1):
        for i, at in enumerate(joins):
            if at == step:
                past, token = greedy.prefill(prompts[i])
                cache.add(past)
                running.append((i, [token]))
        for r in reversed(range(len(running))):  # done rows leave before the pass
            if len(running[r][1]) == new:
                cache.remove(r)
                i, tokens = running.pop(r)
                finished[i] = tokens
        if running:
            chosen = greedy.step(cache, [tokens[-1] for _, tokens in running])
            for (_, tokens), token in zip(running, chosen, strict=True):
                tokens.append(token)
    assert finished == dict(enumerate(alone))
    assert cache.rows == 0 and cache.nbytes == 0
    greedy.model.close()
