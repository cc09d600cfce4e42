"""Read-ahead: only the pages the page cache lacks are read, and it says how many bytes it read."""

from __future__ import annotations

import os

import pytest

from hermes_ort.streaming.memory import drop_file_cache
from hermes_ort.streaming.readahead import is_cached, missing_pages, read_ahead, warm_files

PAGE = os.sysconf("SC_PAGE_SIZE")


def _cold_file(path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())  # clean pages: the kernel drops only those
    drop_file_cache(str(path))


@pytest.fixture
def cold(tmp_path):
    path = tmp_path / "weights.data"
    _cold_file(path, 64 * PAGE)
    fd = os.open(path, os.O_RDONLY)
    missing = missing_pages(fd, os.fstat(fd).st_size)
    os.close(fd)
    if missing is None or missing.sum() < 60:  # no mincore, or a file system that keeps pages
        pytest.skip("the page cache of this file system cannot be dropped or observed")
    return path


@pytest.mark.parametrize("sequential", [False, True])
def test_a_cold_file_is_read_whole_then_not_again(cold, sequential):
    assert is_cached(str(cold)) is False
    assert read_ahead(str(cold), sequential=sequential) == 64 * PAGE
    assert is_cached(str(cold)) is True
    assert read_ahead(str(cold), sequential=sequential) == 0  # every page cached: nothing read


def test_only_the_missing_pages_are_read(cold):
    with open(cold, "rb") as f:  # the first 16 pages into the cache
        f.read(16 * PAGE)
    fd = os.open(cold, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    os.close(fd)
    fd = os.open(cold, os.O_RDONLY)
    missing = missing_pages(fd, 64 * PAGE)
    os.close(fd)
    assert read_ahead(str(cold)) == int(missing.sum()) * PAGE < 64 * PAGE


def test_warm_files_reads_each_file_the_loaders_way(cold, tmp_path):
    other = tmp_path / "other.data"
    _cold_file(other, 8 * PAGE)
    assert warm_files([cold, other]) == 72 * PAGE
    assert warm_files([cold, other]) == 0


def test_an_empty_file_reads_nothing(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    assert read_ahead(str(tmp_path / "empty")) == 0
