#!/usr/bin/env python3
"""Every argument name `llamafactory-cli train` accepts, read inside the TRAINING env.

Usage (with the training env's python):
    python workers/envscripts/train_arg_names.py
Prints one JSON object as the last line of stdout:
    {"llamafactory": "0.9.5", "names": ["adam_beta1", ...]}

`get_train_args` parses a config with transformers' HfArgumentParser over LLaMA-Factory's
ModelArguments, DataArguments, TrainingArguments (which extends transformers'
Seq2SeqTrainingArguments), FinetuningArguments and GeneratingArguments, and refuses any other key
unless ALLOW_EXTRA_ARGS is set: the names are the init fields of those dataclasses, as
`HfArgumentParser.parse_dict` reads them.

Standalone on purpose: imports nothing from app/.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
from importlib import metadata


def argument_names() -> list[str]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with contextlib.redirect_stdout(io.StringIO()):  # keep LLaMA-Factory's import-time prints off our stdout
        from llamafactory.hparams import (
            DataArguments,
            FinetuningArguments,
            GeneratingArguments,
            ModelArguments,
            TrainingArguments,
        )
    classes = (ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments)
    return sorted({field.name for cls in classes for field in dataclasses.fields(cls) if field.init})


def main() -> int:
    names = argument_names()
    sys.stdout.write("\n" + json.dumps({"llamafactory": metadata.version("llamafactory"), "names": names}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
