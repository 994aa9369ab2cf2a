"""Configs: pages (htmx fragments from the same routes) and the JSON API under /api/v1."""

from fastapi import APIRouter

router = APIRouter(tags=["configs-pages"], include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["configs"])
