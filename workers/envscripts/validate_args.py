#!/usr/bin/env python3
"""LLaMA-Factory's own checks of a training config, run inside the TRAINING env.

Usage (with the training env's python):
    python workers/envscripts/validate_args.py < {"args": {...}}

Runs `llamafactory.hparams.get_train_args` on the dict (exactly what
`llamafactory-cli train` does with a YAML file), then checks that the template exists and that
every dataset name is defined in `<dataset_dir>/dataset_info.json`. Nothing is loaded: no model,
no tokenizer, no data. Prints one JSON object:
    {"ok": bool, "errors": [{"field": name | null, "message": str}], "warnings": [str]}

Standalone on purpose: imports nothing from app/.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys


def _quiet_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _field_of(message: str, names: list[str]) -> str | None:
    """The argument a LLaMA-Factory error message is about: a `backticked` or bare known name."""
    for quoted in re.findall(r"`([a-z_0-9]+)`", message):
        if quoted in names:
            return quoted
    lowered = message.lower()
    for name in sorted(names, key=len, reverse=True):
        if re.search(rf"\b{re.escape(name)}\b", lowered):
            return name
    return None


def validate(args: dict) -> dict:
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.data.template import TEMPLATES
    from llamafactory.hparams import get_train_args

    names = sorted(args)
    errors: list[dict] = []
    warnings: list[str] = []
    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model_args, data_args, training_args, finetuning_args, _gen = get_train_args(dict(args))
    except Exception as exc:  # noqa: BLE001 - every rejection is reported, never raised
        message = str(exc).strip() or type(exc).__name__
        unused = re.search(r"not used by the HfArgumentParser: \[(.*)\]", message)
        if unused:
            for key in re.findall(r"'([^']+)'", unused.group(1)):
                errors.append({"field": key, "message": f"{key} is not a LLaMA-Factory training argument"})
        else:
            errors.append({"field": _field_of(message, names), "message": message})
        return {"ok": False, "errors": errors, "warnings": warnings}
    finally:
        logging.getLogger().removeHandler(handler)

    if data_args.template and data_args.template not in TEMPLATES:
        errors.append({"field": "template", "message": f"template {data_args.template!r} is not one of LLaMA-Factory's"})
    for field in ("dataset", "eval_dataset"):
        dataset_names = getattr(data_args, field)
        if not dataset_names:
            continue
        try:
            get_dataset_list(dataset_names, data_args.dataset_dir)
        except Exception as exc:  # noqa: BLE001
            errors.append({"field": field, "message": str(exc)})
    for line in logs.getvalue().splitlines():
        if line.strip():
            warnings.append(line.strip())
    return {"ok": not errors, "errors": errors, "warnings": warnings}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    _quiet_env()
    result = validate(json.load(sys.stdin)["args"])
    # The last line of stdout: LLaMA-Factory's loggers may have written before it.
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
