"""What the two SSE benchmarks share: a live panel whose worker runs a real run folder with a
stand-in trainer (a process that only sleeps, so the machine's CPU goes to the panel), while the
benchmark appends LLaMA-Factory-shaped lines to its trainer_log.jsonl. Everything between the
file and the browser is real: the worker's tailer (workers/log_tail.py) and reporter, the app's
events endpoint, the database, the notification and the SSE stream."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlmodel import Session  # noqa: E402

from app.db import get_engine  # noqa: E402
from tests.factories import run_config_factory  # noqa: E402
from tests.live import LivePanel, standalone_panel  # noqa: E402

STAND_IN_TRAINER = "import time\ntime.sleep(3600)\n"


@dataclass
class FakeRun:
    panel: LivePanel
    run_id: int
    trainer_log: Path
    cursor: int

    def append(self, step: int, total: int) -> None:
        line = {"current_steps": step, "total_steps": total, "loss": 2.0 - step / (total + 1), "lr": 1e-4,
                "epoch": step / total, "percentage": round(100 * step / total, 2), "elapsed_time": f"0:00:{step % 60:02d}",
                "remaining_time": "0:00:10"}
        with self.trainer_log.open("a") as log:
            log.write(json.dumps(line) + "\n")


@contextmanager
def fake_run(prefix: str) -> Iterator[FakeRun]:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    trainer = root / "stand_in_trainer.py"
    trainer.write_text(f"#!{sys.executable}\n{STAND_IN_TRAINER}")
    trainer.chmod(0o755)
    with standalone_panel(root, env={"TUNEBOARD_LLAMAFACTORY_CLI": str(trainer)}) as panel:
        with Session(get_engine()) as session:
            config_id = run_config_factory(session, "/models/stand-in").id
        run_id = panel.api.post("/api/v1/runs", json={"config_id": config_id}).raise_for_status().json()["id"]
        while panel.api.get(f"/api/v1/runs/{run_id}").json()["status"] != "running":
            time.sleep(0.05)
        output = panel.data_dir / "runs" / str(run_id) / "output"
        page = panel.api.get(f"/runs/{run_id}").text
        cursor = json.loads(page.split('id="run-data">')[1].split("</script>")[0])["cursor"]
        try:
            yield FakeRun(panel, run_id, output / "trainer_log.jsonl", cursor)
        finally:
            panel.api.post(f"/api/v1/runs/{run_id}/cancel")
