"""train_sft.py and train_rm.py end to end, as users launch them; bad input; the no-argument learning runs."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import ROOT, run_script
from shared import engine

FAST = ["--batch-size", "8", "--micro-batch-size", "4", "--eval-size", "16", "--steps", "3"]


@pytest.mark.parametrize("ranks", [0, 2])
def test_sft_then_rm_run_and_their_outputs_reload(tmp_path, ranks):
    sft, rm = tmp_path / "sft", tmp_path / "rm"
    # 2 ranks: ZeRO-3 (every forward is collective) and 17 held-out examples, so the ranks hold 9 and 8 of them: 3 and
    # 2 micro-batches of 4, and the evaluations must still make the same calls on both
    flags = FAST[:4] + ["--eval-size", "17", "--steps", "3", "--zero-stage", "3"] if ranks else FAST
    run_script("train_sft.py", *flags, "--output-dir", sft, ranks=ranks)
    run_script("train_rm.py", *flags, "--model-path", sft, "--output-dir", rm, "--stats-examples", "17", ranks=ranks)
    summary = json.loads((sft / "summary.json").read_text())
    assert summary["world_size"] == max(ranks, 1) and 0 <= summary["after"]["eval/task_score"] <= 1
    assert len((sft / "metrics.jsonl").read_text().splitlines()) == 3
    tok = AutoTokenizer.from_pretrained(sft)
    policy = AutoModelForCausalLM.from_pretrained(sft)
    ids = torch.tensor([tok("12+30=")["input_ids"]])
    assert policy.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]
    # the reward model loads as a standard sequence classifier and scores like our reader (engine.score_index)
    classifier = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1).eval()
    assert {"reward_mean", "reward_std"} <= set(classifier.config.to_dict())
    texts = ["12+30=42<eos>", "1+1=3<eos>", "7+8=15"]  # different lengths: right padding in one batch
    ids = [tok(t)["input_ids"] for t in texts]
    from shared.data import pad

    batch, mask = pad(ids, tok.pad_token_id)
    with torch.no_grad():
        hf_scores = classifier(input_ids=batch, attention_mask=mask).logits.squeeze(-1)
        at = engine.score_index(batch, mask, tok.pad_token_id)
        ours = engine.token_scores(classifier, batch, mask).gather(1, at[:, None]).squeeze(1)
        single = torch.stack([classifier(input_ids=torch.tensor([i])).logits[0, 0] for i in ids])
    assert torch.allclose(hf_scores, single, atol=1e-5) and torch.allclose(ours, single, atol=1e-5)
    # train_rm's pair scoring (prompt computed once per pair, cache shared) == the classifier on each sequence alone
    import train_rm

    rows = [("12+30=", "42<eos>", "4<eos>"), ("1+1=", "2<eos>", "11<eos>"), ("7+85=", "92", "29<eos>")]
    pairs = [{"prompt_len": len(tok(p)["input_ids"]), "chosen_ids": tok(p + c)["input_ids"],
              "rejected_ids": tok(p + r)["input_ids"]} for p, c, r in rows]
    with torch.no_grad():
        chosen, rejected = train_rm.score_pairs(classifier, pairs, tok.pad_token_id, "cpu")
        alone = [[classifier(input_ids=torch.tensor([p[k]])).logits[0, 0] for p in pairs]
                 for k in ("chosen_ids", "rejected_ids")]
    assert torch.allclose(chosen, torch.stack(alone[0]), atol=1e-5)
    assert torch.allclose(rejected, torch.stack(alone[1]), atol=1e-5)


def bad_run(tmp_path, *args, script="train_sft.py"):
    out = tmp_path / "out"
    proc = run_script(script, *FAST, "--output-dir", out, *args, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert not out.exists(), "a refused run must write nothing"
    return lines[0]


def test_bad_input_gives_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "notamodel").mkdir()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2=", "response": 4}\n')
    assert "does not exist" in bad_run(tmp_path, "--model-path", tmp_path / "missing")
    assert "not a model directory" in bad_run(tmp_path, "--model-path", tmp_path / "notamodel")
    assert "does not exist" in bad_run(tmp_path, "--dataset", tmp_path / "missing.jsonl")
    assert "available columns" in bad_run(tmp_path, "--dataset", rows, "--response-column", "answer")
    assert "row 1, column 'response'" in bad_run(tmp_path, "--dataset", rows)
    assert "no train examples left" in bad_run(tmp_path, "--max-len", "3", "--overlong", "skip")
    assert "unknown built-in task" in bad_run(tmp_path, "--dataset", "additon")
    assert "must be a positive multiple" in bad_run(tmp_path, "--micro-batch-size", "3")


def test_output_dir_of_another_run_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    run_script("train_sft.py", *FAST, "--output-dir", out)
    first = (out / "model.safetensors").read_bytes()
    proc = run_script("train_sft.py", *FAST, "--output-dir", out, "--seed", "5", check=False)
    assert proc.returncode == 2 and "already holds files" in proc.stderr
    assert (out / "model.safetensors").read_bytes() == first  # untouched
    run_script("train_sft.py", *FAST, "--output-dir", out, "--seed", "5", "--overwrite")
    assert (out / "model.safetensors").read_bytes() != first
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    proc = run_script("train_sft.py", *FAST, "--output-dir", foreign, "--overwrite", check=False)
    assert proc.returncode == 2 and (foreign / "cat.jpg").exists()


def test_default_sft_run_is_better_than_chance_but_far_from_perfect(tmp_path):
    run_script("train_sft.py", cwd=tmp_path)
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["before"]["eval/task_score"] < 0.02  # an untrained model does not add
    assert 0.15 <= summary["after"]["eval/task_score"] <= 0.7


def test_default_rm_run_reaches_90_percent_pair_accuracy(tmp_path):
    run_script("train_rm.py", cwd=tmp_path)
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["eval/pair_accuracy"] >= 0.9
    assert summary["before"]["eval/pair_accuracy"] < 0.75
