"""Workers: the page with one card per worker, the JSON API and the workers' heartbeat."""

from fastapi import APIRouter, Request
from sqlmodel import select

from app.db import SessionDep
from app.models import Worker, WorkerPublic
from app.services import workers as service
from app.templating import is_htmx, render
from app.wire import Heartbeat, HeartbeatReply

router = APIRouter(tags=["workers-pages"], include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["workers"])
internal_router = APIRouter()


@router.get("/workers")
def workers_page(request: Request, session: SessionDep):
    """The whole page, or (to htmx polling) just the cards."""
    context = {"section": "workers", "views": service.worker_views(session)}
    return render(request, "workers/list.html", context, block="cards" if is_htmx(request) else None)


@router.post("/workers/{worker_id}/doctor")
def ask_doctor(request: Request, worker_id: str, session: SessionDep):
    service.request_doctor(session, service.get_worker(session, worker_id))
    context = {"section": "workers", "views": service.worker_views(session)}
    return render(request, "workers/list.html", context, block="cards")


@api_router.get("/workers", response_model=list[WorkerPublic])
def list_workers(session: SessionDep) -> list[WorkerPublic]:
    return [service.public(worker) for worker in session.exec(select(Worker)).all()]


@api_router.get("/workers/{worker_id}", response_model=WorkerPublic)
def get_worker(worker_id: str, session: SessionDep) -> WorkerPublic:
    return service.public(service.get_worker(session, worker_id))


@api_router.post("/workers/{worker_id}/doctor", status_code=202)
def request_doctor(worker_id: str, session: SessionDep) -> dict[str, bool]:
    """Ask the worker for a fresh doctor report; it arrives with its next heartbeat."""
    service.request_doctor(session, service.get_worker(session, worker_id))
    return {"requested": True}


@internal_router.post("/workers/heartbeat")
def heartbeat(payload: Heartbeat, session: SessionDep) -> HeartbeatReply:
    return service.record_heartbeat(session, payload)
