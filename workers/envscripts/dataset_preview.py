#!/usr/bin/env python3
"""Render dataset rows exactly as LLaMA-Factory's SFT preprocessing feeds them to a model.

Runs in the TRAINING env (standalone: imports nothing from app/). Reads one JSON request on stdin,
prints one JSON answer on stdout:

  {"mode": "templates"}
      -> {"templates": ["alpaca", ...]}
  {"mode": "encode", "model_path": ..., "template": ..., "cutoff_len": 1024,
   "dataset_attr": {"formatting", "columns", "tags"},      # a dataset_info.json entry
   "rows": [{...}, ...], "render": 0}                       # render: index of a row to render, or null
      -> {"lengths": [[prompt_tokens, response_tokens] | null, ...],   # null: LLaMA-Factory drops the row
          "rendered": {"row", "segments": [{"trained": bool, "text": str}], "tokens", "full_tokens"} | null}

Lengths are counted without truncation (cutoff_len 10**9): "prompt" tokens are the masked ones
(label IGNORE_INDEX), "response" tokens the trained ones. The rendered row uses the real cutoff_len.
Uses LLaMA-Factory's own DatasetAttr, dataset converter, template (get_template_and_fix_tokenizer)
and SupervisedDatasetProcessor._encode_data_example — never a re-implementation.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _templates() -> dict:
    from llamafactory.data.template import TEMPLATES

    return {"templates": sorted(TEMPLATES)}


def _segments(tokenizer, input_ids: list[int], labels: list[int], ignore_index: int) -> list[dict]:
    """Consecutive runs of masked / trained tokens, decoded with the special tokens kept."""
    segments: list[dict] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] == ignore_index) != (labels[start] == ignore_index):
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            segments.append({"trained": labels[start] != ignore_index, "text": text})
            start = i
    return segments


def _encode(request: dict) -> dict:
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.parser import DatasetAttr
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.extras.constants import IGNORE_INDEX
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    entry = request["dataset_attr"]
    attr = DatasetAttr("file", dataset_name="preview")
    attr.join(entry)
    data_args = DataArguments(template=request["template"], cutoff_len=int(request.get("cutoff_len") or 1024))
    tokenizer = AutoTokenizer.from_pretrained(request["model_path"], trust_remote_code=False)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    converter = get_dataset_converter(attr.formatting, attr, data_args)
    processor = SupervisedDatasetProcessor(template=template, tokenizer=tokenizer, processor=None, data_args=data_args)
    # `datasets` gives every row every column (None where absent); the converter indexes them.
    column_names = [
        getattr(attr, name) for name in ("prompt", "query", "response", "history", "messages", "system", "tools")
    ]

    def encode(row: dict, cutoff_len: int) -> tuple[list[int], list[int]] | None:
        example = dict(row)
        for column in column_names:
            if column:
                example.setdefault(column, None)
        converted = converter(example)
        prompt, response = converted["_prompt"], converted["_response"]
        if len(prompt) % 2 != 1 or len(response) != 1:  # "Dropped invalid example"
            return None
        data_args.cutoff_len = cutoff_len
        return processor._encode_data_example(
            prompt=prompt, response=response, system=converted["_system"], tools=converted["_tools"],
            images=[], videos=[], audios=[],
        )

    cutoff_len = data_args.cutoff_len
    lengths = []
    for row in request.get("rows", []):
        encoded = encode(row, 10**9)
        if encoded is None:
            lengths.append(None)
            continue
        input_ids, labels = encoded
        masked = sum(1 for label in labels if label == IGNORE_INDEX)
        lengths.append([masked, len(input_ids) - masked])

    rendered = None
    index = request.get("render")
    if index is not None and 0 <= index < len(request.get("rows", [])):
        row = request["rows"][index]
        full = encode(row, 10**9)
        encoded = encode(row, cutoff_len)
        if encoded is not None:
            input_ids, labels = encoded
            rendered = {
                "row": index,
                "segments": _segments(tokenizer, input_ids, labels, IGNORE_INDEX),
                "tokens": len(input_ids),
                "full_tokens": len(full[0]),
            }
    return {"lengths": lengths, "rendered": rendered}


def main() -> None:
    request = json.load(sys.stdin)
    mode = request.get("mode")
    try:
        if mode == "templates":
            answer = _templates()
        elif mode == "encode":
            answer = _encode(request)
        else:
            answer = {"error": f"unknown mode {mode!r}"}
    except Exception as exc:  # the app shows the message; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
