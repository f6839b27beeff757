"""Files -> raw records: `{"...": ...}` dicts tagged with the file and line they came from.

    medgpt data validate data/train.jsonl 'data/more/*.json' data/corpus/

Everything here is a generator that reads line by line (.jsonl, .txt, .csv, .tsv) or batch by batch
(.parquet, saved `datasets` directories, hub datasets), so a 10 GB corpus never sits in memory; only a
single .json document has to be parsed whole. Bytes are decoded strictly: a file in an unexpected
encoding fails at the exact line instead of turning into mojibake that then trains the model.
Malformed records come back as `Raw(error=...)` rather than exceptions, so validation can list them all.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import glob
import json
import os
import re
import stat
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

from medgpt.utils import MedGPTError

EXTENSIONS = (".jsonl", ".json", ".txt", ".csv", ".tsv", ".parquet")
HUB_PREFIX = "hf://"
SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_ENCODING_HINT = "re-save the file as UTF-8, or set --data.encoding (e.g. gbk, gb18030, big5, latin-1)"


@dataclass
class Raw:
    """One record as read: `obj` when it parsed, else `error` saying why not. `line` is 1-based.
    `fatal`: the error ends the file (undecodable bytes, a broken .json document), so later records are lost
    with it and a loader that skips bad records must not skip this one."""
    file: str
    line: int
    obj: dict | None = None
    error: str | None = None
    fatal: bool = False


class DecodeError(MedGPTError):
    """Bytes that do not decode; carries the line so validation can report `file:line:`."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason


# ----------------------------------------------------------------------------- paths

SHOWN = 10  # problems listed in one message; the rest are counted


def listed(problems: list, total: int | None = None) -> str:
    """The first SHOWN problems, one per indented line, then "... and N more" when there are more (`total`: the
    full count when `problems` holds only the first ones)."""
    total = len(problems) if total is None else total
    lines = "\n".join(f"  {p}" for p in problems[:SHOWN])
    return lines + (f"\n  ... and {total - SHOWN} more" if total > SHOWN else "")


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """A directory written by `datasets.save_to_disk` (read whole, never recursed into)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in SAVED_DATASET_MARKERS)


def _walk(directory: str) -> list[str]:
    """Data files under `directory`, sorted, skipping hidden entries; saved datasets count as one entry."""
    if is_saved_dataset(directory):
        return [directory]
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in list(dirs):
            if is_saved_dataset(os.path.join(root, d)):
                found.append(os.path.join(root, d))
                dirs.remove(d)
        found += [os.path.join(root, f) for f in files if not f.startswith(".") and f.lower().endswith(EXTENSIONS)]
    return sorted(found)


def _special(path: str) -> bool:
    """A named pipe, socket or device: opening one for reading can block forever, so it is never opened."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode) and not os.path.isdir(path)
    except OSError:
        return False


def expand_paths(specs: Iterable[str]) -> list[str]:
    """Files, globs (`**` allowed), directories, saved `datasets` dirs and hub ids -> a list of sources.

    A hub dataset id (`owner/name`, only when nothing local has that name) comes back as `hf://owner/name`.
    """
    out: list[str] = []
    for spec in [specs] if isinstance(specs, str) else specs:
        spec = str(spec).strip()
        if not spec:
            continue
        if spec.startswith(HUB_PREFIX):
            out.append(spec)
        elif os.path.isdir(spec):
            found = _walk(spec)
            if not found:
                raise MedGPTError(f"data directory '{spec}' holds no data files ({', '.join(EXTENSIONS)}); "
                                  "point --data.train_files at the files themselves or add some")
            out += found
        elif os.path.isfile(spec) or _special(spec):  # a special file is refused by iter_raw, as a problem
            if not spec.lower().endswith(EXTENSIONS):
                raise MedGPTError(f"{spec}: unsupported file type '{Path(spec).suffix}'; "
                                  f"supported: {', '.join(EXTENSIONS)} (or a saved `datasets` directory)")
            out.append(spec)
        elif any(c in spec for c in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            found = [m for m in matches if (os.path.isfile(m) or _special(m)) and m.lower().endswith(EXTENSIONS)]
            found += [f for m in matches if os.path.isdir(m) for f in _walk(m)]
            if not found:
                raise MedGPTError(f"data glob '{spec}' matches no data files ({', '.join(EXTENSIONS)}) "
                                  f"in {os.getcwd()}; check the pattern (quote it so the shell leaves it alone)")
            out += sorted(found)
        elif _HUB_ID.fullmatch(spec) and not spec.lower().endswith(EXTENSIONS):
            out.append(HUB_PREFIX + spec)
        else:
            raise MedGPTError(f"data file '{spec}' not found (looked in {os.getcwd()}); check the path, "
                              "or give a glob, a directory, or a hub dataset id like owner/name")
    return list(dict.fromkeys(out))  # a file named twice (or by two globs) is read once


# ----------------------------------------------------------------------------- encodings

def _decodes(sample: bytes, encoding: str, final: bool) -> int | None:
    """None when `sample` decodes, else the offset of the first bad byte."""
    try:
        codecs.getincrementaldecoder(encoding)(errors="strict").decode(sample, final=final)
        return None
    except UnicodeDecodeError as e:
        return e.start


def _guess(sample: bytes) -> str:
    """charset-normalizer's best guess, only to make an error message more helpful."""
    if sum(b > 0x7F for b in sample[:4096]) < 32:  # too few non-ASCII bytes for a meaningful guess
        return ""
    try:
        from charset_normalizer import from_bytes
        best = from_bytes(sample[:65536]).best()
        return f" (charset-normalizer's guess: {best.encoding})" if best is not None else ""
    except Exception:  # a hint is optional; never let it mask the real error
        return ""


def detect_encoding(path: str | os.PathLike, sample_bytes: int = 1 << 20) -> str:
    """'utf-8-sig' (BOM), 'utf-16' (UTF-16 BOM), 'utf-8', or 'gb18030' (a superset of GBK) when it decodes cleanly.

    Only the first `sample_bytes` are checked; later bytes are still decoded strictly while reading.
    """
    with open(path, "rb") as f:
        sample = f.read(sample_bytes)
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    final = len(sample) < sample_bytes  # a cut-off sample may end inside a multi-byte character
    bad_utf8 = _decodes(sample, "utf-8", final)
    if bad_utf8 is None:
        return "utf-8"
    bad_gb = _decodes(sample, "gb18030", final)
    if bad_gb is None:
        return "gb18030"
    # The decoder that got further is most likely the file's encoding; its stopping point is the bad byte.
    enc, offset = ("UTF-8", bad_utf8) if bad_utf8 >= bad_gb else ("GB18030", bad_gb)
    line = sample.count(b"\n", 0, offset) + 1
    raise DecodeError(str(path), line, f"undecodable byte 0x{sample[offset]:02x} at byte offset {offset} "
                      f"(the file reads as {enc} up to there){_guess(sample)}; {_ENCODING_HINT}")


def _resolve_encoding(path: str, encoding: str) -> str:
    if encoding == "auto":
        return detect_encoding(path)
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise MedGPTError(f"unknown encoding '{encoding}' in --data.encoding; use auto, utf-8, gbk, gb18030, ...")
    return encoding


def _lines(path: str, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its newline) lazily; raises DecodeError at the exact line."""
    if "\n".encode(encoding) != b"\n":  # UTF-16/32: newline bytes are not one byte; let Python split lines
        with open(path, encoding=encoding, errors="strict", newline="") as f:
            lineno = 0
            try:
                for lineno, text in enumerate(f, 1):
                    yield lineno, text
            except UnicodeDecodeError:
                raise DecodeError(path, lineno + 1, f"undecodable bytes as {encoding}; {_ENCODING_HINT}") from None
        return
    # ASCII-compatible encodings (UTF-8, GBK, GB18030, Big5, Latin-1...): byte 0x0A is always a newline,
    # so split bytes first and decode each line; the error then names the exact line and byte offset.
    codec = "utf-8" if encoding.lower().replace("_", "-") == "utf-8-sig" else encoding
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode(codec, errors="strict")
            except UnicodeDecodeError as e:
                raise DecodeError(path, lineno, f"undecodable byte 0x{raw[e.start]:02x} at byte offset "
                                  f"{offset + e.start} as {encoding}{_guess(raw)}; {_ENCODING_HINT}") from None
            if lineno == 1:
                text = text.removeprefix("\ufeff")  # a BOM even when the user named plain utf-8
            offset += len(raw)
            yield lineno, text


def _read_text(path: str, encoding: str) -> str:
    return "".join(text for _, text in _lines(path, encoding))


# ----------------------------------------------------------------------------- one reader per file type

NESTED = "JSON nested too deeply to read (a record is an object of strings and short lists)"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(obj) -> str | None:
    """Why a parsed value cannot be used: a `\\ud800`-style escape with no partner decodes to a character that
    no UTF-8 text can hold (hashing, tokenizing or writing it would fail later). Walked without recursion."""
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            m = _LONE_SURROGATE.search(value)
            if m:
                return (f"lone surrogate \\u{ord(m.group()):04x} in a string (a \\ud800-\\udfff escape without "
                        "its pair is not a character); fix or remove it")
        elif isinstance(value, dict):
            stack += list(value) + list(value.values())
        elif isinstance(value, list):
            stack += value
    return None


def _iter_jsonl(path: str, lines: Iterable[tuple[int, str]]) -> Iterator[Raw]:
    for lineno, text in lines:
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield Raw(path, lineno, error=f"malformed JSON: {e.msg} (column {e.colno})")
            continue
        except RecursionError:
            yield Raw(path, lineno, error=NESTED)
            continue
        bad = _lone_surrogate(obj) if _SURROGATE_ESCAPE.search(text) else None
        if bad:
            yield Raw(path, lineno, error=bad)
        elif isinstance(obj, dict):
            yield Raw(path, lineno, obj=obj)
        else:
            yield Raw(path, lineno, error=f"expected a JSON object per line, got {type(obj).__name__}")


_WS = re.compile(r"\s*")


def _decode(text: str, i: int) -> tuple[object, int]:
    """One JSON value at text[i] -> (value, end); too deep a value is a decode error at its start, not a crash."""
    try:
        return json.JSONDecoder().raw_decode(text, i)
    except RecursionError:
        raise json.JSONDecodeError(NESTED, text, i) from None


def _scan_array(text: str, i: int) -> tuple[list[tuple[int, object]], int]:
    """Parse the JSON array starting at text[i] == '[' -> ([(start offset, element)], end offset)."""
    items = []
    i = _WS.match(text, i + 1).end()
    if text.startswith("]", i):
        return items, i + 1
    while True:
        obj, end = _decode(text, i)
        items.append((i, obj))
        i = _WS.match(text, end).end()
        if text.startswith("]", i):
            return items, i + 1
        if not text.startswith(",", i):
            raise json.JSONDecodeError("expected ',' or ']'", text, i)
        i = _WS.match(text, i + 1).end()


def _json_rows(text: str, i: int, whole: dict) -> list[tuple[int, object]]:
    """A top-level JSON object -> [(offset, row)]: split lists are concatenated, columns become rows."""
    fields = []  # [(key, offset of value)]
    j = _WS.match(text, i + 1).end()
    while not text.startswith("}", j):
        key, j = _decode(text, j)
        j = _WS.match(text, j).end()
        if not text.startswith(":", j):
            raise json.JSONDecodeError("expected ':'", text, j)
        start = _WS.match(text, j + 1).end()
        _, j = _decode(text, start)
        fields.append((key, start))
        j = _WS.match(text, j).end()
        if text.startswith(",", j):
            j = _WS.match(text, j + 1).end()
    if not fields or not all(text.startswith("[", start) for _, start in fields):
        return [(i, whole)]  # one record written as a single object
    lists = {key: _scan_array(text, start)[0] for key, start in fields}
    if all(isinstance(v, dict) for items in lists.values() for _, v in items):
        return [item for items in lists.values() for item in items]  # {"train": [...], "test": [...]}
    lengths = {len(items) for items in lists.values()}
    if len(lengths) != 1:
        raise json.JSONDecodeError(f"columns have different lengths {sorted(lengths)}", text, i)
    columns = list(lists.values())
    return [(row[0][0], {key: cell[1] for key, cell in zip(lists, row)}) for row in zip(*columns)]


def _json_values(text: str, i: int) -> Iterator[tuple[int, object]]:
    """(offset, record) of every top-level value from text[i] on. Lists and objects may follow one another
    (`[a]\\n[b, c]` is three records); anything else after them is an error, never silently dropped."""
    first = True
    while i < len(text):
        if text[i] == "[":
            items, end = _scan_array(text, i)
            yield from items
        elif text[i] == "{":
            obj, end = _decode(text, i)
            alone = first and _WS.match(text, end).end() == len(text)
            yield from _json_rows(text, i, obj) if alone else [(i, obj)]
        elif first:
            raise json.JSONDecodeError("a .json file must hold a list of records or an object", text, i)
        else:
            raise json.JSONDecodeError(f"unexpected text {text[i:i + 20]!r} after the end of the JSON data "
                                       "(a .json file holds lists or objects, one after another)", text, i)
        first, i = False, _WS.match(text, end).end()


def _iter_json(path: str, encoding: str) -> Iterator[Raw]:
    text = _read_text(path, encoding)
    newlines = [m.start() for m in re.finditer("\n", text)]
    line_of = lambda offset: bisect.bisect_left(newlines, offset) + 1  # noqa: E731
    i = _WS.match(text).end()
    check = _SURROGATE_ESCAPE.search(text) is not None
    try:
        if text.startswith("{", i):
            _, end = _decode(text, i)
            if _WS.match(text, end).end() < len(text) and "\n" not in text[i:end]:
                yield from _iter_jsonl(path, enumerate(text.split("\n"), 1))  # one object per line: JSON Lines
                return
        for offset, obj in _json_values(text, i):
            bad = _lone_surrogate(obj) if check else None
            if bad or not isinstance(obj, dict):
                yield Raw(path, line_of(offset), error=bad or f"expected a JSON object, got {type(obj).__name__}")
            else:
                yield Raw(path, line_of(offset), obj=obj)
    except json.JSONDecodeError as e:
        plain = e.msg == NESTED or e.msg.startswith(("a .json", "unexpected text"))
        yield Raw(path, e.lineno, error=e.msg if plain else f"malformed JSON: {e.msg} (column {e.colno})", fatal=True)


def _iter_txt(path: str, encoding: str, text_mode: str) -> Iterator[Raw]:
    if text_mode == "file":
        text = _read_text(path, encoding).strip()
        if text:
            yield Raw(path, 1, obj={"text": text})
        return
    if text_mode not in ("line", "paragraph"):
        raise MedGPTError(f"unknown --data.text_mode '{text_mode}'; use line, paragraph or file")
    para, start = [], 0
    for lineno, text in _lines(path, encoding):
        text = text.rstrip("\r\n")
        if text_mode == "line":
            if text.strip():
                yield Raw(path, lineno, obj={"text": text})
        elif text.strip():
            start = start or lineno
            para.append(text)
        elif para:
            yield Raw(path, start, obj={"text": "\n".join(para)})
            para, start = [], 0
    if para:
        yield Raw(path, start, obj={"text": "\n".join(para)})


def _iter_csv(path: str, encoding: str, delimiter: str) -> Iterator[Raw]:
    # Long medical texts overflow csv's default 128 KiB field limit; the limit is process-wide.
    csv.field_size_limit(2**31 - 1)
    lines = _lines(path, encoding)
    reader = csv.reader((text for _, text in lines), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    header = [h.strip() for h in header]
    while True:
        start = reader.line_num + 1
        row = next(reader, None)
        if row is None:
            return
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield Raw(path, start, error=f"row has {len(row)} fields but the header has {len(header)}")
        else:
            yield Raw(path, start, obj=dict(zip(header, row)))


def _iter_parquet(path: str) -> Iterator[Raw]:
    import pyarrow.parquet as pq
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    except Exception as e:  # pyarrow raises several types for a truncated or non-parquet file
        raise MedGPTError(f"{path}: not a readable parquet file ({e})") from None
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            index += 1
            yield Raw(path, index, obj=row)


def _iter_rows(label: str, rows: Iterable[dict]) -> Iterator[Raw]:
    for index, row in enumerate(rows, 1):
        yield Raw(label, index, obj=dict(row))


def _iter_saved(path: str) -> Iterator[Raw]:
    import datasets
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):  # a saved split dict: train when there is one, else every split
        ds = ds["train"] if "train" in ds else datasets.concatenate_datasets(list(ds.values()))
    yield from _iter_rows(path, ds)


def _iter_hub(spec: str) -> Iterator[Raw]:
    name = spec.removeprefix(HUB_PREFIX)
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    how = ("save it on a connected machine with `datasets.load_dataset(...).save_to_disk(DIR)` and pass DIR, "
           "or pass local files")
    if offline:
        raise MedGPTError(f"'{name}' is not a local file or directory, and loading it as a hub dataset needs "
                          f"the network, but offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); {how}")
    import datasets
    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as e:  # network, auth and not-found errors all mean the same thing to the user
        raise MedGPTError(f"'{name}' is not a local file or directory, and loading it as a hub dataset failed "
                          f"({type(e).__name__}: {e}); if you are offline, {how}") from None
    yield from _iter_rows(spec, ds)


def iter_raw(path: str, encoding: str = "auto", text_mode: str = "line") -> Iterator[Raw]:
    """Raw records of one source from `expand_paths`. A decode failure ends the file with one error Raw."""
    path = str(path)
    if path.startswith(HUB_PREFIX):
        yield from _iter_hub(path)
        return
    if os.path.isdir(path):
        yield from _iter_saved(path)
        return
    ext = Path(path).suffix.lower()
    if ext not in EXTENSIONS:
        raise MedGPTError(f"{path}: unsupported file type '{ext}'; supported: {', '.join(EXTENSIONS)}")
    if _special(path):
        raise MedGPTError(f"{path}: not a regular file (a named pipe, socket or device), so it is not read; "
                          "write the data to a regular file and pass that")
    if ext == ".parquet":
        yield from _iter_parquet(path)
        return
    try:
        enc = _resolve_encoding(path, encoding)
        if ext == ".jsonl":
            yield from _iter_jsonl(path, _lines(path, enc))
        elif ext == ".json":
            yield from _iter_json(path, enc)
        elif ext == ".txt":
            yield from _iter_txt(path, enc, text_mode)
        else:
            yield from _iter_csv(path, enc, "\t" if ext == ".tsv" else ",")
    except DecodeError as e:
        yield Raw(path, e.line, error=e.reason, fatal=True)


def iter_records(paths: Iterable[str], encoding: str = "auto", text_mode: str = "line") -> Iterator[Raw]:
    """Raw records of every source that `paths` (files, globs, dirs, hub ids) expands to, in order."""
    return chain.from_iterable(iter_raw(p, encoding, text_mode) for p in expand_paths(paths))


def read_parsed(path: str, parse, what: str, shape: str, max_samples: int | None = None) -> list:
    """`parse` applied to each raw record of one file (it raises ValueError for a bad one); every bad record is
    listed as file:line in one MedGPTError (first 10, then a count), ending with the record `shape` expected."""
    items, problems = [], []
    for raw in iter_raw(path):
        if max_samples is not None and len(items) >= max_samples:
            break
        if raw.error is None:
            try:
                items.append(parse(raw.obj))
                continue
            except ValueError as e:
                raw.error = str(e)
        problems.append(f"{path}:{raw.line}: {raw.error}")
    if problems:
        raise MedGPTError(f"{len(problems)} bad {what}(s):\n{listed(problems)}\n{shape}")
    if not items:
        raise MedGPTError(f"{path}: no {what}s in the file.")
    return items
