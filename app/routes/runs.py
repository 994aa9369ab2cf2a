"""Runs: pages (htmx fragments from the same routes), the JSON API under /api/v1, the live event
stream (SSE with replay) and the worker channel (claim, events, finish, artifacts)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlmodel import Session, select
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.auth import CurrentUser, OwnerQuery, require_owner
from app.db import SessionDep
from app.models import Run, RunPublic, RunStatus, TrainConfig
from app.models.run import RunPriority
from app.services import configs as config_service
from app.services import listings, run_views
from app.services import runs as service
from app.services import scheduler
from app.services.run_events import hub
from app.services.users import owner_id_filter
from app.templating import is_htmx, render, templates
from app.models import BatchProbe, BatchProbePublic
from app.services import batching
from app.wire import BatchChoice, BatchFallback, ClaimRequest, EventsReply, EventsRequest, FinishRequest, ProbeReport, RunSpec

router = APIRouter(tags=["runs-pages"], include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["runs"])
# Changing one needs its owner or an admin (app/services/permissions.py).
OWNED_RUN = require_owner(service.get_run, "run_id", "run")
internal_router = APIRouter()

# A fresh key per rendered start form (runs/_start_form.html, also included by the config page):
# submitting the same form twice starts one run.
templates.env.globals["new_form_key"] = lambda: uuid.uuid4().hex
templates.env.globals["queue_spot"] = scheduler.queue_spot

SSE_PING_S = 15
# A watcher re-checks the run this often even when no notification came (defence in depth).
SSE_IDLE_RECHECK_S = 30.0


class RunCreate(BaseModel):
    config_id: int
    name: str | None = Field(default=None, max_length=200)
    gpus: int | None = Field(default=None, ge=0)
    priority: RunPriority = RunPriority.normal


def _public(run: Run) -> RunPublic:
    spot = scheduler.queue_spot(run.id) if run.status == RunStatus.queued else None
    update = {"queue_position": spot.position, "wait_reason": spot.reason} if spot else {}
    return RunPublic.model_validate(run, update=update)


# --------------------------------------------------------------------------- the event stream
def _cursor(after: int, last_event_id: str | None) -> int:
    """`Last-Event-ID` (sent by a reconnecting EventSource) wins over the page's `?after=`."""
    if last_event_id and last_event_id.strip().isdigit():
        return max(after, int(last_event_id))
    return after


async def _run_events(run_id: int, cursor: int, finished: bool) -> AsyncIterator[ServerSentEvent]:
    async with hub.subscribe(run_id) as channel:
        while True:
            waiter = channel.waiter()
            events = await channel.read_after(cursor)
            for event in events:
                yield ServerSentEvent(data=event.data, event=event.kind, id=str(event.id))
                cursor = event.id
                if event.kind == "status":
                    finished = RunStatus(json.loads(event.data)["status"]).is_finished()
            if events:
                continue
            if finished:  # nothing more will come: the client closes instead of reconnecting
                yield ServerSentEvent(data=json.dumps({"cursor": cursor}), event="end")
                return
            with suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), SSE_IDLE_RECHECK_S)


def _event_stream(session: Session, run_id: int, after: int, last_event_id: str | None) -> EventSourceResponse:
    finished = service.get_run(session, run_id).status.is_finished()
    session.close()  # the stream may last hours: hold no connection
    return EventSourceResponse(
        _run_events(run_id, _cursor(after, last_event_id), finished),
        ping=SSE_PING_S, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# --------------------------------------------------------------------------- pages
def _start_form_context(session: Session, *, error: str | None = None, values: dict | None = None) -> dict[str, Any]:
    return {
        "configs": listings.config_choices(session), "start_error": error, "start_values": values or {},
    }


def _list_context(session: Session, owner_id: int | None = None, owner: str | None = None) -> dict[str, Any]:
    cursor = listings.latest_event_id(session)  # first: a change made while the rows are read is sent again
    runs = listings.run_rows(session, owner_id=owner_id)
    return {
        "section": "runs", "runs": runs, "owner": owner, "cursor": cursor, "top": max((run.id for run in runs), default=0),
        "any_active": any(run.status.is_active() for run in runs),
        **_start_form_context(session),
    }


@router.get("/runs")
def runs_page(request: Request, session: SessionDep, user: CurrentUser, owner: OwnerQuery = None):
    """`?owner=me`: only the caller's runs (the page's "Mine" toggle)."""
    return render(request, "runs/list.html", _list_context(session, owner_id_filter(session, user, owner), owner))


@router.get("/runs/rows")
def changed_run_rows(request: Request, session: SessionDep, user: CurrentUser, after: int = 0, top: int = 0,
                     owner: OwnerQuery = None) -> Response:
    """htmx polling while a run is active: only the rows of runs with an event after `after`
    (`top`: the newest run the page shows; newer ones are added on top), or 204."""
    changed, cursor = listings.run_rows_changed(session, after, owner_id_filter(session, user, owner))
    if not changed:
        return Response(status_code=204)
    context = {
        "changed": changed, "cursor": cursor, "top_before": top, "owner": owner,
        "top": max(top, *(run.id for run in changed)), "any_active": listings.any_run_active(session),
    }
    return render(request, "runs/list.html", context, block="changed_rows")


@router.post("/runs")
def start_from_form(
    request: Request,
    session: SessionDep,
    config_id: Annotated[int, Form()],
    name: Annotated[str, Form()] = "",
    gpus: Annotated[str, Form()] = "",
    idempotency_key: Annotated[str, Form()] = "",
    fixed: Annotated[bool, Form()] = False,
    priority: Annotated[RunPriority, Form()] = RunPriority.normal,
):
    try:
        run, _created = service.start_run(
            session, config_id, name=name or None, gpus=int(gpus) if gpus.strip() else None,
            idempotency_key=idempotency_key or None, priority=priority,
        )
    except (service.RunError, ValueError) as error:
        detail = error.detail if isinstance(error, service.RunError) else "GPUs must be a whole number"
        context = {
            "section": "runs",
            **_start_form_context(session, error=detail, values={"config_id": config_id, "name": name, "gpus": gpus}),
            "fixed_config": session.get(TrainConfig, config_id) if fixed else None,  # the config page's form
        }
        if is_htmx(request):  # htmx swaps only 2xx: the form comes back with the error inline
            page = "configs/detail.html" if fixed else "runs/list.html"
            return render(request, page, {**context, "config": context["fixed_config"]}, block="start_form")
        status_code = error.status_code if isinstance(error, service.RunError) else 400
        return render(request, "runs/list.html", {**_list_context(session), **context}, status_code=status_code)
    return _redirect(request, f"/runs/{run.id}")


def _redirect(request: Request, url: str) -> Response:
    if is_htmx(request):
        return Response(status_code=204, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


@router.get("/runs/compare")
def compare_page(request: Request, session: SessionDep, ids: Annotated[list[int], Query()] = []):  # noqa: B006
    context = {"section": "runs", "all_runs": listings.run_rows(session), **_compare(session, ids)}
    return render(request, "runs/compare.html", context)


def _dashboard_context(session: Session, run: Run, block: str | None) -> dict[str, Any]:
    """What the page (block None) or one of its refreshed blocks shows."""
    context: dict[str, Any] = {"section": "runs", "run": run}
    if block in (None, "header"):
        points = run_views.metric_points(session, run.id)
        timing = run_views.attempt_timing(run, points)
        context.update(
            config=session.get(TrainConfig, run.config_id), timing=timing,
            resumable=service.latest_checkpoint(session, run) is not None,
        )
    if block in (None, "artifacts"):
        context.update(checkpoints=service.checkpoints_of(session, run),
                       result_files=run_views.result_file_versions(run.id))
    if block is None:
        cursor = service.event_cursor(session, run.id)
        elapsed, remaining = run_views.elapsed_and_remaining(run, timing)
        context.update(elapsed_s=elapsed, remaining_s=remaining, initial={
            "run": json.loads(_public(run).model_dump_json()),
            "cursor": cursor,
            "timing": timing.as_dict(),
            "schedule": run_views.logging_schedule(run),
            "metrics": run_views.dashboard_points(points),
            "logs": service.log_tail(session, run.id, upto_event=cursor),
        })
    return context


@router.get("/runs/{run_id}")
def run_page(request: Request, run_id: int, session: SessionDep):
    """The live dashboard."""
    run = service.get_run(session, run_id)
    return render(request, "runs/detail.html", _dashboard_context(session, run, None))


@router.get("/runs/{run_id}/header")
def run_header(request: Request, run_id: int, session: SessionDep):
    """htmx, after a status event: the dashboard's header (actions, worker, timing)."""
    run = service.get_run(session, run_id)
    return render(request, "runs/detail.html", _dashboard_context(session, run, "header"), block="header")


@router.get("/runs/{run_id}/artifacts")
def run_artifacts_section(request: Request, run_id: int, session: SessionDep):
    """htmx, once a checkpoint is due or the run is over: the dashboard's checkpoints and files."""
    run = service.get_run(session, run_id)
    return render(request, "runs/detail.html", _dashboard_context(session, run, "artifacts"), block="artifacts")


@router.get("/runs/{run_id}/log.txt")
def run_log_download(run_id: int, session: SessionDep) -> StreamingResponse:
    """Every log line of every attempt (the dashboard keeps the last 500)."""
    service.get_run(session, run_id)
    return StreamingResponse(
        run_views.log_text(session, run_id), media_type="text/plain; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="run-{run_id}-log.txt"'},
    )


@router.get("/runs/{run_id}/events")
def run_events_page(
    run_id: int, session: SessionDep, after: int = 0,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    return _event_stream(session, run_id, after, last_event_id)


def _page_action(request: Request, session: Session, run_id: int, action, *, go_to_new: bool = False) -> Response:
    result = action(session, run_id)
    if go_to_new:
        return _redirect(request, f"/runs/{result[0].id}")
    if is_htmx(request):
        return Response(status_code=204, headers={"HX-Refresh": "true"})
    return RedirectResponse(f"/runs/{run_id}", status_code=303)


@router.post("/runs/{run_id}/cancel", dependencies=[OWNED_RUN])
def cancel_from_page(request: Request, run_id: int, session: SessionDep) -> Response:
    return _page_action(request, session, run_id, service.cancel_run)


@router.post("/runs/{run_id}/resume", dependencies=[OWNED_RUN])
def resume_from_page(request: Request, run_id: int, session: SessionDep) -> Response:
    return _page_action(request, session, run_id, service.resume_run)


@router.post("/runs/{run_id}/retry", dependencies=[OWNED_RUN])
def retry_from_page(request: Request, run_id: int, session: SessionDep) -> Response:
    return _page_action(request, session, run_id, service.retry_run)


@router.post("/runs/{run_id}/again")
def again_from_page(
    request: Request, run_id: int, session: SessionDep, idempotency_key: Annotated[str, Form()] = "",
) -> Response:
    return _page_action(
        request, session, run_id,
        lambda s, rid: service.run_again(s, rid, idempotency_key=idempotency_key or None), go_to_new=True,
    )


@router.post("/runs/{run_id}/delete", dependencies=[OWNED_RUN])
def delete_from_page(request: Request, run_id: int, session: SessionDep) -> Response:
    service.delete_run(session, run_id)
    return _redirect(request, "/runs")


@router.get("/runs/{run_id}/artifacts/{name}")
def artifact_page(run_id: int, name: str, v: str | None = None) -> FileResponse:
    """`v`: the file's version (run_views.result_file_versions); a versioned URL never changes
    content, so the browser may keep it."""
    response = _artifact(run_id, name)
    if v is not None:
        response.headers["Cache-Control"] = "private, max-age=31536000, immutable"
    return response


@router.get("/runs/{run_id}/download")
def download_page(run_id: int, session: SessionDep, checkpoint: str | None = None) -> StreamingResponse:
    return _download(session, run_id, checkpoint)


# --------------------------------------------------------------------------- shared helpers
def _artifact(run_id: int, name: str) -> FileResponse:
    return FileResponse(service.result_file_path(run_id, name))


def _download(session: Session, run_id: int, checkpoint: str | None) -> StreamingResponse:
    manifest = service.download_manifest(session, service.get_run(session, run_id), checkpoint)
    filename = f"run-{run_id}-{checkpoint or 'adapter'}.zip"
    return StreamingResponse(
        service.stream_zip(manifest), media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _compare(session: Session, ids: list[int]) -> dict[str, Any]:
    runs = [run for run in (session.get(Run, run_id) for run_id in dict.fromkeys(ids)) if run is not None]
    configs = {run.id: session.get(TrainConfig, run.config_id) for run in runs}
    diff = (
        config_service.diff(session, configs[runs[0].id], configs[runs[1].id]) if len(runs) == 2 else None
    )
    series = {run.id: service.metrics_of(session, run.id) for run in runs}
    points = {run.id: run_views.metric_points(session, run.id) for run in runs}
    # Columns and curves are labelled by name; the id only tells apart runs of the same name.
    names = [run.name for run in runs]
    labels = {run.id: run.name if names.count(run.name) == 1 else f"{run.name} (#{run.id})" for run in runs}
    return {
        "runs": runs, "series": series, "diff": diff, "labels": labels,
        "summary": {run.id: run_views.final_metrics(run, points[run.id]) for run in runs},
        "chart": {"runs": [{"id": run.id, "label": labels[run.id]} for run in runs],
                  "series": {run_id: run_views.dashboard_points(p) for run_id, p in points.items()}},
    }


# --------------------------------------------------------------------------- JSON API
@api_router.get("/runs", response_model=list[RunPublic])
def list_runs(session: SessionDep, user: CurrentUser, status: RunStatus | None = None,
              limit: int = Query(200, le=1000), owner: OwnerQuery = None):
    owner_id = owner_id_filter(session, user, owner)
    return [_public(run) for run in service.list_runs(session, status=status, limit=limit, owner_id=owner_id)]


@api_router.post("/runs", response_model=RunPublic, status_code=201)
def start_run(
    payload: RunCreate, response: Response, session: SessionDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
):
    """Queue a run of a config. Send an `Idempotency-Key` header to make a repeated request
    (a retry, a double click) return the first run (200) instead of starting another."""
    run, created = service.start_run(
        session, payload.config_id, name=payload.name, gpus=payload.gpus, idempotency_key=idempotency_key,
        priority=payload.priority,
    )
    if not created:
        response.status_code = 200
    return _public(run)


@api_router.get("/runs/compare")
def compare_runs(session: SessionDep, ids: Annotated[list[int], Query()]) -> dict[str, Any]:
    """Loss curves of several runs and (for two) their config diff."""
    compared = _compare(session, ids)
    return {
        "runs": [_public(run).model_dump(mode="json") for run in compared["runs"]],
        "metrics": compared["series"],
        "diff": compared["diff"],
    }


@api_router.get("/runs/{run_id}", response_model=RunPublic)
def get_run(run_id: int, session: SessionDep):
    return _public(service.get_run(session, run_id))


@api_router.get("/runs/{run_id}/yaml", response_class=PlainTextResponse)
def run_yaml(run_id: int, session: SessionDep) -> str:
    """The exact train.yaml of the run (output_dir and dataset_dir are the worker's placeholders)."""
    return service.get_run(session, run_id).train_yaml


@api_router.get("/runs/{run_id}/metrics")
def run_metrics(run_id: int, session: SessionDep) -> list[dict[str, Any]]:
    service.get_run(session, run_id)
    return service.metrics_of(session, run_id)


@api_router.get("/runs/{run_id}/logs")
def run_logs(
    run_id: int, session: SessionDep, after_id: int = 0, limit: int = Query(1000, le=10000),
) -> list[dict[str, Any]]:
    """Log lines in order; page with `after_id` (the last line's id)."""
    service.get_run(session, run_id)
    return [line.model_dump() for line in service.log_lines(session, run_id, after_id=after_id, limit=limit)]


@api_router.get("/runs/{run_id}/events", response_class=EventSourceResponse)
def run_events_api(
    run_id: int, session: SessionDep, after: int = 0,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """Server-sent events (`status`, `progress`, `metric`, `log`, then `end` once finished); each
    `id:` is a cursor: reconnect with `?after=<id>` or `Last-Event-ID` to miss nothing."""
    return _event_stream(session, run_id, after, last_event_id)


def _api_action(session: Session, run_id: int, action) -> RunPublic:
    return _public(action(session, run_id))


@api_router.post("/runs/{run_id}/cancel", dependencies=[OWNED_RUN], response_model=RunPublic)
def cancel_run(run_id: int, session: SessionDep):
    """Queued: cancelled at once. Starting or running: the worker stops the process (LLaMA-Factory
    saves the adapter first) and the run becomes cancelled."""
    return _api_action(session, run_id, service.cancel_run)


@api_router.post("/runs/{run_id}/resume", dependencies=[OWNED_RUN], response_model=RunPublic)
def resume_run(run_id: int, session: SessionDep):
    """A new attempt of a failed, cancelled or lost run from its latest complete checkpoint."""
    return _api_action(session, run_id, service.resume_run)


@api_router.post("/runs/{run_id}/retry", dependencies=[OWNED_RUN], response_model=RunPublic)
def retry_run(run_id: int, session: SessionDep):
    """A new attempt of a failed, cancelled or lost run, from scratch."""
    return _api_action(session, run_id, service.retry_run)


@api_router.post("/runs/{run_id}/again", response_model=RunPublic, status_code=201)
def run_again(
    run_id: int, response: Response, session: SessionDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
):
    """A new run of the same frozen config."""
    run, created = service.run_again(session, run_id, idempotency_key=idempotency_key)
    if not created:
        response.status_code = 200
    return _public(run)


@api_router.delete("/runs/{run_id}", dependencies=[OWNED_RUN], status_code=204)
def delete_run(run_id: int, session: SessionDep) -> Response:
    """Delete a finished run, its metrics, logs and files."""
    service.delete_run(session, run_id)
    return Response(status_code=204)


@api_router.get("/runs/{run_id}/checkpoints")
def run_checkpoints(run_id: int, session: SessionDep) -> list[dict[str, Any]]:
    return service.checkpoints_of(session, service.get_run(session, run_id))


@api_router.get("/runs/{run_id}/artifacts")
def run_artifacts(run_id: int, session: SessionDep) -> list[str]:
    service.get_run(session, run_id)
    return service.result_files_of(run_id)


@api_router.get("/runs/{run_id}/artifacts/{name}")
def run_artifact(run_id: int, name: str) -> FileResponse:
    return _artifact(run_id, name)


@api_router.get("/runs/{run_id}/download", responses={200: {"content": {"application/zip": {}}}})
def download_run(run_id: int, session: SessionDep, checkpoint: str | None = None) -> StreamingResponse:
    """The adapter (or `?checkpoint=checkpoint-N`) as a zip, streamed."""
    return _download(session, run_id, checkpoint)


@api_router.get("/batch-probes", response_model=list[BatchProbePublic])
def list_batch_probes(session: SessionDep) -> list[BatchProbe]:
    """The micro-batch probe cache: what each probe measured, newest first."""
    return list(session.exec(select(BatchProbe).order_by(BatchProbe.id.desc())).all())


# --------------------------------------------------------------------------- the worker channel
@internal_router.post("/runs/{run_id}/claim")
def claim(run_id: int, payload: ClaimRequest, session: SessionDep) -> RunSpec:
    return service.claim_run(session, run_id, payload)


@internal_router.post("/runs/{run_id}/events")
def events(run_id: int, payload: EventsRequest, session: SessionDep) -> EventsReply:
    return EventsReply(cancel=service.record_events(session, run_id, payload))


@internal_router.post("/runs/{run_id}/finish")
def finish(run_id: int, payload: FinishRequest, session: SessionDep) -> dict[str, Any]:
    service.finish_run(session, run_id, payload)
    return {}


@internal_router.post("/runs/{run_id}/probe")
def probe_result(run_id: int, payload: ProbeReport, session: SessionDep) -> BatchChoice:
    """The micro-batch probe's measurements; the answer is the split to train with."""
    return batching.record_probe(session, run_id, payload)


@internal_router.post("/runs/{run_id}/batch-fallback")
def batch_fallback(run_id: int, payload: BatchFallback, session: SessionDep) -> dict[str, Any]:
    """The trainer ran out of memory in its first steps: it trains again one size smaller."""
    batching.record_fallback(session, run_id, payload)
    return {}


@internal_router.post("/runs/{run_id}/results")
def upload_result_file(
    run_id: int, session: SessionDep,
    attempt: Annotated[int, Form()], name: Annotated[str, Form()], file: Annotated[UploadFile, File()],
) -> dict[str, Any]:
    path = service.store_result_file(run_id, attempt, name, file.file, session)
    return {"name": name, "size": path.stat().st_size}
