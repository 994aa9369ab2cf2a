"""What LLaMA-Factory reads: dataset kinds, formats, their columns and tags, the refusals, and the
`dataset_info.json` entry of a file.

Semantics mirror LLaMA-Factory 0.9.x `data/parser.py` (`DatasetAttr.join`: when `columns` / `tags`
are present in `dataset_info.json`, every column / tag *not* listed becomes None) and
`data/converter.py` (`AlpacaDatasetConverter` / `SharegptDatasetConverter`), as documented in its
`data/README.md`: ranking rows hold `chosen`/`rejected`, KTO rows a boolean `kto_tag`, pre-training
rows a `text` column read as the alpaca `prompt` (or a `.txt` file, one document per line, which
`datasets`' text loader reads into that same `text` column).
"""

from __future__ import annotations

from typing import Any, Mapping

KINDS = ("sft", "ranking", "kto", "pretrain")
FORMATTINGS = ("alpaca", "sharegpt")

# LLaMA-Factory's DatasetAttr defaults (parser.py). A column set to None is not read.
ALPACA_DEFAULT_COLUMNS: dict[str, str | None] = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": None,
    "system": None,
    "tools": None,
}
SHAREGPT_DEFAULT_COLUMNS: dict[str, str | None] = {
    "messages": "conversations",
    "system": None,
    "tools": None,
}
# The roles each kind reads besides (or instead of) the SFT ones; their defaults are None in
# LLaMA-Factory, so an entry of these kinds always lists its columns.
_KIND_COLUMNS: dict[str, dict[str, str | None]] = {
    "sft": {},
    "ranking": {"response": None, "chosen": "chosen", "rejected": "rejected"},
    "kto": {"kto_tag": "kto_tag"},
    "pretrain": {"prompt": "text", "query": None, "response": None, "history": None, "system": None, "tools": None},
}
# Auto-detected names for the optional columns (default None in LLaMA-Factory, so they must be
# declared in `columns` when present in the file).
OPTIONAL_AUTO_NAMES = {"history": "history", "system": "system", "tools": "tools"}

TAG_NAMES = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
DEFAULT_TAGS: dict[str, str] = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
OPENAI_TAGS: dict[str, str] = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}

# Kinds of row issues. Fatal: LLaMA-Factory / datasets would fail to load or convert the file.
FATAL_KINDS = frozenset(
    {"bad_type", "mixed_types", "bad_history", "bad_messages", "bad_message", "missing_messages", "bad_tools",
     "bad_unicode", "bad_answer", "bad_kto_tag"}
)


def default_columns(kind: str, formatting: str) -> dict[str, str | None]:
    """LLaMA-Factory's column mapping for a kind in a format, as `dataset_info.json` would list it."""
    columns = dict(ALPACA_DEFAULT_COLUMNS if formatting == "alpaca" else SHAREGPT_DEFAULT_COLUMNS)
    for role, key in _KIND_COLUMNS[kind].items():
        if role in columns or role in ("chosen", "rejected", "kto_tag"):
            columns[role] = key
    return columns


def column_roles(kind: str, formatting: str) -> set[str]:
    """The column roles a dataset of this kind and format may map."""
    return set(default_columns(kind, formatting))


class DatasetFormatError(ValueError):
    """The file as a whole cannot be used (not JSON, truncated, wrong top level, bad encoding...)."""

    def __init__(self, message: str, byte_offset: int | None = None, row: int | None = None):
        super().__init__(message)
        self.message = message
        self.byte_offset = byte_offset
        self.row = row

    def to_dict(self) -> dict[str, Any]:
        return {"error": type(self).__name__, "message": self.message, "byte_offset": self.byte_offset, "row": self.row}


class DatasetTooLarge(DatasetFormatError):
    """`max_total_bytes` or `max_row_bytes` exceeded (subclass of DatasetFormatError)."""

    def __init__(self, message: str, byte_offset: int | None = None, row: int | None = None, limit: int | None = None):
        super().__init__(message, byte_offset=byte_offset, row=row)
        self.limit = limit


def dataset_info_entry(src: Any, file_name: str | None = None) -> dict[str, Any]:
    """The LLaMA-Factory `dataset_info.json` entry for an ingested file.

    `src` is an IngestReport or a mapping with `formatting`, optionally `kind` (default sft),
    `columns` (full or partial LLaMA-Factory mapping; roles set to None are not read), `tags` and
    `file_name`. For SFT, `columns` is emitted only when the mapping differs from LLaMA-Factory's
    defaults; the other kinds always list theirs. Either way it lists every column to read
    (LLaMA-Factory resets unlisted columns to None when `columns` is present). `tags` is emitted,
    with all seven names, only when they differ from the defaults.
    """
    if isinstance(src, Mapping):
        kind = src.get("kind") or "sft"
        formatting = src.get("formatting", "alpaca")
        columns = dict(src.get("columns") or {})
        tags = src.get("tags")
        file_name = file_name or src.get("file_name")
    else:  # an IngestReport
        kind, formatting, columns, tags = src.kind, src.formatting, dict(src.columns), src.tags
    if not file_name:
        raise ValueError("file_name is required")
    extensions = (".json", ".jsonl", ".txt") if kind == "pretrain" else (".json", ".jsonl")
    if not str(file_name).lower().endswith(extensions):
        raise ValueError(
            f"file_name {file_name!r} must end in {' or '.join(extensions)} (LLaMA-Factory picks the loader by"
            " extension)"
        )
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if formatting not in FORMATTINGS or (kind == "pretrain" and formatting != "alpaca"):
        allowed = "alpaca" if kind == "pretrain" else "alpaca or sharegpt"
        raise ValueError(f"formatting must be {allowed}, not {formatting!r}")
    defaults = default_columns(kind, formatting)
    bad = set(columns) - set(defaults)
    if bad:
        raise ValueError(f"columns {sorted(bad)} are not valid for the {formatting} format")
    effective = dict(defaults)
    effective.update(columns)
    entry: dict[str, Any] = {"file_name": str(file_name), "formatting": formatting}
    if kind == "ranking":
        entry["ranking"] = True
    if kind != "sft" or effective != defaults:
        entry["columns"] = {role: key for role, key in effective.items() if key}
    if formatting == "sharegpt" and tags:
        full = dict(DEFAULT_TAGS)
        full.update(tags)
        if full != DEFAULT_TAGS:
            entry["tags"] = {name: full[name] for name in TAG_NAMES}
    return entry
