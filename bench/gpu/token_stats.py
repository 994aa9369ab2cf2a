#!/usr/bin/env python3
"""Real (non-padding) token counts of a dataset as LLaMA-Factory tokenizes it for SFT, and the share
of real tokens in its packed sequences (run with the TRAINING env's python).

    python bench/gpu/token_stats.py MODEL_DIR DATASET_DIR DATASET_NAME CUTOFF_LEN

Why: with `packing: true` LLaMA-Factory pads each packed sequence to cutoff_len + 1 with attention
mask 1 (processor/supervised.py), so transformers' `include_num_input_tokens_seen: non_padding`
counts those pads too. Real tokens of a packed run = its count × `packed_real_share`; unpacked
batches pad with mask 0, so their count is exact.
Prints one JSON line: {"rows", "tokens", "mean", "max", "packs", "packed_real_share"}.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile


def main(model_dir: str, dataset_dir: str, dataset: str, cutoff_len: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.data.processor.processor_utils import greedy_knapsack
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    with tempfile.TemporaryDirectory() as output_dir:
        model_args, data_args, training_args, *_ = get_train_args({
            "model_name_or_path": model_dir, "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "template": "qwen", "dataset": dataset, "dataset_dir": dataset_dir, "cutoff_len": cutoff_len,
            "output_dir": output_dir, "overwrite_cache": True, "preprocessing_num_workers": 8,
            "report_to": "none",
        })
        tokenizer_module = load_tokenizer(model_args)
        template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
        module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    lengths = [len(ids) for ids in module["train_dataset"]["input_ids"]]
    fitting = [length for length in lengths if length <= cutoff_len]  # the packer drops longer ones
    packs = len(greedy_knapsack(list(fitting), cutoff_len))
    print(json.dumps({
        "rows": len(lengths), "tokens": sum(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths),
        "packs": packs, "packed_real_share": sum(fitting) / (packs * (cutoff_len + 1)),
    }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
