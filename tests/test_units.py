import pytest

from hermes_ort.core.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    "text,expected",
    [
        ("200MB", 200_000_000),
        ("1.5GiB", 3 * 2**29),
        ("300M", 300 * 2**20),
        ("64 kib", 65536),
        (12345, 12345),
        (None, None),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "MB", "1.2.3GB", "5 parsecs", -1, 0, "0MB", True])
def test_parse_bytes_refuses(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_format_bytes():
    assert (
        format_bytes(512) == "512 B"
        and format_bytes(200_000_000) == "200.0 MB"
        and format_bytes(None) == "-"
    )
