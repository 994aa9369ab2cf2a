"""Who is calling: every page and API route depends on `require_user`."""


def require_user() -> None:
    return None
