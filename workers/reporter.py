"""The worker's channel to the app: authenticated HTTP, retried until the app answers.

Workers never open the database; everything they learn goes through here. Every report is
idempotent on the app's side, so re-sending after a timeout or an app restart is safe.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx

from app.settings import Settings, get_settings

log = logging.getLogger(__name__)


class AppUnavailable(RuntimeError):
    pass


class Reporter:
    def __init__(self, settings: Settings | None = None, *, timeout_s: float = 10.0) -> None:
        settings = settings or get_settings()
        self._client = httpx.Client(
            base_url=settings.app_url.rstrip("/") + "/internal/v1",
            headers={"Authorization": f"Bearer {settings.worker_token}"},
            timeout=timeout_s,
        )

    def request(
        self, method: str, path: str, *, json: Any = None, retry_for_s: float = 300.0, **kwargs: Any
    ) -> httpx.Response:
        """Send until the app answers (connection errors and 5xx are retried with backoff);
        a 4xx is the app's final word and is returned to the caller."""
        deadline = time.monotonic() + retry_for_s
        delay = 0.2
        while True:
            try:
                response = self._client.request(method, path, json=json, **kwargs)
                if response.status_code < 500:
                    return response
                problem = f"HTTP {response.status_code}"
            except httpx.TransportError as error:
                problem = repr(error)
            if time.monotonic() >= deadline:
                raise AppUnavailable(f"{method} {path}: {problem}")
            log.warning("app unavailable (%s); retrying %s %s in %.1fs", problem, method, path, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def post(self, path: str, json: Any = None, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, json=json, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One attempt, not retried: a streamed body cannot be sent twice (the caller resumes)."""
        return self._client.request(method, path, **kwargs)

    def stream(self, method: str, path: str, **kwargs: Any) -> AbstractContextManager[httpx.Response]:
        """One streamed response, not retried: the caller resumes a broken download by range."""
        return self._client.stream(method, path, **kwargs)

    def download(self, path: str, destination: Path, *, retry_for_s: float = 300.0) -> str:
        """Stream a file to `destination` (written whole or not at all, retried like any call);
        returns its sha256."""
        deadline = time.monotonic() + retry_for_s
        partial = destination.with_name(destination.name + ".partial")
        while True:
            digest = hashlib.sha256()
            try:
                with self._client.stream("GET", path) as response, partial.open("wb") as out:
                    response.raise_for_status()
                    for chunk in response.iter_bytes(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                partial.replace(destination)
                return digest.hexdigest()
            except httpx.HTTPStatusError as error:
                if error.response.status_code < 500 or time.monotonic() >= deadline:
                    partial.unlink(missing_ok=True)
                    raise
            except httpx.TransportError as error:
                if time.monotonic() >= deadline:
                    partial.unlink(missing_ok=True)
                    raise AppUnavailable(f"GET {path}: {error!r}") from error
            log.warning("download of %s interrupted; retrying", path)
            time.sleep(1.0)

    def close(self) -> None:
        self._client.close()
