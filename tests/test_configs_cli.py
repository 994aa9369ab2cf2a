"""`tuneboard config …` against a live panel (uvicorn subprocess): import, list, export."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import cli
from tests.live import live_panel  # noqa: F401  (the fixture)

FIXTURE = Path(__file__).parent / "fixtures" / "llamafactory" / "llama3_lora_sft.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("live_panel", [{"worker": False}], indirect=True)
def test_cli_imports_lists_and_exports(live_panel, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setenv("TUNEBOARD_URL", live_panel.url)
    monkeypatch.setenv("TUNEBOARD_TOKEN", live_panel.token)
    runner = CliRunner()
    imported = runner.invoke(cli, ["config", "import", str(FIXTURE)])
    assert imported.exit_code == 0, imported.output
    assert "imported config llama3_lora_sft (id 1)" in imported.output and "output_dir" in imported.output
    listed = runner.invoke(cli, ["config", "list"])
    assert listed.exit_code == 0 and "llama3_lora_sft" in listed.output
    exported = runner.invoke(cli, ["config", "export", "1"])
    assert exported.exit_code == 0
    assert exported.output == live_panel.api.get("/api/v1/configs/1/yaml").text
    assert exported.output.startswith("### model\nmodel_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct\n")
    missing = runner.invoke(cli, ["config", "export", "99"])
    assert missing.exit_code == 1 and "config 99 not found" in missing.output
