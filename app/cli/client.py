"""The CLI's HTTP client for the panel's JSON API (TUNEBOARD_URL, TUNEBOARD_TOKEN)."""

from __future__ import annotations

import os

import httpx
import typer

from app.settings import get_settings


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    return detail if isinstance(detail, str) else str(detail)


def _fail_on_error(response: httpx.Response) -> None:
    if response.is_error:
        response.read()
        typer.echo(f"error: {response.status_code} {_detail(response)}", err=True)
        raise typer.Exit(1)


class PanelClient(httpx.Client):
    """httpx.Client whose failures end the command with a message and exit code 1."""

    def send(self, request: httpx.Request, **kwargs) -> httpx.Response:
        try:
            return super().send(request, **kwargs)
        except httpx.TransportError as error:
            typer.echo(f"error: cannot reach Tuneboard at {self.base_url}: {error}", err=True)
            raise typer.Exit(1) from None


def api_client(timeout: float = 30.0) -> PanelClient:
    """A client of the panel at TUNEBOARD_URL (default: settings.app_url), authenticated with the
    personal API token in TUNEBOARD_TOKEN (create one on the /account page)."""
    token = os.environ.get("TUNEBOARD_TOKEN")
    if not token:
        typer.echo("error: set TUNEBOARD_TOKEN to a personal API token (create one at /account)", err=True)
        raise typer.Exit(1)
    base_url = os.environ.get("TUNEBOARD_URL") or get_settings().app_url
    return PanelClient(
        base_url=base_url.rstrip("/"),
        headers={"Authorization": f"Bearer {token}"},
        timeout=timeout,
        event_hooks={"response": [_fail_on_error]},
    )
