"""The streaming ingester: framing, then the validator detected from row 1, then the row book."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from app.services.dataset_ingest.formats import KINDS, TAG_NAMES, DatasetFormatError
from app.services.dataset_ingest.framing import MiB, RowFramer, RowHandler
from app.services.dataset_ingest.stats import LengthStats, RowBook
from app.services.dataset_ingest.validators import Validator, detect


@dataclass
class IngestReport:
    ok: bool  # no fatal row issue (structural problems raise instead)
    kind: str  # "sft" | "ranking" | "kto" | "pretrain"
    container: str  # "json" (array) | "jsonl" | "txt"
    formatting: str  # "alpaca" | "sharegpt"
    columns: dict[str, str | None]  # effective LLaMA-Factory column mapping (None = not read)
    tags: dict[str, str] | None  # sharegpt tags (None for alpaca)
    rows: int
    bytes: int  # received, a BOM included
    sha256: str  # of the content: what is stored, less a BOM
    bom: bool
    keys_seen: list[str]
    issue_counts: dict[str, int]
    issues: list[dict[str, Any]]  # first `max_issues`: {"row", "kind", "severity", "message"}
    first_fatal: dict[str, Any] | None
    fatal_count: int
    warning_count: int
    duplicate_rows: int
    dropped_rows: int  # rows LLaMA-Factory's preprocessing would drop
    trainable_rows: int  # rows it keeps that have something to learn
    prompt_chars: LengthStats
    response_chars: LengthStats  # what is trained on: the response, chosen + rejected, the text
    preview: list[Any]  # first `preview_rows` rows, as parsed
    sample: list[dict[str, Any]]  # reservoir sample: {"row": n, "data": obj}, sorted by row
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DatasetIngest:
    """Push-style ingester. `feed(bytes)` any number of times, then `finish()` -> IngestReport.
    `feed` is CPU work: the web layer calls it from a worker thread, not the event loop.

    Parameters
    ----------
    container: "auto" | "json" | "jsonl" | "txt" -- auto: first non-whitespace byte `[` -> JSON
        array, `{` -> JSON Lines; "txt": plain text, one pre-training document per line.
    kind: "auto" | "sft" | "ranking" | "kto" | "pretrain" -- auto: detected from the keys of row 1.
    formatting: "auto" | "alpaca" | "sharegpt" -- auto: detected from the keys of row 1.
    columns: LLaMA-Factory `columns` mapping (prompt/query/response/system/history/tools for
        alpaca, messages/system/tools for sharegpt, chosen/rejected/kto_tag) for files whose keys
        differ from the defaults; unspecified roles keep the auto names.
    tags: sharegpt `tags` overrides (role_tag, content_tag, user_tag, ...); detected otherwise.
    sink: receives the content (the bytes less a leading BOM) as it is known: what to store.
    """

    def __init__(
        self,
        *,
        container: str = "auto",
        kind: str = "auto",
        formatting: str = "auto",
        columns: Mapping[str, str | None] | None = None,
        tags: Mapping[str, str] | None = None,
        sink: Callable[[bytes], Any] | None = None,
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
        if kind not in ("auto", *KINDS):
            raise ValueError(f"kind must be auto, {', '.join(KINDS)}, not {kind!r}")
        if formatting not in ("auto", "alpaca", "sharegpt"):
            raise ValueError(f"formatting must be auto, alpaca or sharegpt, not {formatting!r}")
        if container == "txt" and kind not in ("auto", "pretrain"):
            raise ValueError(f"a plain text file holds pre-training documents, not a {kind} dataset")
        self.kind = "pretrain" if container == "txt" else kind
        self.formatting = formatting
        self.user_columns = dict(columns or {})
        self.user_tags = dict(tags or {})
        bad = set(self.user_tags) - set(TAG_NAMES)
        if bad:
            raise ValueError(f"unknown tag names: {sorted(bad)}")
        self._t0 = time.perf_counter()
        self.book = RowBook(preview_rows=preview_rows, sample_size=sample_size, seed=seed, max_issues=max_issues,
                            max_row_chars=max_row_chars, check_duplicates=check_duplicates)
        self.framer = RowFramer(
            first_row=self._first_row, on_surrogate_escape=self._check_surrogates, container=container, sink=sink,
            max_total_bytes=max_total_bytes, max_row_bytes=max_row_bytes, chunk_size=chunk_size,
        )
        self.validator: Validator | None = None
        self._report: IngestReport | None = None

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Feed raw bytes. Raises DatasetFormatError / DatasetTooLarge as soon as detectable."""
        self.framer.feed(chunk)

    def finish(self) -> IngestReport:
        """Signal end of input; parse what is left and return the report (or raise)."""
        if self._report is None:
            self.framer.finish()
            self._report = self._build_report()
        return self._report

    @property
    def sha256(self) -> str:
        return self.framer.sha.hexdigest()

    def _check_surrogates(self) -> None:
        self.book.check_surrogates = True

    def _first_row(self, obj: dict, byte_offset: int) -> RowHandler:
        self.validator = detect(obj, byte_offset, book=self.book, kind=self.kind, formatting=self.formatting,
                                user_columns=self.user_columns, user_tags=self.user_tags)
        return self.validator

    def _build_report(self) -> IngestReport:
        book, framer, validator = self.book, self.framer, self.validator
        seen = book.keys_seen
        columns = {k: (v if v and v in seen else None) for k, v in validator.columns.items()}
        return IngestReport(
            ok=book.fatal == 0,
            kind=validator.kind,
            container=framer.container,
            formatting=validator.formatting,
            columns=columns,
            tags=dict(validator.tags) if validator.tags is not None else None,
            rows=framer.rows,
            bytes=framer.size,
            sha256=self.sha256,
            bom=framer.bom,
            keys_seen=sorted(seen),
            issue_counts=dict(sorted(book.issue_counts.items())),
            issues=list(book.issues),
            first_fatal=book.first_fatal,
            fatal_count=book.fatal,
            warning_count=book.warnings,
            duplicate_rows=book.duplicates,
            dropped_rows=book.dropped,
            trainable_rows=book.trainable,
            prompt_chars=book.prompt_hist.finalize(),
            response_chars=book.response_hist.finalize(),
            preview=list(book.preview),
            sample=book.sample(),
            elapsed_s=round(time.perf_counter() - self._t0, 3),
        )


def refuse_unusable(report: IngestReport) -> None:
    """Raise DatasetFormatError when LLaMA-Factory cannot use the file: a fatal row issue (its
    loader or converter would crash), or no row with anything to train on."""
    if not report.ok:
        first = report.first_fatal
        kinds = ", ".join(f"{kind} ×{count}" for kind, count in report.issue_counts.items())
        more = report.fatal_count - 1
        tail = f" ({more} more rows with problems LLaMA-Factory cannot load; by kind: {kinds})" if more else ""
        raise DatasetFormatError(f"row {first['row']}: {first['message']}{tail}", row=first["row"])
    if report.trainable_rows == 0:
        first_issue = next((issue["message"] for issue in report.issues if issue["row"] == 1), None)
        kinds = ", ".join(f"{kind} ×{count}" for kind, count in report.issue_counts.items())
        raise DatasetFormatError(
            f"no row has anything to train on: each of the {report.rows} rows has an empty or missing response, or"
            f" LLaMA-Factory drops it (row 1: {first_issue or 'no response'}; by kind: {kinds or 'none'})",
            row=1,
        )
