"""The canonical format: validator, ids, reading and atomic writing in every format."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from data_tools.canonical import RecordError, read_records, record_id, record_kind, validate_record, write_records

SHARED = Path(__file__).resolve().parent / "fixtures" / "annotations"  # samples of the real sources

U = {"role": "user", "content": "What color is the sky?"}
A = {"role": "assistant", "content": "It is blue."}
PAIR = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
RANKING = {"prompt": [U], "completions": [[A], [{"role": "assistant", "content": "Green."}]], "ranks": [0, 0],
           "scores": [1.0, 1.0], "agreement": 0.5, "id": "x", "source": "s", "annotators": ["a"], "meta": {"k": 1}}


def test_kinds_and_valid_records():
    assert record_kind(PAIR) == "pair" and record_kind(RANKING) == "ranking"
    assert record_kind({"messages": [U, A]}) == "sft" and record_kind({"prompt": "p", "completion": "c"}) == "sft"
    for rec in (PAIR, RANKING, {"messages": [U, A]}, {"prompt": [U], "completion": [A]},
                {"chosen": "The sky is blue.", "rejected": "The sky is green."},      # implicit prompt
                {"prompt": [U], "chosen": [{"role": "assistant", "content": ""}], "rejected": [A]}):
        validate_record(rec, "f.jsonl: line 1")


@pytest.mark.parametrize("rec, field, reason", [
    ({"prompt": "p"}, None, "not an SFT, pair or ranking record"),
    ({"prompt": "p", "completion": "c", "chosen": "x", "rejected": "y"}, None, "several kinds"),
    ({"prompt": "p", "chosen": "a"}, "rejected", "is missing"),
    ({"prompt": "p", "completions": ["a", "b"], "ranks": [0]}, "ranks", "one integer >= 0 per completion"),
    ({"prompt": "p", "completions": ["a", "b"], "ranks": [0, -1]}, "ranks", "one integer >= 0"),
    ({"prompt": "p", "completions": ["a"], "ranks": [0]}, "completions", "at least 2"),
    ({"prompt": "p", "completions": ["a", "b"], "labels": [True, False]}, "ranks", "stepwise"),
    ({"prompt": "p", "completion": "c", "label": True}, "label", "unpaired preference"),
    ({"prompt": [U], "chosen": [U], "rejected": [A]}, "chosen[0].role", "assistant messages"),
    ({"prompt": "p", "chosen": [A], "rejected": [A]}, "chosen", "string prompt needs string completions"),
    ({"messages": [U, {"role": "bot", "content": "x"}]}, "messages[1].role", "unknown role"),
    ({"messages": [U]}, "messages", "no assistant turn"),
    ({**PAIR, "agreement": 1.5}, "agreement", "[0, 1]"),
    ({**PAIR, "margin": "big"}, "margin", "finite number"),
    ({**PAIR, "annotators": "bob"}, "annotators", "list of strings"),
    ({**PAIR, "meta": "x"}, "meta", "must be an object"),
    ({**PAIR, "scores": [1, 2]}, "scores", "ranking records"),
])
def test_validator_names_the_field(rec, field, reason):
    with pytest.raises(RecordError) as e:
        validate_record(rec, "data.jsonl: line 7")
    assert e.value.where == "data.jsonl: line 7" and e.value.field == field and reason in e.value.reason
    assert str(e.value).startswith("data.jsonl: line 7")


def test_id_is_a_stable_hash_of_the_content_only():
    a = {"prompt": "p", "chosen": "a", "rejected": "b", "meta": {"x": 1}, "annotators": ["u"]}
    b = {"rejected": "b", "chosen": "a", "prompt": "p", "source": "other"}
    assert record_id(a) == record_id(b) and len(record_id(a)) == 16 and int(record_id(a), 16) >= 0
    assert record_id(a) != record_id({**a, "chosen": "b", "rejected": "a"})
    assert record_id(a) == record_id(json.loads(json.dumps(a)))


def test_trl_files_are_valid_canonical_input_and_the_others_are_rejected():
    ok = ["language_modeling_conversational", "preference_explicit_conversational", "preference_explicit_standard",
          "preference_implicit_conversational", "preference_implicit_standard",
          "prompt_completion_conversational", "prompt_completion_standard"]
    for name in ok:
        assert len(read_records(SHARED / "trl" / f"{name}.jsonl")) == 1
    for name in ("language_modeling_standard", "prompt_only_standard", "prompt_only_conversational",
                 "stepwise_supervision", "unpaired_preference_standard"):
        with pytest.raises(RecordError, match=rf"{name}\.jsonl: line 1"):
            read_records(SHARED / "trl" / f"{name}.jsonl")


def _records():
    return [
        {**PAIR, "id": "a", "source": "s", "annotators": [], "meta": {}},
        {**PAIR, "prompt": "Other", "margin": 2.0, "id": "b", "source": "s", "annotators": ["x", "y"],
         "meta": {"nested": {"k": [1, "two", None]}, "ü": "ö"}},
        {"prompt": "q", "completions": ["a", "b", "c"], "ranks": [0, 1, 1], "scores": [2.5, 1.0, 1.0],
         "agreement": 0.25, "id": "c", "source": "s", "annotators": [], "meta": {}},
    ]


@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz", "out.parquet", "out_dataset"])
def test_every_format_reads_back_to_the_same_records(tmp_path, name):
    recs = _records()
    path = write_records(recs, tmp_path / name)
    assert read_records(path) == recs
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]          # no temporary files left
    write_records(recs[:1], path)                                         # replacing works too
    assert read_records(path) == recs[:1]


def test_conversational_records_of_several_kinds_in_one_parquet(tmp_path):
    recs = [{"prompt": [U], "completions": [[A], [{"role": "assistant", "content": "No."}]], "ranks": [0, 1],
             "meta": {"a": 1}},
            {"messages": [U, A], "meta": {}}]
    assert read_records(write_records(recs, tmp_path / "x.parquet")) == recs


def test_jsonl_bytes_are_the_agreed_serialization(tmp_path):
    rec = {"prompt": "ü", "chosen": "a", "rejected": "b"}
    p = write_records([rec], tmp_path / "x.jsonl")
    assert p.read_bytes() == (json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n").encode()


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "x.parquet"
    write_records(_records(), path)
    before = path.read_bytes()
    mixed = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": [U], "chosen": [A], "rejected": [A]}]
    with pytest.raises(ValueError, match="write JSONL instead"):
        write_records(mixed, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["x.parquet"]


def test_read_records_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "p", "completion": "c"}\n\n{"prompt": "p", "chosen": 3, "rejected": "b"}\n')
    with pytest.raises(RecordError) as e:
        read_records(p)
    assert e.value.where == f"{p}: line 3" and e.value.field == "chosen"
    p.write_text('{"prompt": "p", "completion": "c"}\n{oops\n')
    with pytest.raises(RecordError, match=r"bad\.jsonl: line 2: invalid JSON"):
        read_records(p)
    (tmp_path / "arr.json").write_text(json.dumps([{"prompt": "p", "completion": "c"}], indent=2))
    assert read_records(tmp_path / "arr.json") == [{"prompt": "p", "completion": "c"}]
    (tmp_path / "splits").mkdir()
    with pytest.raises(RecordError, match="point at one"):
        read_records(tmp_path / "splits")
