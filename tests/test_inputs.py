"""Bad inputs are refused before any block runs, with the input and the expectation named."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import hermes_ort


@pytest.fixture(scope="module")
def model(toy_source, tmp_path_factory):
    own = shutil.copytree(toy_source, tmp_path_factory.mktemp("inputs") / "model")
    with hermes_ort.load(own, window=2) as m:
        yield m


@pytest.fixture
def feeds(model):
    return model.sample_inputs(batch_size=2, sequence_length=8)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda f: f.pop("attention_mask"), r"missing input\(s\) \['attention_mask'\]"),
        (
            lambda f: f.update(token_type_ids=f["input_ids"]),
            r"unknown input\(s\) \['token_type_ids'\]",
        ),
        (
            lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)),
            "'input_ids' has dtype int32, expected int64",
        ),
        (
            lambda f: f.update(input_ids=f["input_ids"][0]),
            "'input_ids' has rank 1.*expected rank 2",
        ),
        (
            lambda f: f.update(attention_mask=f["attention_mask"][:, :5]),
            "'attention_mask' has sequence_length=5",
        ),
        (
            lambda f: f.update(
                input_ids=f["input_ids"][:0], attention_mask=f["attention_mask"][:0]
            ),
            "'input_ids' is empty",
        ),
        (
            lambda f: f.update(input_ids=f["input_ids"].tolist()),
            "'input_ids' must be a numpy array, got list",
        ),
        (
            lambda f: f.update(
                input_ids=np.zeros((1, 65), np.int64), attention_mask=np.ones((1, 65), np.int64)
            ),
            "sequence_length 65, longer than the model supports \\(64\\)",
        ),
        (
            lambda f: f["input_ids"].__setitem__((1, 3), 50),
            r"'input_ids' has token ids from \d+ to 50, expected 0 <= id < 50",
        ),
        (
            lambda f: f["input_ids"].__setitem__((0, 0), -1),  # Gather would read the last row
            "'input_ids' has token ids from -1 to",
        ),
    ],
)
def test_bad_input_is_named(model, feeds, mutate, message):
    mutate(feeds)
    with pytest.raises(hermes_ort.InputError, match=message):
        model.run(feeds)
    assert model.stats is None  # nothing ran


def test_not_a_dict(model):
    with pytest.raises(hermes_ort.InputError, match="must be a dict"):
        model.run([1, 2, 3])


def test_input_error_is_a_value_error(model):
    with pytest.raises(ValueError):
        model.run({})


def test_non_contiguous_inputs_work(model, feeds):
    expected = model.run(feeds)["logits"]
    strided = {k: np.asfortranarray(v) for k, v in feeds.items()}
    np.testing.assert_array_equal(model.run(strided)["logits"], expected)
