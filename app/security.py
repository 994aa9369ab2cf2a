"""Security primitives: password hashing, API tokens, CSRF tokens, the signed session cookie,
path confinement and the LLaMA-Factory arguments only the panel may set."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from app.errors import Forbidden
from app.settings import Environment, Settings, get_settings

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- passwords


def _password_hasher() -> PasswordHasher:
    # The test suite creates a user per test: argon2's defaults (64 MiB, 3 passes) would dominate
    # its runtime, so tests alone use the cheapest parameters argon2 accepts.
    if get_settings().environment == Environment.test:
        return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    return PasswordHasher()


def hash_password(password: str) -> str:
    return _password_hasher().hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _password_hasher().verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def password_needs_rehash(password_hash: str) -> bool:
    return _password_hasher().check_needs_rehash(password_hash)


# ------------------------------------------------------------------- tokens

TOKEN_PREFIX = "tb_"
# What lists show of a token: enough to tell tokens apart, far too little to guess the rest.
TOKEN_DISPLAY_CHARS = 12


def new_api_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_api_token(raw: str) -> str:
    # A plain SHA-256 is right here (unlike passwords): tokens carry 256 random bits, so there
    # is nothing to brute-force, and every API request must look its token up quickly.
    return hashlib.sha256(raw.encode()).hexdigest()


def token_display_prefix(raw: str) -> str:
    return raw[:TOKEN_DISPLAY_CHARS]


# ------------------------------------------------------- session and CSRF

SESSION_COOKIE = "tuneboard_session"
SESSION_MAX_AGE_S = 14 * 24 * 3600
CSRF_HEADER = "X-CSRF-Token"
CSRF_FORM_FIELD = "csrf_token"


def _session_serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(get_settings().secret_key, salt="tuneboard.session")


def password_fingerprint(password_hash: str) -> str:
    """Stored in the session: changing the password ends every session made with the old one."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def read_session(request: Request) -> dict[str, Any]:
    """The signed session cookie's contents ({} when absent, tampered with or expired)."""
    cached = getattr(request.state, "session_data", None)
    if cached is not None:
        return cached
    data: dict[str, Any] = {}
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        try:
            loaded = _session_serializer().loads(cookie, max_age=SESSION_MAX_AGE_S)
            data = loaded if isinstance(loaded, dict) else {}
        except BadSignature:
            data = {}
    request.state.session_data = data
    return data


def cookies_need_https(settings: Settings) -> bool:
    """Whether the session cookie is Secure even on a plain-http request: in prod, unless
    TUNEBOARD_ALLOW_HTTP says that http is meant."""
    return settings.environment == Environment.prod and not settings.allow_http


def login_needs_https(request: Request) -> bool:
    """A plain-http request to a panel whose session cookie is Secure: the browser drops the cookie,
    so logging in bounces back to the login page."""
    return request.url.scheme != "https" and cookies_need_https(get_settings())


def warn_if_login_needs_https(settings: Settings) -> None:
    """At start-up: say that a browser can only log in over HTTPS (the panel cannot tell whether a
    TLS proxy is in front of it until a request comes)."""
    if cookies_need_https(settings):
        log.warning(
            "TUNEBOARD_ENVIRONMENT=prod: session cookies are Secure, so browsers can log in only over HTTPS."
            " Serve the panel behind TLS (deploy/Caddyfile) or set TUNEBOARD_ALLOW_HTTP=true for plain http."
        )


def write_session(request: Request, response: Response, data: dict[str, Any]) -> None:
    request.state.session_data = data
    response.set_cookie(
        SESSION_COOKIE,
        _session_serializer().dumps(data),
        max_age=SESSION_MAX_AGE_S,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https" or cookies_need_https(get_settings()),
    )


def clear_session(request: Request, response: Response) -> None:
    request.state.session_data = {}
    response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="lax")


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_matches(expected: str | None, given: str | None) -> bool:
    return bool(expected and given) and hmac.compare_digest(expected.encode(), given.encode())


def safe_next_url(target: str | None) -> str:
    """Where to go after logging in: only a path on this site (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


# --------------------------------------------------------- path confinement


class PathNotAllowed(Forbidden):
    """A user-supplied path that resolves outside every allowed root (or, asked to exist, does not)."""


def confine(path: str | Path, roots: Iterable[str | Path], *, must_exist: bool = False) -> Path:
    """`path` with symlinks and `..` resolved, if it lies under one of `roots`; else PathNotAllowed.

    A relative path is taken relative to the first root. With `must_exist`, a missing path is
    refused too (Path.resolve(strict=True))."""
    root_list = [Path(root).expanduser().resolve() for root in roots]
    if not root_list:
        raise PathNotAllowed("no folders are allowed here (configure TUNEBOARD_MODEL_ROOTS)")
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = root_list[0] / candidate
    try:
        resolved = candidate.resolve(strict=must_exist)
    except FileNotFoundError:
        raise PathNotAllowed(f"{path} does not exist") from None
    except (OSError, ValueError, RuntimeError) as error:  # null bytes, symlink loops
        raise PathNotAllowed(f"{path!r} is not a usable path: {error}") from None
    if not any(resolved.is_relative_to(root) for root in root_list):
        allowed = ", ".join(str(root) for root in root_list)
        raise PathNotAllowed(f"{path} is outside the allowed folders ({allowed})")
    return resolved


_UNSAFE_FILENAME_CHARS = re.compile(r"[\x00-\x1f\x7f<>:\"|?*]")


def safe_filename(name: str, *, max_length: int = 200) -> str:
    """A user's file name fit for display and Content-Disposition. Only for display: files on
    disk are always named by id."""
    base = re.split(r"[\\/]", unicodedata.normalize("NFC", name or ""))[-1]
    base = _UNSAFE_FILENAME_CHARS.sub("", base)
    base = " ".join(base.split()).lstrip(".")
    return base[:max_length] or "file"


def attachment_disposition(name: str, default: str) -> str:
    """Content-Disposition for a download under a user's file name: made safe for display, with an
    ASCII fallback beside its UTF-8 form (RFC 6266), since header values are Latin-1."""
    shown = safe_filename(name or default)
    fallback = re.sub(r"[^A-Za-z0-9_. -]+", "_", shown).strip(". ") or default
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(shown)}"


# ----------------------------------------- LLaMA-Factory arguments the panel owns

# Every path-valued argument of LLaMA-Factory 0.9.5 (hparams/*_args.py) and of the transformers
# Seq2SeqTrainingArguments it extends. The panel decides where things are read and written.
PATH_KEYS = frozenset({
    # model_args.py
    "model_name_or_path", "adapter_name_or_path", "adapter_folder", "cache_dir",
    "new_special_tokens_config", "offload_folder", "export_dir", "export_quantization_dataset",
    "kt_weight_path", "kt_expert_checkpoint_path",
    # data_args.py
    "dataset_dir", "media_dir", "tokenized_path",
    # evaluation_args.py
    "task_dir", "save_dir",
    # finetuning_args.py
    "ref_model", "ref_model_adapters", "reward_model", "reward_model_adapters",
    "hyper_parallel_args", "swanlab_logdir",
    # training_args.py (LLaMA-Factory's profiler) and transformers' TrainingArguments
    "profiler_output_dir", "output_dir", "logging_dir", "resume_from_checkpoint",
    "deepspeed", "fsdp_config", "accelerator_config", "generation_config",
})

# Credentials and uploads to remote hubs or trackers: never from a config a user submits.
REMOTE_KEYS = frozenset({
    "hf_hub_token", "ms_hub_token", "om_hub_token", "hub_token", "push_to_hub", "hub_model_id",
    "hub_strategy", "hub_private_repo", "hub_always_push", "hub_revision", "export_hub_model_id",
    "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
    "swanlab_api_key", "swanlab_lark_webhook_url", "swanlab_lark_secret",
})

# Everything a user's config may not set: paths, remote credentials, code execution from model
# repositories, process plumbing, and the resume behaviour the panel manages.
PANEL_OWNED_KEYS = PATH_KEYS | REMOTE_KEYS | frozenset({
    "trust_remote_code", "overwrite_output_dir", "ray_init_kwargs", "master_addr", "master_port",
    "vllm_config", "sglang_config",
})
