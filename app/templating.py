"""Jinja2 templates with named blocks: one route serves a whole page or, to htmx, one fragment."""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

from app.models.base import as_utc
from app.settings import TEMPLATES_DIR

templates = Jinja2Templates(directory=TEMPLATES_DIR)


def isotime(moment: datetime | None) -> str:
    """For `<time datetime="{{ t | isotime }}">`: app.js shows it in the user's locale."""
    return as_utc(moment).isoformat() if moment else ""


def filesize(size: float | None) -> str:
    """Bytes for people: 812 B, 41.3 KiB, 6.51 MiB, 1.20 GiB (three significant digits, so that a
    small file never reads "0.0 MiB")."""
    if size is None:
        return "—"
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            return f"{size:.3g} {unit}" if size < 100 else f"{size:,.0f} {unit}"
    raise AssertionError("unreachable")


def number(value: Any) -> str:
    """A metric or result for people: 6.50616455078125 → 6.506, 936898338816.0 → 936,898,338,816,
    0.0001234 → 1.23e-04; anything that is not a number as it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—" if value is None else str(value)
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if not math.isfinite(value) or value == 0:
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 1e-3:
        return f"{value:.4g}"
    return f"{value:.2e}"


def duration(seconds: float | None) -> str:
    """1h 2m 5s, as the dashboard's script writes it."""
    if seconds is None:
        return "—"
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


_BACKTICKED = re.compile(r"`([^`\n]+)`")


def code_spans(text: str | None) -> Markup:
    """Plain text whose `backticked` parts are code (the doctor's hints are written that way)."""
    return Markup(_BACKTICKED.sub(r"<code>\1</code>", str(escape(text or ""))))


templates.env.filters.update(
    isotime=isotime, filesize=filesize, number=number, duration=duration, code_spans=code_spans,
)


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
