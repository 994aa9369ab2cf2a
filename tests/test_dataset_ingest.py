"""Tests for app.services.dataset_ingest (pure stdlib, real files in tmp_path)."""

from __future__ import annotations

import hashlib
import io
import json
import random

import pytest

from app.services.dataset_ingest import (
    DEFAULT_TAGS,
    OPENAI_TAGS,
    DatasetFormatError,
    DatasetIngest,
    DatasetTooLarge,
    dataset_info_entry,
    refuse_unusable,
)

ALPACA = [
    {"instruction": "Translate to French", "input": "cheese", "output": "fromage"},
    {"instruction": "Say hi", "input": "", "output": "Hi! é東京", "system": "Be nice."},
    {"instruction": "Continue", "input": "", "output": "done", "history": [["q1", "a1"], ["q2", "a2"]]},
    {"instruction": "Count", "input": "1 2", "output": "3"},
]


def write(tmp_path, name: str, data: bytes | str) -> str:
    p = tmp_path / name
    p.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return str(p)


def jdump(rows, indent=None) -> str:
    return json.dumps(rows, ensure_ascii=False, indent=indent)


def jsonl(rows) -> str:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"


def comparable(report) -> dict:
    d = report.to_dict()
    d.pop("elapsed_s")
    return d


def ingest_stream(stream, *, read_size: int = 4 * 1024 * 1024, **options):
    """A stream fed the way uploads are: chunk by chunk into DatasetIngest.feed."""
    options.setdefault("chunk_size", read_size)
    ing = DatasetIngest(**options)
    while chunk := stream.read(read_size):
        ing.feed(chunk)
    return ing.finish()


def ingest_path(path: str, **options):
    with open(path, "rb") as stream:
        return ingest_stream(stream, **options)


def feed_chunks(data: bytes, sizes, **kw):
    ing = DatasetIngest(chunk_size=kw.pop("chunk_size", 64), **kw)
    i = 0
    it = iter(sizes)
    while i < len(data):
        n = next(it)
        ing.feed(data[i : i + n])
        i += n
    return ing.finish()


# ------------------------------------------------------------------------------ happy paths
def test_alpaca_json_array_report(tmp_path):
    path = write(tmp_path, "a.json", jdump(ALPACA, indent=2))
    r = ingest_path(path)
    assert r.ok and r.container == "json" and r.formatting == "alpaca"
    assert r.rows == 4 and r.bytes == len(open(path, "rb").read())
    assert r.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert r.issues == [] and r.fatal_count == 0
    assert r.columns == {"prompt": "instruction", "query": "input", "response": "output",
                         "history": "history", "system": "system", "tools": None}
    assert r.preview == ALPACA
    assert [s["row"] for s in r.sample] == [1, 2, 3, 4]
    # prompt = system + history + instruction + input
    plens = [len("Translate to French") + 6, len("Say hi") + len("Be nice."),
             len("Continue") + 8, len("Count") + 3]
    assert r.prompt_chars.min == min(plens) and r.prompt_chars.max == max(plens)
    assert r.response_chars.max == len("fromage") and r.response_chars.min == 1
    assert r.response_chars.mean == round(sum(len(x["output"]) for x in ALPACA) / 4, 2)


def test_jsonl_with_blank_lines_and_crlf(tmp_path):
    text = "\n\n" + jsonl(ALPACA[:2]).replace("\n", "\r\n") + "\n   \n" + jsonl(ALPACA[2:]) + "\n\n"
    r = ingest_path(write(tmp_path, "a.jsonl", text))
    assert r.ok and r.container == "jsonl" and r.rows == 4 and r.preview == ALPACA


def test_utf8_bom_accepted(tmp_path):
    r = ingest_path(write(tmp_path, "bom.json", b"\xef\xbb\xbf" + jdump(ALPACA).encode()))
    assert r.ok and r.bom and r.rows == 4 and r.preview == ALPACA


def test_bom_jsonl(tmp_path):
    r = ingest_path(write(tmp_path, "bom.jsonl", b"\xef\xbb\xbf" + jsonl(ALPACA).encode()))
    assert r.ok and r.bom and r.container == "jsonl" and r.rows == 4


def test_stream_and_push_api_agree(tmp_path):
    data = jdump(ALPACA).encode()
    a = ingest_stream(io.BytesIO(data))
    ing = DatasetIngest()
    ing.feed(data)
    b = ing.finish()
    assert comparable(a) == comparable(b)
    assert ing.finish() is b  # idempotent


# ------------------------------------------------------------------------------ structural errors
@pytest.mark.parametrize(
    "content, fragment",
    [
        ("hello world", "not JSON"),
        ("instruction,output\nhi,there\n", "not JSON"),
        ('[{"instruction": "a", "output": "b"} {"instruction": "c"}]', "expected ',' or ']'"),
        ('[{"instruction": "a", "output": "b"},]', "trailing comma"),
        ('[{"instruction": "a", output: "b"}]', "invalid JSON in row 1"),
    ],
)
def test_not_json(tmp_path, content, fragment):
    with pytest.raises(DatasetFormatError) as ei:
        ingest_path(write(tmp_path, "x.json", content))
    assert fragment in str(ei.value)
    assert ei.value.byte_offset is not None


def test_truncated_mid_row(tmp_path):
    text = jdump(ALPACA)
    cut = text.index('"Say hi"') + 3
    with pytest.raises(DatasetFormatError) as ei:
        ingest_path(write(tmp_path, "t.json", text[:cut]))
    assert "truncated" in ei.value.message and ei.value.row == 2


def test_truncated_array_not_closed(tmp_path):
    text = jdump(ALPACA)[:-1]  # drop the closing ]
    with pytest.raises(DatasetFormatError) as ei:
        ingest_path(write(tmp_path, "t.json", text))
    assert "not closed" in ei.value.message and ei.value.row == 4


def test_truncated_jsonl_last_line(tmp_path):
    text = jsonl(ALPACA)[:-10]
    with pytest.raises(DatasetFormatError, match="truncated"):
        ingest_path(write(tmp_path, "t.jsonl", text))


def test_object_instead_of_list(tmp_path):
    obj = {"instruction": "a", "input": "", "output": "b"}
    with pytest.raises(DatasetFormatError) as ei:
        ingest_path(write(tmp_path, "o.json", json.dumps(obj, indent=2)))
    assert "JSON object" in ei.value.message and "not a list" in ei.value.message


def test_wrapper_object_hint(tmp_path):
    with pytest.raises(DatasetFormatError) as ei:
        ingest_path(write(tmp_path, "w.json", json.dumps({"data": ALPACA})))
    assert "'data'" in ei.value.message and "top-level JSON array" in ei.value.message


def test_object_with_container_json_forced(tmp_path):
    with pytest.raises(DatasetFormatError, match="JSON object, not a list"):
        ingest_path(write(tmp_path, "o.json", json.dumps(ALPACA[0])), container="json")


@pytest.mark.parametrize("content", [b"", b"   \n\t  ", b"\xef\xbb\xbf"])
def test_empty_file(tmp_path, content):
    with pytest.raises(DatasetFormatError, match="empty"):
        ingest_path(write(tmp_path, "e.json", content))


@pytest.mark.parametrize("content", ["[]", "[ \n ]"])
def test_empty_list(tmp_path, content):
    with pytest.raises(DatasetFormatError, match="empty list"):
        ingest_path(write(tmp_path, "e.json", content))


def test_latin1_byte_rejected_with_offset(tmp_path):
    prefix = b'[{"instruction": "caf'
    data = prefix + "é".encode("latin-1") + b'", "output": "x"}]'
    with pytest.raises(DatasetFormatError) as ei:
        ingest_path(write(tmp_path, "l.json", data))
    assert ei.value.byte_offset == len(prefix)
    assert f"byte {len(prefix)}" in ei.value.message and "UTF-8" in ei.value.message
    # deep in a file, after multi-byte UTF-8 characters and across chunk boundaries
    body = jdump([{"instruction": "東京 é " * 50, "output": "x"}] * 200).encode()
    bad_at = body.rindex(b'"x"') + 1  # an ASCII byte deep in the file
    data2 = body[:bad_at] + b"\xe9" + body[bad_at + 1 :]
    for cs in (7, 64, 1 << 20):
        with pytest.raises(DatasetFormatError) as ei:
            feed_chunks(data2, iter(lambda: 13, None), chunk_size=cs)
        assert ei.value.byte_offset == bad_at, cs


def test_utf16_rejected(tmp_path):
    with pytest.raises(DatasetFormatError, match="UTF-16"):
        ingest_path(write(tmp_path, "u.json", jdump(ALPACA).encode("utf-16")))


def test_trailing_garbage(tmp_path):
    with pytest.raises(DatasetFormatError) as ei:
        ingest_path(write(tmp_path, "g.json", jdump(ALPACA) + "\n\nxyz"))
    assert "trailing data" in ei.value.message
    with pytest.raises(DatasetFormatError, match="trailing data"):
        ingest_path(write(tmp_path, "g2.json", jdump(ALPACA) + jdump(ALPACA)))


def test_trailing_whitespace_ok(tmp_path):
    assert ingest_path(write(tmp_path, "w.json", jdump(ALPACA) + "\n \r\n\t")).rows == 4


def test_row_that_is_a_string_is_structural(tmp_path):
    rows = [ALPACA[0], "just a string", ALPACA[1]]
    with pytest.raises(DatasetFormatError) as ei:
        ingest_path(write(tmp_path, "s.json", jdump(rows)))
    assert ei.value.row == 2 and "string" in ei.value.message and "not an object" in ei.value.message
    with pytest.raises(DatasetFormatError, match="row 2 is a JSON number"):
        ingest_path(write(tmp_path, "n.jsonl", jsonl(ALPACA[:1]) + "12345\n"))


def test_jsonl_two_objects_on_one_line(tmp_path):
    line = json.dumps(ALPACA[0]) + " " + json.dumps(ALPACA[1]) + "\n"
    with pytest.raises(DatasetFormatError, match="expected a newline"):
        ingest_path(write(tmp_path, "x.jsonl", line))


def test_jsonl_row_spanning_lines(tmp_path):
    text = jsonl(ALPACA[:1]) + json.dumps(ALPACA[1], indent=1) + "\n"
    with pytest.raises(DatasetFormatError, match="row 2 spans several lines"):
        ingest_path(write(tmp_path, "x.jsonl", text))


def test_unknown_schema(tmp_path):
    with pytest.raises(DatasetFormatError, match="cannot detect the dataset format"):
        ingest_path(write(tmp_path, "x.json", jdump([{"question": "q", "answer": "a"}])))


# ------------------------------------------------------------------------------ size limits
def test_max_total_bytes(tmp_path):
    path = write(tmp_path, "big.json", jdump(ALPACA * 100))
    with pytest.raises(DatasetTooLarge) as ei:
        ingest_path(path, max_total_bytes=1000, read_size=256)
    assert ei.value.limit == 1000 and isinstance(ei.value, DatasetFormatError)


def _huge_row_file(tmp_path) -> str:
    big = "x" * (50 * 1024 * 1024)
    text = '[{"instruction": "summarise", "input": "", "output": "' + big + '"}, ' + json.dumps(ALPACA[0]) + "]"
    return write(tmp_path, "huge.json", text)


def test_50mb_row_rejected_by_row_limit(tmp_path):
    path = _huge_row_file(tmp_path)
    with pytest.raises(DatasetTooLarge) as ei:
        ingest_path(path, max_row_bytes=16 * 1024 * 1024)
    assert ei.value.row == 1 and "max_row_bytes" in ei.value.message and ei.value.limit == 16 * 1024 * 1024


def test_50mb_row_accepted_under_limit(tmp_path):
    path = _huge_row_file(tmp_path)
    r = ingest_path(path, max_row_bytes=64 * 1024 * 1024)
    assert r.ok and r.rows == 2
    assert r.response_chars.max == 50 * 1024 * 1024
    assert r.issue_counts == {"too_long": 1} and r.issues[0]["row"] == 1


# ------------------------------------------------------------------------------ row-level issues
def test_instruction_number_rejects(tmp_path):
    rows = [ALPACA[0], {"instruction": 42, "input": "", "output": "x"}]
    r = ingest_path(write(tmp_path, "n.json", jdump(rows)))
    assert not r.ok and r.fatal_count >= 1
    assert r.first_fatal["row"] == 2 and r.first_fatal["kind"] == "bad_type"
    assert "number" in r.first_fatal["message"]
    assert r.issue_counts["mixed_types"] == 1  # string in row 1, number in row 2
    with pytest.raises(DatasetFormatError, match="row 2"):
        refuse_unusable(r)


def test_history_not_list_of_pairs(tmp_path):
    rows = [
        {"instruction": "a", "output": "b", "history": [["q", "a"]]},
        {"instruction": "a", "output": "c", "history": [["q", "a", "extra"]]},
        {"instruction": "a", "output": "d", "history": [["q", 1]]},
        {"instruction": "a", "output": "e", "history": "q a"},
    ]
    r = ingest_path(write(tmp_path, "h.json", jdump(rows)))
    assert not r.ok
    assert r.issue_counts["bad_history"] == 3
    assert [i["row"] for i in r.issues if i["kind"] == "bad_history"] == [2, 3, 4]


def test_alpaca_row_warnings(tmp_path):
    rows = [
        {"instruction": "a", "input": "", "output": "b"},
        {"input": "only input", "output": "c"},  # missing instruction
        {"instruction": "x", "input": ""},  # missing output -> dropped by LLaMA-Factory
        {"instruction": "y", "input": "", "output": ""},  # empty output
        {"input": "", "instruction": "a", "output": "b"},  # duplicate of row 1 (key order differs)
        {"instruction": "long", "input": "", "output": "z" * 300},
        {"instruction": "n", "input": None, "output": None},
    ]
    r = ingest_path(write(tmp_path, "w.json", jdump(rows)), max_row_chars=200)
    assert r.ok
    assert r.issue_counts == {"duplicate": 1, "empty_output": 1, "missing_instruction": 1, "missing_output": 2,
                              "too_long": 1}
    by_kind = {}
    for i in r.issues:
        by_kind.setdefault(i["kind"], []).append(i["row"])
    assert by_kind == {"missing_instruction": [2], "missing_output": [3, 7], "empty_output": [4],
                       "duplicate": [5], "too_long": [6]}
    assert "row 1" in [i for i in r.issues if i["kind"] == "duplicate"][0]["message"]
    assert r.duplicate_rows == 1 and r.dropped_rows == 2


def test_issue_list_capped_but_all_counted(tmp_path):
    rows = [{"instruction": f"i{n}", "input": "", "output": ""} for n in range(120)]
    r = ingest_path(write(tmp_path, "c.json", jdump(rows)))
    assert len(r.issues) == 50 and r.issue_counts["empty_output"] == 120
    assert [i["row"] for i in r.issues] == list(range(1, 51))


def test_mixed_types_in_extra_column(tmp_path):
    rows = [dict(ALPACA[0], id=1), dict(ALPACA[1], id="two"), dict(ALPACA[3], id="three")]
    r = ingest_path(write(tmp_path, "m.json", jdump(rows)))
    assert not r.ok and r.issue_counts == {"mixed_types": 2}


# ------------------------------------------------------------------------------ sharegpt
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "system": "sys"},
    {"conversations": [
        {"from": "human", "value": "weather?"},
        {"from": "function_call", "value": '{"name": "w"}'},
        {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "It is sunny."},
    ], "tools": "[]"},
    {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
]
OPENAI = [
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                  {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
]


def test_sharegpt_conversations(tmp_path):
    r = ingest_path(write(tmp_path, "s.json", jdump(SHAREGPT)))
    assert r.ok and r.formatting == "sharegpt" and r.rows == 3 and r.issues == []
    assert r.tags == DEFAULT_TAGS
    assert r.columns == {"messages": "conversations", "system": "system", "tools": "tools"}
    assert r.response_chars.max == len("It is sunny.")
    assert r.prompt_chars.min == len("S") + len("q")


def test_sharegpt_openai_messages(tmp_path):
    r = ingest_path(write(tmp_path, "o.jsonl", jsonl(OPENAI)))
    assert r.ok and r.formatting == "sharegpt" and r.container == "jsonl"
    assert r.tags == OPENAI_TAGS and r.columns == {"messages": "messages", "system": None, "tools": None}


def test_sharegpt_row_issues(tmp_path):
    rows = [
        SHAREGPT[0],
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},  # bad role
        {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},  # wrong order
        {"conversations": [{"from": "human", "value": "q"}]},  # no answer
        {"conversations": []},  # empty
        {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]},  # alternation
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]},  # fatal type
        {"conversations": "hi"},  # fatal
        {"system": "no conversations"},  # fatal: converter would fail
    ]
    r = ingest_path(write(tmp_path, "s.json", jdump(rows)))
    assert not r.ok
    kinds = {i["row"]: i["kind"] for i in r.issues if i["kind"] != "mixed_types"}
    assert kinds == {2: "bad_role", 3: "bad_alternation", 4: "unpaired_turns", 5: "empty_conversation",
                     6: "bad_alternation", 7: "bad_message", 8: "bad_messages", 9: "missing_messages"}
    assert r.dropped_rows == 5


# ------------------------------------------------------------------------------ column mapping
def test_column_mapped_alpaca(tmp_path):
    rows = [{"question": "q", "context": "c", "answer": "a", "sys": "s"},
            {"question": "q2", "context": "", "answer": "a2"}]
    path = write(tmp_path, "m.json", jdump(rows))
    r = ingest_path(path, columns={"prompt": "question", "query": "context", "response": "answer", "system": "sys"})
    assert r.ok and r.formatting == "alpaca" and r.rows == 2 and r.issues == []
    assert r.prompt_chars.max == 3
    assert dataset_info_entry(r, "m.json") == {
        "file_name": "m.json",
        "formatting": "alpaca",
        "columns": {"prompt": "question", "query": "context", "response": "answer", "system": "sys"},
    }


def test_column_mapped_sharegpt_with_tags(tmp_path):
    rows = [{"dialog": [{"speaker": "usr", "text": "q"}, {"speaker": "bot", "text": "a"}]}]
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "usr", "assistant_tag": "bot"}
    r = ingest_path(write(tmp_path, "d.json", jdump(rows)), formatting="sharegpt", columns={"messages": "dialog"},
                    tags=tags)
    assert r.ok and r.issues == []
    e = dataset_info_entry(r, "d.json")
    assert e["columns"] == {"messages": "dialog"}
    assert e["tags"] == {"role_tag": "speaker", "content_tag": "text", "user_tag": "usr", "assistant_tag": "bot",
                         "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}


# ------------------------------------------------------------------------------ dataset_info entries
def test_entry_default_alpaca_omits_columns(tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "b"}]
    r = ingest_path(write(tmp_path, "d.json", jdump(rows)))
    assert dataset_info_entry(r, "d.json") == {"file_name": "d.json", "formatting": "alpaca"}


def test_entry_alpaca_with_system_history(tmp_path):
    r = ingest_path(write(tmp_path, "d.json", jdump(ALPACA)))
    # LLaMA-Factory reads history/system only when declared; declaring `columns` resets every
    # unlisted column to None, so prompt/query/response must be listed too (data/README.md example).
    assert dataset_info_entry(r, "d.json") == {
        "file_name": "d.json",
        "formatting": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                    "system": "system"},
    }


def test_entry_alpaca_without_input_column(tmp_path):
    # No row has "input": the default query="input" would raise KeyError in LLaMA-Factory's
    # converter (hiyouga/LlamaFactory#7344), so `columns` must be written without query.
    r = ingest_path(write(tmp_path, "d.jsonl", jsonl([{"instruction": "a", "output": "b"}])))
    assert dataset_info_entry(r, "d.jsonl") == {
        "file_name": "d.jsonl", "formatting": "alpaca", "columns": {"prompt": "instruction", "response": "output"},
    }


def test_entry_sharegpt_default_and_openai(tmp_path):
    plain = [{"conversations": SHAREGPT[0]["conversations"]}]
    r = ingest_path(write(tmp_path, "s.json", jdump(plain)))
    assert dataset_info_entry(r, "s.json") == {"file_name": "s.json", "formatting": "sharegpt"}
    r = ingest_path(write(tmp_path, "s2.json", jdump(SHAREGPT)))
    assert dataset_info_entry(r, "s2.json") == {
        "file_name": "s2.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "system": "system", "tools": "tools"},
    }
    r = ingest_path(write(tmp_path, "o.json", jdump(OPENAI)))
    assert dataset_info_entry(r, "o.json") == {
        "file_name": "o.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"},
    }


def test_entry_from_params():
    assert dataset_info_entry({"file_name": "x.json", "formatting": "alpaca"}) == {
        "file_name": "x.json", "formatting": "alpaca"}
    assert dataset_info_entry({"formatting": "alpaca", "columns": {"prompt": "q", "response": "a", "query": None}},
                              file_name="x.json") == {
        "file_name": "x.json", "formatting": "alpaca", "columns": {"prompt": "q", "response": "a"}}
    assert dataset_info_entry({"file_name": "x.jsonl", "formatting": "sharegpt", "tags": dict(DEFAULT_TAGS)}) == {
        "file_name": "x.jsonl", "formatting": "sharegpt"}
    with pytest.raises(ValueError):
        dataset_info_entry({"file_name": "x.csv", "formatting": "alpaca"})
    with pytest.raises(ValueError):
        dataset_info_entry({"file_name": "x.json", "formatting": "alpaca", "columns": {"messages": "m"}})


# ------------------------------------------------------------------------------ chunk boundaries
def _mixed_file() -> bytes:
    rng = random.Random(7)
    rows = []
    for i in range(300):
        row = {"instruction": f"q{i} " + "é東京😀"[i % 4] * rng.randint(0, 40), "input": "",
               "output": "a" * rng.randint(0, 200) + "\\\"\n\u2028"}
        if i % 7 == 0:
            row["history"] = [["h", "r" * i]]
        if i % 50 == 0:
            row["output"] = ""
        rows.append(row)
    rows.append(rows[3])  # a duplicate
    return (b"\xef\xbb\xbf" + json.dumps(rows, ensure_ascii=False, indent=1).encode())


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_chunk_boundaries_anywhere(kind):
    data = _mixed_file()
    if kind == "jsonl":
        rows = json.loads(data.decode("utf-8-sig"))
        data = jsonl(rows).encode()
    one_shot = DatasetIngest(sample_size=50)
    one_shot.feed(data)
    ref = comparable(one_shot.finish())
    assert ref["rows"] == 301 and ref["duplicate_rows"] == 1 and ref["container"] == kind
    rng = random.Random(1)
    for sizes in (iter(lambda: 1, None), iter(lambda: 7, None), iter(lambda: rng.randint(1, 5000), None)):
        for chunk_size in (1, 100, 4096):
            got = comparable(feed_chunks(data, sizes, chunk_size=chunk_size, sample_size=50))
            assert got == ref


def test_chunk_boundaries_for_errors():
    data = jdump(ALPACA).encode()[:-25]  # truncated mid-row
    errs = set()
    for n in (1, 3, 7, 50, 10**6):
        with pytest.raises(DatasetFormatError) as ei:
            feed_chunks(data, iter(lambda: n, None), chunk_size=16)
        errs.add((ei.value.message, ei.value.byte_offset, ei.value.row))
    assert len(errs) == 1


def test_scalar_row_split_across_chunks():
    data = b'[{"instruction": "a", "output": "b"}, 12345]'
    msgs = set()
    for n in range(1, len(data) + 1):
        with pytest.raises(DatasetFormatError) as ei:
            feed_chunks(data, iter(lambda: n, None), chunk_size=1)
        msgs.add(ei.value.message)
    assert len(msgs) == 1 and "row 2 is a JSON number" in msgs.pop()


def test_feed_after_error_reraises():
    ing = DatasetIngest(chunk_size=1)
    with pytest.raises(DatasetFormatError):
        ing.feed(b"nope")
    with pytest.raises(DatasetFormatError):
        ing.feed(b"more")


# ------------------------------------------------------------------------------ stats & sampling
def test_stats_percentiles_and_reservoir(tmp_path):
    rows = [{"instruction": "p" * (i % 100 + 1), "input": "", "output": "r" * (i + 1)} for i in range(5000)]
    r = ingest_path(write(tmp_path, "s.json", jdump(rows)), sample_size=100, seed=3)
    assert r.rows == 5000 and len(r.preview) == 20 and r.preview[0] == rows[0]
    assert r.response_chars.min == 1 and r.response_chars.max == 5000
    assert r.response_chars.p50 == 2500 and r.response_chars.mean == 2500.5
    assert abs(r.response_chars.p95 - 4750) <= 4750 * 0.012  # log buckets above 4096 chars: ~1%
    assert r.prompt_chars.p50 == 50 and r.prompt_chars.p95 == 95
    assert len(r.sample) == 100 and len({s["row"] for s in r.sample}) == 100
    assert all(s["data"] == rows[s["row"] - 1] for s in r.sample)
    assert max(s["row"] for s in r.sample) > 2500  # not just the head of the file
    r2 = ingest_path(write(tmp_path, "s2.json", jdump(rows)), sample_size=100, seed=3)
    assert r2.sample == r.sample  # seeded


def test_read_sizes_agree(tmp_path):
    data = _mixed_file()
    path = write(tmp_path, "m.json", data)
    a = ingest_path(path, read_size=1000)
    b = ingest_path(path, read_size=777)
    assert comparable(a) == comparable(b)
    # The hash is of the content as stored: the file less its BOM.
    assert a.bom and a.sha256 == hashlib.sha256(data.removeprefix(b"\xef\xbb\xbf")).hexdigest()


# ------------------------------------------------------------------------------ other kinds
def test_text_lines_anywhere_across_chunks():
    """A plain text file is cut into lines as `datasets`' text loader cuts it (str.splitlines),
    whatever the chunks: CRLF split between two of them, a multi-byte character, no final newline."""
    data = "\ufeffone\r\ntwo é東京\n\nthree\u2028four\rfive".encode()
    ref = comparable(feed_chunks(data, iter(lambda: len(data), None), container="txt", chunk_size=4096))
    texts = [row["text"] for row in ref["preview"]]
    assert texts == "one\r\ntwo é東京\n\nthree\u2028four\rfive".splitlines() and ref["kind"] == "pretrain"
    assert ref["bom"] and ref["sha256"] == hashlib.sha256(data[3:]).hexdigest()
    for n in (1, 2, 3, 5):
        assert comparable(feed_chunks(data, iter(lambda: n, None), container="txt", chunk_size=n)) == ref


def test_kind_detected_from_row_one():
    def kind_of(rows, **kw):
        r = feed_chunks(jdump(rows).encode(), iter(lambda: 10**6, None), **kw)
        return r.kind, r.formatting
    assert kind_of([{"instruction": "q", "chosen": "a", "rejected": "b"}]) == ("ranking", "alpaca")
    assert kind_of([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                     "label": True}]) == ("kto", "sharegpt")
    assert kind_of([{"text": "a document"}]) == ("pretrain", "alpaca")
    assert kind_of(ALPACA) == ("sft", "alpaca")
    # Mapped onto other keys, chosen/rejected are ranking columns; asked for SFT, such a file is refused.
    assert kind_of([{"q": "x", "good": "a", "bad": "b"}],
                   columns={"prompt": "q", "chosen": "good", "rejected": "bad"}) == ("ranking", "alpaca")
    with pytest.raises(DatasetFormatError, match="preference"):
        kind_of([{"instruction": "q", "chosen": "a", "rejected": "b"}], kind="sft")
