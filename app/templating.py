"""Jinja2 templates with named blocks: one route serves a whole page or, to htmx, one fragment."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from app.models.base import as_utc
from app.settings import TEMPLATES_DIR

templates = Jinja2Templates(directory=TEMPLATES_DIR)


def isotime(moment: datetime | None) -> str:
    """For `<time datetime="{{ t | isotime }}">`: app.js shows it in the user's locale."""
    return as_utc(moment).isoformat() if moment else ""


templates.env.filters["isotime"] = isotime


def is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def render(
    request: Request,
    name: str,
    context: dict[str, Any] | None = None,
    *,
    block: str | None = None,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    """Render `name`; with `block`, only that named block (an htmx fragment of the same page)."""
    context = {"request": request, **(context or {})}
    if block is None:
        return templates.TemplateResponse(
            request, name, context, status_code=status_code, headers=headers
        )
    template = templates.env.get_template(name)
    for processor in templates.context_processors:  # as TemplateResponse does for whole pages
        context = {**processor(request), **context}
    template_context = template.new_context({**templates.env.globals, **context})
    html = "".join(template.blocks[block](template_context))
    return HTMLResponse(html, status_code=status_code, headers=headers)
