"""Every closed set of choices the runtime offers, as enums, and the one place a user's value is
checked against one (`choose`). The CLI takes its `choices=` from these (`values`).

Members are `str`s too: they compare equal to their value, print as it and go into JSON as it,
so a manifest, a profile or a plan on disk stays plain text."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from hermes_ort.core.errors import OptionError


class Choice(str, Enum):
    """A str-valued enum that prints as its value (`enum.StrEnum` is Python >= 3.11 only)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class StrategyName(Choice):
    """pipeload and the baselines every benchmark carries (planning/strategies.py)."""

    PIPELOAD = "pipeload"
    FULL = "full"
    FULL_MMAP = "full-mmap"
    PIPESWITCH = "pipeswitch"
    ONDEMAND = "ondemand"


class Engine(Choice):
    """Which engine runs a plan: per-block sessions, or one session of the whole-model file."""

    BLOCKS = "blocks"
    WHOLE = "whole"


class Residency(Choice):
    """Which of a per-block strategy's blocks stay open between passes."""

    PLANNED = "planned"  # as many as the budget holds (pipeload's planner)
    ALL = "all"  # pipeswitch
    NONE = "none"  # ondemand


class BlockKind(Choice):
    """A manifest block's place in the model."""

    PROLOGUE = "prologue"  # embeddings (and a decoder's mask arithmetic)
    LAYERS = "layers"  # one or more transformer layers
    EPILOGUE = "epilogue"  # final norm, head (or, with HEAD blocks, what follows them)
    # one slice of a decoder's LM head over the vocabulary (position-wise: the runtime may feed
    # it only the last position); the block after the slices concatenates their logits
    HEAD = "head"


class Objective(Choice):
    """What pipeload's plan makes fastest."""

    REPEATED = "repeated"  # later passes: a model loaded once and run many times
    ONE_SHOT = "one-shot"  # the first pass: load, run once, close


class PageCacheMode(Choice):
    """Whether streamed blocks' file pages are dropped after their run (planning/page_cache.py)."""

    AUTO = "auto"  # drop only where memory has no room for the model's files beside the budget
    KEEP = "keep"
    DROP = "drop"


class Paging(Choice):
    """Whether pipeload may page its prepacked streamed blocks: keep their sessions open on saved
    packed copies, dropping their pages after each run (streaming/paged.py)."""

    AUTO = "auto"  # where the cost model finds it faster and within the budget
    OFF = "off"  # re-create their sessions every pass


class VerifyMode(Choice):
    """How a model's files are checked before use (streaming/integrity.py)."""

    ONCE = "once"  # sha256 before first use, then cached by size, times and inode
    SIZE = "size"  # sizes only


class LoadPath(Choice):
    """How a per-block baseline opens its blocks."""

    DEFAULT = "default"  # ONNX Runtime's default load: prepacking on, no read-ahead
    STREAM = "stream"  # pipeload's: weights mmapped, no prepacking, read-ahead (ablations)


class PoolingMode(Choice):
    """How an encoder's token embeddings become one sentence embedding (tensors/pooling.py):
    sentence-transformers' modes, by its names, in the order it concatenates them."""

    CLS = "cls"  # the first real token
    MAX = "max"  # the largest value per dimension over the real tokens
    MEAN = "mean"  # the mean over the real tokens (the attention mask)
    MEAN_SQRT_LEN = "mean_sqrt_len_tokens"  # their sum over the square root of their count
    WEIGHTED_MEAN = "weightedmean"  # weighted by position 1..T
    LAST_TOKEN = "lasttoken"  # the last real token


class CacheLayout(Choice):
    """Where a decoder's graph puts a row's new position in its present, so where a batch of
    rows of different lengths keeps its padding (tensors/batch_cache.py)."""

    CONCAT = "concat"  # after the whole past (optimum's graphs): rows left-padded
    SEQLENS = "seqlens"  # after the row's own length (GroupQueryAttention): rows right-padded


C = TypeVar("C", bound=Choice)


def values(kind: type[Choice]) -> tuple[str, ...]:
    """The values of a choice, in declaration order (argparse's `choices=`)."""
    return tuple(member.value for member in kind)


def choose(kind: type[C], value: object, option: str) -> C:
    """`value` as a member of `kind`, or OptionError naming the option and its choices."""
    try:
        return kind(value)
    except ValueError:
        raise OptionError(
            f"unknown {option} {value!r} (choose from {', '.join(values(kind))})"
        ) from None
