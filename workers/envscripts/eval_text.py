"""Evaluation helpers run in the training environment (LLaMA-Factory's own code and libraries).

    eval_text.py prompts PREDICT_YAML OUT_JSONL   the prompts LLaMA-Factory's predict feeds the
        model: its own argument parsing, template and data pipeline (`get_dataset` with
        do_predict + predict_with_generate: the unsupervised processor), one line per row with
        prompt_token_ids, the prompt text and the reference; the first line is a header with the
        stop token ids LLaMA-Factory's sft workflow generates with.
    eval_text.py score PREDICTIONS_JSONL OUT_JSON  BLEU-4 and ROUGE-1/2/L of {"predict", "label"}
        lines, as LLaMA-Factory's ComputeSimilarity scores them (llamafactory/train/sft/metric.py:
        jieba words for ROUGE (rouge-chinese), characters for BLEU-4 (nltk, smoothing method3),
        each rounded ×100 per row, then the mean).
"""

import json
import sys


def prompts(yaml_path: str, out_path: str) -> None:
    import yaml
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    args = yaml.safe_load(open(yaml_path, encoding="utf-8"))
    model_args, data_args, training_args, _finetuning_args, _generating_args = get_train_args(args)
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    dataset = module["eval_dataset"]
    # The same stop tokens as llamafactory/train/sft/workflow.py (transformers 5 branch).
    extra_ids = getattr(tokenizer, "additional_special_tokens_ids", None)
    if not isinstance(extra_ids, list):
        extra = [str(t) for t in getattr(tokenizer, "_extra_special_tokens", [])]
        extra_ids = tokenizer.convert_tokens_to_ids(extra)
    stop_ids = list(dict.fromkeys([tokenizer.eos_token_id] + [i for i in extra_ids if i != -1]))
    with open(out_path, "w", encoding="utf-8") as out:
        out.write(json.dumps({"stop_token_ids": stop_ids}) + "\n")
        for row in dataset:
            labels = [t for t in row["labels"] if t != -100]
            out.write(json.dumps({
                "prompt_token_ids": list(row["input_ids"]),
                "prompt": tokenizer.decode(row["input_ids"], skip_special_tokens=False),
                "label": tokenizer.decode(labels, skip_special_tokens=True),
            }, ensure_ascii=False) + "\n")


def score_pairs(pairs):
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(60)
    scores = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in pairs:
        hypothesis = list(jieba.cut(pred))
        reference = list(jieba.cut(label))
        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        for key, value in result.items():
            scores[key].append(round(value["f"] * 100, 4))
        bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        scores["bleu-4"].append(round(bleu * 100, 4))
    return {key: (sum(values) / len(values) if values else 0.0) for key, values in scores.items()}


def score(predictions_path: str, out_path: str) -> None:
    with open(predictions_path, encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    metrics = score_pairs([(row["predict"], row["label"]) for row in rows])
    with open(out_path, "w", encoding="utf-8") as out:
        json.dump(metrics, out)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"prompts": prompts, "score": score}[mode](*rest)
