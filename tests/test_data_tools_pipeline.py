"""The shared plumbing: errors and rejects, accounting, determinism, dedup/aggregation, splits, the CLI."""
from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from data_tools import cli
from data_tools.aggregate import aggregate
from data_tools.canonical import RecordError, read_records, record_kind
from data_tools.importer import run

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parent / "fixtures" / "annotations"  # samples of the real sources
EXTRA = Path(__file__).resolve().parent / "fixtures" / "annotations_extra"

# (source, inputs, extra args) covering every importer
CASES = [("hh-rlhf", [EXTRA / "hh_rlhf_verbatim.jsonl"], []),
         ("hh-rlhf", [EXTRA / "hh_rlhf_broken.jsonl"], ["--on-error", "skip"]),
         ("summarize-from-feedback", [EXTRA / "summarize_multi_worker.json"], ["--on-error", "skip"]),
         ("label-studio", [EXTRA / "label_studio_ranker_multi.json"],
          ["--bucket-order", "good,bad", "--on-error", "skip"]),
         ("label-studio", [EXTRA / "label_studio_pairwise_verbatim.json"], ["--on-error", "skip"]),
         ("csv", [EXTRA / "generic_pairs.csv"],
          ["--map", "prompt=question,chosen=good,rejected=bad", "--on-error", "skip"])]
S = SHARED  # samples of each real source (tests/fixtures/annotations/README.md)
CASES += [("summarize-from-feedback", [S / "summarize_from_feedback/comparisons/batch9.json",
                                       S / "summarize_from_feedback/axis_evals/cnndm1.json"], ["--ref-sft"]),
          ("shp", [S / "shp/askculinary/train.json", S / "shp/askacademia/train.json"], ["--min-ratio", "1.5"]),
          ("ultrafeedback", [S / "ultrafeedback/truthful_qa.jsonl"], []),
          ("ultrafeedback-binarized", [S / "ultrafeedback_binarized/train_prefs.jsonl"], []),
          ("oasst", sorted((S / "oasst1").glob("2023*")), []),           # a tree twice: duplicates
          ("oasst", [S / "oasst1/hf_parquet_rows_as_json.jsonl"], ["--sft", "all"]),
          ("helpsteer2", [S / "helpsteer2/train.jsonl", S / "helpsteer2/preference/preference.jsonl",
                          S / "helpsteer2/disagreements/disagreements.jsonl"], []),
          ("label-studio", sorted((S / "label_studio").glob("*.json")),
           ["--bucket-order", "relevant_results,_,biased_results", "--empty-completions", "keep"]),
          ("argilla", [S / "argilla/v1_feedback_records_SYNTHETIC.jsonl",
                       S / "argilla/v1_hf_row_as_read_by_pyarrow_SYNTHETIC.jsonl"], []),
          ("argilla", [S / "argilla/v2_records_SYNTHETIC.json", S / "argilla/v2_flat_row_SYNTHETIC.jsonl"], []),
          ("alpaca", [S / "sft/alpaca_data.json"], []),
          ("dolly", [S / "sft/databricks-dolly-15k.jsonl"], []),
          ("sharegpt", [S / "sft/sharegpt.json"], []),
          ("jsonl", sorted((S / "trl").glob("*.jsonl")), ["--on-error", "skip"])]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]


def parse(source, inputs, args, out):
    return cli.build_parser().parse_args([source, *map(str, inputs), "--out", str(out), *args])


def run_case(source, inputs, args, out, stream=None):
    ns = parse(source, inputs, args, out)
    return run(cli.source(source), ns.inputs, ns.out, ns, on_error=ns.on_error, split=ns.split, fmt=ns.format,
               stream=stream or io.StringIO())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_record_is_accounted_for_and_output_is_reproducible(tmp_path, case):
    source, inputs, args = case
    rep = run_case(source, inputs, args, tmp_path / "a.jsonl")
    assert rep.read == rep.converted + rep.dropped_total + rep.rejected
    assert rep.produced == rep.written + rep.duplicates + rep.merged_votes
    ns = parse(source, inputs, args, tmp_path / "a.jsonl")
    assert rep.read == sum(1 for f in inputs for _ in cli.source(source).read(Path(f), ns)) > 0
    recs = read_records(tmp_path / "a.jsonl")                     # validates every record
    assert len(recs) == rep.written and len({r["id"] for r in recs}) == len(recs)
    assert sum(rep.by_kind.values()) == rep.written
    if "--on-error" in args:
        rejects = read_records(tmp_path / "a.rejects.jsonl", validate=False)
        assert len(rejects) == rep.rejected
        assert all(r["file"] and r["record"] >= 1 and r["reason"] for r in rejects)
    run_case(source, inputs, args, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


@pytest.mark.parametrize("case", [c for c in CASES if c[0] not in ("alpaca", "dolly", "sharegpt")], ids=
                         [i for c, i in zip(CASES, IDS) if c[0] not in ("alpaca", "dolly", "sharegpt")])
def test_the_reward_stage_reads_every_pair_and_ranking(tmp_path, case):
    from align.data.preferences import to_group
    source, inputs, args = case
    run_case(source, inputs, args, tmp_path / "a.jsonl")
    for n, rec in enumerate(read_records(tmp_path / "a.jsonl"), 1):
        if record_kind(rec) != "sft":
            g = to_group(rec, f"record {n}")
            assert len(g.completions) == len(g.ranks) >= 2 and min(g.ranks) == 0


def test_fail_stops_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "hh.jsonl"
    out.write_text("previous contents\n")
    rc = cli.main(["hh-rlhf", str(EXTRA / "hh_rlhf_broken.jsonl"), "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{EXTRA / 'hh_rlhf_broken.jsonl'}: line 2: invalid JSON" in err and "nothing was written" in err
    assert out.read_text() == "previous contents\n" and sorted(p.name for p in tmp_path.iterdir()) == ["hh.jsonl"]


def test_skip_writes_rejects_with_reasons_and_counts(tmp_path, capsys):
    f = EXTRA / "hh_rlhf_broken.jsonl"
    rc = cli.main(["hh-rlhf", str(f), "--out", str(tmp_path / "hh.jsonl"), "--on-error", "skip"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "read 9 input records: 3 converted, 1 dropped, 5 rejected" in out
    assert "3 produced -> 1 written, 1 exact duplicates removed, 1 merged as further judgements into 1 " in out
    assert "dropped 1: chosen and rejected are identical" in out and "wrote 5 rejects to" in out
    rejects = [json.loads(x) for x in (tmp_path / "hh.rejects.jsonl").read_text().splitlines()]
    assert [(r["record"], r["unit"], r["field"]) for r in rejects] == [
        (2, "line", None), (3, "line", "rejected"), (4, "line", "chosen"), (6, "line", "chosen"), (9, "line", None)]
    assert all(r["file"] == str(f) for r in rejects)
    assert rejects[1]["reason"] == "is missing" and rejects[1]["raw"] == {"chosen": "\n\nHuman: Q\n\nAssistant: A"}
    assert "Human turn" in rejects[2]["reason"] and rejects[0]["raw"] is None
    (rec,) = read_records(tmp_path / "hh.jsonl")
    # line 1 and its duplicate (line 5) against the reversed vote of line 8: a tie, agreement 0
    assert rec["ranks"] == [0, 0] and rec["agreement"] == 0.0
    assert "duplicates" not in rec["meta"]                     # line 5 repeats line 1 byte for byte
    assert [v.get("meta") for v in rec["meta"]["votes"]] == [None, {"subset": "helpful-base"}]


def test_summary_reports_kinds_ties_agreement_and_lengths(tmp_path, capsys):
    assert cli.main(["label-studio", str(EXTRA / "label_studio_ranker_multi.json"), "--bucket-order", "good,bad",
                     "--on-error", "skip", "--out", str(tmp_path / "o.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "by kind: ranking 1" in out and "ties: 0 records" in out
    assert "agreement: mean 0.600" in out and "prompt chars: n 1, min 13" in out and "completion chars: n 3" in out


def test_aggregation_mean_versus_majority():
    orders = [{"x": 0, "y": 1, "z": 2}, {"x": 0, "y": 1, "z": 2}, {"x": 1, "y": 2, "z": 0}]
    assert aggregate(orders, ["x", "y", "z"], "mean") == ([0, 1, 1], pytest.approx(5 / 9))   # y, z mean 4/3
    assert aggregate(orders, ["x", "y", "z"], "majority")[0] == [0, 1, 2]                     # y beats z 2:1
    assert aggregate(orders[:1], ["x", "y", "z"], "mean") == ([0, 1, 2], None)


def _random_pairs(path: Path, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(rng.randint(5, 40)):
        p = f"prompt {rng.randint(0, 6)}"
        a, b = rng.sample(["A", "B", "C", "D"], 2)
        row = {"prompt": p, "chosen": a, "rejected": b}
        if rng.random() < 0.5:
            row["annotator"] = rng.choice(["u1", "u2", "u3"])
        rows.append(row)
        if rng.random() < 0.2:
            rows.append(dict(row))                                    # an exact duplicate
    if rng.random() < 0.5:
        rows.append({"prompt": "broken", "chosen": "x"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.mark.parametrize("seed", range(8))
def test_random_inputs_every_record_accounted_and_splits_disjoint(tmp_path, seed):
    f = tmp_path / "in.jsonl"
    rows = _random_pairs(f, seed)
    rep = run_case("jsonl", [f], ["--on-error", "skip", "--aggregate", ("mean", "majority")[seed % 2],
                                  "--split", "train=0.5,validation=0.25,test=0.25"], tmp_path / "out")
    assert rep.read == len(rows) == rep.converted + rep.rejected and rep.dropped_total == 0
    assert rep.produced == rep.converted == rep.written + rep.duplicates + rep.merged_votes
    splits = {name: read_records(tmp_path / "out" / f"{name}.jsonl") for name in ("train", "validation", "test")}
    assert sum(map(len, splits.values())) == rep.written
    seen = {}
    for name, recs in splits.items():
        for r in recs:
            assert seen.setdefault(json.dumps(r["prompt"]), name) == name          # one prompt, one split
    # every distinct item (prompt + completion set) of the input is exactly one output record
    items = {(r["prompt"], frozenset((r["chosen"], r["rejected"]))) for r in rows if "rejected" in r}
    outs = [(r["prompt"], frozenset(r["completions"] if "completions" in r else (r["chosen"], r["rejected"])))
            for recs in splits.values() for r in recs]
    assert len(outs) == len(set(outs)) and set(outs) == items


def test_split_is_deterministic_and_keeps_conversations_together(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"q{i % 30}"}] + ([{"role": "assistant", "content": "a"},
            {"role": "user", "content": "more"}] if i % 2 else []), "chosen": [{"role": "assistant", "content": "x"}],
             "rejected": [{"role": "assistant", "content": f"y{i}"}]} for i in range(120)]
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for out in ("s1", "s2"):
        assert cli.main(["jsonl", str(f), "--out", str(tmp_path / out), "--split", "train=0.8,test=0.2",
                         "--format", "parquet"]) == 0
    for name in ("train", "test"):
        assert (tmp_path / "s1" / f"{name}.parquet").read_bytes() == (tmp_path / "s2" / f"{name}.parquet").read_bytes()
    first_turns = {n: {r["prompt"][0]["content"] for r in read_records(tmp_path / "s1" / f"{n}.parquet")}
                   for n in ("train", "test")}
    assert not first_turns["train"] & first_turns["test"] and len(first_turns["train"] | first_turns["test"]) == 30
    assert 0 < len(first_turns["test"]) < 15


def test_implicit_prompt_pairs_of_one_conversation_share_a_split():
    """Issue 16: the key of a {chosen, rejected} text pair took every shared character, so the
    replies' common first words moved pairs of one conversation to different splits."""
    from data_tools.importer import split_key, split_of
    convo = "\n\nHuman: hi there\n\nAssistant: Hello.\n\nHuman: a joke?\n\nAssistant:"
    pairs = [(" Sure, here it is.", " Sure, here is one."), (" Sure thing!", " No."), (" Nope.", " No way.")]
    keys = {split_key({"chosen": convo + c, "rejected": convo + r}) for c, r in pairs}
    assert keys == {convo}
    for i in range(40):
        c = convo.replace("hi there", f"hi {i}")
        sides = {split_of({"chosen": c + a, "rejected": c + b}, {"train": 0.5, "test": 0.5}) for a, b in pairs}
        assert len(sides) == 1
    assert split_key({"chosen": "The sky is blue.", "rejected": "The sky is green."}) == "The sky is"


def test_usage_errors_exit_2(tmp_path, capsys):
    f = str(EXTRA / "hh_rlhf_verbatim.jsonl")
    assert cli.main(["hh-rlhf", f, "--out", str(tmp_path / "o"), "--split", "train=0.9,test=0.2"]) == 2
    assert "--split fractions sum to 1.1" in capsys.readouterr().err
    assert cli.main(["no-such-source", f, "--out", "x"]) == 2
    assert cli.main(["hh-rlhf", f]) == 2                                      # --out is required
    assert cli.main(["hh-rlhf", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_run_raises_record_error_in_fail_mode(tmp_path):
    ns = SimpleNamespace(aggregate="mean", empty_completions=None)
    with pytest.raises(RecordError) as e:
        run(cli.source("hh-rlhf"), [str(EXTRA / "hh_rlhf_broken.jsonl")], str(tmp_path / "x.jsonl"), ns)
    assert e.value.where.endswith("hh_rlhf_broken.jsonl: line 2")


def test_module_entry_points(tmp_path):
    f = str(EXTRA / "hh_rlhf_verbatim.jsonl")
    a = subprocess.run([sys.executable, "-m", "data_tools.hh_rlhf", f, "--out", str(tmp_path / "a.jsonl")],
                       cwd=REPO, capture_output=True, text=True)
    b = subprocess.run([sys.executable, "-m", "data_tools", "hh-rlhf", f, "--out", str(tmp_path / "b.jsonl")],
                       cwd=REPO, capture_output=True, text=True)
    assert a.returncode == b.returncode == 0 and "by kind: pair 5" in a.stdout
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    c = subprocess.run([sys.executable, "-m", "data_tools.csv_table", str(EXTRA / "generic_pairs.csv"), "--out",
                        str(tmp_path / "c.jsonl")], cwd=REPO, capture_output=True, text=True)
    assert c.returncode == 1 and "generic_pairs.csv: line 2: maps to no completion" in c.stderr
