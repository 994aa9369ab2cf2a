"""Following trainer_log.jsonl, running_log.txt and stdout by byte offset."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from workers.log_tail import FileTail, RunTails, metric_point, parse_duration


def _record(step: int, **extra: object) -> dict:
    return {"current_steps": step, "total_steps": 10, "loss": 2.0 - step / 10, "lr": 1e-3,
            "epoch": step / 5, "percentage": step * 10.0, "elapsed_time": f"0:00:0{step}",
            "remaining_time": "0:00:09", **extra}


def _line(step: int, **extra: object) -> bytes:
    return (json.dumps(_record(step, **extra)) + "\n").encode()


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as handle:
        handle.write(data)


def test_a_partial_last_line_is_held_back_until_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_bytes(b"first\nsec")
    tail = FileTail(path)
    assert [(line.offset, line.line) for line in tail.read()] == [(0, "first")]
    assert tail.read() == []
    _append(path, b"ond\nthird")
    assert [(line.offset, line.line) for line in tail.read()] == [(6, "second")]
    assert [(line.offset, line.line) for line in tail.read(final=True)] == [(13, "third")]


def test_a_json_line_split_across_two_reads_is_parsed_once_whole(tmp_path: Path) -> None:
    output = tmp_path / "output"
    output.mkdir()
    trainer_log = output / "trainer_log.jsonl"
    line = _line(1)
    trainer_log.write_bytes(line[:17])
    tails = RunTails(output, tmp_path / "stdout.log")
    assert not tails.read()
    _append(trainer_log, line[17:])
    batch = tails.read()
    assert [point["step"] for point in batch.metrics] == [1]
    assert batch.metrics[0]["loss"] == 1.9 and batch.metrics[0]["learning_rate"] == 1e-3
    assert batch.progress["current_steps"] == 1 and batch.progress["elapsed_time"] == 1.0


def test_a_truncated_or_recreated_file_is_read_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "trainer_log.jsonl"
    path.write_bytes(b"aaaa\nbbbb\n")
    tail = FileTail(path)
    assert len(tail.read()) == 2
    path.unlink()  # overwrite_output_dir: true deletes it at start
    assert tail.read() == []
    path.write_bytes(b"cccc\n")  # a new inode, shorter than what was read
    assert [(line.offset, line.line) for line in tail.read()] == [(0, "cccc")]
    with path.open("r+b") as handle:  # truncated in place (same inode)
        handle.truncate(0)
    _append(path, b"dd\n")
    assert [(line.offset, line.line) for line in tail.read()] == [(0, "dd")]


def test_a_replacement_longer_than_the_old_file_is_noticed_by_its_inode(tmp_path: Path) -> None:
    path = tmp_path / "trainer_log.jsonl"
    path.write_bytes(b"old\n")
    tail = FileTail(path)
    tail.read()
    replacement = tmp_path / "new"
    replacement.write_bytes(b"new one\nnew two\n")
    os.replace(replacement, path)
    assert [line.line for line in tail.read()] == ["new one", "new two"]


def test_steps_logged_again_after_a_resume_are_all_reported_in_order(tmp_path: Path) -> None:
    output = tmp_path / "output"
    output.mkdir()
    trainer_log = output / "trainer_log.jsonl"
    trainer_log.write_bytes(_line(1) + _line(2) + _line(3))
    first = RunTails(output, tmp_path / "stdout.log")
    assert [point["step"] for point in first.read().metrics] == [1, 2, 3]
    # The resumed attempt (from checkpoint-2) appends steps 3.. again; it starts at the end of
    # what the first attempt reported.
    resumed = RunTails(output, tmp_path / "stdout.log", resume=True)
    _append(trainer_log, _line(3, loss=0.5) + _line(4))
    points = resumed.read().metrics
    assert [(point["step"], point["loss"]) for point in points] == [(3, 0.5), (4, 1.6)]


def test_eval_lines_and_the_summary_line(tmp_path: Path) -> None:
    eval_line = {"current_steps": 5, "total_steps": 10, "eval_loss": 1.25, "epoch": 1.0,
                 "percentage": 50.0, "elapsed_time": "0:00:05", "remaining_time": "0:00:05"}
    assert metric_point(eval_line) == {"step": 5, "epoch": 1.0, "eval_loss": 1.25, "elapsed_s": 5.0}
    summary = {"current_steps": 10, "total_steps": 10, "epoch": 2.0, "percentage": 100.0,
               "elapsed_time": "0:00:10", "remaining_time": "0:00:00"}
    assert metric_point(summary) is None
    with_tokens = metric_point(_record(2, throughput=123.4, total_tokens=2048))
    assert with_tokens["tokens_per_s"] == 123.4 and with_tokens["total_tokens"] == 2048


def test_a_garbage_line_is_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    output = tmp_path / "output"
    output.mkdir()
    (output / "trainer_log.jsonl").write_bytes(_line(1) + b"{not json\n" + b"[1, 2]\n" + _line(2))
    with caplog.at_level(logging.WARNING, logger="workers.log_tail"):
        batch = RunTails(output, tmp_path / "stdout.log").read()
    assert [point["step"] for point in batch.metrics] == [1, 2]
    assert sum("ignoring trainer_log.jsonl line" in message for message in caplog.messages) == 2


def test_log_lines_carry_their_source_and_offset_and_tqdm_redraws_collapse(tmp_path: Path) -> None:
    output = tmp_path / "output"
    output.mkdir()
    # LLaMA-Factory's copy of its logger lines, which stderr (in the stdout log) carries too.
    (output / "running_log.txt").write_bytes("[INFO] loading\n".encode())
    stdout_log = tmp_path / "stdout.log"
    stdout_log.write_bytes(b"start\n 10%|#  |\r 50%|#####  |\r100%|##########|\nend")
    logs = RunTails(output, stdout_log).read(final=True).logs
    assert logs == [  # each line once
        {"source": "stdout", "offset": 0, "line": "start"},
        {"source": "stdout", "offset": 6, "line": "100%|##########|"},
        {"source": "stdout", "offset": 47, "line": "end"},
    ]


def test_durations() -> None:
    assert parse_duration("0:01:05") == 65
    assert parse_duration("1 day, 2:03:04") == 93784
    assert parse_duration("soon") is None
