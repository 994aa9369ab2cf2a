#!/usr/bin/env bash
# Smoke test of the environment chain, outside the app:
#   demo model (train env) -> llamafactory-cli train (LoRA) -> vLLM CPU (serve env) with the adapter -> one chat.
#
#   bench/smoke_envs.sh            (needs .envs/train and .envs/serve: envs/install.sh train|serve)
# Env: SMOKE_DIR (work dir; default a fresh temp dir, deleted at exit unless SMOKE_KEEP=1),
#      SMOKE_EPOCHS (3), SMOKE_ENFORCE_EAGER (1: pass --enforce-eager to vLLM; 0: let it compile).
# vLLM CPU picks bfloat16 for a float32 checkpoint under --dtype auto: --dtype float32 is passed so
# that its greedy output matches HF/peft.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
train_env=${TRAIN_ENV:-$root/.envs/train}
serve_env=${SERVE_ENV:-$root/.envs/serve}
epochs=${SMOKE_EPOCHS:-3}
eager=${SMOKE_ENFORCE_EAGER:-1}
if [[ -n "${SMOKE_DIR:-}" ]]; then work=$SMOKE_DIR; mkdir -p "$work"; else work=$(mktemp -d -t tuneboard-smoke.XXXXXX); fi

server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM -- "-$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [[ -z "${SMOKE_DIR:-}" && "${SMOKE_KEEP:-0}" != 1 ]]; then rm -rf "$work"; fi
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
t_all=$(now)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# 1. demo model -------------------------------------------------------------------------------------
t=$(now)
"$train_env/bin/python" "$root/workers/envscripts/demo_model.py" "$work/model" 2>/dev/null
echo "[smoke] demo model: $(since "$t")s"

# 2. LoRA training ----------------------------------------------------------------------------------
mkdir -p "$work/data" "$work/out"
cp "$root/app/demo/demo_alpaca.json" "$work/data/demo_alpaca.json"
cat > "$work/data/dataset_info.json" <<JSON
{"demo": {"file_name": "demo_alpaca.json",
          "columns": {"prompt": "instruction", "query": "input", "response": "output",
                      "system": "system", "history": "history"}}}
JSON
cat > "$work/train.yaml" <<YAML
model_name_or_path: $work/model
trust_remote_code: false
stage: sft
do_train: true
finetuning_type: lora
lora_target: all
lora_rank: 8
lora_alpha: 16
dataset: demo
dataset_dir: $work/data
template: qwen
cutoff_len: 256
overwrite_cache: true
preprocessing_num_workers: 1
output_dir: $work/out
overwrite_output_dir: true
logging_steps: 1
save_steps: 5
plot_loss: true
report_to: none
per_device_train_batch_size: 8
gradient_accumulation_steps: 1
learning_rate: 5.0e-3
num_train_epochs: $epochs
lr_scheduler_type: cosine
bf16: false
val_size: 0.1
per_device_eval_batch_size: 8
eval_strategy: steps
eval_steps: 5
YAML
t=$(now)
( cd "$work" && LLAMABOARD_ENABLED=1 LLAMABOARD_WORKDIR="$work/out" \
    "$train_env/bin/llamafactory-cli" train "$work/train.yaml" > "$work/train.log" 2>&1 ) || {
  tail -n 40 "$work/train.log"; echo "[smoke] training FAILED"; exit 1; }
echo "[smoke] train: $(since "$t")s  ($(grep -c '"loss"' "$work/out/trainer_log.jsonl") loss lines;" \
     "last: $(grep '"loss"' "$work/out/trainer_log.jsonl" | tail -n 1 | cut -c1-100))"
echo "[smoke] output_dir: $(cd "$work/out" && ls | tr '\n' ' ')"
test -f "$work/out/adapter_model.safetensors" -a -f "$work/out/adapter_config.json"

# 3. vLLM with the adapter --------------------------------------------------------------------------
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
extra=()
[[ "$eager" == 1 ]] && extra+=(--enforce-eager)
t=$(now)
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_ENABLE_V1_MULTIPROCESSING=0 \
  setsid "$serve_env/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$work/model" --enable-lora --lora-modules "demo=$work/out" --max-lora-rank 8 \
    --dtype float32 --max-model-len 512 --kv-cache-memory-bytes 64M --host 127.0.0.1 --port "$port" "${extra[@]}" \
    > "$work/vllm.log" 2>&1 &
server_pid=$!
until curl -fsS "$base/health" >/dev/null 2>&1; do
  if ! kill -0 "$server_pid" 2>/dev/null; then tail -n 40 "$work/vllm.log"; echo "[smoke] vLLM died"; exit 1; fi
  if (( $(date +%s) - ${t%.*} > 300 )); then tail -n 40 "$work/vllm.log"; echo "[smoke] vLLM not ready in 300 s"; exit 1; fi
  sleep 0.5
done
echo "[smoke] vLLM /health ok: $(since "$t")s (enforce_eager=$eager)"
models=$(curl -fsS "$base/v1/models")
python3 -c 'import json,sys; ids=[m["id"] for m in json.loads(sys.argv[1])["data"]]; print("[smoke] /v1/models:", ids); assert "demo" in ids' "$models"
t=$(now)
reply=$(curl -fsS "$base/v1/chat/completions" -H 'Content-Type: application/json' -d @- <<'JSON'
{"model": "demo",
 "messages": [{"role": "system", "content": "你是Qwen，由阿里云创建。你是一个乐于助人的助手。"},
              {"role": "user", "content": "你是谁？"}],
 "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05, "max_tokens": 64}
JSON
)
echo "[smoke] chat (adapter demo): $(since "$t")s"
python3 -c 'import json,sys; r=json.loads(sys.argv[1]); c=r["choices"][0]; print("[smoke] reply:", json.dumps(c["message"]["content"], ensure_ascii=False)[:200], "| finish:", c["finish_reason"], "| usage:", r["usage"])' "$reply"
t=$(now)
kill -TERM -- "-$server_pid"
wait "$server_pid" 2>/dev/null || true
server_pid=""
echo "[smoke] vLLM stopped: $(since "$t")s"
echo "[smoke] total: $(since "$t_all")s  (work dir: $work)"
