"""Following a run's files by byte offset: LLaMA-Factory's `trainer_log.jsonl` (metric points and
progress) and the process's stdout log (log lines).

A line is only taken once its newline is there (the writers append from background threads,
so the last line may be half-written); a file that shrinks or is replaced (a new inode: e.g.
`overwrite_output_dir: true` deletes trainer_log.jsonl at start) is read again from the start.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# One read never takes more than this; the rest comes at the next tail.
MAX_READ_BYTES = 1 << 20
# A line without a newline is kept up to this size (only its text after the last carriage
# return matters, as on a terminal: tqdm redraws its bar with \r); longer is cut.
MAX_LINE_BYTES = 64 << 10


@dataclass(frozen=True)
class LogLine:
    offset: int  # byte offset of the line's start in its file
    line: str


class FileTail:
    """New complete lines of one file since the last call."""

    def __init__(self, path: str | Path, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset  # where the next unread byte is
        self._identity: tuple[int, int] | None = None
        self._partial = b""  # bytes of an unfinished line, read but not yet returned
        self._partial_offset = offset
        if offset:
            try:
                stat = self.path.stat()
                self._identity = (stat.st_dev, stat.st_ino)
            except FileNotFoundError:
                self.offset = self._partial_offset = 0

    @classmethod
    def from_end(cls, path: str | Path) -> "FileTail":
        """Skip what the file holds now (lines reported by an earlier attempt)."""
        try:
            return cls(path, Path(path).stat().st_size)
        except FileNotFoundError:
            return cls(path)

    def read(self, *, final: bool = False) -> list[LogLine]:
        """Complete lines; with `final` (the writer has exited) an unfinished last line too."""
        lines = self._read_new()
        if final and self._partial:
            lines.append(LogLine(self._partial_offset, _decode(self._partial)))
            self._partial = b""
            self._partial_offset = self.offset
        return lines

    def _read_new(self) -> list[LogLine]:
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            return []
        with handle:
            stat = os.fstat(handle.fileno())
            identity = (stat.st_dev, stat.st_ino)
            if identity != self._identity or stat.st_size < self.offset:
                if self._identity is not None:
                    log.info("%s was replaced or truncated; reading it from the start", self.path)
                self._identity = identity
                self.offset = self._partial_offset = 0
                self._partial = b""
            if stat.st_size == self.offset:
                return []
            handle.seek(self.offset)
            chunk = handle.read(min(stat.st_size - self.offset, MAX_READ_BYTES))
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = []
        start = 0
        line_offset = self._partial_offset
        while (end := data.find(b"\n", start)) != -1:
            lines.append(LogLine(line_offset, _decode(data[start:end])))
            line_offset += end + 1 - start
            start = end + 1
        self._partial = _compact(data[start:])
        self._partial_offset = line_offset
        return lines


def _compact(partial: bytes) -> bytes:
    if len(partial) <= MAX_LINE_BYTES:
        return partial
    redraw = partial.rfind(b"\r")
    kept = partial[redraw:] if redraw != -1 else partial
    return kept[-MAX_LINE_BYTES:]


def _decode(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace").rstrip("\r")
    return text.rsplit("\r", 1)[-1]  # what a terminal shows after tqdm's redraws


# --- trainer_log.jsonl ----------------------------------------------------------------------

_DURATION = re.compile(r"^(?:(?P<days>\d+) days?, )?(?P<h>\d+):(?P<m>\d{2}):(?P<s>\d{2}(?:\.\d+)?)$")


def parse_duration(value: Any) -> float | None:
    """LLaMA-Factory writes times as str(timedelta): "0:01:05", "1 day, 2:03:04"."""
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str) or not (match := _DURATION.match(value.strip())):
        return None
    days = int(match["days"] or 0)
    return days * 86400 + int(match["h"]) * 3600 + int(match["m"]) * 60 + float(match["s"])


def _number(record: dict[str, Any], key: str) -> float | None:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def metric_point(record: dict[str, Any]) -> dict[str, Any] | None:
    """The metric point of one trainer_log line (a train line has a loss, an eval line an
    eval_loss), in the app's field names; None for any other line."""
    step = record.get("current_steps")
    if not isinstance(step, int):
        return None
    values = {
        "loss": _number(record, "loss"),
        "eval_loss": _number(record, "eval_loss"),
        "learning_rate": _number(record, "lr"),
        "tokens_per_s": _number(record, "throughput"),
        "total_tokens": int(record["total_tokens"]) if _number(record, "total_tokens") is not None else None,
        "grad_norm": _number(record, "grad_norm"),
        # A DPO train line carries rewards/accuracies as "accuracy"; the other rewards are only
        # in the Trainer's own log line on stdout (see StageMetrics).
        "rewards_accuracies": _number(record, "accuracy"),
    }
    if values["loss"] is None and values["eval_loss"] is None:
        return None  # the final summary line repeats the last step's throughput, nothing new
    point = {"step": step, "epoch": _number(record, "epoch"), **values,
             "elapsed_s": parse_duration(record.get("elapsed_time"))}
    return {key: value for key, value in point.items() if value is not None}


def progress_of(record: dict[str, Any]) -> dict[str, Any] | None:
    if not isinstance(record.get("current_steps"), int):
        return None
    return {
        "current_steps": record["current_steps"],
        "total_steps": record.get("total_steps"),
        "percentage": _number(record, "percentage"),
        "epoch": _number(record, "epoch"),
        "elapsed_time": parse_duration(record.get("elapsed_time")),
        "remaining_time": parse_duration(record.get("remaining_time")),
    }


# --- the Trainer's log lines on stdout -------------------------------------------------------

# transformers prints each `Trainer.log` call as a Python dict repr (floats as "%.4g" strings),
# after whatever tqdm left on the terminal line: {'loss': '0.4965', ..., 'epoch': '0.6667'}. Not
# LLaMA-Factory's own summary of it (LLAMABOARD_ENABLED), a logger line: "[INFO|…] … >> {'loss': …}".
_TRAINER_LOG_LINE = re.compile(r"(?<!>> )\{'[^{}]*\}$")
# Trainer log keys LLaMA-Factory's trainer_log.jsonl leaves out, in the app's field names.
STAGE_METRIC_KEYS = {
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/accuracies": "rewards_accuracies",
    "rewards/margins": "rewards_margins",
    "eval_accuracy": "eval_accuracy",  # RM
    "eval_rewards/accuracies": "eval_accuracy",  # DPO
}


def trainer_log_line(line: str) -> dict[str, Any] | None:
    """The dict of one stdout line the Trainer printed for a log call (it has an epoch), or None."""
    match = _TRAINER_LOG_LINE.search(line.rstrip())
    if match is None:
        return None
    try:
        logged = ast.literal_eval(match.group(0))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return logged if isinstance(logged, dict) and "epoch" in logged else None


def _logged_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and not isinstance(value, bool) else None


def _epoch_text(value: Any) -> str | None:
    """An epoch as the Trainer prints it ("%.4g"), to check that two records are one log call."""
    number = _logged_float(value)
    return None if number is None else f"{number:.4g}"


class StageMetrics:
    """DPO/KTO rewards and RM accuracy, which LLaMA-Factory's trainer_log.jsonl leaves out, from the
    Trainer's log lines on stdout. Those lines carry no step: every `Trainer.log` call writes one
    trainer_log.jsonl record and one stdout line, in the same order, so the n-th of each belong
    together (both with the same epoch: a pair whose epochs differ is not one call, and the side
    with the earlier epoch had no partner, e.g. an evaluation after training prints nothing)."""

    def __init__(self) -> None:
        self._records: list[tuple[int, str]] = []  # (step, epoch) of trainer_log records not yet paired
        self._lines: list[tuple[str, dict[str, float]]] = []  # (epoch, stage values) of stdout lines

    def restart(self) -> None:
        """trainer_log.jsonl starts again (a relaunch): what was waiting has no partner any more."""
        self._records.clear()
        self._lines.clear()

    def add_record(self, record: dict[str, Any]) -> None:
        epoch = _epoch_text(record.get("epoch"))
        if isinstance(record.get("current_steps"), int) and epoch is not None:
            self._records.append((record["current_steps"], epoch))

    def add_line(self, line: str) -> None:
        logged = trainer_log_line(line)
        if logged is None or (epoch := _epoch_text(logged["epoch"])) is None:
            return
        values = {field: number for key, field in STAGE_METRIC_KEYS.items()
                  if key in logged and (number := _logged_float(logged[key])) is not None}
        self._lines.append((epoch, values))

    def points(self) -> list[dict[str, Any]]:
        """Metric points of the pairs complete so far (only those with a stage value)."""
        points = []
        while self._records and self._lines:
            (step, record_epoch), (line_epoch, values) = self._records[0], self._lines[0]
            if record_epoch != line_epoch:
                (self._records if float(record_epoch) < float(line_epoch) else self._lines).pop(0)
                continue
            self._records.pop(0)
            self._lines.pop(0)
            if values:
                points.append({"step": step, **values})
        return points


@dataclass
class TailBatch:
    metrics: list[dict[str, Any]] = field(default_factory=list)
    progress: dict[str, Any] | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.metrics or self.progress or self.logs)


class RunTails:
    """The two files of one run attempt. `resume` skips what trainer_log.jsonl already holds
    (the earlier attempt reported it); the stdout log is fresh for each attempt.

    LLaMA-Factory's running_log.txt is not followed: it is a copy of the logger lines that the
    process also writes to stderr (which the stdout log captures), so every line came twice."""

    def __init__(self, output_dir: Path, stdout_log: Path, *, resume: bool = False) -> None:
        trainer_log = output_dir / "trainer_log.jsonl"
        self.trainer_log = FileTail.from_end(trainer_log) if resume else FileTail(trainer_log)
        self.log_sources = {"stdout": FileTail(stdout_log)}
        self.stage_metrics = StageMetrics()

    def restart_trainer_log(self) -> None:
        """Follow a trainer_log.jsonl that a relaunch writes again from its first line."""
        self.trainer_log = FileTail(self.trainer_log.path)
        self.stage_metrics.restart()

    def read(self, *, final: bool = False) -> TailBatch:
        batch = TailBatch()
        for line in self.trainer_log.read(final=final):
            try:
                record = json.loads(line.line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError as error:
                log.warning("ignoring trainer_log.jsonl line at byte %d (%s): %.200s",
                            line.offset, error, line.line)
                continue
            if (point := metric_point(record)) is not None:
                batch.metrics.append(point)
            batch.progress = progress_of(record) or batch.progress
            self.stage_metrics.add_record(record)
        for source, tail in self.log_sources.items():
            for line in tail.read(final=final):
                batch.logs.append({"source": source, "offset": line.offset, "line": line.line})
                self.stage_metrics.add_line(line.line)
        batch.metrics += self.stage_metrics.points()
        return batch
