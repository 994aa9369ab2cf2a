"""`tuneboard user …`: accounts, from the server's shell (the first admin, a forgotten password)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from sqlmodel import Session

from app.cli import cli
from app.db import get_engine, migrate
from app.models.user import UserRole
from app.services import audit, users

user_cli = typer.Typer(help="Accounts: create users (admin, member, viewer), reset passwords.", no_args_is_help=True)
cli.add_typer(user_cli, name="user")
# Where the audit log says these changes came from: the server's own shell, no panel user.
SHELL = "server shell"


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return typer.prompt("Password", hide_input=True, confirmation_prompt=True)


@user_cli.command("create")
def create(
    username: str,
    admin: Annotated[bool, typer.Option("--admin", help="Make this user an admin (same as --role admin).")] = False,
    role: Annotated[UserRole, typer.Option("--role", help="admin, member (the default) or viewer.")] = UserRole.member,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin.")] = False,
) -> None:
    """Create a user (the password is prompted for, or read from stdin)."""
    migrate()  # the CLI may run before the web app ever has
    password = _read_password(password_stdin)
    with Session(get_engine()) as session:
        try:
            user = users.create_user(session, username, password, role=UserRole.admin if admin else role)
        except users.UserError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
        created = f"created {user.role.value} {user.username}"
        audit.record(session, "user.create", "user", user.id, address=SHELL, detail={"role": user.role.value})
    typer.echo(created)


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
        audit.record(session, "user.password", "user", user.id, address=SHELL)
    typer.echo(f"password of {username} changed")
