"""The fast paths of flattening give exactly what the plain ones give: the byte reader what reading
the file as text gives, numpy's date parsing what pandas' gives."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from fedlab.flatten.derive import timestamps
from fedlab.flatten.readers import ndjson_items


def text_mode_items(path: Path) -> Iterator[tuple]:
    """The reference: the file read as text (universal newlines, utf-8-sig), each line through json."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if raw.isspace() or not raw:
                continue
            try:
                yield lineno, json.loads(raw), None
            except json.JSONDecodeError as err:
                yield lineno, None, f"malformed JSON: {err.msg} at column {err.colno}"


TRICKY = [
    b'\xef\xbb\xbf{"resourceType": "Patient", "id": "bom"}\n',
    b'{"a": 1}\r\n{"b": 2}\r{"c": "\xc3\xa9"}\n',          # CRLF, a bare CR, UTF-8
    b"\n   \n\t\n\xe3\x80\x80\n",                          # blank lines, an ideographic space only
    b'{"n": NaN, "big": 123456789012345678901234567890}\n',  # what only json accepts
    b'{"s": "\\ud800"}\n',                                    # a lone surrogate escape
    b"{not json\n[1, 2]\n\"text\"\n",
    b'{"last": "no newline"',
    b'{"broken": \n',
]


@pytest.mark.parametrize("gzipped", [False, True])
@pytest.mark.parametrize("block_size", [7, 64, 1 << 20])
def test_the_byte_reader_reads_lines_as_text_mode_does(tmp_path: Path, monkeypatch, gzipped: bool,
                                                       block_size: int) -> None:
    import fedlab.flatten.readers as readers

    original = readers._byte_blocks
    monkeypatch.setattr(readers, "_byte_blocks", lambda path: original(path, block_size))
    data = b"".join(TRICKY)
    rng = random.Random(block_size)
    data += b"".join(json.dumps({"id": i, "x": "y" * rng.randint(0, 40)}).encode() + rng.choice([b"\n", b"\r\n", b"\r"])
                     for i in range(200))
    for ending in (b"", b"\n", b"\r", b'{"tail": 1}', b'{"tail": '):
        path = tmp_path / ("Thing.ndjson.gz" if gzipped else "Thing.ndjson")
        path.write_bytes(gzip.compress(data + ending) if gzipped else data + ending)
        assert list(ndjson_items(path)) == list(text_mode_items(path)), ending


def test_invalid_utf8_stops_the_byte_reader_as_it_stops_text_mode(tmp_path: Path) -> None:
    path = tmp_path / "Bad.ndjson"
    path.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(UnicodeDecodeError):
        list(text_mode_items(path))
    with pytest.raises(UnicodeDecodeError):
        list(ndjson_items(path))


def _texts(rng: random.Random, kinds: list[str]) -> list[str | None]:
    def one(kind: str) -> str:
        date = f"{rng.randint(1678, 2261):04d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        if kind == "date":
            return date
        fraction = rng.choice(["", "." + str(rng.randint(0, 999999)).zfill(6)[:rng.randint(1, 6)]])
        time = f"T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}{fraction}"
        zone = rng.choice(["Z", f"+{rng.randint(0, 14):02d}:{rng.choice([0, 30, 45]):02d}",
                           f"-{rng.randint(0, 12):02d}:{rng.choice([0, 30]):02d}"])
        return date + time + (zone if kind == "zoned" else "")

    pool = [one(rng.choice(kinds)) for _ in range(rng.randint(1, 30))] + [None]
    return [rng.choice(pool) for _ in range(rng.randint(1, 80))]


@pytest.mark.parametrize("kinds", [["date"], ["naive"], ["zoned"], ["date", "zoned"], ["naive", "zoned"],
                                   ["date", "naive", "zoned"]])
def test_timestamps_are_what_pandas_makes_of_the_same_texts(kinds: list[str]) -> None:
    rng = random.Random(len(kinds) * 7 + len(kinds[0]))
    for _ in range(40):
        texts = _texts(rng, kinds) + [rng.choice(["2014", "2014-04", "2014-04-22T14:57", "2014-04-22T14:57:00.1234567Z"])]
        expected = pd.to_datetime(pd.Series(texts, dtype=object), format="ISO8601", utc=True)
        pd.testing.assert_series_equal(timestamps(pd.Series(texts, dtype=object)),
                                       expected.astype("datetime64[us, UTC]"), check_names=False)


@pytest.mark.parametrize("text", ["2020-02-30", "1600-01-01", "yesterday", "2014-04-22Z", "2014-04-22T24:00:00"])
def test_timestamps_refuse_what_pandas_refuses(text: str) -> None:
    series = pd.Series([text, "2014-01-01"], dtype=object)
    with pytest.raises(Exception) as expected:
        pd.to_datetime(series, format="ISO8601", utc=True)
    with pytest.raises(type(expected.value)):
        timestamps(series)
