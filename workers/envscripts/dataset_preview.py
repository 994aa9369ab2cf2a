#!/usr/bin/env python3
"""Render dataset rows exactly as LLaMA-Factory's preprocessing feeds them to a model.

Runs in the TRAINING env (standalone: imports nothing from app/). Reads one JSON request on stdin,
prints one JSON answer on stdout:

  {"mode": "templates"}
      -> {"templates": ["alpaca", ...]}
  {"mode": "encode", "model_path": ..., "template": ..., "cutoff_len": 1024,
   "kind": "sft" | "ranking" | "kto" | "pretrain",
   "dataset_attr": {"formatting", "ranking", "columns", "tags"},   # a dataset_info.json entry
   "rows": [{...}, ...], "render": 0}                                # render: index of a row to render, or null
      -> {"lengths": [lengths | null, ...],   # null: LLaMA-Factory drops the row
          "rendered": {"row", "segments": [{"trained": bool, "text": str}], "tokens", "full_tokens", ...} | null}

Lengths are counted without truncation (cutoff_len 10**9): "prompt" tokens are the masked ones
(label IGNORE_INDEX), the others the trained ones. Per kind:
  sft, kto: [prompt_tokens, response_tokens]; a KTO row renders its answer and says its "kto_tag";
  ranking:  [prompt_tokens, chosen_tokens, rejected_tokens]; the row renders "sides": chosen and
            rejected, each with its segments;
  pretrain: [0, text_tokens] (the document and its end-of-text token, all trained); the row renders
            its "chunks": the pieces of cutoff_len tokens that packing would cut it into.
The rendered row uses the real cutoff_len. Uses LLaMA-Factory's own DatasetAttr, dataset converter,
template (get_template_and_fix_tokenizer) and the stage's DatasetProcessor (Supervised, Pairwise,
Feedback, Pretrain) — never a re-implementation.
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
    from llamafactory.data.processor import (
        FeedbackDatasetProcessor,
        PairwiseDatasetProcessor,
        PretrainDatasetProcessor,
        SupervisedDatasetProcessor,
    )
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.extras.constants import IGNORE_INDEX
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    kind = request.get("kind") or "sft"
    entry = request["dataset_attr"]
    attr = DatasetAttr("file", dataset_name="preview")
    attr.join(entry)
    data_args = DataArguments(template=request["template"], cutoff_len=int(request.get("cutoff_len") or 1024))
    tokenizer = AutoTokenizer.from_pretrained(request["model_path"], trust_remote_code=False)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    converter = get_dataset_converter(attr.formatting, attr, data_args)
    processor_class = {"ranking": PairwiseDatasetProcessor, "kto": FeedbackDatasetProcessor,
                       "pretrain": PretrainDatasetProcessor}.get(kind, SupervisedDatasetProcessor)
    processor = processor_class(template=template, tokenizer=tokenizer, processor=None, data_args=data_args)
    # `datasets` gives every row every column (None where absent); the converter indexes them.
    column_names = [
        getattr(attr, name)
        for name in ("prompt", "query", "response", "history", "messages", "system", "tools", "chosen", "rejected",
                     "kto_tag")
    ]

    def encode(row: dict, cutoff_len: int) -> list[tuple[list[int], list[int]]] | None:
        """The sequences the row trains (one; chosen and rejected for ranking) as (input_ids, labels)."""
        example = dict(row)
        for column in column_names:
            if column:
                example.setdefault(column, None)
        converted = converter(example)
        prompt, response = converted["_prompt"], converted["_response"]
        data_args.cutoff_len = cutoff_len
        if kind == "pretrain":  # the processor's own path without packing: the document, truncated
            result = processor.preprocess_dataset({"_prompt": [prompt]})
            return [(result["input_ids"][0], result["input_ids"][0])]
        wanted = 1 if kind == "sft" else 2
        if len(prompt) % 2 != 1 or len(response) < wanted or (kind == "sft" and len(response) != 1):
            return None  # "Dropped invalid example"
        common = {"system": converted["_system"], "tools": converted["_tools"], "images": [], "videos": [],
                  "audios": []}
        if kind == "ranking":
            chosen_ids, chosen_labels, rejected_ids, rejected_labels = processor._encode_data_example(
                prompt=prompt, response=response, **common)
            return [(chosen_ids, chosen_labels), (rejected_ids, rejected_labels)]
        if kind == "kto":
            input_ids, labels, _, _, _ = processor._encode_data_example(
                prompt=prompt, response=response, kl_response=response, **common)
            return [(input_ids, labels)]
        return [processor._encode_data_example(prompt=prompt, response=response, **common)]

    def trained(labels: list[int]) -> int:
        return sum(1 for label in labels if label != IGNORE_INDEX)

    cutoff_len = data_args.cutoff_len
    lengths = []
    for row in request.get("rows", []):
        encoded = encode(row, 10**9)
        if encoded is None:
            lengths.append(None)
        elif kind == "pretrain":
            lengths.append([0, len(encoded[0][0])])
        elif kind == "ranking":
            (chosen_ids, chosen_labels), (_, rejected_labels) = encoded
            lengths.append([len(chosen_ids) - trained(chosen_labels), trained(chosen_labels),
                            trained(rejected_labels)])
        else:
            input_ids, labels = encoded[0]
            lengths.append([len(input_ids) - trained(labels), trained(labels)])

    rendered = None
    index = request.get("render")
    if index is not None and 0 <= index < len(request.get("rows", [])):
        row = request["rows"][index]
        full = encode(row, 10**9)
        encoded = encode(row, cutoff_len)
        if encoded is not None:
            sides = [
                {"segments": _segments(tokenizer, input_ids, labels, IGNORE_INDEX), "tokens": len(input_ids),
                 "full_tokens": len(whole[0])}
                for (input_ids, labels), whole in zip(encoded, full)
            ]
            rendered = {"row": index, **sides[0]}
            if kind == "ranking":
                rendered["sides"] = [{"label": "chosen", **sides[0]}, {"label": "rejected", **sides[1]}]
            elif kind == "kto":
                rendered["kto_tag"] = row.get(attr.kto_tag)
            elif kind == "pretrain":
                ids = full[0][0]
                rendered["chunks"] = [
                    {"text": tokenizer.decode(ids[start:start + cutoff_len], skip_special_tokens=False),
                     "tokens": len(ids[start:start + cutoff_len])}
                    for start in range(0, len(ids), cutoff_len)
                ]
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
