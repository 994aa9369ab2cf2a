"""Streaming validator / ingester for LLaMA-Factory SFT datasets (alpaca / sharegpt).

Pure stdlib: no FastAPI, no DB. Two ways in:

* pull:  ``report = ingest_stream(fileobj)`` (anything with ``.read(n)``) or ``ingest_path(path)``
* push:  ``ing = DatasetIngest(...); ing.feed(chunk); ...; report = ing.finish()``
  (the web layer feeds network chunks as they arrive while writing them to disk; ``feed`` is
  CPU work, so call it from a worker thread, not the event loop).

The whole file is never held in memory: raw bytes are sha256-hashed as they arrive, decoded by an
incremental UTF-8 decoder (BOM accepted and stripped) and parsed row by row with the C
``json`` scanner over a sliding text buffer (``chunk_size`` bytes at a time; a row larger than a
chunk just grows the buffer, up to ``max_row_bytes``).

Structural problems (the file cannot be loaded by ``datasets``/LLaMA-Factory at all) raise
:class:`DatasetFormatError` (or :class:`DatasetTooLarge` for the size limits). Row-level problems
are collected in the report: *fatal* ones (would make LLaMA-Factory's loader or converter crash,
e.g. a non-string ``instruction``, a column whose JSON type changes between rows, a malformed
``history``) set ``report.ok = False``; *warnings* (rows LLaMA-Factory silently drops or trains
badly on, duplicates, over-long rows) keep ``ok`` True.

Semantics mirror LLaMA-Factory 0.9.x ``data/parser.py`` (``DatasetAttr.join``: when ``columns`` /
``tags`` are present in ``dataset_info.json``, every column / tag *not* listed becomes ``None``) and
``data/converter.py`` (``AlpacaDatasetConverter`` / ``SharegptDatasetConverter``).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import json.decoder
import math
import os
import queue
import random
import re
import threading
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Mapping

__all__ = [
    "ALPACA_DEFAULT_COLUMNS",
    "SHAREGPT_DEFAULT_COLUMNS",
    "DEFAULT_TAGS",
    "OPENAI_TAGS",
    "DatasetFormatError",
    "DatasetTooLarge",
    "DatasetIngest",
    "IngestReport",
    "LengthStats",
    "ingest_stream",
    "ingest_path",
    "dataset_info_entry",
]

MiB = 1024 * 1024

# LLaMA-Factory's DatasetAttr defaults (parser.py). A column set to None is not read.
ALPACA_DEFAULT_COLUMNS: dict[str, str | None] = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": None,
    "system": None,
    "tools": None,
}
SHAREGPT_DEFAULT_COLUMNS: dict[str, str | None] = {
    "messages": "conversations",
    "system": None,
    "tools": None,
}
# Auto-detected names for the optional columns (default None in LLaMA-Factory, so they must be
# declared in `columns` when present in the file).
_OPTIONAL_AUTO_NAMES = {"history": "history", "system": "system", "tools": "tools"}

TAG_NAMES = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
DEFAULT_TAGS: dict[str, str] = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
OPENAI_TAGS: dict[str, str] = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}

# Kinds of row issues. Fatal: LLaMA-Factory / datasets would fail to load or convert the file.
FATAL_KINDS = frozenset(
    {"bad_type", "mixed_types", "bad_history", "bad_messages", "bad_message", "missing_messages", "bad_tools",
     "bad_unicode"}
)
# Kinds for which LLaMA-Factory's SFT pipeline drops the row ("Dropped invalid example" /
# "Skipping this abnormal example").
DROP_KINDS = frozenset({"missing_output", "bad_role", "bad_alternation", "unpaired_turns", "empty_conversation"})

# Structural bounds. Real SFT rows nest 3-4 levels (row > conversations > message > text); deeper
# rows are refused before anything recursive (Python's json, hashing, the preview) can overflow.
MAX_NESTING = 64
# datasets/Arrow makes a column of every key of every row; LLaMA-Factory reads a handful.
MAX_KEYS = 1000
MAX_KEY_CHARS = 1024
# Python's json turns an escaped UTF-16 surrogate without its pair (a lone \udc00) into a str that
# cannot be encoded as UTF-8 (to store or train on). Rows are searched for one only once the text
# holds such an escape: a regex scan (~1 GB/s) that pairs the escapes of escaped emoji as it goes.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate_escape(text: str, start: int) -> bool:
    """Whether JSON text (from `start`) may hold a surrogate escape that is not half of a
    high-then-low pair. An escaped backslash before "udc00", or a pair cut at either end, also
    answers True: the rows are then searched, which finds nothing wrong."""
    high_end = -1  # where a high surrogate's escape ended, waiting for its low half
    for match in _SURROGATE_ESCAPE.finditer(text, start):
        is_high = match.group()[3] in "89abAB"
        if high_end >= 0:
            if is_high or match.start() != high_end:
                return True
            high_end = -1
        elif is_high:
            high_end = match.end()
        else:
            return True
    return high_end >= 0


# --------------------------------------------------------------------------------------- errors
class DatasetFormatError(ValueError):
    """The file as a whole cannot be used (not JSON, truncated, wrong top level, bad encoding...)."""

    def __init__(self, message: str, byte_offset: int | None = None, row: int | None = None):
        super().__init__(message)
        self.message = message
        self.byte_offset = byte_offset
        self.row = row

    def to_dict(self) -> dict[str, Any]:
        return {"error": type(self).__name__, "message": self.message, "byte_offset": self.byte_offset, "row": self.row}


class DatasetTooLarge(DatasetFormatError):
    """``max_total_bytes`` or ``max_row_bytes`` exceeded (subclass of DatasetFormatError)."""

    def __init__(self, message: str, byte_offset: int | None = None, row: int | None = None, limit: int | None = None):
        super().__init__(message, byte_offset=byte_offset, row=row)
        self.limit = limit


# ---------------------------------------------------------------------------------------- report
@dataclass
class LengthStats:
    count: int = 0
    min: int | None = None
    mean: float | None = None
    p50: int | None = None
    p95: int | None = None
    max: int | None = None


@dataclass
class IngestReport:
    ok: bool  # no fatal row issue (structural problems raise instead)
    container: str  # "json" (array) | "jsonl"
    formatting: str  # "alpaca" | "sharegpt"
    columns: dict[str, str | None]  # effective LLaMA-Factory column mapping (None = not read)
    tags: dict[str, str] | None  # sharegpt tags (None for alpaca)
    rows: int
    bytes: int
    sha256: str
    bom: bool
    keys_seen: list[str]
    issue_counts: dict[str, int]
    issues: list[dict[str, Any]]  # first `max_issues`: {"row", "kind", "severity", "message"}
    first_fatal: dict[str, Any] | None
    fatal_count: int
    warning_count: int
    duplicate_rows: int
    dropped_rows: int  # rows LLaMA-Factory's SFT preprocessing would drop
    trainable_rows: int  # rows it keeps that have a non-empty response to learn
    prompt_chars: LengthStats
    response_chars: LengthStats
    preview: list[Any]  # first `preview_rows` rows, as parsed
    sample: list[dict[str, Any]]  # reservoir sample: {"row": n, "data": obj}, sorted by row
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def raise_if_rejected(self) -> None:
        if not self.ok and self.first_fatal is not None:
            f = self.first_fatal
            raise DatasetFormatError(f"row {f['row']}: {f['message']}", row=f["row"])


# ------------------------------------------------------------------------------------ internals
_WS = re.compile(r"[ \t\n\r]*")
_HWS = re.compile(r"[ \t\r]*")  # whitespace on the same line (JSONL)
_ARRAY_SEP = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")
_LINE_SEP = re.compile(r"[ \t\r]*\n[ \t\n\r]*")

_ST_BEGIN, _ST_FIRST, _ST_VALUE, _ST_AFTER, _ST_END, _ST_ROW, _ST_AFTER_ROW = range(7)

_KIND = {str: "string", int: "number", float: "number", bool: "boolean", list: "array", dict: "object"}
_SMALL = 4096  # exact histogram buckets below this length
_LOG_RES = 64  # log buckets per octave above it (~1% resolution)


def _utf8len(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


class _LenHist:
    """Bounded-memory length histogram: exact counts below 4096, ~1% log-spaced buckets above
    (a few hundred buckets up to 10^9). Lengths are appended to a small batch list (cheap per row)
    and folded in with collections.Counter (C) every 64 Ki rows."""

    __slots__ = ("small", "big", "count", "total", "lo", "hi", "batch")

    def __init__(self) -> None:
        self.small = [0] * _SMALL
        self.big: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.lo: int | None = None
        self.hi = 0
        self.batch: list[int] = []

    def flush(self) -> None:
        batch = self.batch
        if not batch:
            return
        self.count += len(batch)
        self.total += sum(batch)
        lo, hi = min(batch), max(batch)
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = max(self.hi, hi)
        small, big = self.small, self.big
        for n, c in Counter(batch).items():
            if n < _SMALL:
                small[n] += c
            else:
                b = int(math.log2(n / _SMALL) * _LOG_RES)
                big[b] = big.get(b, 0) + c
        batch.clear()

    def finalize(self) -> LengthStats:
        self.flush()
        count = self.count
        if count == 0:
            return LengthStats()
        small, big, hi = self.small, self.big, self.hi

        def pct(p: float) -> int:
            rank = max(1, math.ceil(p * count))
            acc = 0
            for i, c in enumerate(small):
                acc += c
                if acc >= rank:
                    return i
            for b in sorted(big):
                acc += big[b]
                if acc >= rank:
                    return min(hi, int(_SMALL * 2 ** ((b + 1) / _LOG_RES)))  # bucket's upper edge
            return hi

        return LengthStats(
            count=count, min=self.lo, mean=round(self.total / count, 2), p50=pct(0.5), p95=pct(0.95), max=hi
        )


class _DigestSet:
    """Open-addressing set of 64-bit row digests in array('Q') + array('I') (first row number):
    12 bytes per slot at load factor <= 0.7, i.e. 17-34 bytes per row (1.35 M rows: 2^21 slots
    = 24 MiB), versus ~80-110 bytes per row for a Python set of ints.
    Stores the first row number of each digest to report "duplicate of row N"."""

    __slots__ = ("keys", "rows", "mask", "used")

    def __init__(self, cap_log2: int = 16) -> None:
        cap = 1 << cap_log2
        self.keys = array("Q", bytes(8 * cap))
        self.rows = array("I", bytes(4 * cap))
        self.mask = cap - 1
        self.used = 0

    def add(self, h: int, row: int) -> int:
        """Insert digest h (nonzero); return 0 if new, else the row that first had it."""
        keys = self.keys
        mask = self.mask
        i = h & mask
        while True:
            k = keys[i]
            if k == 0:
                break
            if k == h:
                return self.rows[i]
            i = (i + 1) & mask
        keys[i] = h
        self.rows[i] = row
        self.used += 1
        if self.used * 10 > mask * 7:  # load factor 0.7
            self.grow()
        return 0

    def grow(self) -> None:
        old_keys, old_rows = self.keys, self.rows
        cap = (self.mask + 1) * 2
        self.keys = keys = array("Q", bytes(8 * cap))
        self.rows = rows = array("I", bytes(4 * cap))
        self.mask = mask = cap - 1
        for j, h in enumerate(old_keys):
            if h:
                i = h & mask
                while keys[i]:
                    i = (i + 1) & mask
                keys[i] = h
                rows[i] = old_rows[j]

    def nbytes(self) -> int:
        return len(self.keys) * 8 + len(self.rows) * self.rows.itemsize


class _NestedTooDeep(ValueError):
    """A value nests arrays/objects more than MAX_NESTING levels deep."""


def _freeze(v: Any, depth: int = 1) -> Any:
    """Hashable, key-order independent form of a parsed JSON value (dict -> frozenset of items).
    Raises _NestedTooDeep past MAX_NESTING levels (the recursion stays far from Python's limit)."""
    t = type(v)
    if t is dict or t is list:
        if depth > MAX_NESTING:
            raise _NestedTooDeep
        if t is dict:
            return frozenset([(k, _freeze(x, depth + 1)) for k, x in v.items()])
        return tuple([_freeze(x, depth + 1) for x in v])
    return v


def _nested_too_deep(row: int, byte_offset: int | None = None) -> DatasetFormatError:
    return DatasetFormatError(
        f"row {row} nests arrays or objects more than {MAX_NESTING} levels deep; an SFT row holds strings,"
        " lists of messages and [prompt, response] pairs",
        byte_offset=byte_offset,
        row=row,
    )


def _holds_surrogate(v: Any) -> bool:
    """Whether a parsed value (nesting already bounded) holds a lone UTF-16 surrogate."""
    t = type(v)
    if t is str:
        return _SURROGATE.search(v) is not None
    if t is dict:
        return any(_holds_surrogate(k) or _holds_surrogate(x) for k, x in v.items())
    if t is list:
        return any(_holds_surrogate(x) for x in v)
    return False


def _describe(v: Any) -> str:
    return "null" if v is None else _KIND.get(type(v), type(v).__name__)


# ---------------------------------------------------------------------------------------- ingest
class DatasetIngest:
    """Push-style ingester. ``feed(bytes)`` any number of times, then ``finish()`` -> IngestReport.

    Parameters
    ----------
    container: "auto" | "json" | "jsonl" -- auto: first non-whitespace byte ``[`` -> JSON array,
        ``{`` -> JSON Lines.
    formatting: "auto" | "alpaca" | "sharegpt" -- auto: detected from the keys of row 1.
    columns: LLaMA-Factory ``columns`` mapping (prompt/query/response/system/history/tools for
        alpaca, messages/system/tools for sharegpt) for files whose keys differ from the defaults;
        unspecified roles keep the auto names.
    tags: sharegpt ``tags`` overrides (role_tag, content_tag, user_tag, ...); detected otherwise.
    """

    def __init__(
        self,
        *,
        container: str = "auto",
        formatting: str = "auto",
        columns: Mapping[str, str | None] | None = None,
        tags: Mapping[str, str] | None = None,
        max_total_bytes: int | None = 20 * 1024 * MiB,
        max_row_bytes: int = 32 * MiB,
        max_row_chars: int | None = 100_000,
        preview_rows: int = 20,
        sample_size: int = 2000,
        seed: int = 0,
        max_issues: int = 50,
        check_duplicates: bool = True,
        chunk_size: int = 4 * MiB,
    ) -> None:
        if container not in ("auto", "json", "jsonl"):
            raise ValueError(f"container must be auto, json or jsonl, not {container!r}")
        if formatting not in ("auto", "alpaca", "sharegpt"):
            raise ValueError(f"formatting must be auto, alpaca or sharegpt, not {formatting!r}")
        self.container = container
        self.formatting = formatting
        self.user_columns = dict(columns or {})
        self.user_tags = dict(tags or {})
        bad = set(self.user_tags) - set(TAG_NAMES)
        if bad:
            raise ValueError(f"unknown tag names: {sorted(bad)}")
        self.max_total_bytes = max_total_bytes
        self.max_row_bytes = max_row_bytes
        self.max_row_chars = max_row_chars
        self.preview_rows = preview_rows
        self.sample_size = sample_size
        self.max_issues = max_issues
        self.chunk_size = max(1, chunk_size)

        self._t0 = time.perf_counter()
        self._sha = hashlib.sha256()
        self._nbytes = 0  # raw bytes received
        self._pending = bytearray()  # raw bytes not yet decoded
        self._head_done = False  # BOM / encoding sniffing done
        self._bom = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._decoded_bytes = 0  # absolute offset just past the bytes handed to the decoder
        self._buf = ""  # sliding text buffer
        self._pos = 0  # parse position in _buf
        self._buf_base = 0  # absolute byte offset of _buf[0]
        self._buf_ascii = True
        self._state = _ST_BEGIN
        self._wait_for = 0  # chars of an incomplete row: don't re-parse before twice as many are buffered
        self._error: DatasetFormatError | None = None
        self._finished = False
        self._report: IngestReport | None = None
        self._scan = json.decoder.JSONDecoder().scan_once
        self._check_surrogates = False  # turned on once the text holds a surrogate escape

        # row bookkeeping
        self.rows = 0
        self._validate = None
        self._cols: dict[str, str | None] = {}
        self._tags: dict[str, str] | None = None
        self._keys_seen: set[str] = set()
        self._sigs: set[tuple] = set()  # (keys, value types) layouts already checked
        self._kinds: dict[str, str] = {}  # key -> JSON kind seen first (Arrow needs one type per column)
        self._kind_rows: dict[str, int] = {}
        self._issue_counts: dict[str, int] = {}
        self._issues: list[dict[str, Any]] = []
        self._first_fatal: dict[str, Any] | None = None
        self._fatal = 0
        self._warn = 0
        self._dups = 0
        self._dropped = 0
        self._trainable = 0
        self._digests = _DigestSet() if check_duplicates else None
        self._ph = _LenHist()
        self._rh = _LenHist()
        self._pbatch = self._ph.batch
        self._rbatch = self._rh.batch
        self._preview: list[Any] = []
        # reservoir sampling (Algorithm L: O(k log(n/k)) random draws)
        self._rng = random.Random(seed)
        self._sample: list[tuple[int, Any]] = []
        self._res_w = 0.0
        self._res_next = 0

    # ---------------------------------------------------------------- public push API
    @property
    def bytes_received(self) -> int:
        return self._nbytes

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Feed raw bytes. Raises DatasetFormatError / DatasetTooLarge as soon as detectable."""
        self._feed(chunk, hashed=False)

    def _feed(self, chunk: bytes | bytearray | memoryview, hashed: bool) -> None:
        if self._error is not None:
            raise self._error
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if not chunk:
            return
        n = len(chunk)
        if self.max_total_bytes is not None and self._nbytes + n > self.max_total_bytes:
            self._fail(
                DatasetTooLarge(
                    f"dataset is larger than the limit of {self.max_total_bytes} bytes",
                    byte_offset=self.max_total_bytes,
                    limit=self.max_total_bytes,
                )
            )
        self._nbytes += n
        if not hashed:
            self._sha.update(chunk)
        if not self._pending and n >= self.chunk_size and self._head_done:
            self._run(final=False, data=chunk)  # big chunk: decode it in place, no copy
            return
        self._pending += chunk
        if len(self._pending) >= self.chunk_size:
            self._run(final=False)

    def finish(self) -> IngestReport:
        """Signal end of input; parse what is left and return the report (or raise)."""
        if self._error is not None:
            raise self._error
        if self._report is not None:
            return self._report
        self._finished = True
        self._run(final=True)
        self._report = self._build_report()
        return self._report

    # ---------------------------------------------------------------- decoding
    def _fail(self, err: DatasetFormatError) -> None:
        self._error = err
        raise err

    def _run(self, final: bool, data: Any = None) -> None:
        try:
            self._decode_pending(final, self._pending if data is None else data)
            self._parse(final)
        except DatasetFormatError as e:
            self._error = e
            raise

    def _decode_pending(self, final: bool, data: Any) -> None:
        if not self._head_done:
            if len(data) < 3 and not final:
                return
            self._head_done = True
            if data[:3] == b"\xef\xbb\xbf":
                self._bom = True
                del data[:3]
                self._decoded_bytes = 3
            elif data[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise DatasetFormatError(
                    "the file is UTF-16 encoded (byte order mark FF FE / FE FF); save it as UTF-8", byte_offset=0
                )
            elif b"\x00" in data[:4]:  # JSON text never holds a NUL: "[\0{\0" is UTF-16 or UTF-32
                raise DatasetFormatError(
                    "the file is UTF-16 or UTF-32 encoded without a byte order mark (NUL bytes at its start);"
                    " save it as UTF-8",
                    byte_offset=data.index(b"\x00"),
                )
        if not data and not final:
            return
        dec = self._decoder
        held = len(dec.getstate()[0])  # bytes kept from the previous call (split UTF-8 sequence)
        try:
            text = dec.decode(data, final)
        except UnicodeDecodeError as e:
            self._refuse_bad_utf8(e, held)
        held_after = len(dec.getstate()[0])
        text_bytes = len(data) + held - held_after  # UTF-8 size of `text`
        self._decoded_bytes += len(data)
        if data is self._pending:
            data.clear()
        self._append_text(text, text_end=self._decoded_bytes - held_after, text_bytes=text_bytes)

    def _refuse_bad_utf8(self, e: UnicodeDecodeError, held: int) -> None:
        """Parse the valid text before the bad byte (so that the error can name its row), then raise."""
        off = self._decoded_bytes - held + e.start
        good = e.object[: e.start].decode("utf-8")  # `e.object` starts with the `held` bytes
        self._append_text(good, text_end=off, text_bytes=e.start)
        self._wait_for = 0
        self._parse(final=False)
        row = self.rows + 1
        bad = e.object[e.start : e.start + 1].hex().upper()
        if e.reason == "unexpected end of data":
            msg = f"the file ends in the middle of a UTF-8 sequence at byte {off} (row {row})"
        else:
            msg = (
                f"invalid UTF-8 at byte {off} (byte 0x{bad}, row {row}); the file must be UTF-8 encoded"
                " (it looks like Latin-1/Windows-1252 or binary data)"
            )
        raise DatasetFormatError(msg, byte_offset=off, row=row) from None

    def _append_text(self, text: str, *, text_end: int, text_bytes: int) -> None:
        """Slide the text buffer: drop what was parsed, append `text` (which ends at byte `text_end`)."""
        buf, pos = self._buf, self._pos
        if pos:
            left = buf[pos:]
            self._buf = buf = ""  # release the old buffer before building the new one
            self._buf_base = text_end - text_bytes - _utf8len(left)
            buf = left + text
        elif buf:
            buf += text  # nothing consumed yet (a row larger than the chunk): grow
        else:
            buf = text
            self._buf_base = text_end - text_bytes
        self._buf = buf
        self._pos = 0
        self._buf_ascii = buf.isascii()
        if not self._check_surrogates:  # from 11 characters before the new text: a pair may straddle chunks
            self._check_surrogates = _lone_surrogate_escape(buf, max(0, len(buf) - len(text) - 11))

    def _offset(self, i: int) -> int:
        """Absolute byte offset of text position i in the current buffer."""
        if self._buf_ascii:
            return self._buf_base + i
        return self._buf_base + _utf8len(self._buf[:i])

    # ---------------------------------------------------------------- parsing
    def _parse(self, final: bool) -> None:
        buf = self._buf
        n = len(buf)
        pos = self._pos
        state = self._state
        if not final and n - pos < 2 * self._wait_for:
            # a big incomplete row: re-parse only once the buffered text has doubled (O(n) total)
            if (n - pos) * 4 > self.max_row_bytes:
                self._check_row_size(buf[pos:], pos, complete=False)
            return
        self._wait_for = 0
        ws = _WS.match
        scan = self._scan
        try:
            while True:
                if (state == _ST_AFTER or state == _ST_AFTER_ROW) and self._validate is not None:
                    pos = self._fast_rows(buf, pos, state == _ST_AFTER)
                if state == _ST_AFTER:  # between array elements
                    pos = ws(buf, pos).end()
                    if pos >= n:
                        break
                    c = buf[pos]
                    if c == ",":
                        pos += 1
                        state = _ST_VALUE
                    elif c == "]":
                        pos += 1
                        state = _ST_END
                        continue
                    else:
                        raise DatasetFormatError(
                            f"invalid JSON after row {self.rows}: expected ',' or ']' but found {buf[pos]!r}"
                            f" at byte {self._offset(pos)}",
                            byte_offset=self._offset(pos),
                            row=self.rows,
                        )
                if state == _ST_VALUE or state == _ST_ROW or state == _ST_FIRST:
                    pos = ws(buf, pos).end()
                    if pos >= n:
                        break
                    if buf[pos] == "]" and state != _ST_ROW:
                        off = self._offset(pos)
                        if state == _ST_FIRST:
                            raise DatasetFormatError("the dataset is an empty list: it has no rows", byte_offset=off)
                        raise DatasetFormatError(
                            f"invalid JSON: trailing comma after row {self.rows} at byte {off}", byte_offset=off,
                            row=self.rows,
                        )
                    try:
                        obj, end = scan(buf, pos)
                    except StopIteration as e:
                        if not final and e.value >= n - 8:
                            break
                        self._raise_json_error("Expecting value", e.value, pos, final)
                    except json.JSONDecodeError as e:
                        if not final and (e.pos >= n - 8 or e.msg.startswith("Unterminated string")):
                            break
                        self._raise_json_error(e.msg, e.pos, pos, final)
                    except RecursionError:  # the C scanner recurses once per level
                        raise _nested_too_deep(self.rows + 1, self._offset(pos)) from None
                    if type(obj) is not dict:
                        if end >= n and not final:
                            break  # a scalar may continue in the next chunk
                        self._non_object_row(obj, pos)
                    row_chars = end - pos
                    if row_chars * 4 > self.max_row_bytes:
                        self._check_row_size(buf[pos:end], pos, complete=True)
                    if state == _ST_ROW:
                        if buf.find("\n", pos, end) != -1:
                            self._multiline_row(pos)
                        state = _ST_AFTER_ROW
                    else:
                        state = _ST_AFTER
                    self.rows += 1
                    if self._validate is None:
                        self._setup_schema(obj, pos)
                    self._validate(obj, self.rows, row_chars)
                    pos = end
                    continue
                if state == _ST_AFTER_ROW:
                    pos = _HWS.match(buf, pos).end()
                    if pos >= n:
                        break
                    if buf[pos] != "\n":
                        off = self._offset(pos)
                        raise DatasetFormatError(
                            f"invalid JSON Lines: expected a newline after row {self.rows} but found {buf[pos]!r}"
                            f" at byte {off} (one JSON object per line)",
                            byte_offset=off,
                            row=self.rows,
                        )
                    pos += 1
                    state = _ST_ROW
                    continue
                if state == _ST_BEGIN:
                    pos = ws(buf, pos).end()
                    if pos >= n:
                        break
                    c = buf[pos]
                    container = self.container
                    if container == "auto":
                        if c == "[":
                            container = "json"
                        elif c == "{":
                            container = "jsonl"
                        else:
                            off = self._offset(pos)
                            raise DatasetFormatError(
                                f"not JSON: the file starts with {buf[pos:pos + 20]!r} at byte {off}; expected '['"
                                " (a JSON array of rows) or '{' (JSON Lines, one object per line)",
                                byte_offset=off,
                            )
                        self.container = container
                    if container == "json":
                        if c != "[":
                            off = self._offset(pos)
                            if c == "{":
                                msg = "the file is a JSON object, not a list of rows: wrap the rows in [ ]"
                            else:
                                msg = f"not a JSON array: the file starts with {buf[pos:pos + 20]!r}"
                            raise DatasetFormatError(msg, byte_offset=off)
                        pos += 1
                        state = _ST_FIRST
                    else:
                        state = _ST_ROW
                    continue
                if state == _ST_END:
                    pos = ws(buf, pos).end()
                    if pos >= n:
                        break
                    off = self._offset(pos)
                    raise DatasetFormatError(
                        f"trailing data after the end of the JSON array at byte {off}: {buf[pos:pos + 20]!r}",
                        byte_offset=off,
                        row=self.rows,
                    )
        finally:
            self._pos = pos
            self._state = state

        # ran out of buffered text
        if not final:
            pend = n - pos
            if pend > self.chunk_size:
                self._wait_for = pend
            if pend * 4 > self.max_row_bytes and state in (_ST_VALUE, _ST_ROW, _ST_FIRST):
                self._check_row_size(buf[pos:], pos, complete=False)
            return
        if state == _ST_BEGIN:
            raise DatasetFormatError("the file is empty" + (" (only a byte order mark)" if self._bom else ""),
                                     byte_offset=0)
        if state in (_ST_FIRST, _ST_VALUE, _ST_AFTER):
            off = self._offset(n)
            raise DatasetFormatError(
                f"truncated JSON: the file ends after row {self.rows} but the array is not closed with ']'",
                byte_offset=off,
                row=self.rows,
            )
        # _ST_END, _ST_ROW, _ST_AFTER_ROW: complete (JSONL always has >= 1 row here)

    def _fast_rows(self, buf: str, pos: int, array_mode: bool) -> int:
        """Hot loop: separator + well-formed object rows. Returns the position after the last row it
        handled; anything unusual (errors, end of buffer, scalars, huge rows) is left to the general
        state machine in _parse, which redoes that step from the returned position."""
        sep = (_ARRAY_SEP if array_mode else _LINE_SEP).match
        scan = self._scan
        validate = self._validate
        n = len(buf)
        max_chars = self.max_row_bytes // 4
        rows = self.rows
        find = buf.find
        try:
            while True:
                m = sep(buf, pos)
                if m is None:
                    break
                start = m.end()
                if start >= n:
                    break
                try:
                    obj, end = scan(buf, start)
                except (StopIteration, json.JSONDecodeError, RecursionError):
                    break
                if end >= n or type(obj) is not dict or end - start > max_chars:
                    break
                if not array_mode and find("\n", start, end) != -1:
                    break
                rows += 1
                self.rows = rows
                validate(obj, rows, end - start)
                pos = end
        finally:
            self.rows = rows
        return pos

    def _raise_json_error(self, msg: str, pos: int, row_pos: int, final: bool) -> None:
        buf = self._buf
        n = len(buf)
        row = self.rows + 1
        off = self._offset(min(pos, n))
        if final and (pos >= n - 8 or msg.startswith("Unterminated string")):
            # stream ended mid-row
            start = self._offset(row_pos)
            raise DatasetFormatError(
                f"truncated JSON: the file ends in the middle of row {row} (row starts at byte {start})",
                byte_offset=off,
                row=row,
            )
        raise DatasetFormatError(f"invalid JSON in row {row} at byte {off}: {msg}", byte_offset=off, row=row)

    def _non_object_row(self, obj: Any, pos: int) -> None:
        row = self.rows + 1
        off = self._offset(pos)
        raise DatasetFormatError(
            f"row {row} is a JSON {_describe(obj)}, not an object; every row must be a JSON object"
            " (datasets/LLaMA-Factory cannot load mixed rows)",
            byte_offset=off,
            row=row,
        )

    def _multiline_row(self, pos: int) -> None:
        row = self.rows + 1
        off = self._offset(pos)
        if row == 1:
            msg = (
                "the file is a JSON object spanning several lines, not a list of rows: LLaMA-Factory needs a JSON"
                " array of objects ([ {...}, {...} ]) or JSON Lines (one object per line)"
            )
        else:
            msg = f"invalid JSON Lines: row {row} spans several lines (one JSON object per line)"
        raise DatasetFormatError(msg, byte_offset=off, row=row)

    def _check_row_size(self, text: str, pos: int, complete: bool) -> None:
        size = _utf8len(text)
        if size > self.max_row_bytes:
            row = self.rows + 1
            what = "is" if complete else "is at least"
            raise DatasetTooLarge(
                f"row {row} {what} {size} bytes, over the limit of {self.max_row_bytes} bytes per row"
                f" (max_row_bytes)",
                byte_offset=self._offset(pos),
                row=row,
                limit=self.max_row_bytes,
            )

    # ---------------------------------------------------------------- schema
    def _refuse_preference_data(self, obj: dict, pos: int) -> None:
        """Preference rows read as SFT lose their answers (every row looks unpaired): say what they are.
        Mirrors the dataset_info.json import, which skips ranking and KTO entries."""
        mapped = {key for key in self.user_columns.values() if key}
        if {"chosen", "rejected"} <= obj.keys() and not {"chosen", "rejected"} & mapped:
            raise DatasetFormatError(
                "row 1 has 'chosen' and 'rejected': this is a preference (ranking) dataset for DPO/ORPO-style"
                " training; only SFT datasets are registered (an 'output', or a conversation ending with the"
                " assistant's answer)",
                byte_offset=self._offset(pos),
                row=1,
            )
        # LLaMA-Factory's kto_en_demo keeps the tag in a boolean "label" next to the messages.
        conversation = "messages" in obj or "conversations" in obj
        tag = "kto_tag" if "kto_tag" in obj else "label" if conversation and type(obj.get("label")) is bool else None
        if tag is not None and tag not in mapped:
            raise DatasetFormatError(
                f"row 1 has a true/false {tag!r}: this is a KTO dataset (answers marked desirable or not); only SFT"
                " datasets are registered",
                byte_offset=self._offset(pos),
                row=1,
            )

    def _setup_schema(self, obj: dict, pos: int) -> None:
        self._refuse_preference_data(obj, pos)
        uc = self.user_columns
        fmt = self.formatting
        if fmt == "auto":
            if "messages" in uc:
                fmt = "sharegpt"
            elif any(k in uc for k in ("prompt", "query", "response", "history")):
                fmt = "alpaca"
            elif ("conversations" in obj or "messages" in obj) and not ("instruction" in obj or "output" in obj):
                fmt = "sharegpt"
            elif "instruction" in obj or "output" in obj:
                fmt = "alpaca"
            else:
                hint = ""
                for k, v in obj.items():
                    if isinstance(v, list) and v and isinstance(v[0], dict):
                        hint = (
                            f" Key {k!r} holds a list of objects: if the file is one object wrapping the rows,"
                            " LLaMA-Factory needs the rows themselves as a top-level JSON array."
                        )
                        break
                raise DatasetFormatError(
                    f"cannot detect the dataset format from row 1 (keys: {[k[:40] for k in sorted(obj)[:20]]}):"
                    " expected alpaca"
                    " (instruction/input/output) or sharegpt (conversations or messages). Pass formatting= and"
                    " columns= to map other key names." + hint,
                    byte_offset=self._offset(pos),
                    row=1,
                )
        self.formatting = fmt
        bad = set(uc) - (set(ALPACA_DEFAULT_COLUMNS) if fmt == "alpaca" else set(SHAREGPT_DEFAULT_COLUMNS))
        if bad:
            raise ValueError(f"columns {sorted(bad)} are not valid for the {fmt} format")
        if fmt == "alpaca":
            cols = dict(ALPACA_DEFAULT_COLUMNS)
            cols.update(_OPTIONAL_AUTO_NAMES)
            cols.update(uc)
            self._cols = cols
            self._acols = tuple(cols[k] for k in ("prompt", "query", "response", "system", "history", "tools"))
            self._validate = self._validate_alpaca
        else:
            cols = dict(SHAREGPT_DEFAULT_COLUMNS)
            cols["system"] = "system"
            cols["tools"] = "tools"
            if "messages" not in uc and "conversations" not in obj and "messages" in obj:
                cols["messages"] = "messages"
            cols.update(uc)
            self._cols = cols
            base = DEFAULT_TAGS
            if not {"role_tag", "content_tag"} <= set(self.user_tags):
                msgs = obj.get(cols["messages"])
                first = msgs[0] if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) else None
                if first is not None:
                    if "role" in first and "from" not in first:
                        base = OPENAI_TAGS
                elif cols["messages"] == "messages":
                    base = OPENAI_TAGS
            tags = dict(base)
            tags.update(self.user_tags)
            self._tags = tags
            self._validate = self._validate_sharegpt

    # ---------------------------------------------------------------- row bookkeeping
    def _issue(self, row: int, kind: str, message: str) -> None:
        fatal = kind in FATAL_KINDS
        self._issue_counts[kind] = self._issue_counts.get(kind, 0) + 1
        if fatal:
            self._fatal += 1
        else:
            self._warn += 1
        rec = {"row": row, "kind": kind, "severity": "fatal" if fatal else "warning", "message": message}
        if fatal and self._first_fatal is None:
            self._first_fatal = rec
        if len(self._issues) < self.max_issues:
            self._issues.append(rec)

    def _common(self, obj: dict, row: int, pchars: int, rchars: int) -> None:
        """Per-row work shared by both formats: key/type tracking, duplicates, stats, preview, sample."""
        sig = (tuple(obj), tuple(map(type, obj.values())))
        if sig not in self._sigs:  # new key/type layout: the slow check (rare once warmed up)
            self._new_layout(obj, row, sig)
        # Python's hash (SipHash, salted per process; only compared within this run) of a
        # key-order independent frozen form: ~10x cheaper than hashing canonical JSON text.
        # Freezing a row with nested values also bounds its depth, whether or not duplicates count.
        try:
            h = hash(frozenset(obj.items()))  # only scalar values: nothing nested
        except TypeError:
            try:
                h = hash(_freeze(obj))
            except _NestedTooDeep:
                raise _nested_too_deep(row) from None
        if self._check_surrogates:
            for k, v in obj.items():
                if _holds_surrogate(k) or _holds_surrogate(v):
                    self._issue(
                        row, "bad_unicode",
                        f"{k!r} holds an invalid Unicode escape: a lone surrogate (\\ud800-\\udfff without its"
                        " pair), which is not text and cannot be stored as UTF-8",
                    )
                    break
        ds = self._digests
        if ds is not None:  # _DigestSet.add, inlined (hot path)
            h = (h & 0xFFFFFFFFFFFFFFFF) or 1
            keys = ds.keys
            mask = ds.mask
            i = h & mask
            k = keys[i]
            while k:
                if k == h:
                    self._dups += 1
                    self._issue(row, "duplicate", f"duplicate of row {ds.rows[i]}")
                    break
                i = (i + 1) & mask
                k = keys[i]
            else:
                keys[i] = h
                ds.rows[i] = row
                ds.used += 1
                if ds.used * 10 > mask * 7:
                    ds.grow()
        mc = self.max_row_chars
        if mc is not None and pchars + rchars > mc:
            self._issue(row, "too_long", f"{pchars + rchars} characters (limit {mc})")
        pb = self._pbatch
        pb.append(pchars)
        self._rbatch.append(rchars)
        if len(pb) >= 65536:
            self._ph.flush()
            self._rh.flush()
        if row <= self.preview_rows:
            self._preview.append(obj)
        k = self.sample_size
        if k > 0:
            if row <= k:
                self._sample.append((row, obj))
                if row == k:
                    rng = self._rng
                    self._res_w = math.exp(math.log(rng.random() or 1e-300) / k)
                    self._res_next = k + 1 + int(math.log(rng.random() or 1e-300) / math.log(1 - self._res_w))
            elif row == self._res_next:
                rng = self._rng
                self._sample[rng.randrange(k)] = (row, obj)
                self._res_w *= math.exp(math.log(rng.random() or 1e-300) / k)
                self._res_next = row + 1 + int(math.log(rng.random() or 1e-300) / math.log(1 - self._res_w))

    def _new_layout(self, obj: dict, row: int, sig: tuple) -> None:
        """Record keys seen and check each key keeps one JSON type across rows (Arrow columns)."""
        self._keys_seen.update(obj)
        if len(self._keys_seen) > MAX_KEYS:
            raise DatasetFormatError(
                f"row {row}: the rows hold more than {MAX_KEYS} distinct keys; datasets/Arrow loads each key as a"
                " column (LLaMA-Factory reads a handful): put the extra data in fewer keys",
                row=row,
            )
        long_key = next((k for k in obj if len(k) > MAX_KEY_CHARS), None)
        if long_key is not None:
            raise DatasetFormatError(
                f"row {row} has a key of {len(long_key)} characters ({long_key[:40]!r}…); at most {MAX_KEY_CHARS}",
                row=row,
            )
        kinds = self._kinds
        mixed = False
        for k, v in obj.items():
            if v is None:
                continue
            kd = _KIND.get(type(v))
            prev = kinds.get(k)
            if prev is None:
                kinds[k] = kd
                self._kind_rows[k] = row
            elif prev != kd:
                mixed = True
                self._issue(
                    row, "mixed_types",
                    f"key {k!r} is a {kd} here but a {prev} in row {self._kind_rows[k]}; a column must keep one"
                    " JSON type (datasets/Arrow cannot load mixed types)",
                )
        if not mixed and len(self._sigs) < 4096:  # mismatching layouts stay on the slow path (counted per row)
            self._sigs.add(sig)

    def _validate_alpaca(self, obj: dict, row: int, row_chars: int) -> None:
        pc, qc, rc, sc, hc, tc = self._acols
        get = obj.get
        issue = self._issue
        pchars = rchars = 0
        prompt = get(pc) if pc else None
        prompt_missing = False
        if type(prompt) is str and prompt:
            pchars = len(prompt)
        elif prompt is None or prompt == "":
            prompt_missing = True
        else:
            issue(row, "bad_type", f"{pc!r} is a {_describe(prompt)}, expected a string")
        if qc:
            query = get(qc)
            if type(query) is str:
                pchars += len(query)
            elif query is not None:
                issue(row, "bad_type", f"{qc!r} is a {_describe(query)}, expected a string")
        resp = get(rc) if rc else None
        if type(resp) is str:
            rchars = len(resp)
            if rchars:
                self._trainable += 1
        elif resp is None:
            issue(row, "missing_output", f"{rc!r} is missing (LLaMA-Factory drops the row)")
            self._dropped += 1
        else:
            issue(row, "bad_type", f"{rc!r} is a {_describe(resp)}, expected a string")
        if sc:
            v = get(sc)
            if v is not None:
                if type(v) is str:
                    pchars += len(v)
                else:
                    issue(row, "bad_type", f"{sc!r} is a {_describe(v)}, expected a string")
        if hc:
            v = get(hc)
            if v is not None:
                pchars += self._check_history(v, hc, row)
        if tc:
            v = get(tc)
            if v is not None and type(v) is not str:
                issue(row, "bad_tools", f"{tc!r} is a {_describe(v)}, expected a JSON string")
        if resp == "" and not pchars:
            issue(row, "nothing_to_train", "nothing to train on: the prompt and the response are empty")
        else:
            if prompt_missing:
                issue(row, "missing_instruction", f"{pc!r} is missing or empty")
            if resp == "":
                issue(row, "empty_output", f"{rc!r} is empty")
        self._common(obj, row, pchars, rchars)

    def _check_history(self, hist: Any, hc: str, row: int) -> int:
        if type(hist) is not list:
            self._issue(
                row, "bad_history", f"{hc!r} is a {_describe(hist)}, expected a list of [prompt, response] pairs"
            )
            return 0
        total = 0
        for i, pair in enumerate(hist):
            if type(pair) is not list or len(pair) != 2:
                what = f"has {len(pair)} items" if type(pair) is list else f"is a {_describe(pair)}"
                self._issue(row, "bad_history", f"{hc!r}[{i}] {what}, expected a [prompt, response] pair of strings")
                return total
            a, b = pair
            if type(a) is not str or type(b) is not str:
                self._issue(
                    row, "bad_history",
                    f"{hc!r}[{i}] holds {_describe(a)}/{_describe(b)}, expected two strings",
                )
                return total
            total += len(a) + len(b)
        return total

    def _validate_sharegpt(self, obj: dict, row: int, row_chars: int) -> None:
        cols = self._cols
        tags = self._tags
        get = obj.get
        mc = cols["messages"]
        msgs = get(mc)
        pchars = rchars = 0
        dropped = False
        sc = cols["system"]
        if sc:
            s = get(sc)
            if s is not None:
                if type(s) is str:
                    pchars += len(s)
                else:
                    self._issue(row, "bad_type", f"{sc!r} is a {_describe(s)}, expected a string")
        tc = cols["tools"]
        if tc:
            t = get(tc)
            if t is not None and type(t) is not str:
                self._issue(row, "bad_tools", f"{tc!r} is a {_describe(t)}, expected a JSON string")
        if msgs is None:
            self._issue(row, "missing_messages", f"{mc!r} is missing (LLaMA-Factory's converter fails on it)")
        elif type(msgs) is not list:
            self._issue(row, "bad_messages", f"{mc!r} is a {_describe(msgs)}, expected a list of messages")
        else:
            role_tag, content_tag = tags["role_tag"], tags["content_tag"]
            ok = True
            for i, m in enumerate(msgs):
                if type(m) is not dict:
                    self._issue(row, "bad_message", f"{mc!r}[{i}] is a {_describe(m)}, expected an object")
                    ok = False
                    break
                r = m.get(role_tag)
                c = m.get(content_tag)
                if type(r) is not str or type(c) is not str:
                    bad = role_tag if type(r) is not str else content_tag
                    self._issue(
                        row, "bad_message",
                        f"{mc!r}[{i}].{bad} is {_describe(m.get(bad))}, expected a string",
                    )
                    ok = False
                    break
            if ok:
                if not msgs:
                    self._issue(row, "empty_conversation", f"{mc!r} is empty (LLaMA-Factory drops the row)")
                    dropped = True
                else:
                    st = tags["system_tag"]
                    start = 0
                    if st and msgs[0][role_tag] == st:
                        pchars += len(msgs[0][content_tag])
                        start = 1
                    odd = (tags["user_tag"], tags["observation_tag"])
                    even = (tags["assistant_tag"], tags["function_tag"])
                    known = set(odd) | set(even) | {st}
                    accept = (odd, even)
                    turns = 0
                    for j in range(start, len(msgs)):
                        m = msgs[j]
                        r = m[role_tag]
                        if r not in accept[turns % 2]:
                            if r not in known:
                                self._issue(
                                    row, "bad_role",
                                    f"message {j + 1} has role {r!r}, not one of {sorted(x for x in known if x)}"
                                    " (LLaMA-Factory drops the row)",
                                )
                            else:
                                want = "/".join(accept[turns % 2])
                                self._issue(
                                    row, "bad_alternation",
                                    f"message {j + 1} has role {r!r} where {want} is expected (user/observation"
                                    " and assistant/function_call must alternate; LLaMA-Factory drops the row)",
                                )
                            dropped = True
                            break
                        turns += 1
                    if not dropped and turns % 2:
                        self._issue(
                            row, "unpaired_turns",
                            "the conversation does not end with an assistant turn (odd number of turns;"
                            " LLaMA-Factory drops the row)",
                        )
                        dropped = True
                    last = msgs[-1]
                    for j in range(start, len(msgs) - 1):
                        pchars += len(msgs[j][content_tag])
                    if len(msgs) > start:
                        if last[role_tag] in even:
                            rchars = len(last[content_tag])
                            if not dropped and rchars == 0:
                                if pchars:
                                    self._issue(row, "empty_output", "the last assistant message is empty")
                                else:
                                    self._issue(row, "nothing_to_train",
                                                "nothing to train on: every message is empty")
                        else:
                            pchars += len(last[content_tag])
        if dropped:
            self._dropped += 1
        elif rchars:
            self._trainable += 1
        self._common(obj, row, pchars, rchars)

    # ---------------------------------------------------------------- report
    def _build_report(self) -> IngestReport:
        seen = self._keys_seen
        cols = {k: (v if v and v in seen else None) for k, v in self._cols.items()}
        sample = sorted(self._sample, key=lambda t: t[0])
        return IngestReport(
            ok=self._fatal == 0,
            container=self.container,
            formatting=self.formatting,
            columns=cols,
            tags=dict(self._tags) if self._tags is not None else None,
            rows=self.rows,
            bytes=self._nbytes,
            sha256=self._sha.hexdigest(),
            bom=self._bom,
            keys_seen=sorted(seen),
            issue_counts=dict(sorted(self._issue_counts.items())),
            issues=list(self._issues),
            first_fatal=self._first_fatal,
            fatal_count=self._fatal,
            warning_count=self._warn,
            duplicate_rows=self._dups,
            dropped_rows=self._dropped,
            trainable_rows=self._trainable,
            prompt_chars=self._ph.finalize(),
            response_chars=self._rh.finalize(),
            preview=list(self._preview),
            sample=[{"row": r, "data": o} for r, o in sample],
            elapsed_s=round(time.perf_counter() - self._t0, 3),
        )


# ------------------------------------------------------------------------------------ pull API
def ingest_stream(
    stream: BinaryIO, *, read_size: int = 4 * MiB, threaded: bool = True, **options: Any
) -> IngestReport:
    """Ingest anything with ``.read(n) -> bytes``. ``options`` are DatasetIngest's keyword args.

    With ``threaded`` (default) a helper thread reads and sha256-hashes the next chunks while this
    thread parses (both release the GIL), bounded to 2 chunks in flight."""
    options.setdefault("chunk_size", read_size)
    ing = DatasetIngest(**options)
    read = stream.read
    if not threaded:
        while True:
            chunk = read(read_size)
            if not chunk:
                break
            ing.feed(chunk)
        return ing.finish()

    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    sha = hashlib.sha256()

    def reader() -> None:
        try:
            while not stop.is_set():
                chunk = read(read_size)
                if chunk:
                    sha.update(chunk)
                while not stop.is_set():
                    try:
                        q.put(chunk, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if not chunk:
                    return
        except BaseException as e:  # handed to the parsing thread
            q.put(e)

    t = threading.Thread(target=reader, name="dataset-ingest-reader", daemon=True)
    t.start()
    try:
        while True:
            chunk = q.get()
            if isinstance(chunk, BaseException):
                raise chunk
            if not chunk:
                break
            ing._feed(chunk, hashed=True)
        ing._sha = sha
        return ing.finish()
    finally:
        stop.set()
        t.join()


def ingest_path(path: str | os.PathLike[str], **options: Any) -> IngestReport:
    with open(path, "rb", buffering=0) as f:
        return ingest_stream(f, **options)


# ----------------------------------------------------------------------------- dataset_info.json
def dataset_info_entry(src: IngestReport | Mapping[str, Any], file_name: str | None = None) -> dict[str, Any]:
    """The LLaMA-Factory ``dataset_info.json`` entry for an ingested file.

    ``src`` is an IngestReport or a mapping with ``formatting`` and optionally ``columns`` (full or
    partial LLaMA-Factory mapping; roles set to None are not read), ``tags`` and ``file_name``.
    ``columns`` is emitted only when the mapping differs from LLaMA-Factory's defaults, and then
    lists every column to read (LLaMA-Factory resets unlisted columns to None when ``columns`` is
    present). ``tags`` is emitted, with all seven names, only when they differ from the defaults.
    """
    if isinstance(src, IngestReport):
        formatting, columns, tags = src.formatting, dict(src.columns), src.tags
        file_name = file_name or None
    else:
        formatting = src.get("formatting", "alpaca")
        columns = dict(src.get("columns") or {})
        tags = src.get("tags")
        file_name = file_name or src.get("file_name")
    if not file_name:
        raise ValueError("file_name is required")
    if not str(file_name).lower().endswith((".json", ".jsonl")):
        raise ValueError(
            f"file_name {file_name!r} must end in .json or .jsonl (LLaMA-Factory picks the loader by extension)"
        )
    if formatting not in ("alpaca", "sharegpt"):
        raise ValueError(f"formatting must be alpaca or sharegpt, not {formatting!r}")
    defaults = ALPACA_DEFAULT_COLUMNS if formatting == "alpaca" else SHAREGPT_DEFAULT_COLUMNS
    bad = set(columns) - set(defaults)
    if bad:
        raise ValueError(f"columns {sorted(bad)} are not valid for the {formatting} format")
    eff = dict(defaults)
    eff.update(columns)
    entry: dict[str, Any] = {"file_name": str(file_name), "formatting": formatting}
    if eff != defaults:
        entry["columns"] = {k: v for k, v in eff.items() if v}
    if formatting == "sharegpt" and tags:
        full = dict(DEFAULT_TAGS)
        full.update(tags)
        if full != DEFAULT_TAGS:
            entry["tags"] = {k: full[k] for k in TAG_NAMES}
    return entry
