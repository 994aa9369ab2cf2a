"""Streaming validation of LLaMA-Factory datasets: SFT (alpaca / sharegpt), preference pairs
(ranking), KTO and pre-training text, in parts:

* `framing`: raw bytes to rows (BOM, hash, UTF-8, a JSON array, JSON Lines or text lines);
* `validators`: the kind and format detected from row 1, and one validator per pair of them;
* `stats`: issues, duplicates, length statistics, preview and sample, in bounded memory;
* `formats`: what LLaMA-Factory reads (columns, tags) and the `dataset_info.json` entry;
* `ingest`: `DatasetIngest`, which puts them together, and its `IngestReport`.

Pure stdlib: no FastAPI, no database. The whole file is never held in memory. Structural problems
(the file cannot be loaded by `datasets`/LLaMA-Factory at all) raise DatasetFormatError (or
DatasetTooLarge for the size limits). Row-level problems are collected in the report: fatal ones
(LLaMA-Factory's loader or converter would crash) set `report.ok = False`; warnings (rows it
silently drops or trains badly on, duplicates, over-long rows) keep `ok` True.
"""

from app.services.dataset_ingest.formats import (
    DEFAULT_TAGS,
    KINDS,
    OPENAI_TAGS,
    TAG_NAMES,
    DatasetFormatError,
    DatasetTooLarge,
    column_roles,
    dataset_info_entry,
)
from app.services.dataset_ingest.ingest import DatasetIngest, IngestReport, refuse_unusable

__all__ = [
    "DEFAULT_TAGS",
    "KINDS",
    "OPENAI_TAGS",
    "TAG_NAMES",
    "DatasetFormatError",
    "DatasetIngest",
    "DatasetTooLarge",
    "IngestReport",
    "column_roles",
    "dataset_info_entry",
    "refuse_unusable",
]
