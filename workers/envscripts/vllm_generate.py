"""Batch generation with vLLM's offline engine (serving environment), for an evaluation.

    vllm_generate.py REQUEST_JSON

The request names the base model, the LoRA adapter (or none), the prompts file eval_text.py
`prompts` wrote (the token ids LLaMA-Factory's own template and data pipeline build), and where to
write generated_predictions.jsonl (LLaMA-Factory's format: prompt, predict, label) and a result
file with the seconds spent generating. Greedy decoding with LLaMA-Factory's stop tokens.
"""

import json
import sys
import time

from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest



def _bytes(size) -> int:
    """'64M' (vLLM's CLI form) or a number of bytes."""
    text = str(size).strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


request = json.load(open(sys.argv[1], encoding="utf-8"))
with open(request["prompts_path"], encoding="utf-8") as lines:
    header, *rows = [json.loads(line) for line in lines if line.strip()]
options = dict(model=request["model"], max_model_len=request["max_model_len"], enforce_eager=True, seed=0)
if request.get("adapter"):
    options |= {"enable_lora": True, "max_lora_rank": request["max_lora_rank"], "max_loras": 1}
if not request.get("gpu"):
    # float32 on the CPU: greedy outputs equal transformers + peft's (docs: FACTS).
    options |= {"dtype": "float32", "kv_cache_memory_bytes": _bytes(request["kv_cache_bytes"])}
loaded = time.monotonic()
llm = LLM(**options)
sampling = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"],
                          stop_token_ids=header["stop_token_ids"], skip_special_tokens=True)
lora = LoRARequest("adapter", 1, request["adapter"]) if request.get("adapter") else None
started = time.monotonic()
outputs = llm.generate([{"prompt_token_ids": row["prompt_token_ids"]} for row in rows], sampling,
                       lora_request=lora, use_tqdm=False)
generate_s = time.monotonic() - started
with open(request["out_path"], "w", encoding="utf-8") as out:
    for row, output in zip(rows, outputs, strict=True):
        out.write(json.dumps({"prompt": row["prompt"], "predict": output.outputs[0].text, "label": row["label"]},
                             ensure_ascii=False) + "\n")
json.dump({"generate_s": generate_s, "load_s": started - loaded, "rows": len(rows)},
          open(request["result_path"], "w"))
