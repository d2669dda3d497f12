"""Readers: which files a site's folder holds, and their lines or bundle entries, parsed.

A `Source` is one input file: typed NDJSON (`<Type>.ndjson[.gz]`, one resource per line, its type
from the export manifest or the file name) or a FHIR Bundle (`*.json[.gz]`, any types, e.g.
Synthea's transaction bundles). `items(source)` yields (line or entry number, parsed resource or
None, parse error or None) for each non-blank line or entry, so the runners never see raw text.
`export_files` lists an export folder's NDJSON inputs from its `manifest.json` (or every
`*.ndjson[.gz]` when there is none).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from fedlab.flatten.contract import FlattenError
from fedlab.io import read_json

Item = tuple[int, Any, "str | None"]  # (line or entry number, resource or None, error or None)


@dataclass
class Source:
    path: Path
    expected_type: str | None  # None for bundles (mixed types)
    kind: Literal["ndjson", "bundle"] = "ndjson"


def type_from_name(name: str) -> str:
    return name.split(".", 1)[0]


def ndjson_sources(paths: Iterable[str | Path], types: dict[str, str] | None = None,
                   must_exist: bool = False) -> list[Source]:
    """Each NDJSON input with its expected resource type: `types` (file name -> type, from the
    manifest), else the file name's first part (`Observation.2.ndjson` -> Observation)."""
    types = types or {}
    sources = [Source(Path(p), types.get(Path(p).name) or type_from_name(Path(p).name)) for p in paths]
    if must_exist:
        for source in sources:
            if not source.path.is_file():
                raise FlattenError(f"NDJSON input not found: {source.path}")
    return sources


def bundle_sources(paths: Iterable[str | Path]) -> list[Source]:
    """FHIR Bundles (`.json[.gz]`), in path order."""
    return [Source(Path(p), None, "bundle") for p in sorted(Path(p) for p in paths)]


def items(source: Source) -> Iterator[Item]:
    return bundle_items(source.path) if source.kind == "bundle" else ndjson_items(source.path)


def open_text(path: Path):
    # utf-8-sig: a byte-order mark at the start of a file (Windows tools write one) is not JSON.
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def ndjson_items(path: Path) -> Iterator[Item]:
    """(line number, parsed resource or None, parse error) for each non-blank line.

    Lines are read as bytes and split as text mode splits them (`\n`, `\r\n` or `\r`, a leading
    byte-order mark dropped); orjson parses the bytes directly, several times faster than json. It
    is stricter (no NaN, no integers beyond 64 bits, no lone surrogates): whatever it refuses is
    decoded and goes through json.loads, which decides, so values and error messages stay those of
    the standard library reading the file as text."""
    fast_loads, decode_error = orjson.loads, orjson.JSONDecodeError
    lineno = 0
    for block in _byte_blocks(path):
        for line in block:
            lineno += 1
            if line.isspace():
                continue
            try:
                yield lineno, fast_loads(line), None
            except decode_error:
                item = _slow_item(lineno, line)
                if item is not None:
                    yield item


def _slow_item(lineno: int, line: bytes) -> Item | None:
    text = line.decode("utf-8")  # invalid UTF-8 raises, as reading the file as text does
    if text.endswith(("\r\n", "\r", "\n")):
        text = text.rstrip("\r\n") + "\n"  # text mode hands over one "\n" for any line end
    if text.isspace():
        return None  # a line of Unicode white space only
    try:
        return lineno, json.loads(text), None
    except json.JSONDecodeError as err:
        return lineno, None, f"malformed JSON: {err.msg} at column {err.colno}"


def _byte_blocks(path: Path, block_size: int = 1 << 20) -> Iterator[list[bytes]]:
    """The file's lines with their line ends, a block at a time, split where text mode (universal
    newlines) splits them."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        rest = handle.read(block_size).removeprefix(b"\xef\xbb\xbf")
        while True:
            block = handle.read(block_size)
            lines = (rest + block if block else rest).splitlines(keepends=True)
            if not block:
                yield lines
                return
            # the last piece may continue in the next block (or be a "\r" before its "\n")
            rest = lines.pop() if lines and not lines[-1].endswith(b"\n") else b""
            yield lines


def bundle_items(path: Path) -> Iterator[Item]:
    """(entry number, resource, error) for each entry of a bundle; a broken file is one bad item."""
    try:
        with open_text(path) as handle:
            bundle = json.load(handle)
    except json.JSONDecodeError as err:
        yield err.lineno, None, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}"
        return
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        yield 0, None, "not a FHIR Bundle"
        return
    for number, entry in enumerate(bundle.get("entry") or [], start=1):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        yield number, resource, None if resource is not None else "bundle entry without resource"


def loads_line(text: str) -> Any:
    """orjson where it accepts the line, else json (which then decides what the value or error is)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def json_error(text: str) -> str:
    """The quarantine reason of a line json refuses (as `ndjson_items` words it)."""
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return f"malformed JSON: {err.msg} at column {err.colno}"
    return "malformed JSON"


def ends_with_newline(path: Path) -> bool:
    if path.suffix == ".gz":
        tail = b""
        with gzip.open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                tail = block[-1:]
        return tail in (b"\n", b"\r")
    with path.open("rb") as handle:
        handle.seek(0, 2)
        if handle.tell() == 0:
            return False
        handle.seek(-1, 2)
        return handle.read(1) in (b"\n", b"\r")


def export_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """Files to read from an export folder: the manifest's `files` list, else every *.ndjson(.gz)."""
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        try:
            manifest = read_json(manifest_path)
        except json.JSONDecodeError as err:
            raise FlattenError(f"{manifest_path}: not valid JSON: {err}") from None
        entries = manifest.get("files")
        if not isinstance(entries, list):
            raise FlattenError(f"{manifest_path}: no 'files' list")
        paths, types = [], {}
        for entry in entries:
            name = entry.get("name") or entry.get("file") or entry.get("path")
            if not name:
                raise FlattenError(f"{manifest_path}: a 'files' entry has no name: {entry}")
            path = folder / Path(name).name
            if not path.is_file():
                raise FlattenError(f"{manifest_path}: lists {name}, which is not in {folder}")
            paths.append(path)
            if entry.get("type"):
                types[path.name] = entry["type"]
        return paths, types
    paths = sorted(p for p in folder.iterdir() if p.name.endswith((".ndjson", ".ndjson.gz")))
    if not paths:
        raise FlattenError(f"{folder}: no manifest.json and no *.ndjson files")
    return paths, {}
