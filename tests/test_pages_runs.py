"""The runs pages as the browser gets them, through the real app (TestClient, real SQLite), with
the worker channel driven as a worker drives it: the runs table polls only the rows that changed,
the dashboard keeps time and tokens across attempts, result plots have versioned URLs, the whole
log downloads with each line once, and compare labels its columns by run name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app.services import runs as service
from tests.factories import store_folder
from tests.test_runs import claim, config, finish, report, start, worker_headers  # noqa: F401  (fixtures)


def poll_url(html: str) -> str | None:
    found = re.search(r'id="run-table-poll" hx-get="([^"]+)"', html)
    return found.group(1).replace("&amp;", "&") if found else None


def text_of(html: str, element_id: str) -> str:
    return re.search(rf'id="{element_id}"[^>]*>([^<]*)<', html).group(1).strip()


def page_data(html: str) -> dict:
    return json.loads(html.split('id="run-data">')[1].split("</script>")[0])


def progress(current: int, total: int, elapsed: float, remaining: float) -> dict:
    return {"current_steps": current, "total_steps": total, "percentage": round(100 * current / total, 2),
            "epoch": current / total, "elapsed_time": elapsed, "remaining_time": remaining}


# --------------------------------------------------------------------------- the runs table
def test_the_runs_table_polls_only_the_rows_that_changed(client, session, config, worker_headers) -> None:
    first = start(client, config.id, name="first")["id"]
    second = start(client, config.id, name="second")["id"]
    page = client.get("/runs").text
    assert page.index(f'id="run-row-{second}"') < page.index(f'id="run-row-{first}"')  # newest on top
    poll = poll_url(page)
    assert poll is not None
    assert client.get(poll).status_code == 204  # nothing changed: nothing is sent

    claim(client, worker_headers, first)
    report(client, worker_headers, first, status="running", progress=progress(3, 10, 6, 14),
           metrics=[{"step": 3, "loss": 1.25}])
    changed = client.get(poll)
    assert changed.status_code == 200
    assert "<table" not in changed.text and "<html" not in changed.text  # rows, not the page
    partial = re.search(rf'<hx-partial hx-target="#run-row-{first}" hx-swap="outerHTML">(.*?)</hx-partial>',
                        changed.text, re.S).group(1)
    assert 'badge running' in partial and "3/10" in partial and "1.25" in partial
    poll = poll_url(changed.text)
    assert client.get(poll).status_code == 204  # the new cursor: the same change is not sent again

    third = start(client, config.id, name="third")["id"]
    added = client.get(poll)
    new_row = re.search(r'<hx-partial hx-target="#run-rows" hx-swap="afterbegin">(.*?)</hx-partial>',
                        added.text, re.S).group(1)
    assert f'id="run-row-{third}"' in new_row and "third" in new_row
    poll = poll_url(added.text)
    assert f"top={third}" in poll

    finish(client, worker_headers, first)
    for run_id in (second, third):
        client.post(f"/api/v1/runs/{run_id}/cancel")
    last = client.get(poll)
    assert last.status_code == 200 and 'badge succeeded' in last.text
    assert poll_url(last.text) is None  # nothing active: the table stops asking


def test_the_runs_table_reads_no_config_or_yaml(client, session, config) -> None:
    """The list shows the last logged loss (all_results.json's train_loss is wrong after a resume)."""
    run_id = start(client, config.id, name="listed")["id"]
    page = client.get("/runs").text
    row = re.search(rf'<tr id="run-row-{run_id}".*?</tr>', page, re.S).group(0)
    assert "listed" in row and "—" in row
    assert "learning_rate" not in page  # no config's parameters on the page


# --------------------------------------------------------------------------- the dashboard
def _resumed_run(client, session, config, worker_headers) -> int:
    """Attempt 1 logs steps 1–6 (2 s a step, 100 tokens a step), is cancelled; attempt 2 resumes
    from checkpoint-4 and LLaMA-Factory's clock starts again at 0."""
    run_id = start(client, config.id)["id"]
    claim(client, worker_headers, run_id)
    report(client, worker_headers, run_id, status="running", progress=progress(6, 20, 12, 28), metrics=[
        {"step": s, "loss": 3 - s / 10, "elapsed_s": 2.0 * s, "total_tokens": 100 * s, "tokens_per_s": 50.0}
        for s in range(1, 7)
    ])
    output = service.run_dir(run_id) / "output" / "checkpoint-4"
    output.mkdir(parents=True)
    (output / "trainer_state.json").write_text('{"step": 4}')
    store_folder(session, run_id, 1, output, "checkpoint-4", 4)
    client.post(f"/api/v1/runs/{run_id}/cancel")
    finish(client, worker_headers, run_id, outcome="cancelled",
           checkpoints=[{"name": "checkpoint-4", "step": 4, "complete": True}])
    assert client.post(f"/api/v1/runs/{run_id}/resume").json()["resume_from"] == "checkpoint-4"
    claim(client, worker_headers, run_id, attempt=2)
    return run_id


def test_elapsed_and_remaining_carry_across_a_resume(client, session, config, worker_headers) -> None:
    run_id = _resumed_run(client, session, config, worker_headers)
    waiting = client.get(f"/runs/{run_id}").text
    # Not yet reported: the time up to checkpoint-4 (step 4 at 8 s), nothing left to say yet.
    assert text_of(waiting, "run-elapsed") == "8s" and text_of(waiting, "run-remaining") == "—"
    assert text_of(waiting, "run-steps") == "4/20"  # where it resumes, not where attempt 1 was cancelled

    # Steps 5–8 at 1 s a step: LLaMA-Factory says elapsed 4 s, remaining (20 − 8) × 4 / 8 = 6 s.
    report(client, worker_headers, run_id, attempt=2, status="running", progress=progress(8, 20, 4, 6), metrics=[
        {"step": s, "loss": 3 - s / 10, "elapsed_s": float(s - 4), "total_tokens": 100 * s,
         "tokens_per_s": 100 * s / (s - 4)}
        for s in range(5, 9)
    ])
    page = client.get(f"/runs/{run_id}").text
    assert text_of(page, "run-elapsed") == "12s"  # 8 s before the resume + 4 s since
    assert text_of(page, "run-remaining") == "12s"  # 12 steps left at this attempt's 1 s a step
    assert text_of(page, "run-steps") == "8/20"
    timing = json.loads(re.search(r"data-timing='([^']+)'", page).group(1))
    assert timing == {"attempt": 2, "start_step": 4, "elapsed_before_s": 8.0, "tokens_before": 400, "reported": True}
    points = {p["step"]: p for p in page_data(page)["metrics"]}
    assert [points[s]["attempt"] for s in (4, 5)] == [1, 2]
    # Tokens/s of attempt 2 counts its own tokens: 400 in 4 s at step 8, not 800.
    assert points[8]["tokens_per_s"] == pytest.approx(100.0) and points[3]["tokens_per_s"] == 50.0

    finish(client, worker_headers, run_id, attempt=2)
    done = client.get(f"/runs/{run_id}").text
    assert text_of(done, "run-elapsed") == "12s" and text_of(done, "run-remaining") == "0s"


def test_the_header_fragment_names_the_worker_and_the_artifacts_say_what_is_stored(
    client, session, config, worker_headers,
) -> None:
    run_id = start(client, config.id)["id"]
    queued = client.get(f"/runs/{run_id}/header", headers={"HX-Request": "true"}).text
    assert queued.lstrip().startswith('<div id="run-header"') and " on " not in text_of(queued, "run-worker")
    claim(client, worker_headers, run_id, worker_id="w1")
    header = client.get(f"/runs/{run_id}/header", headers={"HX-Request": "true"}).text
    assert text_of(header, "run-worker") == "CPU on w1"

    folder = service.run_dir(run_id) / "output" / "checkpoint-2"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    store_folder(session, run_id, 1, folder, "checkpoint-2", 2)
    artifacts = client.get(f"/runs/{run_id}/artifacts", headers={"HX-Request": "true"}).text
    assert artifacts.lstrip().startswith('<section id="run-artifacts"')
    assert 'id="run-checkpoints" data-latest="2"' in artifacts and "checkpoint-2" in artifacts
    data = page_data(client.get(f"/runs/{run_id}").text)
    assert data["schedule"] == {"save_steps": 4, "logging_steps": 1}  # the config's: when to look again


def test_result_plots_get_a_new_url_when_an_attempt_writes_them_again(client, session, config, worker_headers) -> None:
    run_id = _resumed_run(client, session, config, worker_headers)

    def upload(attempt: int, content: bytes) -> None:
        response = client.post(
            f"/internal/v1/runs/{run_id}/results", headers=worker_headers,
            data={"attempt": str(attempt), "name": "training_loss.png"}, files={"file": ("x", content, "image/png")},
        )
        assert response.status_code == 200, response.text

    def plot_url() -> str:
        page = client.get(f"/runs/{run_id}").text
        return re.search(rf'<img src="(/runs/{run_id}/artifacts/training_loss.png\?v=\d+)"', page).group(1)

    upload(2, b"\x89PNG the cancelled attempt's curve")
    before = plot_url()
    path = service.result_file_path(run_id, "training_loss.png")
    mtime = path.stat().st_mtime_ns
    upload(2, b"\x89PNG the whole curve")
    if path.stat().st_mtime_ns == mtime:  # a coarse file-system clock: make the new write visible
        Path(path).touch()
    after = plot_url()
    assert after != before
    served = client.get(after)
    assert served.content == b"\x89PNG the whole curve"
    assert "immutable" in served.headers["cache-control"]  # a versioned URL never changes content


def test_the_whole_log_downloads_with_each_line_once(client, session, config, worker_headers) -> None:
    run_id = start(client, config.id)["id"]
    claim(client, worker_headers, run_id)
    lines = [f"line {n}" for n in range(700)]  # more than the dashboard's 500
    report(client, worker_headers, run_id, status="running",
           logs=[{"source": "stdout", "offset": 10 * n, "line": line} for n, line in enumerate(lines)])
    # A re-sent batch (the worker retried) adds nothing.
    report(client, worker_headers, run_id, logs=[{"source": "stdout", "offset": 0, "line": "line 0"}])
    finish(client, worker_headers, run_id)
    download = client.get(f"/runs/{run_id}/log.txt")
    assert download.status_code == 200
    assert download.headers["content-disposition"] == f'attachment; filename="run-{run_id}-log.txt"'
    assert download.text.splitlines() == lines
    page = client.get(f"/runs/{run_id}").text
    assert f'href="/runs/{run_id}/log.txt"' in page and len(page_data(page)["logs"]) == 500
    assert client.get("/runs/9999/log.txt").status_code == 404


def test_the_log_download_marks_where_each_attempt_begins(client, session, config, worker_headers) -> None:
    run_id = _resumed_run(client, session, config, worker_headers)
    report(client, worker_headers, run_id, attempt=2, status="running",
           logs=[{"source": "stdout", "offset": 0, "line": "resumed"}])
    assert client.get(f"/runs/{run_id}/log.txt").text == "----- attempt 2 -----\nresumed\n"


# --------------------------------------------------------------------------- compare
def test_compare_shows_final_metrics_by_run_name(client, session, config, worker_headers) -> None:
    ids = []
    for name, losses in (("alpha", [2.0, 1.5]), ("beta", [2.2, 1.1]), ("beta", [2.1, 1.9])):
        run_id = start(client, config.id, name=name)["id"]
        claim(client, worker_headers, run_id)
        report(client, worker_headers, run_id, status="running", progress=progress(2, 2, 10, 0), metrics=[
            {"step": 1, "loss": losses[0], "elapsed_s": 5.0, "tokens_per_s": 300.0, "total_tokens": 1500},
            {"step": 2, "loss": losses[1], "eval_loss": losses[1] + 0.25, "elapsed_s": 10.0, "tokens_per_s": 500.0,
             "total_tokens": 5000},
        ])
        finish(client, worker_headers, run_id, results={"eval_accuracy": 0.8125, "train_loss": 9.9})
        ids.append(run_id)
    page = client.get("/runs/compare?" + "&".join(f"ids={i}" for i in ids)).text
    table = re.search(r'<table id="compare-summary">.*?</table>', page, re.S).group(0)
    headers = re.findall(r'<th scope="col"><a href="/runs/\d+">([^<]+)</a></th>', table)
    assert headers == ["alpha", f"beta (#{ids[1]})", f"beta (#{ids[2]})"]  # names; ids only to tell apart

    def row(label: str) -> list[str]:
        cells = re.search(rf'<th scope="row"[^>]*>{re.escape(label)}</th>(.*?)</tr>', table, re.S).group(1)
        return re.findall(r"<td[^>]*>(.*?)</td>", cells)

    assert row("Train loss (last)") == ["1.5", "1.1", "1.9"]  # the logged curve's end, not results' 9.9
    assert row("Eval loss (last)") == ["1.75", "1.35", "2.15"]
    assert row("Training time") == ["10s", "10s", "10s"]
    assert row("Tokens/s (mean)") == ["400", "400", "400"]
    assert row("eval_accuracy") == ["0.8125"] * 3
    chart = json.loads(page.split('id="compare-data">')[1].split("</script>")[0])
    assert [run["label"] for run in chart["runs"]] == headers
