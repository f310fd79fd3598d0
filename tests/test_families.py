"""The model-family matrix (tests/families.py: llama untied, qwen2 tied + GQA + biases, gpt2 tied + learned positions +
dropout; a BPE tokenizer with a ChatML template and pad == eos): exports reload exactly, an exported reward model
scores the same in plain transformers, dropout is off where two passes must agree, and every script runs on every
family with sampler and trainer agreeing."""
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import train_rm
from conftest import run_script
from families import FAMILIES, build_family, family_config, save_family
from shared import data, engine, rewards
from shared.dist import Ctx

CTX = Ctx(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
ARGS = SimpleNamespace(trust_remote_code=False, zero_stage=0, dtype="fp32", offload=False, bf16=False)
TEXTS = [("12+30=", "42", True), ("7+8=", "15 is the sum", True), ("1+1=", "3", False), ("55+5=", "", True)]


def test_exported_policy_reloads_with_identical_logits(family_dir, tmp_path):
    model = engine.load_model(str(family_dir), ARGS, CTX)
    tok = engine.load_tokenizer(str(family_dir), ARGS)
    with torch.no_grad():  # move every weight (a tied head moves with the embedding) so the export is not the input
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    engine.export_hf(model, tok, tmp_path / "export", CTX)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert again.config.tie_word_embeddings == model.config.tie_word_embeddings
    ids = torch.tensor([tok("<|im_start|>user\n12+30=<|im_end|>\n<|im_start|>assistant\n42")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, again(input_ids=ids).logits)


def reward_model_dir(name, path):
    """A reward model of family `name` as train_rm.py writes it: a 1-label classifier exported by engine.export_hf."""
    _, tok = build_family(name)
    cfg = family_config(name, len(tok), tok.eos_token_id)
    cfg.num_labels = 1
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # scores that differ visibly from token to token
    engine.export_hf(model, tok, path, CTX)
    return path


@pytest.mark.parametrize("name", FAMILIES)
def test_exported_reward_model_scores_the_same_in_transformers(name, tmp_path):
    path = reward_model_dir(name, tmp_path / "rm")
    classifier = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token_id == tok.eos_token_id == classifier.config.pad_token_id
    seqs = [data.encode_prompt(tok, p) + (data.encode_response(tok, r) if e else tok(r)["input_ids"])
            for p, r, e in TEXTS]
    with torch.no_grad():
        alone = torch.stack([classifier(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs])
        for left in (False, True):  # transformers itself on a padded batch, either side (with left padding, positions
            ids, mask = data.pad(seqs, tok.pad_token_id, left=left)  # that skip the padding: GPT-2's are learned)
            out = classifier(input_ids=ids, attention_mask=mask, position_ids=engine.position_ids(mask)).logits[:, 0]
            assert torch.allclose(out, alone, atol=1e-5), (left, out, alone)
        ours = rewards.RewardModel(str(path), ARGS, CTX)(*zip(*TEXTS))  # the RL scripts' reward
        model = engine.load_model(str(path), ARGS, CTX, kind="score")
        pairs = [{"prompt_len": len(data.encode_prompt(tok, TEXTS[i][0])), "chosen_ids": seqs[i],
                  "rejected_ids": seqs[j]} for i, j in ((0, 1), (2, 3))]
        chosen, rejected = train_rm.score_pairs(model.eval(), pairs, tok.pad_token_id, "cpu")  # train_rm's reader
    assert torch.allclose(ours, alone, atol=1e-5), (ours, alone)
    assert torch.allclose(torch.stack([chosen, rejected], 1).flatten(), alone, atol=1e-5)


def test_dropout_is_off_in_rl_and_preference_models_and_kept_in_sft(tmp_path):
    path = save_family("gpt2", tmp_path / "gpt2")
    ids = torch.tensor([list(range(5, 40))])
    off = engine.load_model(str(path), ARGS, CTX).train()
    on = engine.load_model(str(path), ARGS, CTX, dropout=True).train()
    assert torch.equal(off(input_ids=ids).logits, off(input_ids=ids).logits)  # train mode, no randomness
    assert not torch.equal(on(input_ids=ids).logits, on(input_ids=ids).logits)  # the model's own 0.1
    assert off.config.resid_pdrop == 0.1  # the config (and so an export) keeps its rates


RL = ["--steps", "2", "--prompts-per-step", "4", "--n-samples", "4", "--micro-batch-size", "8", "--max-new-tokens",
      "6", "--eval-size", "8", "--eval-every", "0"]
OFFLINE = ["--steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--eval-size", "8", "--max-new-tokens", "6"]


def first_step(out):
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_every_script_runs_on_every_family(family_dir, tmp_path):
    """SFT -> RM -> PPO-max, the critic-free scripts and DPO/KTO, a few steps each on one family. RL scripts: the
    sampler's log-probs (HF backend, fp32) are the trainer's to 1e-5 on the first step, dropout model included."""
    m = ["--model-path", family_dir]
    run_script("train_sft.py", *OFFLINE, *m, "--output-dir", tmp_path / "sft")
    run_script("train_rm.py", *OFFLINE, *m, "--output-dir", tmp_path / "rm")
    run_script("ppo_max.py", *RL, *m, "--reward-path", tmp_path / "rm", "--output-dir", tmp_path / "ppo_max")
    for name in ("grpo", "rloo", "reinforce_pp"):
        run_script(f"{name}.py", *RL, *m, "--output-dir", tmp_path / name)
    for name in ("dpo", "kto"):
        run_script(f"{name}.py", *OFFLINE, *m, "--output-dir", tmp_path / name)
    for script in ("ppo_max", "grpo", "rloo", "reinforce_pp"):
        row = first_step(tmp_path / script)
        assert row["policy/logprob_diff_max"] <= 1e-5, (script, row)  # so the first ratio is 1 up to 1e-5
    for name in ("sft", "rm", "ppo_max", "grpo", "rloo", "reinforce_pp", "dpo", "kto"):
        assert (tmp_path / name / "model.safetensors").exists() and (tmp_path / name / "summary.json").exists()


def test_a_sampler_that_drifts_from_the_trainer_stops_the_run(tmp_path):
    """--max-logprob-gap below the HF backend's float-rounding gap (~1e-7) stands in for a broken engine: the run stops
    after measuring it, with one line naming the backend and the figure, exit code 3, and no model exported."""
    out = tmp_path / "run"
    proc = run_script("rloo.py", *RL, "--max-logprob-gap", "1e-12", "--output-dir", out, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("stopped:")]
    assert proc.returncode == 3 and len(lines) == 1, proc.stderr[-2000:]
    assert "hf sampler's log-probs differ from the trainer's by" in lines[0] and "--max-logprob-gap" in lines[0]
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("script", ["rloo.py", "reinforce_pp.py"])
def test_critic_free_scripts_on_two_ranks_zero3_with_a_tied_gqa_model(script, tmp_path):
    """2 ranks under NCCL's device rule (tests/nccl_like.py), ZeRO-3, evaluations mid-run: every collective of the
    loop (evaluation sums, token counts, global whitening, the sampler-gap check) on a tied, GQA model."""
    path = save_family("qwen2", tmp_path / "qwen2")
    out = tmp_path / "run"
    run_script(script, *RL[:-2], "--eval-every", "1", "--zero-stage", "3", "--model-path", path, "--output-dir", out,
               ranks=2)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "eval/task_score" in rows[0] and rows[0]["policy/logprob_diff_max"] <= 1e-5
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
