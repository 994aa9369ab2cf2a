"""Read-only views of runs for the dashboard and the compare page: metric points with the
attempt that logged them, time across attempts, final metrics, versioned result files and the
whole log.

LLaMA-Factory restarts its clock at each attempt: after a resume from checkpoint-N its
`elapsed_time` counts from 0, its `remaining_time` divides the steps left by the steps since the
attempt began *as if it had begun at step 0*, and its `throughput` divides every token since
step 0 by the attempt's time. The points of earlier attempts up to the resumed step stay in
`RunMetric` (later ones were replaced), so the time and tokens before the attempt are known.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import yaml
from sqlmodel import Session, col, select

from app.models import Run, RunEvent, RunMetric, RunStatus
from app.services import runs as run_service
from app.wire import METRIC_FIELDS, checkpoint_step

LOG_PAGE = 5000


@dataclass(frozen=True)
class AttemptTiming:
    attempt: int
    # The step this attempt resumed from (0: it started from scratch).
    start_step: int
    # Training time and tokens of the earlier attempts, up to that step.
    elapsed_before_s: float
    tokens_before: int
    # Whether this attempt has logged a point yet (until it has, the run's progress fields
    # still hold the previous attempt's values).
    reported: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def metric_points(session: Session, run_id: int) -> list[dict[str, Any]]:
    """The run's points in step order, each with the attempt that logged it."""
    rows = session.exec(select(RunMetric).where(RunMetric.run_id == run_id).order_by(RunMetric.step)).all()
    return [{"step": m.step, "attempt": m.attempt, **{name: getattr(m, name) for name in METRIC_FIELDS}}
            for m in rows]


def _segments(points: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], float, int]]:
    """Each point with the elapsed time and tokens before its attempt's first point (a new
    attempt begins where the attempt of the points changes)."""
    elapsed_base, tokens_base = 0.0, 0
    last_elapsed, last_tokens, attempt = 0.0, 0, None
    for point in points:
        if attempt is not None and point["attempt"] != attempt:
            elapsed_base, tokens_base = last_elapsed, last_tokens
        attempt = point["attempt"]
        if point["elapsed_s"] is not None:
            last_elapsed = elapsed_base + point["elapsed_s"]
        if point["total_tokens"] is not None:
            last_tokens = point["total_tokens"]
        yield point, elapsed_base, tokens_base


def attempt_timing(run: Run, points: list[dict[str, Any]]) -> AttemptTiming:
    start_step = checkpoint_step(run.resume_from or "") or 0
    elapsed_before, tokens_before = 0.0, 0
    for point, elapsed_base, _ in _segments(points):
        if point["attempt"] < run.attempt and point["step"] <= start_step:
            if point["elapsed_s"] is not None:
                elapsed_before = elapsed_base + point["elapsed_s"]
            if point["total_tokens"] is not None:
                tokens_before = point["total_tokens"]
    reported = run.attempt == 1 or any(point["attempt"] == run.attempt for point in points)
    return AttemptTiming(run.attempt, start_step, elapsed_before, tokens_before, reported)


def elapsed_and_remaining(run: Run, timing: AttemptTiming) -> tuple[float, float | None]:
    """Training time over every attempt, and the time left at the current attempt's own rate."""
    if not timing.reported:
        return timing.elapsed_before_s, None
    elapsed = timing.elapsed_before_s + run.elapsed_s
    if run.status == RunStatus.succeeded:
        return elapsed, 0.0
    done = run.current_step - timing.start_step
    if run.status.is_finished() or done <= 0 or run.elapsed_s <= 0 or not run.total_steps:
        return elapsed, None
    return elapsed, max(run.total_steps - run.current_step, 0) * run.elapsed_s / done


def dashboard_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points as the charts draw them: tokens/s of a resumed attempt counts its own tokens only
    (`throughput` × the share of `total_tokens` the attempt trained on)."""
    shown = []
    for point, _, tokens_base in _segments(points):
        tps, total = point["tokens_per_s"], point["total_tokens"]
        if tokens_base and tps is not None and total:
            point = {**point, "tokens_per_s": tps * max(total - tokens_base, 0) / total}
        shown.append(point)
    return shown


def logging_schedule(run: Run) -> dict[str, int | None]:
    """save_steps and logging_steps of the run's YAML: the dashboard refreshes its checkpoint
    table once a save step has passed."""
    try:
        args = yaml.safe_load(run.train_yaml) or {}
    except yaml.YAMLError:
        args = {}
    return {key: args.get(key) if isinstance(args.get(key), int) else None for key in ("save_steps", "logging_steps")}


def result_file_versions(run_id: int) -> dict[str, int]:
    """Result file → a version for its URL (its modification time): a plot written again by a
    resumed attempt gets a new URL, so a browser never shows the cancelled attempt's from cache."""
    return {name: run_service.result_file_path(run_id, name).stat().st_mtime_ns
            for name in run_service.result_files_of(run_id)}


def final_metrics(run: Run, points: list[dict[str, Any]]) -> dict[str, Any]:
    """What the compare table shows for one run: the last train and eval loss logged, the
    training time over every attempt, the mean tokens/s, and any other evaluation metric of
    the results (eval_accuracy, …)."""
    timing = attempt_timing(run, points)
    elapsed, _ = elapsed_and_remaining(run, timing)
    shown = dashboard_points(points)
    losses = [p["loss"] for p in shown if p["loss"] is not None]
    evals = [p["eval_loss"] for p in shown if p["eval_loss"] is not None]
    speeds = [p["tokens_per_s"] for p in shown if p["tokens_per_s"] is not None]
    extra = {key: value for key, value in sorted(run.results.items())
             if key.startswith(("eval_", "predict_")) and key != "eval_loss"
             and isinstance(value, (int, float)) and not key.endswith(("_runtime", "_per_second"))}
    return {
        "train_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else run.results.get("eval_loss"),
        "runtime_s": elapsed if points else run.results.get("train_runtime"),
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "steps": run.current_step,
        "extra": extra,
    }


def log_text(session: Session, run_id: int) -> Iterator[str]:
    """Every log line of the run, attempt by attempt in the order they were written, paged so
    that a long log never sits in memory at once."""
    after, attempt = 0, None
    while True:
        lines = session.exec(
            select(RunEvent.id, RunEvent.data)
            .where(RunEvent.run_id == run_id, RunEvent.kind == "log", RunEvent.id > after)
            .order_by(col(RunEvent.id)).limit(LOG_PAGE)
        ).all()
        if not lines:
            return
        page = []
        for _id, line in lines:
            if line["attempt"] != attempt and line["attempt"] > 1:
                page.append(f"----- attempt {line['attempt']} -----\n")
            attempt = line["attempt"]
            page.append(f"{line['line']}\n")
        yield "".join(page)
        after = lines[-1][0]
