"""One export job on this worker: claim it, fetch the adapter, merge it into the base model with
`llamafactory-cli export` (safetensors shards of export_size GB, the tokenizer, the Ollama
Modelfile), upload the merged folder to the artifact store as the run's artifact "export-N", and
report how it ended. A failed export (a full disk included) leaves no partial folder behind."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time

import yaml

from app.settings import get_settings
from app.wire import EvalClaim, EvalHeartbeat, EvalReply, ExportFinish, ExportSpec, ExportTask
from workers import artifacts
from workers.evaluation import STOP_GRACE_S, EvaluationFailed, _Cancelled
from workers.process import ManagedProcess
from workers.reporter import AppUnavailable, Reporter
from workers.training import _PRIVATE_ENV, _last_lines

log = logging.getLogger(__name__)


def export(task: ExportTask, *, worker_id: str, instance_id: str) -> str:
    settings = get_settings()
    reporter = Reporter(settings, timeout_s=10.0)
    try:
        claim = EvalClaim(dispatch_id=task.dispatch_id, worker_id=worker_id, instance_id=instance_id)
        try:
            response = reporter.post(f"/exports/{task.export_id}/claim", json=claim.model_dump(), retry_for_s=60.0)
        except AppUnavailable as error:
            log.warning("export %s: claim not delivered (%s)", task.export_id, error)
            return "not claimed: panel unavailable"
        if response.status_code in (404, 409):
            return "not claimable"
        response.raise_for_status()
        return ExportJob(ExportSpec.model_validate(response.json()), worker_id, reporter).execute()
    finally:
        reporter.close()


class ExportJob:
    def __init__(self, spec: ExportSpec, worker_id: str, reporter: Reporter) -> None:
        self.spec, self.worker_id, self.reporter = spec, worker_id, reporter
        self.settings = get_settings()
        self.folder = self.settings.path("exports", str(spec.export_id))
        self.merged = self.folder / "merged"
        self.cancel, self.gone = threading.Event(), threading.Event()

    def _beat(self, stop: threading.Event) -> None:
        beats = Reporter(self.settings, timeout_s=5.0)
        try:
            while True:
                try:
                    response = beats.post(f"/exports/{self.spec.export_id}/heartbeat",
                                          json=EvalHeartbeat(worker_id=self.worker_id, status="running").model_dump())
                    if response.status_code in (404, 409):
                        self.gone.set()
                    elif response.status_code == 200 and EvalReply.model_validate(response.json()).cancel:
                        self.cancel.set()
                except AppUnavailable as error:
                    log.warning("export %s: heartbeat not delivered: %s", self.spec.export_id, error)
                if stop.wait(self.spec.heartbeat_interval_s):
                    return
        finally:
            beats.close()

    def execute(self) -> str:
        started = time.monotonic()
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(stop,), daemon=True)
        beat.start()
        uploaded, outcome, reason = False, "succeeded", ""
        try:
            self._merge()
            artifacts.upload_folder(self.reporter, self.spec.run_id, self.spec.attempt, self.worker_id, self.merged,
                                    self.spec.artifact_name, None)
            uploaded = True
        except _Cancelled:
            outcome, reason = "cancelled", "cancelled by the user"
        except (EvaluationFailed, OSError, AppUnavailable, artifacts.ArtifactTransferError) as error:
            outcome, reason = "failed", str(error)
        finally:
            stop.set()
            beat.join(5)
            # The merged folder is in the store now, or it failed: nothing stays on this disk.
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.gone.is_set():
            return "ended by the panel"
        body = ExportFinish(worker_id=self.worker_id, outcome=outcome, reason=reason, uploaded=uploaded,
                            elapsed_s=time.monotonic() - started)
        try:
            response = self.reporter.post(f"/exports/{self.spec.export_id}/finish", json=body.model_dump(),
                                          retry_for_s=300.0)
            if response.status_code != 200:
                log.warning("export %s: finish refused (%s): %s", self.spec.export_id, response.status_code,
                            response.text)
        except AppUnavailable as error:
            log.error("export %s: finish not delivered: %s", self.spec.export_id, error)
        return outcome

    def _merge(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        adapter = artifacts.fetch_manifest(self.reporter, self.spec.adapter, self.settings.path("cache"))
        config = {
            "model_name_or_path": self.spec.base_model_path, "adapter_name_or_path": str(adapter),
            "template": self.spec.template, "finetuning_type": "lora", "export_dir": str(self.merged),
            "export_size": self.spec.export_size, "export_device": "cpu", "export_legacy_format": False,
        }
        (self.folder / "export.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        env = {key: value for key, value in os.environ.items() if not _PRIVATE_ENV.match(key)}
        env |= {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
        log_path = self.folder / "stdout.log"
        process = ManagedProcess([self.settings.llamafactory_cli, "export", str(self.folder / "export.yaml")], env,
                                 self.folder, log_path)
        while (code := process.poll()) is None:
            if self.cancel.is_set() or self.gone.is_set():
                process.stop(STOP_GRACE_S, first_signal=signal.SIGTERM)
                raise _Cancelled()
            time.sleep(0.1)
        if code != 0:
            raise EvaluationFailed(f"llamafactory-cli export exited with {code}:\n" + _last_lines(log_path, 30))
        if not any(self.merged.glob("*.safetensors")):
            raise EvaluationFailed(f"llamafactory-cli export wrote no safetensors into {self.merged}")
