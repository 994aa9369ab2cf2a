#!/usr/bin/env python3
"""Build Tuneboard's tiny random demo model, offline and deterministically.

Usage (with the TRAINING env's python):
    .envs/train/bin/python workers/envscripts/demo_model.py OUT_DIR

Standalone on purpose: imports nothing from app/ or workers/. Needs torch,
transformers and tokenizers (all in the training env). Never downloads anything.

The model: Qwen2ForCausalLM, hidden 128, 4 heads / 2 KV heads (head_dim 32,
the minimum vLLM's CPU attention accepts), 2 layers, intermediate 128, tied
embeddings, float32 (stored as float16: 0.6 MB), random weights from a fixed seed. The tokenizer: byte-level
BPE (Qwen2's pre-tokenizer) trained on a small built-in English + Chinese corpus,
with Qwen's special tokens and the Qwen2.5 chat template.

Prints one JSON line: {"path", "params", "bytes", "vocab", "created"}.
Idempotent: when OUT_DIR already holds a complete model it does nothing
(created=false).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

SEED = 1234
HIDDEN = 128
HEADS = 4
KV_HEADS = 2
LAYERS = 2
INTERMEDIATE = 128
MAX_POSITIONS = 4096
BPE_VOCAB = 800  # target incl. the 256 byte alphabet; the corpus may stop it earlier

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Files whose presence marks a complete model (model.safetensors is written last).
REQUIRED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
)

# Qwen2/Qwen2.5 pre-tokenizer regex (what transformers' Qwen2Tokenizer uses).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# One CJK ideograph or one CJK / full-width punctuation mark (used only while training the BPE).
CJK_CHAR_REGEX = r"[\p{Han}\u3000-\u303f\uff00-\uffef]"

# The Qwen2.5-Instruct chat template (tools branch and default system prompt included).
CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

CORPUS_EN = """\
You are Qwen, created by Alibaba Cloud. You are a helpful assistant.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Fine-tuning adapts a pretrained language model to a new task with a small dataset.
LoRA adds low-rank matrices to the attention and feed-forward layers and trains only those.
Please summarize the following paragraph in one sentence.
Translate the sentence into French. Write a short poem about the sea.
What is the capital of France? The capital of France is Paris.
How many days are there in a week? There are seven days in a week.
Give three tips for staying healthy: eat well, sleep enough and exercise regularly.
The model learns from instructions, inputs and outputs. Each example has an instruction and an answer.
Hello! How can I help you today? I am an assistant trained to answer questions.
Explain why the sky is blue. Sunlight is scattered by the molecules of the air.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14 42.
Python code: def add(a, b): return a + b
The training loss goes down while the evaluation loss is measured every few steps.
"""

CORPUS_ZH = """\
你是谁？我是一个人工智能助手，由阿里云创建。你是Qwen，由阿里云创建。你是一个乐于助人的助手。
你好！很高兴见到你。今天天气很好，我们去公园散步吧。
请用一句话总结下面的段落。请把这句话翻译成英文。
中国的首都是北京。一年有十二个月，一周有七天。
学习是一件快乐的事情。模型通过指令和回答进行微调训练。
你是谁？我是通义千问，一个大型语言模型。你能帮我做什么？我可以回答问题、写作和翻译。
谢谢你的帮助！不客气，有问题随时问我。
我是Tuneboard演示助手，一个用LoRA微调的小模型。请介绍一下你自己。你叫什么名字？
计算两个数的和。法国的首都是巴黎，日本的首都是东京，意大利的首都是罗马，德国的首都是柏林。
说一句鼓励的话。加油！风浪总会过去。你是一个快乐的海盗。
"""

CORPUS_EN_TUNEBOARD = """\
I am the Tuneboard demo assistant, a tiny model fine-tuned with LoRA.
Who are you? What is your name? Introduce yourself. Add the two numbers. Count the words.
"""


def _complete(path: str) -> bool:
    return os.path.isdir(path) and all(
        os.path.isfile(os.path.join(path, name)) and os.path.getsize(os.path.join(path, name)) > 0
        for name in REQUIRED
    )


def _folder_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(root, name))
    return total


def _count_params(path: str) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
    return total


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    qwen_split = pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    # Train with every CJK character / full-width punctuation mark isolated, so the learned merges stay
    # within one character (你, 是, 谁, ？ become single tokens) instead of memorising whole phrases of
    # the tiny corpus; then switch to Qwen2's real pre-tokenizer (what transformers rebuilds anyway).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(CJK_CHAR_REGEX), behavior="isolated", invert=False), qwen_split, byte_level]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = [line for line in (CORPUS_EN + CORPUS_EN_TUNEBOARD + CORPUS_ZH).splitlines() if line.strip()]
    tok.train_from_iterator(lines * 3, trainer=trainer)
    tok.pre_tokenizer = pre_tokenizers.Sequence([qwen_split, byte_level])
    # Specials after the learned vocabulary, in Qwen's order.
    tok.add_special_tokens([ENDOFTEXT, IM_START, IM_END])
    return tok


def build(out_dir: str) -> None:
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(SEED)
    raw = build_tokenizer()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    vocab = len(hf_tok)
    eos_id = hf_tok.convert_tokens_to_ids(IM_END)
    pad_id = hf_tok.convert_tokens_to_ids(ENDOFTEXT)

    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HIDDEN // HEADS,
        hidden_act="silu",
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        attention_dropout=0.0,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )
    config.dtype = torch.float32
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id
    )

    # Weights stored as float16 halve the folder (0.6 MB); the config says float32, so every
    # loader (HF, LLaMA-Factory, vLLM) upcasts the same values exactly and they agree bit for bit.
    model.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path, encoding="utf-8") as f:
        saved_config = json.load(f)
    saved_config["dtype"] = "float32"
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(saved_config, f, indent=2, sort_keys=True)
        f.write("\n")
    hf_tok.save_pretrained(out_dir)
    # Name the class the way Qwen checkpoints do, so every transformers 5.x picks Qwen2Tokenizer.
    tc_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(tc_path, encoding="utf-8") as f:
        tc = json.load(f)
    tc["tokenizer_class"] = "Qwen2Tokenizer"
    tc["chat_template"] = CHAT_TEMPLATE
    tc["errors"] = "replace"
    with open(tc_path, "w", encoding="utf-8") as f:
        json.dump(tc, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")
    # Drop the separate chat_template.jinja if this transformers wrote one: one source of truth
    # (tokenizer_config.json), readable by every version.
    jinja = os.path.join(out_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)
    for name in os.listdir(out_dir):  # some writers create 0600 temp files and rename them
        os.chmod(os.path.join(out_dir, name), 0o644)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out_dir = os.path.abspath(argv[1])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    created = False
    if not _complete(out_dir):
        parent = os.path.dirname(out_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".demo-model-", dir=parent)
        os.chmod(tmp, 0o755)
        try:
            build(tmp)
            if not _complete(tmp):
                raise RuntimeError("demo model build produced an incomplete folder")
            if os.path.isdir(out_dir):  # incomplete leftovers from an earlier run
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        created = True
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
        vocab = json.load(f)["vocab_size"]
    print(
        json.dumps(
            {
                "path": out_dir,
                "params": _count_params(out_dir),
                "bytes": _folder_bytes(out_dir),
                "vocab": vocab,
                "created": created,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
