"""The one bridge to the training environment (and the serving one): LLaMA-Factory and vLLM live in
Pythons of their own, because their pins conflict with the app's. Every script the panel or a
worker runs there (workers/envscripts/) goes through `run_script`: one environment for the child,
one timeout per call, and one error policy. A script answers with one JSON object, the last line
it prints that starts with "{"; what it says on stderr becomes the error when it gives none.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from app.settings import get_settings

ENVSCRIPTS_DIR = Path(__file__).resolve().parent / "envscripts"
# Offline: nothing is ever downloaded from a hub.
CHILD_ENV = {"HF_HUB_OFFLINE": "1"}


class TrainEnvError(RuntimeError):
    """The script could not give an answer; the subclass says why."""


class TrainEnvMissing(TrainEnvError):
    pass


class TrainEnvTimeout(TrainEnvError):
    pass


class TrainEnvScriptFailed(TrainEnvError):
    pass


def run_script(
    script: str, payload: Any = None, *, args: tuple[str, ...] = (), timeout_s: float, python: str | None = None,
    cwd: Path | None = None, gpus: bool = False, what: str | None = None,
) -> dict[str, Any]:
    """Run workers/envscripts/`script` in the training env (or `python`), `payload` as JSON on its
    stdin; its JSON answer. It sees no GPU unless `gpus` (these are short checks, not training);
    `what` names the work in error messages ("tokenizing", …)."""
    python = python or get_settings().train_python
    what = what or script.removesuffix(".py").replace("_", " ")
    try:
        completed = subprocess.run(
            [python, str(ENVSCRIPTS_DIR / script), *args], input=None if payload is None else json.dumps(payload),
            capture_output=True, text=True, timeout=timeout_s, check=False, cwd=cwd,
            env={**os.environ, **CHILD_ENV, **({} if gpus else {"CUDA_VISIBLE_DEVICES": ""})},
        )
    except FileNotFoundError:
        raise TrainEnvMissing(f"the environment is missing ({python})") from None
    except subprocess.TimeoutExpired:
        raise TrainEnvTimeout(f"{what} took longer than {timeout_s:.0f} s") from None
    answers = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if not answers:
        tail = (completed.stderr.strip().splitlines() or [f"exit code {completed.returncode}, no output"])[-1]
        raise TrainEnvScriptFailed(f"{what} failed: {tail}")
    try:
        return json.loads(answers[-1])
    except json.JSONDecodeError:
        raise TrainEnvScriptFailed(f"{what} answered something that is not JSON") from None
