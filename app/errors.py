"""Domain errors: services raise them, and one handler in `app.main` answers them over HTTP.

A service says what went wrong (and, for a form, which field); it never knows about FastAPI. The
handler answers JSON under /api and /internal, a fragment to htmx, and a page to a browser.
"""

from __future__ import annotations

from typing import Any, Self


class DomainError(Exception):
    """A refusal: `detail` is said to the user as-is; `field` names the form field at fault."""

    status_code = 400

    def __init__(self, detail: str, *, field: str | None = None, status_code: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        if status_code is not None:
            self.status_code = status_code
        # More keys of the JSON answer, for a client that acts on them (an upload's state, a config's errors).
        self.extra: dict[str, Any] = {}

    def with_extra(self, **extra: Any) -> Self:
        """`raise Conflict("...").with_extra(offset=12)`: the JSON answer carries `offset` too."""
        self.extra.update(extra)
        return self


class Invalid(DomainError):
    """The request is well-formed but its content is refused (a form's field, a file's row)."""

    status_code = 422


class Forbidden(DomainError):
    status_code = 403


class NotFound(DomainError):
    status_code = 404


class Conflict(DomainError):
    """The thing is not in a state that allows this now (running, in use, already exists)."""

    status_code = 409


class TooLarge(DomainError):
    status_code = 413


class Unavailable(DomainError):
    """A component the panel needs (the artifact store, the training environment) did not answer."""

    status_code = 503
