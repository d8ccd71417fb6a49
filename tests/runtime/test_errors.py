"""errors.echo: client values in error messages are capped and escaped, their size reported."""
import pytest

from uwrt.runtime.errors import ECHO_MAX_CHARS, echo


@pytest.mark.parametrize("value", ["USD", "", "features[x]", "ä" * ECHO_MAX_CHARS])
def test_short_printable_values_are_unchanged(value):
    assert echo(value) == value


def test_long_values_are_cut_and_report_the_client_size():
    assert echo("U" * 100_000) == "U" * ECHO_MAX_CHARS + "...(100000 bytes)"
    assert echo("é" * 1000).endswith("...(2000 bytes)")         # UTF-8 bytes, not characters


def test_non_printable_values_are_escaped_and_bounded():
    out = echo("a\nb\x00\u202e")
    assert out.isprintable() and out == "a\\nb\\x00\\u202e"
    long = echo("\x1b" * 10_000)
    assert long.isprintable() and len(long) <= ECHO_MAX_CHARS + 20 and long.endswith("...(10000 bytes)")
    assert echo("\ud800" * 3).isprintable()                      # a lone surrogate (never valid UTF-8)


def test_non_strings_are_echoed_as_text():
    assert echo(12345) == "12345"
