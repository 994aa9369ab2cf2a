"""`tuneboard user …`: accounts, from the server's shell (the first admin, a forgotten password)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from sqlmodel import Session

from app.cli import cli
from app.db import get_engine, migrate
from app.services import users

user_cli = typer.Typer(help="Accounts: create users, reset passwords.", no_args_is_help=True)
cli.add_typer(user_cli, name="user")


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return typer.prompt("Password", hide_input=True, confirmation_prompt=True)


@user_cli.command("create")
def create(
    username: str,
    admin: Annotated[bool, typer.Option("--admin", help="Make this user an admin.")] = False,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin.")] = False,
) -> None:
    """Create a user (the password is prompted for, or read from stdin)."""
    migrate()  # the CLI may run before the web app ever has
    password = _read_password(password_stdin)
    with Session(get_engine()) as session:
        try:
            user = users.create_user(session, username, password, is_admin=admin)
        except users.UserError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"created {'admin' if user.is_admin else 'user'} {user.username}")


@user_cli.command("set-password")
def set_password(
    username: str,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin.")] = False,
) -> None:
    """Set a user's password (ends their sessions)."""
    migrate()
    with Session(get_engine()) as session:
        user = users.get_user_by_name(session, username)
        if user is None:
            typer.echo(f"error: no user {username}", err=True)
            raise typer.Exit(1)
        try:
            users.set_password(session, user, _read_password(password_stdin))
        except users.UserError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"password of {username} changed")
