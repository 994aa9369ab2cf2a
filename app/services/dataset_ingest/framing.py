"""Row framing: raw bytes in, rows out, in bounded memory.

Bytes are counted, a leading UTF-8 BOM is stripped, and the content (what is stored) is sha256-hashed
and handed to the `sink` exactly once, here. The text is decoded by an incremental UTF-8 decoder and
cut into rows: a JSON array or JSON Lines parsed row by row with the C `json` scanner over a sliding
text buffer (`chunk_size` bytes at a time; a row larger than a chunk just grows the buffer, up to
`max_row_bytes`), or a plain text file read as `datasets`' text loader reads it (one row per line,
in a `text` column). Structural problems raise DatasetFormatError (DatasetTooLarge for the limits).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import json.decoder
import re
from collections.abc import Callable
from typing import Any

from app.services.dataset_ingest.formats import DatasetFormatError, DatasetTooLarge
from app.services.dataset_ingest.stats import describe, nested_too_deep

MiB = 1024 * 1024

# Python's json turns an escaped UTF-16 surrogate without its pair (a lone \udc00) into a str that
# cannot be encoded as UTF-8 (to store or train on). Rows are searched for one only once the text
# holds such an escape: a regex scan (~1 GB/s) that pairs the escapes of escaped emoji as it goes.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")

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


_WS = re.compile(r"[ \t\n\r]*")
_HWS = re.compile(r"[ \t\r]*")  # whitespace on the same line (JSONL)
_ARRAY_SEP = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")
_LINE_SEP = re.compile(r"[ \t\r]*\n[ \t\n\r]*")

_ST_BEGIN, _ST_FIRST, _ST_VALUE, _ST_AFTER, _ST_END, _ST_ROW, _ST_AFTER_ROW = range(7)

def _utf8len(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


RowHandler = Callable[[dict, int, int], None]  # (row object, row number, row length in characters)


class RowFramer:
    """Push-style framing: `feed(bytes)` any number of times, then `finish()`.

    container: "auto" | "json" | "jsonl" | "txt" -- auto: first non-whitespace byte `[` -> JSON
        array, `{` -> JSON Lines; a plain text file is never guessed (its caller knows its name).
    first_row(obj, byte_offset) -> RowHandler is called with row 1 (to detect its schema) and
        returns the handler of every row, row 1 included.
    sink(bytes) receives the content as it is known (the input less a leading BOM).
    """

    def __init__(
        self,
        *,
        first_row: Callable[[dict, int], RowHandler],
        on_surrogate_escape: Callable[[], None],
        container: str = "auto",
        sink: Callable[[bytes], Any] | None = None,
        max_total_bytes: int | None = 20 * 1024 * MiB,
        max_row_bytes: int = 32 * MiB,
        chunk_size: int = 4 * MiB,
    ) -> None:
        if container not in ("auto", "json", "jsonl", "txt"):
            raise ValueError(f"container must be auto, json, jsonl or txt, not {container!r}")
        self.container = container
        self.max_total_bytes = max_total_bytes
        self.max_row_bytes = max_row_bytes
        self.chunk_size = max(1, chunk_size)
        self._first_row = first_row
        self._on_surrogate_escape = on_surrogate_escape
        self._sink = sink
        self.sha = hashlib.sha256()  # of the content: the bytes stored, less the BOM
        self.size = 0  # raw bytes received
        self.bom = False
        self.rows = 0
        self._handle_row: RowHandler | None = None
        self._pending = bytearray()  # raw bytes not yet decoded
        self._head_done = False  # BOM / encoding sniffing done
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
        self._scan = json.decoder.JSONDecoder().scan_once
        self._check_surrogates = False

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Feed raw bytes. Raises DatasetFormatError / DatasetTooLarge as soon as detectable."""
        if self._error is not None:
            raise self._error
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if not chunk:
            return
        n = len(chunk)
        if self.max_total_bytes is not None and self.size + n > self.max_total_bytes:
            self._fail(
                DatasetTooLarge(
                    f"dataset is larger than the limit of {self.max_total_bytes} bytes",
                    byte_offset=self.max_total_bytes,
                    limit=self.max_total_bytes,
                )
            )
        self.size += n
        if not self._pending and n >= self.chunk_size and self._head_done:
            self._run(final=False, data=chunk)  # big chunk: decode it in place, no copy
            return
        self._pending += chunk
        if len(self._pending) >= self.chunk_size:
            self._run(final=False)

    def finish(self) -> None:
        """Signal end of input: frame what is left (or raise)."""
        if self._error is not None:
            raise self._error
        if self._finished:
            return
        self._finished = True
        self._run(final=True)

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
                self.bom = True
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
        if data:
            self.sha.update(data)
            if self._sink is not None:
                self._sink(data if type(data) is bytes else bytes(data))
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
        # JSON escapes only; from 11 characters before the new text: a pair may straddle chunks
        if not self._check_surrogates and self.container != "txt":
            self._check_surrogates = _lone_surrogate_escape(buf, max(0, len(buf) - len(text) - 11))
            if self._check_surrogates:
                self._on_surrogate_escape()

    def _offset(self, i: int) -> int:
        """Absolute byte offset of text position i in the current buffer."""
        if self._buf_ascii:
            return self._buf_base + i
        return self._buf_base + _utf8len(self._buf[:i])

    # ---------------------------------------------------------------- parsing
    def _parse(self, final: bool) -> None:
        if self.container == "txt":
            self._parse_lines(final)
            return
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
                if (state == _ST_AFTER or state == _ST_AFTER_ROW) and self._handle_row is not None:
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
                        raise nested_too_deep(self.rows + 1, self._offset(pos)) from None
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
                    if self._handle_row is None:
                        self._handle_row = self._first_row(obj, self._offset(pos))
                    self._handle_row(obj, self.rows, row_chars)
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
            raise DatasetFormatError("the file is empty" + (" (only a byte order mark)" if self.bom else ""),
                                     byte_offset=0)
        if state in (_ST_FIRST, _ST_VALUE, _ST_AFTER):
            off = self._offset(n)
            raise DatasetFormatError(
                f"truncated JSON: the file ends after row {self.rows} but the array is not closed with ']'",
                byte_offset=off,
                row=self.rows,
            )
        # _ST_END, _ST_ROW, _ST_AFTER_ROW: complete (JSONL always has >= 1 row here)

    def _parse_lines(self, final: bool) -> None:
        """A plain text file: one row per line, as `datasets`' text loader splits it (str.splitlines
        on the universal-newline text), each row {"text": line}. Only complete lines are cut: up to
        the last newline, or everything at the end."""
        buf, pos = self._buf, self._pos
        end = len(buf) if final else buf.rfind("\n", pos) + 1
        if end <= pos:
            if (len(buf) - pos) * 4 > self.max_row_bytes:
                self._check_row_size(buf[pos:], pos, complete=False)
            return
        for line in buf[pos:end].splitlines():
            if len(line) * 4 > self.max_row_bytes:
                self._check_row_size(line, pos, complete=True)
            self.rows += 1
            row = {"text": line}
            if self._handle_row is None:
                self._handle_row = self._first_row(row, self._offset(pos))
            self._handle_row(row, self.rows, len(line))
        self._pos = end
        if final and self.rows == 0:
            raise DatasetFormatError("the file is empty" + (" (only a byte order mark)" if self.bom else ""),
                                     byte_offset=0)

    def _fast_rows(self, buf: str, pos: int, array_mode: bool) -> int:
        """Hot loop: separator + well-formed object rows. Returns the position after the last row it
        handled; anything unusual (errors, end of buffer, scalars, huge rows) is left to the general
        state machine in _parse, which redoes that step from the returned position."""
        sep = (_ARRAY_SEP if array_mode else _LINE_SEP).match
        scan = self._scan
        validate = self._handle_row
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
            f"row {row} is a JSON {describe(obj)}, not an object; every row must be a JSON object"
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

