"""One export job on this worker: claim it, fetch the adapter, merge it into the base model with
`llamafactory-cli export` (safetensors shards of export_size GB, the tokenizer, the Ollama
Modelfile), upload the merged folder to the artifact store as the run's artifact "export-N", and
report how it ended. A failed export (a full disk included) leaves no partial folder behind."""

from __future__ import annotations

import shutil
from typing import Any

import yaml

from app.settings import Settings, get_settings
from app.wire import EvalClaim, ExportFinish, ExportSpec, ExportTask
from workers import artifacts
from workers.jobs import JobFailed, WorkerJob, claim_and_run
from workers.reporter import Reporter


def export(task: ExportTask, *, worker_id: str, instance_id: str) -> str:
    claim = EvalClaim(dispatch_id=task.dispatch_id, worker_id=worker_id, instance_id=instance_id)
    return claim_and_run(f"/exports/{task.export_id}", claim, lambda spec, reporter: ExportJob(
        ExportSpec.model_validate(spec), worker_id, get_settings(), reporter))


class ExportJob(WorkerJob):
    finish_model = ExportFinish

    def __init__(self, spec: ExportSpec, worker_id: str, settings: Settings, reporter: Reporter) -> None:
        super().__init__(f"/exports/{spec.export_id}", worker_id, settings, reporter,
                         settings.path("exports", str(spec.export_id)), spec.heartbeat_interval_s)
        self.spec = spec
        self.merged = self.folder / "merged"

    def work(self) -> dict[str, Any]:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.running.set()
        adapter = artifacts.fetch_manifest(self.reporter, self.spec.adapter, self.settings.path("cache"))
        config = {
            "model_name_or_path": self.spec.base_model_path, "adapter_name_or_path": str(adapter),
            "template": self.spec.template, "finetuning_type": "lora", "export_dir": str(self.merged),
            "export_size": self.spec.export_size, "export_device": "cpu", "export_legacy_format": False,
        }
        (self.folder / "export.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.run_process([self.settings.llamafactory_cli, "export", str(self.folder / "export.yaml")],
                         self.environment([]), "llamafactory-cli export")
        if not any(self.merged.glob("*.safetensors")):
            raise JobFailed(f"llamafactory-cli export wrote no safetensors into {self.merged}")
        artifacts.upload_folder(self.reporter, self.spec.run_id, self.spec.attempt, self.worker_id, self.merged,
                                self.spec.artifact_name, None)
        return {"uploaded": True}

    def cleanup(self) -> None:
        # The merged folder is in the store now, or it failed: nothing stays on this disk.
        shutil.rmtree(self.folder, ignore_errors=True)
