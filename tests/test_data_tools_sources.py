"""Each importer on its fixtures: exact canonical content (spot checks), counts and quirks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_tools.canonical import read_records
from data_tools.cli import main

SHARED = Path(__file__).resolve().parent / "fixtures" / "annotations"  # samples of the real sources
EXTRA = Path(__file__).resolve().parent / "fixtures" / "annotations_extra"


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def imp(tmp_path, source, *inputs, args=(), out="out.jsonl"):
    """Import; return the written records (read back and validated by read_records)."""
    target = tmp_path / out
    rc = main([source, *map(str, inputs), "--out", str(target), *args])
    assert rc == 0, f"{source} exited {rc}"
    recs = read_records(target)
    for r in recs:
        assert set(r) >= {"id", "source", "annotators", "meta"} and r["source"] == source
    return recs


def by_kind(recs, kind):
    from data_tools.canonical import record_kind
    return [r for r in recs if record_kind(r) == kind]


# ----------------------------------------------------------------------------------------- hh-rlhf

def test_hh_rlhf_verbatim_lines(tmp_path):
    recs = imp(tmp_path, "hh-rlhf", EXTRA / "hh_rlhf_verbatim.jsonl")
    assert len(recs) == 5 and all(r["meta"] == {} and r["annotators"] == [] for r in recs)
    assert recs[0]["prompt"] == [U("Hello, How are you?")]
    assert recs[0]["chosen"] == [A("Hello, I’m doing quite well.")]
    assert recs[0]["rejected"] == [A("Hello, I am doing well. What is your name?")]
    assert recs[2]["prompt"] == [U("How much wood do you think can a woodchuck chuck?"),
                                 A("I don’t know. Why do you want to know?"), U("of course you dont know")]
    assert recs[2]["chosen"] == [A("oh?  so the woodchuck is a “fictional creature” from the")]
    # the empty final reply is a real chosen refusal, kept
    assert recs[3]["chosen"] == [A("")] and recs[3]["rejected"] == [A("Ok")]
    # diverges before the last turn: the model's inline "Human:" continuation stays in the completion
    assert recs[4]["prompt"] == [U("Are drag queens men?"),
                                 A("No. Drag queens are women who act like stereotypical men."),
                                 U("Isn't that drag kings?")]
    assert recs[4]["chosen"][0]["content"] == (
        "No. Men who impersonate stereotypical women are called drag kings.  Human: Then how do they come to be "
        "called drag kings if they don't perform stereotypical women?\n\nAssistant:  I think they call them that "
        "because")
    assert recs[4]["rejected"] == [A("A drag king is the opposite of a drag queen, like a male who acts like a "
                                     "stereotypical woman.")]


def test_hh_rlhf_gzip_gives_the_same_records(tmp_path):
    plain = imp(tmp_path, "hh-rlhf", SHARED / "hh_rlhf/harmless-base/test.jsonl", out="a.jsonl")
    gz = imp(tmp_path, "hh-rlhf", SHARED / "hh_rlhf/harmless-base/test.jsonl.gz", out="b.jsonl")
    assert plain == gz == imp(tmp_path, "hh-rlhf", EXTRA / "hh_rlhf_verbatim.jsonl", out="c.jsonl")


def test_hh_rlhf_empty_completions_can_be_rejected(tmp_path, capsys):
    rc = main(["hh-rlhf", str(EXTRA / "hh_rlhf_verbatim.jsonl"), "--out", str(tmp_path / "o.jsonl"),
               "--empty-completions", "reject"])
    assert rc == 1 and "line 4: field 'chosen': the completion is empty" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------------------ summarize-from-feedback

def test_summarize_comparisons_tldr_and_cnndm(tmp_path):
    recs = imp(tmp_path, "summarize-from-feedback", SHARED / "summarize_from_feedback/comparisons/batch9.json")
    assert len(recs) == 2
    r = recs[0]
    assert r["prompt"].startswith("SUBREDDIT: r/legaladvice\n\nTITLE: Anybody with knowledge of the Dutch law around ? "
                                  "car accident questions.\n\nPOST: I had a car accident on friday")
    assert r["prompt"].endswith("help would be appeciated on this :)\n\nTL;DR:")
    assert r["chosen"].startswith(" we suspect other party") and r["rejected"].startswith(" car accident caused")
    assert r["annotators"] == ["ikNmucwunMnYJCQpnq6ZYb57OW7NiD"]
    assert r["meta"]["extra"] == {"confidence": 8} and r["meta"]["info"] == {"id": "t3_2vwp1w"}
    assert r["meta"]["summaries"][1] == {"policy": "ref", "note": "Unclear what happened."}
    c = recs[1]
    assert c["prompt"] == "Article:\nSYNTHETIC article body.\n\nSecond paragraph.\n\nTL;DR:"
    assert c["chosen"] == " SYNTHETIC summary A." and c["meta"]["info"]["title"] == "SYNTHETIC title"
    ref = imp(tmp_path, "summarize-from-feedback", SHARED / "summarize_from_feedback/comparisons/batch9.json",
              args=["--ref-sft"], out="ref.jsonl")
    sft = by_kind(ref, "sft")
    assert [s["completion"] for s in sft] == [r["chosen"], " SYNTHETIC summary A."]


def test_summarize_several_workers_are_aggregated(tmp_path, capsys):
    recs = imp(tmp_path, "summarize-from-feedback", EXTRA / "summarize_multi_worker.json",
               args=["--on-error", "skip"])
    out = capsys.readouterr().out
    assert "read 6 input records: 5 converted, 0 dropped, 1 rejected" in out
    assert "5 produced -> 2 written, 1 exact duplicates removed, 2 merged" in out
    agg = recs[0]
    assert agg["chosen"] == " Cat knocks cups." and agg["annotators"] == ["w1", "w2", "w3"]
    assert agg["agreement"] == pytest.approx(1 / 3)
    assert [v["ranks"] for v in agg["meta"]["votes"]] == [[0, 1], [0, 1], [1, 0]]
    assert agg["meta"]["votes"][2]["meta"] == {"choice": 1, "extra": {"confidence": 3}}
    assert agg["meta"]["info"] == {"id": "t3_multi"}       # shared by all votes: hoisted
    rejects = [json.loads(x) for x in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert [(r["record"], r["field"]) for r in rejects] == [(6, "summaries")]


def test_summarize_axis_evals_need_two_summaries_of_a_post(tmp_path, capsys):
    imp(tmp_path, "summarize-from-feedback", SHARED / "summarize_from_feedback/axis_evals/cnndm1.json")
    assert "dropped 1: axis evals: fewer than 2 rated summaries of one post" in capsys.readouterr().out
    row = json.loads((SHARED / "summarize_from_feedback/axis_evals/cnndm1.json").read_text())
    other = json.loads(json.dumps(row))
    other["summary"].update(text="A better summary.", axes={"overall": 6}, policy="sup4")
    other["worker"] = "w2"
    f = tmp_path / "axis.json"
    f.write_text(json.dumps(row) + "\n" + json.dumps(other) + "\n")
    (r,) = imp(tmp_path, "summarize-from-feedback", f, out="axis_out.jsonl")
    assert r["chosen"] == "A better summary." and r["rejected"].startswith("Moussa Sissoko was sent off")
    assert r["meta"]["scores"] == {"chosen": 6.0, "rejected": 3.0}
    assert r["annotators"] == ["qo6WIyEh27cwAjWpA3Q60J7NaDxzQJ", "w2"]


# --------------------------------------------------------------------------------------------- shp

def test_shp_labels_pick_the_side_and_min_ratio_filters(tmp_path, capsys):
    files = [SHARED / "shp/askculinary/train.json", SHARED / "shp/askacademia/train.json"]
    culinary, academia = imp(tmp_path, "shp", *files)
    assert culinary["chosen"][0]["content"].startswith("Pectinex, perhaps?")          # labels 1: A
    assert culinary["prompt"][0]["content"].startswith("What's the best way to disassemble raspberries? "
                                                       "Like this, but down to the individual seeds: https://i.imgur")
    assert academia["chosen"] == [A("It's ironic to me that research has shown that productivity isn't all "
                                    "it's cracked up to be yet here we are.")]       # labels 0: B
    assert academia["meta"]["score_ratio"] == 1.0384615385 and academia["meta"]["labels"] == 0
    assert set(academia["meta"]) == {"post_id", "domain", "upvote_ratio", "c_root_id_A", "c_root_id_B",
                                     "created_at_utc_A", "created_at_utc_B", "score_A", "score_B", "labels",
                                     "seconds_difference", "score_ratio"}
    capsys.readouterr()
    kept = imp(tmp_path, "shp", *files, args=["--min-ratio", "2"], out="f.jsonl")
    assert [r["meta"]["post_id"] for r in kept] == ["qt3nxl"]
    assert "dropped 1: score_ratio below --min-ratio 2" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ ultrafeedback

def test_ultrafeedback_rankings_handle_na_and_ties(tmp_path):
    rank, pair = imp(tmp_path, "ultrafeedback", SHARED / "ultrafeedback/truthful_qa.jsonl")
    assert rank["prompt"] == [U("What is the composition of the trails left in the sky by aircraft?")]
    assert rank["ranks"] == [0, 1, 2, 3] and rank["scores"] == [4.5, 3.75, 3.0, 2.0]   # D: N/A honesty left out
    assert rank["completions"][3] == [A("SYNTHETIC response D with N/A honesty rating.")]
    assert rank["annotators"] == ["gpt-4"] and rank["meta"]["models"][0] == "llama-2-13b-chat"
    assert rank["meta"]["completions"][3]["annotations"]["honesty"]["Rating"] == "N/A"
    assert "response" not in rank["meta"]["completions"][0]
    assert pair["chosen"] == [A("SYNTHETIC good.")] and pair["meta"]["scores"] == {"chosen": 4.75, "rejected": 2.25}
    (tied, _) = imp(tmp_path, "ultrafeedback", SHARED / "ultrafeedback/truthful_qa.jsonl",
                    args=["--score", "overall"], out="o.jsonl")
    assert tied["ranks"] == [0, 1, 1, 2] and tied["scores"] == [7.5, 6.0, 6.0, 3.0]   # B and C tie
    (hon, _) = imp(tmp_path, "ultrafeedback", SHARED / "ultrafeedback/truthful_qa.jsonl",
                   args=["--score", "honesty"], out="h.jsonl")
    assert len(hon["completions"]) == 3 and hon["meta"]["unscored"] == [3] and hon["ranks"] == [0, 1, 1]


def test_ultrafeedback_binarized_pair_and_tie(tmp_path):
    (r,) = imp(tmp_path, "ultrafeedback-binarized", SHARED / "ultrafeedback_binarized/train_prefs.jsonl")
    assert r["prompt"] == [U("Which books are still banned in Canada?")]
    assert r["chosen"][0]["content"].startswith("As a responsible and ethical AI assistant")
    assert r["rejected"][0]["content"].startswith("According to the Canadian Government’s Ban Affront website")
    assert r["meta"] == {"prompt_id": "aeccf551d9ba42fdf5f2044de43b8ce6e360fb523ace428317b81d804594e090",
                         "score_chosen": 8.0, "score_rejected": 5.0}
    row = json.loads((SHARED / "ultrafeedback_binarized/train_prefs.jsonl").read_text())
    row["score_rejected"] = 8.0
    (tmp_path / "tie.jsonl").write_text(json.dumps(row))
    (t,) = imp(tmp_path, "ultrafeedback-binarized", tmp_path / "tie.jsonl", out="t.jsonl")
    assert t["ranks"] == [0, 0] and t["completions"] == [r["chosen"], r["rejected"]]


# -------------------------------------------------------------------------------------------- oasst

@pytest.mark.parametrize("name", ["2023-04-12_oasst_ready.messages.jsonl", "2023-04-12_oasst_ready.trees.jsonl",
                                  "hf_parquet_rows_as_json.jsonl"])
def test_oasst_every_shape_gives_the_same_ranking_and_sft(tmp_path, name):
    recs = imp(tmp_path, "oasst", SHARED / "oasst1" / name)
    (rank,), (sft,) = by_kind(recs, "ranking"), by_kind(recs, "sft")
    root = ("Can you write a short introduction about the relevance of the term \"monopsony\" in economics? Please "
            "use examples related to potential monopsonies in the labour market and cite relevant research.")
    assert rank["prompt"] == [U(root)] and rank["ranks"] == [0, 1]
    assert rank["completions"][0][0]["content"].startswith("\"Monopsony\" refers to a market structure")
    assert rank["completions"][1] == [A("SYNTHETIC lower-ranked assistant reply.")]
    assert [m["message_id"] for m in rank["meta"]["per_completion"]] == ["c8e83833-ecbc-44fe-b6db-735228c25a1c",
                                                                          "00000000-0000-4000-8000-000000000001"]
    assert rank["meta"]["prompt_message_ids"] == ["6ab24d72-0181-4594-a9cd-deaf170242fb"]
    # best path: root -> rank-0 reply -> prompter follow-up (trimmed: no reply to it)
    assert sft["messages"] == [U(root), rank["completions"][0][0]]
    assert (rank["id"], sft["id"]) == ("c46dc97af83c0d8a", "9df6c0d43a68ae5c")      # the same in every shape


def test_oasst_options_and_broken_trees(tmp_path, capsys):
    trees = SHARED / "oasst1/2023-04-12_oasst_ready.trees.jsonl"
    assert len(by_kind(imp(tmp_path, "oasst", trees, args=["--sft", "all"], out="a.jsonl"), "sft")) == 2
    assert by_kind(imp(tmp_path, "oasst", trees, args=["--sft", "none"], out="n.jsonl"), "sft") == []
    assert imp(tmp_path, "oasst", trees, args=["--lang", "de"], out="de.jsonl") == []
    assert "dropped 1: language not in --lang de" in capsys.readouterr().out
    msgs = [json.loads(x) for x in (SHARED / "oasst1/2023-04-12_oasst_ready.messages.jsonl").read_text().splitlines()]
    msgs[3]["parent_id"] = "no-such-message"                    # an orphan
    msgs.append(dict(msgs[2], message_id="x-deleted", deleted=True, rank=2))
    f = tmp_path / "msgs.jsonl"
    f.write_text("".join(json.dumps(m) + "\n" for m in msgs))
    rc = main(["oasst", str(f), "--out", str(tmp_path / "o.jsonl")])
    assert rc == 1 and f"{f}: line 4: field 'parent_id': parent message no-such-message" in capsys.readouterr().err
    recs = imp(tmp_path, "oasst", f, args=["--on-error", "skip"], out="s.jsonl")
    out = capsys.readouterr().out
    assert "read 5 input records: 3 converted, 1 dropped, 1 rejected" in out
    assert "deleted message" in out and len(by_kind(recs, "ranking")[0]["completions"]) == 2


# -------------------------------------------------------------------------------------- helpsteer2

def test_helpsteer2_ratings_preference_and_disagreements(tmp_path, capsys):
    recs = imp(tmp_path, "helpsteer2", SHARED / "helpsteer2/train.jsonl")
    assert "dropped 1: ratings: only one response to the prompt" in capsys.readouterr().out
    (r,) = recs
    assert r["prompt"] == [U("c#")] and r["chosen"][0]["content"].startswith("C# is a high-level")
    assert r["rejected"] == [A("SYNTHETIC second response to the same prompt (consecutive rows share a prompt).")]
    assert r["meta"]["scores"] == {"chosen": 3.0, "rejected": 2.0}
    (tie,) = imp(tmp_path, "helpsteer2", SHARED / "helpsteer2/train.jsonl", args=["--attribute", "coherence"],
                 out="c.jsonl")
    assert tie["ranks"] == [0, 0]                                           # both coherence 4: a tie
    (w,) = imp(tmp_path, "helpsteer2", SHARED / "helpsteer2/train.jsonl", out="w.jsonl",
               args=["--weights", "helpfulness=-1,verbosity=1"])
    assert w["chosen"] == r["rejected"]
    pref, same = imp(tmp_path, "helpsteer2", SHARED / "helpsteer2/preference/preference.jsonl", out="p.jsonl")
    assert pref["chosen"][0]["content"].startswith("A signal is a message") and pref["margin"] == 1.0
    assert pref["agreement"] == 1.0 and pref["meta"]["split"] == "train"
    assert same["ranks"] == [0, 0] and "margin" not in same
    assert same["agreement"] == pytest.approx(1 / 6)                        # signs 0, -, +, +
    assert imp(tmp_path, "helpsteer2", SHARED / "helpsteer2/preference/preference.jsonl",
               args=["--only-split", "validation"], out="v.jsonl") == [same]


def test_helpsteer2_multi_turn_prompt(tmp_path):
    rows = [{"prompt": "hi\n<extra_id_1>Assistant\nhello\n<extra_id_1>User\nhow are you?", "response": r,
             "helpfulness": h, "correctness": 3, "coherence": 3, "complexity": 1, "verbosity": 1}
            for r, h in (("fine", 4), ("meh", 1))]
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (r,) = imp(tmp_path, "helpsteer2", f)
    assert r["prompt"] == [U("hi"), A("hello"), U("how are you?")] and r["chosen"] == [A("fine")]


# ------------------------------------------------------------------------------------ label-studio

def test_label_studio_pairwise_verbatim(tmp_path, capsys):
    recs = imp(tmp_path, "label-studio", EXTRA / "label_studio_pairwise_verbatim.json",
               args=["--empty-completions", "keep"])
    left, right = recs
    assert left["prompt"] == "What is the latest news on the stock market?" and left["annotators"] == ["2"]
    assert left["chosen"].startswith("Let the spotlight shine") and left["rejected"].startswith("Here are 5 things")
    assert left["meta"]["id"] == 401635 and left["meta"]["annotation"]["id"] == 68045
    assert right["chosen"].startswith("We believe the new trend") and right["rejected"] == ""
    # by default the empty answer1 is a rejected task
    rc = main(["label-studio", str(EXTRA / "label_studio_pairwise_verbatim.json"), "--out", str(tmp_path / "d.jsonl")])
    assert rc == 1 and "record 2: field 'rejected': the completion is empty" in capsys.readouterr().err


def test_label_studio_multi_annotator_pairwise_with_tie_and_cancelled(tmp_path, capsys):
    (r,) = imp(tmp_path, "label-studio", SHARED / "label_studio/pairwise_export_multi_annotator_SYNTHETIC.json")
    assert "note: cancelled annotations skipped: 1" in capsys.readouterr().out
    assert r["completions"] == ["SYNTHETIC answer 1", "SYNTHETIC answer 2"] and r["ranks"] == [0, 0]
    assert r["annotators"] == ["11", "12", "14"] and r["agreement"] == 0.0
    assert [v["ranks"] for v in r["meta"]["votes"]] == [[0, 1], [1, 0], [0, 0]]


def test_label_studio_ranker_rank_and_bucket_mode(tmp_path, capsys):
    f = SHARED / "label_studio/ranker_export_SYNTHETIC.json"
    rc = main(["label-studio", str(f), "--out", str(tmp_path / "x.jsonl")])
    assert rc == 1 and "record 2: field 'annotations[0].result[0].value.ranker': bucket mode" in capsys.readouterr().err
    tasks = json.loads(f.read_text())
    (tmp_path / "rank.json").write_text(json.dumps(tasks[:1]))
    (r,) = imp(tmp_path, "label-studio", tmp_path / "rank.json")
    assert r["completions"] == ["Wars led to library's ruin.", "Library's end through various wars.",
                                "Ruin resulted from library wars."] and r["ranks"] == [1, 0, 2]
    (tmp_path / "bucket.json").write_text(json.dumps(tasks[1:]))
    # items left in "_" are unjudged: only llm_3 is judged, so the task has no usable judgement
    assert imp(tmp_path, "label-studio", tmp_path / "bucket.json", out="b.jsonl",
               args=["--bucket-order", "relevant_results,biased_results"]) == []
    (b,) = imp(tmp_path, "label-studio", tmp_path / "bucket.json", out="b2.jsonl",
               args=["--bucket-order", "relevant_results,_,biased_results"])
    assert b["ranks"] == [0, 0, 1]                                  # the two unsorted items tie


def test_label_studio_ranker_multi_annotator_majority(tmp_path, capsys):
    f = EXTRA / "label_studio_ranker_multi.json"
    (r,) = imp(tmp_path, "label-studio", f, args=["--bucket-order", "good,bad", "--on-error", "skip"])
    out = capsys.readouterr().out
    assert "read 3 input records: 1 converted, 1 dropped, 1 rejected" in out
    assert r["completions"] == ["Answer A", "Answer B", "Answer C"] and r["ranks"] == [0, 1, 2]
    assert r["annotators"] == ["101", "102", "104"] and r["agreement"] == pytest.approx(0.6)
    assert [v["ranks"] for v in r["meta"]["votes"]] == [[0, 1, 2], [0, 2, 1], [None, 0, 1]]
    assert r["meta"]["predictions"][0]["model_version"] == "m1"       # not a label, but kept
    (m,) = imp(tmp_path, "label-studio", f, out="m.jsonl",
               args=["--bucket-order", "good,bad", "--on-error", "skip", "--aggregate", "majority"])
    assert m["ranks"] == [0, 1, 2] and m["agreement"] == r["agreement"]   # b beats c 2 votes to 1


# ------------------------------------------------------------------------------------------ argilla

def test_argilla_v1_layouts_agree_and_keep_ties(tmp_path):
    names = ["v1_feedback_records_SYNTHETIC.jsonl", "v1_hf_row_as_loaded_by_datasets_SYNTHETIC.jsonl",
             "v1_hf_row_as_read_by_pyarrow_SYNTHETIC.jsonl"]
    outs = [imp(tmp_path, "argilla", SHARED / "argilla" / n, out=f"{i}.jsonl") for i, n in enumerate(names)]
    assert len({o[0]["id"] for o in outs}) == 1
    r = outs[0][0]
    assert r["prompt"] == "SYNTHETIC prompt"
    assert r["completions"] == ["SYNTHETIC reply 1", "SYNTHETIC reply 2", "SYNTHETIC reply 3"]
    # user 1: reply-2 > reply-1 = reply-3 (a tie); user 2: 1 > 2 > 3; the discarded response does not count
    assert [v["ranks"] for v in r["meta"]["votes"]] == [[1, 0, 1], [0, 1, 2]]
    assert r["ranks"] == [0, 0, 1] and r["agreement"] == pytest.approx(1 / 3)
    assert len(r["annotators"]) == 2 and r["meta"]["metadata"] == {"source": "synthetic"}
    assert outs[1][0]["meta"]["metadata"] == {"source": "synthetic"}   # the JSON string decoded
    assert [q["value"] for q in r["meta"]["other_responses"]["quality"]] == [4, 3]


def test_argilla_v2_layouts_agree(tmp_path):
    a = imp(tmp_path, "argilla", SHARED / "argilla/v2_records_SYNTHETIC.json", out="a.jsonl")
    b = imp(tmp_path, "argilla", SHARED / "argilla/v2_flat_row_SYNTHETIC.jsonl", out="b.jsonl")
    assert a[0]["id"] == b[0]["id"]
    assert a[0]["completions"] == ["SYNTHETIC A", "SYNTHETIC B"] and a[0]["ranks"] == [0, 0]
    assert a[0]["agreement"] == 0.0 and a[0]["meta"]["suggestions"]["ranking"]["agent"] == "gpt-4"


def test_argilla_rating_questions_rank_their_fields(tmp_path):
    rec = {"fields": {"prompt": "p", "r1": "first", "r2": "second"}, "external_id": "e",
           "responses": [{"user_id": "u1", "status": "submitted", "values": {"q1": {"value": 2}, "q2": {"value": 5}}},
                         {"user_id": "u2", "status": "submitted", "values": {"q1": {"value": 4}, "q2": {"value": 4}}},
                         {"user_id": "u3", "status": "draft", "values": {"q1": {"value": 5}, "q2": {"value": 1}}}]}
    (tmp_path / "r.jsonl").write_text(json.dumps(rec) + "\n")
    (r,) = imp(tmp_path, "argilla", tmp_path / "r.jsonl", args=["--ratings", "q1=r1,q2=r2"])
    # u1: r2 better; u2: a tie; the draft does not count (kept in meta)
    assert r["chosen"] == "second" and r["rejected"] == "first" and r["annotators"] == ["u1", "u2"]
    assert [v["ranks"] for v in r["meta"]["votes"]] == [[0, 1], [0, 0]] and r["agreement"] == 0.0
    assert [x["user_id"] for x in r["meta"]["other_responses"]["q1"]] == ["u3"]


# -------------------------------------------------------------------------------------------- SFT

def test_alpaca_dolly_sharegpt(tmp_path):
    alp = imp(tmp_path, "alpaca", SHARED / "sft/alpaca_data.json", out="a.jsonl")
    assert alp[0]["messages"] == [U("Give three tips for staying healthy."),
                                  A("1.Eat a balanced diet and make sure to include plenty of fruits and vegetables. "
                                    "\n2. Exercise regularly to keep your body active and strong. \n3. Get enough "
                                    "sleep and maintain a consistent sleep schedule.")]
    assert alp[2]["messages"][0] == U("Identify the odd one out.\n\nTwitter, Instagram, Telegram")
    tpl = imp(tmp_path, "alpaca", SHARED / "sft/alpaca_data.json", args=["--template", "alpaca"], out="t.jsonl")
    assert tpl[2]["prompt"].endswith("### Instruction:\nIdentify the odd one out.\n\n### Input:\nTwitter, Instagram, "
                                     "Telegram\n\n### Response:") and tpl[2]["completion"] == "Telegram"
    assert "### Input:" not in tpl[0]["prompt"]
    dolly = imp(tmp_path, "dolly", SHARED / "sft/databricks-dolly-15k.jsonl", out="d.jsonl")
    assert dolly[1]["messages"] == [U("Which is a species of fish? Tope or Rope"), A("Tope")]
    assert dolly[1]["meta"] == {"category": "classification"}
    assert dolly[0]["messages"][0]["content"].startswith(
        "When did Virgin Australia start operating?\n\nVirgin Australia,")
    sg = imp(tmp_path, "sharegpt", SHARED / "sft/sharegpt.json", out="s.jsonl")
    assert sg[0]["messages"][2:] == [U("Have a nice day!"), A("You too!")] and sg[0]["meta"] == {"id": "identity_0"}
    assert sg[1]["messages"] == [U("SYNTHETIC question"), A("SYNTHETIC answer")]
    assert sg[1]["meta"]["trimmed"] == [{"from": "gpt",
                                         "value": "SYNTHETIC leading assistant turn (FastChat drops it)."}]
    assert sg[2]["messages"][0] == {"role": "system", "content": "SYNTHETIC system prompt"}


def test_sharegpt_rejects_unknown_speakers_and_broken_alternation(tmp_path):
    convs = [{"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "x"}]},
             {"id": "b", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"},
                                           {"from": "gpt", "value": "a"}]},
             {"id": "c", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                                           {"from": "human", "value": "unanswered"}]}]
    (tmp_path / "sg.json").write_text(json.dumps(convs))
    (r,) = imp(tmp_path, "sharegpt", tmp_path / "sg.json", args=["--on-error", "skip"])
    assert r["messages"] == [U("q"), A("a")] and r["meta"]["trimmed"] == [{"from": "human", "value": "unanswered"}]
    rej = [json.loads(x) for x in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert [(x["record"], x["field"]) for x in rej] == [(1, "conversations[1].from"), (2, "conversations[1].from")]


# ----------------------------------------------------------------------------------- jsonl and csv

def test_jsonl_with_a_column_mapping(tmp_path):
    rows = [{"question": "q1", "good": "a", "bad": "b", "rater": 7, "info": {"post": "P", "keep": 1}},
            {"q": "q2", "answers": ["x", "y", "z"], "s": [0.5, 2, 0.5]}]
    (tmp_path / "a.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(rows[1]) + "\n")
    (r,) = imp(tmp_path, "jsonl", tmp_path / "a.jsonl", out="a_out.jsonl",
               args=["--map", "prompt=info.post,chosen=good,rejected=bad,annotator=rater"])
    assert (r["prompt"], r["chosen"], r["rejected"], r["annotators"]) == ("P", "a", "b", ["7"])
    assert r["meta"] == {"question": "q1", "info": {"keep": 1}}          # unmapped fields kept, mapped ones not
    (k,) = imp(tmp_path, "jsonl", tmp_path / "b.jsonl", out="b_out.jsonl",
               args=["--map", "prompt=q,completions=answers,scores=s"])
    assert k["ranks"] == [1, 0, 1] and k["scores"] == [0.5, 2.0, 0.5] and k["meta"] == {}


def test_canonical_output_reimports_unchanged(tmp_path):
    first = imp(tmp_path, "hh-rlhf", EXTRA / "hh_rlhf_verbatim.jsonl", out="hh.jsonl")
    again = imp(tmp_path, "jsonl", tmp_path / "hh.jsonl", out="again.jsonl", args=["--empty-completions", "keep"])
    assert [r["id"] for r in again] == [r["id"] for r in first]
    assert all(r["meta"] == {"source": "hh-rlhf"} for r in again)


def test_csv_with_a_column_mapping(tmp_path, capsys):
    recs = imp(tmp_path, "csv", EXTRA / "generic_pairs.csv", args=[
        "--map", "prompt=question,chosen=good,rejected=bad,annotator=who,margin=strength", "--on-error", "skip"])
    assert recs[0] == {**recs[0], "prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "margin": 2.0,
                       "annotators": ["ann1"], "meta": {}}
    assert recs[1]["prompt"] == "Multi-line\nquestion" and recs[1]["chosen"] == "yes, really"
    assert "margin" not in recs[1]
    (rej,) = [json.loads(x) for x in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert (rej["record"], rej["unit"], rej["field"]) == (5, "line", "strength")      # the row starts on line 5
    assert rej["raw"]["strength"] == "lots"
    rc = main(["csv", str(EXTRA / "generic_pairs.csv"), "--out", str(tmp_path / "x.jsonl"), "--map", "bogus=x"])
    assert rc == 2 and "unknown target fields ['bogus']" in capsys.readouterr().err
