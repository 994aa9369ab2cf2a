"""Path confinement, display file names and the LLaMA-Factory keys only the panel sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.security import PANEL_OWNED_KEYS, PATH_KEYS, PathNotAllowed, confine, safe_filename


@pytest.fixture
def roots(tmp_path: Path) -> list[Path]:
    models = tmp_path / "models"
    (models / "qwen" / "sub").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_text("x")
    return [models, tmp_path / "other-root"]


def test_paths_inside_a_root_are_resolved(roots: list[Path]) -> None:
    models = roots[0].resolve()
    assert confine(roots[0] / "qwen", roots) == models / "qwen"
    assert confine(roots[0] / "qwen" / "sub" / ".." / "sub", roots) == models / "qwen" / "sub"
    assert confine("qwen/sub", roots) == models / "qwen" / "sub"  # relative: under the first root
    assert confine(roots[0] / "not-yet", roots) == models / "not-yet"
    assert confine(roots[1] / "x", roots) == roots[1].resolve() / "x"


@pytest.mark.parametrize("escape", ["../secret/key", "qwen/../../secret", "/etc/passwd", "/", "~"])
def test_dot_dot_and_absolute_paths_outside_are_refused(roots: list[Path], escape: str) -> None:
    with pytest.raises(PathNotAllowed, match="outside the allowed folders"):
        confine(escape, roots)


def test_a_root_prefix_is_not_a_parent(roots: list[Path]) -> None:
    sibling = roots[0].parent / "models-evil"
    sibling.mkdir()
    with pytest.raises(PathNotAllowed):
        confine(sibling, roots)


def test_symlinks_escaping_a_root_are_refused(roots: list[Path], tmp_path: Path) -> None:
    os.symlink(tmp_path / "secret", roots[0] / "link-out")
    os.symlink(roots[0] / "qwen", roots[0] / "link-in")
    with pytest.raises(PathNotAllowed):
        confine(roots[0] / "link-out" / "key", roots)
    with pytest.raises(PathNotAllowed):
        confine(roots[0] / "link-out", roots)
    assert confine(roots[0] / "link-in" / "sub", roots) == roots[0].resolve() / "qwen" / "sub"


def test_must_exist_and_unusable_paths(roots: list[Path]) -> None:
    with pytest.raises(PathNotAllowed, match="does not exist"):
        confine(roots[0] / "missing", roots, must_exist=True)
    with pytest.raises(PathNotAllowed):
        confine("qwen\x00/../../secret", roots)
    with pytest.raises(PathNotAllowed, match="no folders"):
        confine("/tmp", [])


@pytest.mark.parametrize(("name", "shown"), [
    ("report.json", "report.json"),
    ("../../etc/passwd", "passwd"),
    ("C:\\Users\\me\\data.jsonl", "data.jsonl"),
    ("..hidden", "hidden"),
    ("bad\x00\x1b[31mname\n.csv", "bad[31mname.csv"),
    ("", "file"),
    ("a" * 300, "a" * 200),
])
def test_safe_filename(name: str, shown: str) -> None:
    assert safe_filename(name) == shown


def test_panel_owned_keys_cover_every_path_argument() -> None:
    for key in ("output_dir", "dataset_dir", "deepspeed", "adapter_name_or_path", "cache_dir",
                "tokenized_path", "media_dir", "export_dir", "logging_dir", "resume_from_checkpoint"):
        assert key in PATH_KEYS
    assert PATH_KEYS <= PANEL_OWNED_KEYS
    for key in ("hf_hub_token", "hub_token", "push_to_hub", "trust_remote_code"):
        assert key in PANEL_OWNED_KEYS
    for key in ("learning_rate", "lora_rank", "cutoff_len", "template"):
        assert key not in PANEL_OWNED_KEYS
