"""Configs: pages (htmx fragments from the same routes) and the JSON API under /api/v1."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, RedirectResponse
from pydantic import ValidationError
from sqlmodel import Session, SQLModel
from starlette.datastructures import UploadFile

from app.auth import CurrentUser, OwnerQuery, require_owner
from app.db import SessionDep
from app.models import TrainConfig, TrainConfigPublic
from app.services import configs as service
from app.services import listings
from app.services import llamafactory_params as catalogue
from app.services.configs import ConfigError, TrainConfigInput
from app.services.datasets import list_datasets, templates_or_empty
from app.services.model_registry import list_models
from app.services.users import owned_by, owner_id_filter
from app.services.form_defaults import new_config_defaults
from app.templating import is_htmx, render

router = APIRouter(tags=["configs-pages"], include_in_schema=False)
api_router = APIRouter(prefix="/api/v1", tags=["configs"])
# Changing one needs its owner or an admin (app/services/permissions.py).
OWNED_CONFIG = require_owner(service.get_config, "config_id", "config")


class ConfigImport(SQLModel):
    yaml: str
    name: str = ""


class ConfigImported(SQLModel):
    config: TrainConfigPublic
    notices: list[str]


# ---------------------------------------------------------------------------------------- API


@api_router.get("/configs", response_model=list[TrainConfigPublic])
def list_configs(session: SessionDep, user: CurrentUser, owner: OwnerQuery = None) -> list[TrainConfig]:
    return owned_by(service.list_configs(session), owner_id_filter(session, user, owner))


@api_router.post("/configs", response_model=TrainConfigPublic, status_code=status.HTTP_201_CREATED,
                 responses={422: {"description": "refused input, with messages by field"}})
def create_config(body: TrainConfigInput, session: SessionDep) -> TrainConfig:
    return service.create_config(session, body)


@api_router.post("/configs/import", response_model=ConfigImported, status_code=status.HTTP_201_CREATED,
                 responses={422: {"description": "not a LLaMA-Factory YAML mapping, or refused keys"}})
async def import_config(request: Request, session: SessionDep):
    """A LLaMA-Factory training YAML: JSON {yaml, name}, or a multipart upload `file` (+ `name`)."""
    if request.headers.get("content-type", "").startswith("multipart/"):
        form = await request.form()
        upload = form.get("file")
        # A file's bytes: the service checks their encoding.
        text = await upload.read() if isinstance(upload, UploadFile) else str(form.get("yaml") or "")
        name = str(form.get("name") or "") or (upload.filename.rsplit(".", 1)[0]
                                               if isinstance(upload, UploadFile) and upload.filename else "")
    else:
        try:  # an empty or non-JSON body is the caller's mistake (422), not a crash
            body = ConfigImport.model_validate_json(await request.body())
        except ValidationError as error:
            raise RequestValidationError(error.errors(include_url=False, include_context=False)) from None
        text, name = body.yaml, body.name
    config, notices = service.import_config(session, text, name=name)
    return ConfigImported(config=TrainConfigPublic.model_validate(config), notices=notices)


@api_router.post("/configs/validate")
def validate_config(body: TrainConfigInput, session: SessionDep) -> dict[str, Any]:
    """The panel's checks and LLaMA-Factory's own argument parsing (in the training env)."""
    return service.llamafactory_check(session, body)


@api_router.post("/configs/estimate")
def estimate_config(body: TrainConfigInput, session: SessionDep) -> dict[str, Any]:
    return service.estimate(session, body)


@api_router.get("/configs/{config_id}", response_model=TrainConfigPublic)
def get_config(config_id: int, session: SessionDep) -> TrainConfig:
    return service.get_config(session, config_id)


@api_router.put("/configs/{config_id}", dependencies=[OWNED_CONFIG], response_model=TrainConfigPublic,
                responses={422: {"description": "refused input, with messages by field"}})
def update_config(config_id: int, body: TrainConfigInput, session: SessionDep) -> TrainConfig:
    """Edit; a frozen config (used by a run) is kept and the edit becomes a new version."""
    return service.update_config(session, service.get_config(session, config_id), body)


@api_router.delete("/configs/{config_id}", dependencies=[OWNED_CONFIG], status_code=status.HTTP_204_NO_CONTENT)
def delete_config(config_id: int, session: SessionDep) -> None:
    service.delete_config(session, service.get_config(session, config_id))


@api_router.get("/configs/{config_id}/yaml", response_class=PlainTextResponse,
                responses={200: {"content": {"application/yaml": {}}}})
def config_yaml(config_id: int, session: SessionDep, download: bool = False) -> PlainTextResponse:
    """The YAML `llamafactory-cli train` reads (output_dir: LLaMA-Factory's saves/… convention)."""
    config = service.get_config(session, config_id)
    headers = {"Content-Disposition": f'attachment; filename="config-{config.id}-v{config.version}.yaml"'} \
        if download else None
    return PlainTextResponse(service.export_yaml(session, config), media_type="application/yaml", headers=headers)


@api_router.get("/configs/{a}/diff/{b}")
def diff_configs(a: int, b: int, session: SessionDep) -> dict[str, Any]:
    left, right = service.get_config(session, a), service.get_config(session, b)
    return {"a": a, "b": b, "changes": service.diff(session, left, right)}


# -------------------------------------------------------------------------------------- pages


# Fields with their own place in the form; errors on any other key are shown under "advanced".
FORM_FIELDS = frozenset({p.name for p in catalogue.PARAMS if p.in_form}
                        | {"name", "gpus", "model_id", "dataset_ids", "advanced", "gradient_checkpointing"})


def _form_values(data: TrainConfigInput) -> dict[str, str]:
    values = {}
    for key, value in data.params.items():
        values[key] = "" if value is None else (service.format_scalar(value) if not isinstance(value, str) else value)
    return values


def _advanced_text(params: dict[str, Any]) -> str:
    """Every parameter the form has no field for, as YAML lines (so nothing is lost on edit)."""
    hidden = {k: v for k, v in params.items()
              if not (catalogue.BY_NAME.get(k) and catalogue.BY_NAME[k].in_form)
              and k not in ("disable_gradient_checkpointing", "model_name_or_path", "dataset")}
    return "".join(f"{k}: {service.format_scalar(v)}\n" for k, v in hidden.items())


def _form_context(session: Session, data: TrainConfigInput, *, config: TrainConfig | None = None,
                  errors: dict | None = None, warnings: dict | None = None, advanced: str | None = None,
                  notices: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    models = list_models(session)
    return {
        **extra,
        "section": "configs", "config": config, "data": data, "values": _form_values(data),
        "section_titles": catalogue.SECTION_TITLES,
        "advanced": _advanced_text(data.params) if advanced is None else advanced,
        "gradient_checkpointing": not data.params.get("disable_gradient_checkpointing"),
        "errors": errors or {}, "warnings": warnings or {}, "notices": notices or [],
        "models": models, "suggested": {m.id: m.suggested_template for m in models},
        "datasets": list_datasets(session), "templates": templates_or_empty(),
        "sections": catalogue.SECTIONS, "form_params": catalogue.form_params, "form_fields": FORM_FIELDS,
        "presets": catalogue.MAX_SAMPLES_PRESETS, "estimate": service.estimate(session, data),
        "stage_help": catalogue.STAGE_HELP, "ppo_note": catalogue.STAGE_NOT_OFFERED["ppo"],
        "stage_dataset_kinds": catalogue.STAGE_DATASET_KINDS,
        "unresolved": data.params.get("dataset"), "model_hint": data.params.get("model_name_or_path"),
    }


async def _submitted(request: Request) -> tuple[TrainConfigInput, str, dict[str | None, str]]:
    form = await request.form()
    fields: dict[str, Any] = {k: v for k, v in form.items() if k != "dataset_ids"}
    fields["dataset_ids"] = form.getlist("dataset_ids")
    advanced_text = str(form.get("advanced") or "")
    errors: dict[str | None, str] = {}
    advanced: dict[str, Any] = {}
    if advanced_text.strip():
        try:
            advanced = service.parse_yaml_mapping(advanced_text)
        except ConfigError as error:  # shown next to the "advanced" box
            errors["advanced"] = error.detail
    data = service.form_to_input(fields, advanced)
    return data, advanced_text, errors


def _config_page(request: Request, session: Session, config: TrainConfig, **extra: Any):
    parent = service.get_config(session, config.parent_id) if config.parent_id else None
    reference = config.params.get("model_name_or_path") if config.model_id is None else None
    context = {"section": "configs", "config": config, "yaml_text": service.export_yaml(session, config),
               "parent": parent, "configs": listings.config_choices(session),
               "estimate": service.estimate(session, service.to_input(config)),
               "run_blockers": service.run_blockers(session, config),
               "suggested_model": service.model_suggestion(session, str(reference)) if reference else None,
               "findings": None, **extra}
    return render(request, "configs/detail.html", context)


@router.get("/configs")
def configs_page(request: Request, session: SessionDep, user: CurrentUser, owner: OwnerQuery = None):
    """`?owner=me`: only the caller's configs (the page's "Mine" toggle)."""
    rows = listings.config_rows(session, owner_id_filter(session, user, owner))
    return render(request, "configs/list.html", {"section": "configs", "configs": rows, "owner": owner,
                                                 "import_errors": {}, "import_text": ""})


@router.post("/configs/import")
async def import_config_form(request: Request, session: SessionDep):
    form = await request.form()
    upload = form.get("file")
    text: str | bytes = str(form.get("yaml") or "")
    if isinstance(upload, UploadFile) and upload.filename:
        text = await upload.read()
    name = str(form.get("name") or "")
    try:
        config, notices = service.import_config(session, text, name=name)
    except ConfigError as error:
        return render(request, "configs/list.html", {
            "section": "configs", "configs": listings.config_rows(session), "import_errors": error.errors,
            "import_text": text if isinstance(text, str) else "", "import_name": name},
            status_code=200 if is_htmx(request) else 422)  # htmx swaps only 2xx answers
    page = _config_page(request, session, config, notices=notices)
    page.headers["HX-Push-Url"] = f"/configs/{config.id}"
    return page


@router.get("/configs/new")
def new_config_page(request: Request, session: SessionDep):
    # A panel with a GPU worker online starts from the recommended GPU defaults; precision and
    # process counts follow the worker the run would land on.
    defaults = new_config_defaults(session)
    data = TrainConfigInput(name="", gpus=defaults.gpus, params=defaults.params)
    models = list_models(session)
    if len(models) == 1:
        data.model_id = models[0].id
        data.params["template"] = models[0].suggested_template or data.params["template"]
    return render(request, "configs/form.html", _form_context(session, data, worker_note=defaults.worker_note))


def _without_dataset_unconfirmed(request_form: Any, data: TrainConfigInput) -> bool:
    """A config with no dataset is saved only once the user confirmed it ("Save without a
    dataset"): a run of it cannot start."""
    return not data.dataset_ids and not data.params.get("dataset") and not request_form.get("save_without_dataset")


def _unconfirmed_page(request: Request, session: Session, data: TrainConfigInput, advanced: str,
                      config: TrainConfig | None = None):
    _, found = service.check(session, data)
    return render(request, "configs/form.html",
                  _form_context(session, data, config=config, warnings=found.warnings, advanced=advanced,
                                errors=found.errors, no_dataset_warning=True), status_code=422)


@router.post("/configs/new")
async def create_config_form(request: Request, session: SessionDep):
    data, advanced, errors = await _submitted(request)
    if not errors and _without_dataset_unconfirmed(await request.form(), data):
        return _unconfirmed_page(request, session, data, advanced)
    if not errors:
        try:
            config = service.create_config(session, data)
        except ConfigError as error:
            errors = error.errors
        else:
            return RedirectResponse(f"/configs/{config.id}", status_code=status.HTTP_303_SEE_OTHER)
    _, found = service.check(session, data)
    return render(request, "configs/form.html",
                  _form_context(session, data, errors=errors, warnings=found.warnings, advanced=advanced),
                  status_code=422)


@router.post("/configs/form/estimate")
async def estimate_form(request: Request, session: SessionDep):
    """htmx: the live estimates and the panel's warnings for the form as it is now."""
    data, advanced, errors = await _submitted(request)
    _, found = service.check(session, data)
    context = _form_context(session, data, errors={**found.errors, **errors}, warnings=found.warnings,
                            advanced=advanced, fragment=True)
    return render(request, "configs/form.html", context, block="estimates")


@router.post("/configs/form/validate")
async def validate_form(request: Request, session: SessionDep):
    """htmx: LLaMA-Factory's own checks of the form as it is now (the training env, ~5 s)."""
    data, _, errors = await _submitted(request)
    findings = service.llamafactory_check(session, data)
    for field, message in errors.items():
        findings["errors"].append({"field": field, "message": message})
    return render(request, "configs/form.html", {"findings": findings, "oob_fields": sorted(FORM_FIELDS)},
                  block="findings")


@router.get("/configs/{config_id}")
def config_page(config_id: int, request: Request, session: SessionDep):
    return _config_page(request, session, service.get_config(session, config_id))


@router.post("/configs/{config_id}/validate")
def validate_config_page(config_id: int, request: Request, session: SessionDep):
    findings = service.llamafactory_check(session, service.to_input(service.get_config(session, config_id)))
    return render(request, "configs/detail.html", {"findings": findings}, block="findings")


@router.get("/configs/{config_id}/edit")
def edit_config_page(config_id: int, request: Request, session: SessionDep):
    config = service.get_config(session, config_id)
    data = service.to_input(config)
    _, found = service.check(session, data)
    return render(request, "configs/form.html", _form_context(session, data, config=config, warnings=found.warnings))


@router.post("/configs/{config_id}/edit", dependencies=[OWNED_CONFIG])
async def update_config_form(config_id: int, request: Request, session: SessionDep):
    config = service.get_config(session, config_id)
    data, advanced, errors = await _submitted(request)
    # The form cannot show unregistered dataset names or a hub model id: keep them.
    for key in ("dataset", "model_name_or_path"):
        if key in config.params and key not in data.params:
            if key == "model_name_or_path" and data.model_id is not None:
                continue
            data.params[key] = config.params[key]
    if not errors and _without_dataset_unconfirmed(await request.form(), data):
        return _unconfirmed_page(request, session, data, advanced, config)
    if not errors:
        try:
            saved = service.update_config(session, config, data)
        except ConfigError as error:
            errors = error.errors
        else:
            return RedirectResponse(f"/configs/{saved.id}", status_code=status.HTTP_303_SEE_OTHER)
    _, found = service.check(session, data)
    return render(request, "configs/form.html",
                  _form_context(session, data, config=config, errors=errors, warnings=found.warnings,
                                advanced=advanced), status_code=422)


@router.post("/configs/{config_id}/use-model", dependencies=[OWNED_CONFIG])
async def use_model_form(config_id: int, request: Request, session: SessionDep):
    """The config page's offer: resolve an imported model reference to the registered model."""
    config = service.get_config(session, config_id)
    model_id = str((await request.form()).get("model_id") or "")
    try:
        saved = service.use_model(session, config, int(model_id) if model_id.isdigit() else -1)
    except ConfigError as error:
        return _config_page(request, session, config, notices=list(error.errors.values()))
    return RedirectResponse(f"/configs/{saved.id}", status_code=status.HTTP_303_SEE_OTHER)


@router.post("/configs/{config_id}/delete", dependencies=[OWNED_CONFIG])
def delete_config_form(config_id: int, request: Request, session: SessionDep):
    config = service.get_config(session, config_id)
    try:
        service.delete_config(session, config)
    except ConfigError as error:
        return _config_page(request, session, config, delete_error=error.detail)
    return RedirectResponse("/configs", status_code=status.HTTP_303_SEE_OTHER)


@router.get("/configs/{a}/diff/{b}")
def diff_page(a: int, b: int, request: Request, session: SessionDep):
    left, right = service.get_config(session, a), service.get_config(session, b)
    return render(request, "configs/diff.html", {
        "section": "configs", "a": left, "b": right, "changes": service.diff(session, left, right),
        "configs": listings.config_choices(session)})


@router.get("/configs-diff")
def diff_picker(request: Request, a: int, b: int):
    """The diff form's GET target: on to /configs/{a}/diff/{b}."""
    return RedirectResponse(f"/configs/{a}/diff/{b}", status_code=status.HTTP_303_SEE_OTHER)
