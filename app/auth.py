"""Who is calling: every page and API route depends on `require_user`; the worker channel on
`require_worker`."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, status

from app.settings import get_settings


def require_user() -> None:
    return None


def require_worker(request: Request) -> None:
    """Workers authenticate with the internal token (TUNEBOARD_INTERNAL_TOKEN), never a user's."""
    expected = f"Bearer {get_settings().worker_token}"
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "worker token required")
