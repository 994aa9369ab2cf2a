"""Dataset kinds (issue 18): preference pairs (ranking), KTO and pre-training text, detected at
upload, validated row by row, registered in dataset_info.json with LLaMA-Factory's keys, imported
back from it, and filtered by kind. Through the API with real files."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from fastapi.testclient import TestClient

from tests.test_datasets import assert_nothing_stored, upload


def _json(rows) -> bytes:
    return json.dumps(rows, ensure_ascii=False).encode()


def _jsonl(rows) -> bytes:
    return ("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n").encode()


def _ranking_alpaca(i: int) -> dict:
    return {"instruction": f"question {i}", "input": "", "chosen": f"good answer {i}", "rejected": f"bad {i}"}


def _ranking_sharegpt(i: int) -> dict:
    return {"conversations": [{"from": "human", "value": f"question {i}"}],
            "chosen": {"from": "gpt", "value": f"good answer {i}"}, "rejected": {"from": "gpt", "value": f"bad {i}"}}


def _ranking_openai(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}],
            "chosen": {"role": "assistant", "content": f"good {i}"}, "rejected": {"role": "assistant", "content": "no"}}


def _kto(i: int, tag: str = "kto_tag") -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            tag: i % 2 == 0}


def _kto_alpaca(i: int) -> dict:
    return {"instruction": f"q{i}", "input": "", "output": f"a{i}", "kto_tag": i % 3 != 0}


OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}

# (file name, content, kind, formatting, the dataset_info.json entry without its file_name)
KINDS = [
    ("pairs.json", _json([_ranking_alpaca(i) for i in range(4)]), "ranking", "alpaca",
     {"formatting": "alpaca", "ranking": True,
      "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}}),
    ("pairs_chat.jsonl", _jsonl([_ranking_sharegpt(i) for i in range(4)]), "ranking", "sharegpt",
     {"formatting": "sharegpt", "ranking": True,
      "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}),
    ("pairs_openai.json", _json([_ranking_openai(i) for i in range(3)]), "ranking", "sharegpt",
     {"formatting": "sharegpt", "ranking": True,
      "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"}, "tags": OPENAI_TAGS}),
    ("feedback.jsonl", _jsonl([_kto(i) for i in range(4)]), "kto", "sharegpt",
     {"formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "kto_tag"}, "tags": OPENAI_TAGS}),
    # LLaMA-Factory's kto_en_demo keeps the tag in "label".
    ("kto_demo.json", _json([_kto(i, "label") for i in range(4)]), "kto", "sharegpt",
     {"formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"}, "tags": OPENAI_TAGS}),
    ("kto_alpaca.json", _json([_kto_alpaca(i) for i in range(4)]), "kto", "alpaca",
     {"formatting": "alpaca",
      "columns": {"prompt": "instruction", "query": "input", "response": "output", "kto_tag": "kto_tag"}}),
    ("corpus.jsonl", _jsonl([{"text": f"document number {i}."} for i in range(5)]), "pretrain", "alpaca",
     {"formatting": "alpaca", "columns": {"prompt": "text"}}),
    ("corpus_lines.txt", "first document\nsecond document, é東京\r\nthird\n".encode(), "pretrain", "alpaca",
     {"formatting": "alpaca", "columns": {"prompt": "text"}}),
]


@pytest.mark.parametrize(("filename", "content", "kind", "formatting", "entry"), KINDS,
                         ids=[case[0] for case in KINDS])
def test_each_kind_is_detected_and_registered(client: TestClient, filename, content, kind, formatting, entry) -> None:
    response = upload(client, content, filename)
    assert response.status_code == 201, response.text
    body = response.json()
    extension = filename.rsplit(".", 1)[1]
    assert (body["kind"], body["formatting"], body["file_kind"]) == (kind, formatting, extension)
    detail = client.get(f"/api/v1/datasets/{body['id']}").json()
    assert detail["dataset_info"] == {"file_name": f"dataset_{body['id']}.{extension}", **entry}
    assert detail["report"]["kind"] == kind and detail["report"]["trainable_rows"] == detail["row_count"]
    assert client.get(f"/api/v1/datasets/{body['id']}/download").content == content
    page = client.get(f"/datasets/{body['id']}").text
    assert f'title="what it trains">{kind}</span>' in page


def test_a_text_file_is_one_document_per_line(client: TestClient) -> None:
    content = "first\n\nthird line, é\r\nlast without newline".encode()
    body = upload(client, content, "notes.txt").json()
    assert body["row_count"] == 4
    report = client.get(f"/api/v1/datasets/{body['id']}").json()["report"]
    assert [row["text"] for row in report["preview"]] == ["first", "", "third line, é", "last without newline"]
    # An empty line trains only the end-of-text token: said, not refused.
    assert report["issue_counts"] == {"empty_text": 1} and report["issues"][0]["row"] == 2
    assert report["trainable_rows"] == 3


# (file name, rows with a wrong one, what the refusal says)
WRONG_ROWS = [
    ("pairs.json", [_ranking_alpaca(0), _ranking_alpaca(1), {**_ranking_alpaca(2), "chosen": 5}],
     "row 3: 'chosen' is a number, expected a string"),
    ("pairs.json", [_ranking_sharegpt(0), {**_ranking_sharegpt(1), "rejected": {"from": "human", "value": "x"}}],
     "row 2: 'rejected' has role 'human'; an answer is one of ['function_call', 'gpt']"),
    ("pairs.json", [_ranking_sharegpt(0), {**_ranking_sharegpt(1), "chosen": "just text"}],
     "row 2: 'chosen' is a string, expected a message object with 'from' and 'value'"),
    ("kto.json", [_kto(0), _kto(1), _kto(2), {**_kto(3), "kto_tag": "yes"}],
     "row 4: 'kto_tag' is a string, expected true or false"),
    ("corpus.jsonl", [{"text": "fine"}, {"text": ["not", "text"]}],
     "row 2: 'text' is a array, expected a string"),
]


@pytest.mark.parametrize(("filename", "rows", "message"), WRONG_ROWS, ids=[case[2][:40] for case in WRONG_ROWS])
def test_a_wrong_row_of_each_kind_is_refused_with_its_number(client, session, data_dir, filename, rows,
                                                             message) -> None:
    content = _jsonl(rows) if filename.endswith(".jsonl") else _json(rows)
    response = upload(client, content, filename)
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith(message), response.json()["detail"]
    assert_nothing_stored(session, data_dir)


def test_rows_llama_factory_drops_are_flagged(client: TestClient) -> None:
    """A conversation that already ends with the answer leaves nothing for chosen/rejected to
    answer; a KTO row without its tag is not a KTO example: both are dropped, and said so."""
    pairs = [_ranking_sharegpt(0), {**_ranking_sharegpt(1), "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    report = client.get(f"/api/v1/datasets/{upload(client, _json(pairs), 'p.json').json()['id']}").json()["report"]
    assert report["issue_counts"] == {"unpaired_turns": 1} and report["dropped_rows"] == 1
    assert "must end with the user's turn" in report["issues"][0]["message"]
    feedback = [_kto(0), {key: value for key, value in _kto(1).items() if key != "kto_tag"}]
    report = client.get(f"/api/v1/datasets/{upload(client, _json(feedback), 'k.json').json()['id']}").json()["report"]
    assert report["issue_counts"] == {"missing_kto_tag": 1} and report["trainable_rows"] == 1


def test_the_kind_asked_for_is_checked(client, session, data_dir) -> None:
    sft = _json([{"instruction": "q", "input": "", "output": "a"}])
    answer = upload(client, sft, "x.json", kind="ranking")
    assert answer.status_code == 400 and "row 1 has no 'chosen' and 'rejected'" in answer.json()["detail"]
    answer = upload(client, b"some text\n", "x.txt", kind="sft")
    assert answer.status_code == 400 and "pre-training documents, not a sft dataset" in answer.json()["detail"]
    answer = upload(client, sft, "x.json", kind="dpo")
    assert answer.status_code == 400
    assert "kind must be one of auto, sft, ranking, kto, pretrain" in answer.json()["detail"]
    assert_nothing_stored(session, data_dir)
    # Pre-training text under another key, said with a column mapping.
    mapped = upload(client, _jsonl([{"body": "a document"}]), "docs.jsonl", kind="pretrain",
                    columns=json.dumps({"prompt": "body"}))
    assert mapped.status_code == 201, mapped.text
    assert client.get(f"/api/v1/datasets/{mapped.json()['id']}").json()["dataset_info"]["columns"] == {"prompt": "body"}


def test_the_list_filters_by_kind(client: TestClient) -> None:
    names = {}
    for filename, content, kind, _, _ in KINDS[:1] + KINDS[3:4] + KINDS[6:7]:
        names[kind] = upload(client, content, filename).json()["name"]
    sft = upload(client, _json([{"instruction": "q", "input": "", "output": "a"}]), "plain.json").json()
    for kind, name in {**names, "sft": sft["name"]}.items():
        listed = client.get("/api/v1/datasets", params={"kind": kind}).json()
        assert [d["name"] for d in listed] == [name]
    assert len(client.get("/api/v1/datasets").json()) == 4
    assert client.get("/api/v1/datasets", params={"kind": "dpo"}).status_code == 422
    page = client.get("/datasets").text
    assert all(f'<span class="badge">{kind}</span>' in page for kind in ("sft", "ranking", "kto", "pretrain"))


def test_dataset_info_round_trip_for_each_kind(client: TestClient) -> None:
    """Upload one file of each kind, take the dataset_info.json a run gets with the files beside
    it, delete the datasets, import that folder: the same kinds and entries come back."""
    uploaded = [upload(client, content, filename).json() for filename, content, *_ in KINDS]
    info, files = {}, {}
    for dataset in uploaded:
        entry = client.get(f"/api/v1/datasets/{dataset['id']}").json()["dataset_info"]
        info[dataset["name"]] = entry
        files[entry["file_name"]] = client.get(f"/api/v1/datasets/{dataset['id']}/download").content
    for dataset in uploaded:
        assert client.delete(f"/api/v1/datasets/{dataset['id']}").status_code == 204
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data/dataset_info.json", json.dumps(info))
        for name, content in files.items():
            archive.writestr(f"data/{name}", content)
    response = client.post("/api/v1/datasets/import", files={"archive": ("data.zip", buffer.getvalue())})
    assert response.status_code == 201, response.text
    assert response.json()["skipped"] == []
    imported = {d["name"]: d for d in response.json()["registered"]}
    assert {name: d["kind"] for name, d in imported.items()} == {d["name"]: d["kind"] for d in uploaded}
    for name, entry in info.items():
        again = client.get(f"/api/v1/datasets/{imported[name]['id']}").json()["dataset_info"]
        extension = entry["file_name"].rsplit(".", 1)[1]
        assert again == {**entry, "file_name": f"dataset_{imported[name]['id']}.{extension}"}


# ------------------------------------------------------------------- through LLaMA-Factory itself
LOAD_EACH_KIND = """
import json, sys
from llamafactory.data.loader import _load_single_dataset
from llamafactory.data.parser import get_dataset_list
from llamafactory.hparams import get_train_args
model_path, dataset_dir, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
model_args, data_args, training_args, *_ = get_train_args({
    "model_name_or_path": model_path, "stage": "sft", "do_train": True, "finetuning_type": "lora",
    "dataset": names[0], "dataset_dir": dataset_dir, "template": "qwen",
    "output_dir": dataset_dir + "/out", "report_to": "none"})
loaded = {}
for attr in get_dataset_list(names, dataset_dir):
    rows = _load_single_dataset(attr, model_args, data_args, training_args)
    loaded[attr.dataset_name] = [rows[0]["_prompt"][-1]["content"], [r["content"] for r in rows[0]["_response"]],
                                 len(rows)]
print("RESULT" + json.dumps(loaded))
"""


@pytest.mark.slow
def test_llamafactory_reads_each_kind_and_its_tokens_are_counted(client, session, tiny_model, tmp_path) -> None:
    """The registered entries, read by LLaMA-Factory's own loader; token statistics and a rendered
    row through its template and the stage's processor (pairwise, feedback, pre-training)."""
    import os
    import subprocess

    from app.models import Dataset, ModelEntry
    from app.settings import get_settings
    from tests.factories import write_run_dataset_dir

    model = ModelEntry(name="tiny", path=str(tiny_model), suggested_template="qwen")
    session.add(model)
    session.commit()
    cases = {name: upload(client, content, filename).json() for filename, content, *_ in KINDS
             for name in [filename.rsplit(".", 1)[0]] if name in ("pairs", "pairs_chat", "feedback", "corpus_lines")}
    datasets = [session.get(Dataset, body["id"]) for body in cases.values()]
    write_run_dataset_dir(datasets, tmp_path / "run_data")
    result = subprocess.run(
        [get_settings().train_python, "-c", LOAD_EACH_KIND, str(tiny_model), str(tmp_path / "run_data"),
         ",".join(cases)], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    line = next((part for part in result.stdout.splitlines() if part.startswith("RESULT")), None)
    assert line is not None, result.stderr[-3000:]
    loaded = json.loads(line.removeprefix("RESULT"))
    by_name = {f"dataset_{body['id']}.{body['file_kind']}": name for name, body in cases.items()}
    assert {by_name[key]: value for key, value in loaded.items()} == {
        "pairs": ["question 0", ["good answer 0", "bad 0"], 4],
        "pairs_chat": ["question 0", ["good answer 0", "bad 0"], 4],
        "feedback": ["q0", ["a0", ""], 4],  # kto_tag true: the answer, then an empty undesired one
        "corpus_lines": ["first document", [], 3],
    }

    def stats(name: str, cutoff_len: int = 1024) -> dict:
        answer = client.get(f"/api/v1/datasets/{cases[name]['id']}/stats",
                            params={"model_id": model.id, "cutoff_len": cutoff_len})
        assert answer.status_code == 200, answer.text
        return answer.json()

    pairs = stats("pairs")
    assert pairs["kind"] == "ranking" and pairs["sampled_rows"] == 4 and pairs["dropped_rows"] == 0
    # Trained: chosen + rejected; the longer sequence is what cutoff_len truncates.
    assert pairs["response_tokens"]["min"] == pairs["chosen_tokens"]["min"] + pairs["rejected_tokens"]["min"]
    assert pairs["chosen_tokens"]["min"] > pairs["rejected_tokens"]["min"] >= 2
    assert pairs["total_tokens"]["max"] == pairs["prompt_tokens"]["max"] + pairs["chosen_tokens"]["max"]
    feedback = stats("feedback")
    assert feedback["dropped_rows"] == 0 and feedback["response_tokens"]["min"] >= 2
    corpus = stats("corpus_lines", cutoff_len=3)
    assert corpus["prompt_tokens"]["max"] == 0 and corpus["truncated_rows"] >= 1
    assert corpus["total_tokens"]["min"] == corpus["response_tokens"]["min"] >= 2  # the text and its end token

    def rendered(name: str, row: int = 1, cutoff_len: int = 1024) -> dict:
        answer = client.get(f"/api/v1/datasets/{cases[name]['id']}/preview",
                            params={"model_id": model.id, "row": row, "cutoff_len": cutoff_len})
        assert answer.status_code == 200, answer.text
        return answer.json()["rendered"]

    chosen, rejected = rendered("pairs_chat")["sides"]
    assert (chosen["label"], rejected["label"]) == ("chosen", "rejected")
    assert chosen["segments"][0]["text"] == rejected["segments"][0]["text"]  # the same prompt, masked
    assert not chosen["segments"][0]["trained"] and "question 0" in chosen["segments"][0]["text"]
    assert chosen["segments"][-1]["trained"] and chosen["segments"][-1]["text"].startswith("good answer 0")
    assert rejected["segments"][-1]["text"].startswith("bad 0")
    kto = rendered("feedback", row=2)
    assert kto["kto_tag"] is False and kto["segments"][-1]["text"].startswith("a1")
    text = rendered("corpus_lines", row=2, cutoff_len=4)
    assert all(segment["trained"] for segment in text["segments"]) and text["tokens"] == 4
    assert len(text["chunks"]) == -(-text["full_tokens"] // 4) and text["chunks"][0]["tokens"] == 4
    page = client.get(f"/datasets/{cases['pairs']['id']}/tokens", params={"model_id": model.id, "template": "qwen"})
    assert "<h4>chosen</h4>" in page.text and "<h4>rejected</h4>" in page.text and "Chosen tokens" in page.text
    page = client.get(f"/datasets/{cases['corpus_lines']['id']}/tokens",
                      params={"model_id": model.id, "template": "qwen", "cutoff_len": 4, "row": 2})
    assert "Piece 2" in page.text and "Text tokens" in page.text
