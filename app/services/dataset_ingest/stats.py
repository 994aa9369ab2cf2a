"""Row bookkeeping shared by every format: issues, key/type tracking, duplicates, length
statistics, the preview and a reservoir sample, all in bounded memory whatever the file's size."""

from __future__ import annotations

import math
import random
import re
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Any

from app.services.dataset_ingest.formats import FATAL_KINDS, DatasetFormatError

# Structural bounds. Real rows nest 3-4 levels (row > conversations > message > text); deeper
# rows are refused before anything recursive (Python's json, hashing, the preview) can overflow.
MAX_NESTING = 64
# datasets/Arrow makes a column of every key of every row; LLaMA-Factory reads a handful.
MAX_KEYS = 1000
MAX_KEY_CHARS = 1024
_SURROGATE = re.compile("[\ud800-\udfff]")

_KIND = {str: "string", int: "number", float: "number", bool: "boolean", list: "array", dict: "object"}
_SMALL = 4096  # exact histogram buckets below this length
_LOG_RES = 64  # log buckets per octave above it (~1% resolution)


def describe(v: Any) -> str:
    """A JSON value's type, as a message names it."""
    return "null" if v is None else _KIND.get(type(v), type(v).__name__)


@dataclass
class LengthStats:
    count: int = 0
    min: int | None = None
    mean: float | None = None
    p50: int | None = None
    p95: int | None = None
    max: int | None = None



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


class NestedTooDeep(ValueError):
    """A value nests arrays/objects more than MAX_NESTING levels deep."""


def _freeze(v: Any, depth: int = 1) -> Any:
    """Hashable, key-order independent form of a parsed JSON value (dict -> frozenset of items).
    Raises NestedTooDeep past MAX_NESTING levels (the recursion stays far from Python's limit)."""
    t = type(v)
    if t is dict or t is list:
        if depth > MAX_NESTING:
            raise NestedTooDeep
        if t is dict:
            return frozenset([(k, _freeze(x, depth + 1)) for k, x in v.items()])
        return tuple([_freeze(x, depth + 1) for x in v])
    return v


def nested_too_deep(row: int, byte_offset: int | None = None) -> DatasetFormatError:
    return DatasetFormatError(
        f"row {row} nests arrays or objects more than {MAX_NESTING} levels deep; a row holds strings,"
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


class RowBook:
    """What is learnt of the rows as they pass: one `common` call per row after its validator."""

    def __init__(self, *, preview_rows: int, sample_size: int, seed: int, max_issues: int, max_row_chars: int | None,
                 check_duplicates: bool) -> None:
        self.preview_rows = preview_rows
        self.sample_size = sample_size
        self.max_issues = max_issues
        self.max_row_chars = max_row_chars
        self.check_surrogates = False  # turned on by the framing once the text holds a surrogate escape
        self.keys_seen: set[str] = set()
        self._sigs: set[tuple] = set()  # (keys, value types) layouts already checked
        self._kinds: dict[str, str] = {}  # key -> JSON kind seen first (Arrow needs one type per column)
        self._kind_rows: dict[str, int] = {}
        self.issue_counts: dict[str, int] = {}
        self.issues: list[dict[str, Any]] = []
        self.first_fatal: dict[str, Any] | None = None
        self.fatal = 0
        self.warnings = 0
        self.duplicates = 0
        self.dropped = 0  # rows LLaMA-Factory's preprocessing would drop
        self.trainable = 0  # rows it keeps that have something to learn
        self._digests = _DigestSet() if check_duplicates else None
        self.prompt_hist = _LenHist()
        self.response_hist = _LenHist()
        self._pbatch = self.prompt_hist.batch
        self._rbatch = self.response_hist.batch
        self.preview: list[Any] = []
        # reservoir sampling (Algorithm L: O(k log(n/k)) random draws)
        self._rng = random.Random(seed)
        self._sample: list[tuple[int, Any]] = []
        self._res_w = 0.0
        self._res_next = 0

    def sample(self) -> list[dict[str, Any]]:
        return [{"row": r, "data": o} for r, o in sorted(self._sample, key=lambda t: t[0])]

    def issue(self, row: int, kind: str, message: str) -> None:
        fatal = kind in FATAL_KINDS
        self.issue_counts[kind] = self.issue_counts.get(kind, 0) + 1
        if fatal:
            self.fatal += 1
        else:
            self.warnings += 1
        rec = {"row": row, "kind": kind, "severity": "fatal" if fatal else "warning", "message": message}
        if fatal and self.first_fatal is None:
            self.first_fatal = rec
        if len(self.issues) < self.max_issues:
            self.issues.append(rec)

    def common(self, obj: dict, row: int, pchars: int, rchars: int) -> None:
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
            except NestedTooDeep:
                raise nested_too_deep(row) from None
        if self.check_surrogates:
            for k, v in obj.items():
                if _holds_surrogate(k) or _holds_surrogate(v):
                    self.issue(
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
                    self.duplicates += 1
                    self.issue(row, "duplicate", f"duplicate of row {ds.rows[i]}")
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
            self.issue(row, "too_long", f"{pchars + rchars} characters (limit {mc})")
        pb = self._pbatch
        pb.append(pchars)
        self._rbatch.append(rchars)
        if len(pb) >= 65536:
            self.prompt_hist.flush()
            self.response_hist.flush()
        if row <= self.preview_rows:
            self.preview.append(obj)
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
        self.keys_seen.update(obj)
        if len(self.keys_seen) > MAX_KEYS:
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
                self.issue(
                    row, "mixed_types",
                    f"key {k!r} is a {kd} here but a {prev} in row {self._kind_rows[k]}; a column must keep one"
                    " JSON type (datasets/Arrow cannot load mixed types)",
                )
        if not mixed and len(self._sigs) < 4096:  # mismatching layouts stay on the slow path (counted per row)
            self._sigs.add(sig)
