#!/usr/bin/env python3
"""Models and data for the GPU benchmark, built offline (run with the TRAINING env's python).

    python bench/gpu/make_assets.py OUT_DIR --shapes tiny,0.5b,7b [--rows 4000] [--device cuda]

- OUT_DIR/models/<shape>: Qwen2ForCausalLM with the layer sizes of the real checkpoints' config.json
  (Qwen2.5-0.5B-Instruct, Qwen2.5-7B-Instruct), random bf16 weights (throughput does not depend on
  the values), and the demo model's tokenizer (workers/envscripts/demo_model.py: a byte-level BPE of
  ~800 tokens with Qwen's special tokens and chat template; the real Qwen2 tokenizer is not available
  offline). The embedding and LM head keep the real vocabulary size, so their cost is the real one.
  "tiny" is the demo model itself (the CPU smoke test).
- OUT_DIR/data/alpaca_bench.json: synthetic Alpaca rows of 40–780 tokens (mean ≈ 410 with the chat
  template), from a fixed seed.

Idempotent: a model folder with its model.safetensors.index.json / model.safetensors is kept.
Prints one JSON line per asset.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL_SCRIPT = ROOT / "workers" / "envscripts" / "demo_model.py"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
SEED = 20261127

# The fields of the published config.json files that set the compute (hidden sizes, layers, heads,
# vocabulary, RoPE); everything else is Qwen2Config's default, as in those files.
SHAPES: dict[str, dict] = {
    "0.5b": {  # Qwen/Qwen2.5-0.5B-Instruct
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    },
    "7b": {  # Qwen/Qwen2.5-7B-Instruct
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    },
}


def complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors.index.json").is_file() or (path / "model.safetensors").is_file()
    )


def build_tiny(out: Path) -> None:
    subprocess.run([sys.executable, str(DEMO_MODEL_SCRIPT), str(out)], check=True, stdout=subprocess.DEVNULL)


def build_shape(name: str, out: Path, tiny: Path, device: str) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    special = json.loads((tiny / "config.json").read_text())
    config = Qwen2Config(
        **SHAPES[name], hidden_act="silu", use_sliding_window=False, attention_dropout=0.0,
        bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"],
        pad_token_id=special["pad_token_id"], initializer_range=0.02, use_cache=True,
    )
    torch.manual_seed(SEED)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp, max_shard_size="5GB")
    for file_name in TOKENIZER_FILES:
        shutil.copy(tiny / file_name, tmp / file_name)
    del model
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def parameter_counts(path: Path) -> dict[str, int]:
    """All parameters, and those that take part in matrix products (all but the input embedding
    table when it is not tied to the LM head): the N of the 6N FLOPs per token."""
    config = json.loads((path / "config.json").read_text())
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    vocab = config["vocab_size"]
    attention = h * heads * head_dim + heads * head_dim + 2 * (h * kv * head_dim + kv * head_dim) + heads * head_dim * h
    mlp = 3 * h * inter
    per_layer = attention + mlp + 2 * h
    embedding = vocab * h
    head = 0 if config.get("tie_word_embeddings") else vocab * h
    total = embedding + head + layers * per_layer + h
    return {"params": total, "matmul_params": total - (embedding if head else 0)}


def build_dataset(path: Path, tokenizer_dir: Path, rows: int) -> dict:
    from transformers import AutoTokenizer

    sys.path.insert(0, str(DEMO_MODEL_SCRIPT.parent))
    import demo_model  # the corpus the tokenizer was trained on: realistic token/word ratios

    words = " ".join(demo_model.CORPUS_EN.split("\n")).split()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    probe = " ".join(random.Random(0).choices(words, k=2000))
    tokens_per_word = len(tokenizer(probe)["input_ids"]) / 2000
    rng = random.Random(SEED)
    data, lengths = [], []
    for index in range(rows):
        target = rng.randint(10, 720)  # tokens of instruction + output (the template adds ~40)
        n_words = max(4, int(target / tokens_per_word))
        n_instruction = max(3, n_words // 5)
        instruction = " ".join(rng.choices(words, k=n_instruction))
        output = " ".join(rng.choices(words, k=n_words - n_instruction))
        data.append({"instruction": f"Task {index}: {instruction}", "input": "", "output": output})
        lengths.append(len(tokenizer(f"Task {index}: {instruction}")["input_ids"]) + len(tokenizer(output)["input_ids"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False))
    return {"path": str(path), "rows": rows, "mean_text_tokens": sum(lengths) / rows, "max_text_tokens": max(lengths)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shapes", default="tiny,0.5b,7b")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    models = args.out / "models"
    tiny = models / "tiny"
    if not complete(tiny):
        build_tiny(tiny)
    for name in args.shapes.split(","):
        path = models / name
        if name != "tiny" and not complete(path):
            build_shape(name, path, tiny, args.device)
        print(json.dumps({"model": name, "path": str(path), **parameter_counts(path)}), flush=True)
    dataset = args.out / "data" / "alpaca_bench.json"
    if not dataset.is_file():
        print(json.dumps({"dataset": build_dataset(dataset, tiny, args.rows)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
