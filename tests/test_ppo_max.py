"""PPO-max math against independent computations, the presets, critic warmup, end to end, and the learning run."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script
from ppo_max import (PRESETS, Args, RunningMoments, gae, normalise_scores, policy_loss, ptx_tokens, resolve_preset,
                     sft_nll, shaped_rewards, tokenizer_mismatch, value_loss, whiten)
from shared import engine
from shared.rollout import response_mask_from


def test_gae_matches_a_double_loop_on_ragged_masks():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    lengths = [6, 3, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in lengths])
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values * mask, mask, gamma, lam)
    for b, n in enumerate(lengths):
        r, v = rewards[b].tolist(), values[b].tolist()
        for t in range(6):
            if t >= n:
                assert adv[b, t] == 0 and ret[b, t] == 0
                continue
            want = 0.0
            for k in range(t, n):  # A_t = sum_k (gamma lam)^(k-t) delta_k, V after the last token = 0
                next_v = v[k + 1] if k + 1 < n else 0.0
                want += (gamma * lam) ** (k - t) * (r[k] + gamma * next_v - v[k])
            assert abs(adv[b, t].item() - want) < 1e-5
            assert abs(ret[b, t].item() - (want + v[t])) < 1e-5  # returns = advantages + values


def test_policy_loss_clipped_branches():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    per_token = [-min(1.5 * 1, 1.2 * 1), -min(0.5 * 1, 0.8 * 1), -min(1.1 * -1, 1.1 * -1)]
    assert abs(policy_loss(logp, old, adv, mask, 0.2, 0.2).item() - sum(per_token) / 3) < 1e-6


def test_policy_loss_clips_below_at_eps_low_and_above_at_eps_high():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.25, 0.85]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    eps_low, eps_high = 0.1, 0.3  # the ratio is clipped to [0.9, 1.3]
    per_token = [-min(1.5, 1.3), -min(-0.5, -0.9), -min(1.25, 1.25), -min(-0.85, -0.9)]
    got = policy_loss(logp, old, adv, mask, eps_low, eps_high).item()
    assert abs(got - sum(per_token) / 4) < 1e-6


def test_value_loss_clipped_and_unclipped():
    values, old, returns = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[2.0, -1.0, 0.0]])
    mask = torch.ones(1, 3)
    clipped = [o + max(-0.2, min(0.2, v - o)) for v, o in zip([1.0, 0.0, 2.0], [0.5, 0.5, 0.0])]
    want = [0.5 * max((v - r) ** 2, (c - r) ** 2) for v, c, r in zip([1.0, 0.0, 2.0], clipped, [2.0, -1.0, 0.0])]
    assert abs(value_loss(values, old, returns, mask, 0.2).item() - sum(want) / 3) < 1e-6
    plain = [0.5 * (v - r) ** 2 for v, r in zip([1.0, 0.0, 2.0], [2.0, -1.0, 0.0])]
    assert abs(value_loss(values, old, returns, mask, 0.0).item() - sum(plain) / 3) < 1e-6


MICRO_SPLITS = [[[0, 1, 2, 3, 4, 5]], [[0], [1, 2, 3, 4, 5]], [[0, 1, 2], [3, 4, 5]], [[5, 3], [0], [4, 1, 2]],
                [[0, 5], [1, 2, 3, 4]]]


def test_micro_batch_shares_add_up_to_the_minibatch_token_mean():
    """policy_loss / value_loss / sft_nll with the minibatch's token count: the shares of any split into micro-batches
    (of different token counts) add up to the token mean over the whole minibatch, in value and in gradient; each
    micro-batch's own mean, averaged over micro-batches (the old aggregation), does not."""
    torch.manual_seed(0)
    lengths = [1, 5, 3, 2, 4, 1]  # ragged: micro-batches of one split hold different token counts
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    logp0, old, adv = torch.randn(6, 5) * 0.3 - 1, torch.randn(6, 5) * 0.3 - 1, torch.randn(6, 5)
    val0, old_v, ret = torch.randn(6, 5), torch.randn(6, 5), torch.randn(6, 5)
    eps, clip = 0.2, 0.2
    # independent per-token losses, in Python floats, over the valid tokens only
    pg_tok, v_tok = [], []
    for b, n in enumerate(lengths):
        for t in range(n):
            rho = math.exp(logp0[b, t].item() - old[b, t].item())
            a = adv[b, t].item()
            pg_tok.append(-min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a))
            v, o, r = val0[b, t].item(), old_v[b, t].item(), ret[b, t].item()
            v_clip = o + min(max(v - o, -clip), clip)
            v_tok.append(0.5 * max((v - r) ** 2, (v_clip - r) ** 2))
    want_pg, want_v, n_tokens = sum(pg_tok) / len(pg_tok), sum(v_tok) / len(v_tok), sum(lengths)

    def full_grads():  # gradients of the token means written out here, on the whole minibatch at once
        logp, val = logp0.clone().requires_grad_(), val0.clone().requires_grad_()
        rho = torch.exp(logp - old)
        pg = (-torch.min(rho * adv, rho.clamp(1 - eps, 1 + eps) * adv) * mask).sum() / mask.sum()
        vc = old_v + (val - old_v).clamp(-clip, clip)
        v = (0.5 * torch.max((val - ret) ** 2, (vc - ret) ** 2) * mask).sum() / mask.sum()
        (pg + v).backward()
        return logp.grad, val.grad

    want_logp_grad, want_val_grad = full_grads()
    old_style = []
    for split in MICRO_SPLITS:
        logp, val = logp0.clone().requires_grad_(), val0.clone().requires_grad_()
        pg = sum(policy_loss(logp[i], old[i], adv[i], mask[i], eps, eps, n_tokens) for i in split)
        v = sum(value_loss(val[i], old_v[i], ret[i], mask[i], clip, n_tokens) for i in split)
        assert abs(pg.item() - want_pg) < 1e-5 and abs(v.item() - want_v) < 1e-5, split
        (pg + v).backward()
        assert torch.allclose(logp.grad, want_logp_grad, atol=1e-6) and torch.allclose(val.grad, want_val_grad,
                                                                                       atol=1e-6), split
        own_means = [policy_loss(logp0[i], old[i], adv[i], mask[i], eps, eps).item() for i in split]
        old_style.append(sum(own_means) / len(split))
    assert abs(old_style[0] - want_pg) < 1e-5  # one micro-batch: its own mean is the minibatch mean
    assert all(abs(o - want_pg) > 1e-3 for o in old_style[1:])  # the splits above do tell the two apart
    # the brief's example: micro-batch A, 1 token with loss 1; B, 3 tokens with loss 0 -> 1/4, not (1 + 0) / 2
    a = value_loss(torch.tensor([[2 ** 0.5, 0, 0]]), torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[1.0, 0, 0]]),
                   0.0, 4)
    b = value_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3), 0.0, 4)
    assert abs((a + b).item() - 0.25) < 1e-6

    # PPO-ptx: the NLL over the ptx tokens of all of a minibatch's ptx batches (token 0 of a row predicts nothing)
    vocab = 7
    ids = torch.randint(0, vocab, (6, 5))
    rmask = torch.tensor([[0, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1], [0, 1, 1, 1, 1],
                          [0, 0, 1, 0, 0]], dtype=torch.bool)
    logits = torch.randn(6, 5, vocab)
    nll = [-(logits[b, t - 1].log_softmax(-1)[ids[b, t]].item()) for b in range(6) for t in range(1, 5) if rmask[b, t]]
    want_ptx, ptx_total = sum(nll) / len(nll), len(nll)
    for split in MICRO_SPLITS:
        assert sum(ptx_tokens(rmask[i]).item() for i in split) == ptx_total
        logprobs = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        got = sum(sft_nll(logprobs[i], rmask[i], ptx_total) for i in split)
        assert abs(got.item() - want_ptx) < 1e-5, split


def test_whitening_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    vals = np.array([1.0, 2.0, 3.0])
    w = whiten(x, mask)
    assert torch.allclose(w[mask.bool()], torch.tensor((vals - vals.mean()) / vals.std(), dtype=torch.float32), atol=1e-5)
    assert (w[~mask.bool()] == 0).all()


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_score_lands_on_the_last_real_token_and_kl_on_every_response_token(pad_is_eos):
    eos, pad = 1, (1 if pad_is_eos else 0)
    responses = torch.tensor([[5, 6, eos, pad, pad], [5, eos, pad, pad, pad], [5, 6, 7, 8, 9]])  # row 2: truncated
    mask = response_mask_from(responses, eos).float()
    logp, ref = torch.full((3, 5), -1.0), torch.full((3, 5), -1.5)
    r = shaped_rewards(torch.tensor([2.0, 3.0, 4.0]), logp, ref, mask, kl_coef=0.1)
    last = {0: 2, 1: 1, 2: 4}  # the EOS, the EOS, the last token of the truncated row
    for b in range(3):
        for t in range(5):
            want = (-0.1 * 0.5 if mask[b, t] else 0.0) + ([2.0, 3.0, 4.0][b] if t == last[b] else 0.0)
            assert abs(r[b, t].item() - want) < 1e-6


def test_running_moments_match_numpy_over_the_stream():
    rng = np.random.default_rng(0)
    stream, moments = [], RunningMoments()
    for size in [5, 1, 17, 8]:
        batch = rng.normal(3.0, 2.0, size)
        stream.extend(batch)
        moments.update(torch.tensor(batch))
        assert abs(moments.mean - np.mean(stream)) < 1e-9 and abs(moments.std - np.std(stream)) < 1e-9
    s = torch.tensor([0.0, 10.0])
    assert torch.allclose(normalise_scores(s, moments, "normalize", 0.0), (s - np.mean(stream)) / np.std(stream))
    assert torch.allclose(normalise_scores(s, moments, "scale", 0.0), s / np.std(stream))
    assert normalise_scores(torch.tensor([1e6]), moments, "normalize", 5.0).item() == 5.0


def test_vanilla_preset_switches_every_trick_off_and_flags_override():
    vanilla = resolve_preset(Args(preset="vanilla"))
    assert vanilla.reward_norm == "none" and vanilla.reward_clip == 0 and vanilla.whiten_advantages is False
    assert vanilla.value_clip == 0 and vanilla.critic_init == "policy" and vanilla.critic_warmup_steps == 0
    assert vanilla.ptx_coef == 0 and vanilla.global_grad_clip == 0 and vanilla.max_grad_norm == 0
    assert set(PRESETS["vanilla"]) == set(PRESETS["ppo-max"])
    for name, value in PRESETS["ppo-max"].items():
        assert getattr(vanilla, name) != value, f"vanilla leaves {name} on"
    assert resolve_preset(Args(preset="vanilla", value_clip=0.3)).value_clip == 0.3


FAST = ["--prompts-per-step", "4", "--n-samples", "2", "--micro-batch-size", "4", "--num-minibatches", "2",
        "--eval-size", "8"]


def test_critic_warmup_leaves_the_policy_bit_identical(tmp_path):
    run_script("ppo_max.py", *FAST, "--steps", "2", "--critic-warmup-steps", "2", "--output-dir", tmp_path / "r",
               "--save-critic")
    start, end = load_file(f"{engine.DEFAULT_SFT}/model.safetensors"), load_file(tmp_path / "r" / "model.safetensors")
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)
    critic0, critic1 = load_file(f"{engine.DEFAULT_RM}/model.safetensors"), load_file(tmp_path / "r/critic/model.safetensors")
    assert not all(torch.equal(critic0[k], critic1[k]) for k in critic0)  # while the critic learned
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/policy_updated"] for r in rows] == [0.0, 0.0]


@pytest.mark.parametrize("ranks,extra", [(0, ["--preset", "vanilla"]), (2, ["--zero-stage", "3", "--prompts-per-step", "8"])])
def test_runs_end_to_end(tmp_path, ranks, extra):
    out = tmp_path / "run"
    run_script("ppo_max.py", *FAST, "--steps", "2", "--critic-warmup-steps", "1", "--output-dir", out, *extra,
               ranks=ranks)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == max(ranks, 1) and (out / "model.safetensors").exists()
    resolved = json.loads((out / "args.json").read_text())
    assert resolved["reward_norm"] == ("none" if "vanilla" in extra else "normalize")


def test_no_argument_run_raises_heldout_accuracy_by_15_points(tmp_path):
    run_script("ppo_max.py", cwd=tmp_path)
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["before"]["eval/task_score"], summary["after"]["eval/task_score"]
    assert after >= before + 0.15 or after >= 0.8, (before, after)


def test_resume_is_bit_identical(tmp_path):
    common = [*FAST, "--steps", "4", "--critic-warmup-steps", "1", "--save-critic"]
    run_script("ppo_max.py", *common, "--output-dir", tmp_path / "straight")
    run_script("ppo_max.py", *common, "--output-dir", tmp_path / "split", "--stop-after", "2")
    run_script("ppo_max.py", *common, "--output-dir", tmp_path / "split", "--resume")
    for sub in ["", "critic/"]:
        a = load_file(tmp_path / "straight" / sub / "model.safetensors")
        b = load_file(tmp_path / "split" / sub / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), sub


def test_nan_reward_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    (tmp_path / "nanreward.py").write_text(
        "calls = 0\n"
        "def score(prompts, responses, **_):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    return [float('nan') if calls >= 4 else 1.0 for _ in responses]\n")  # trial call, eval, step 1, NaN at step 2
    out = tmp_path / "run"
    proc = run_script("ppo_max.py", *FAST, "--steps", "3", "--save-every", "1", "--reward-path", "", "--reward-fn",
                      "nanreward:score", "--critic-init", "policy", "--output-dir", out, check=False, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "stopped: non-finite reward at step 2" in proc.stderr
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1
    assert (out / "step_1" / "model.safetensors").exists() and not (out / "checkpoint.tmp").exists()


def test_micro_batch_size_does_not_change_the_update(tmp_path):
    """One step (2 epochs x 2 minibatches of 4 sequences, PPO-ptx on) with the minibatch in one micro-batch and in
    micro-batches of 1 sequence (different token counts): the same policy and critic up to float summation order, and
    the same logged losses (each a minibatch token mean)."""
    common = [*FAST, "--steps", "1", "--critic-warmup-steps", "0", "--save-critic", "--rollout-backend", "hf",
              "--dtype", "fp32"]
    runs = {}
    for micro in ("4", "1"):
        out = tmp_path / f"micro{micro}"
        run_script("ppo_max.py", *common, "--micro-batch-size", micro, "--output-dir", out)
        runs[micro] = out
    assert json.loads((runs["4"] / "args.json").read_text())["ptx_coef"] > 0
    for sub, start in [("", engine.DEFAULT_SFT), ("critic/", engine.DEFAULT_RM)]:
        a, b = (load_file(runs[m] / sub / "model.safetensors") for m in ("4", "1"))
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 1e-5, (sub, worst)
        start = load_file(f"{start}/model.safetensors")
        assert max((a[k] - start[k]).abs().max().item() for k in start) > 5e-5, sub  # it did learn (4 Adam steps)
    rows = {m: json.loads((runs[m] / "metrics.jsonl").read_text().splitlines()[0]) for m in runs}
    for name in ("loss/policy", "loss/value", "loss/ptx"):
        assert abs(rows["4"][name] - rows["1"][name]) < 1e-5 * max(1.0, abs(rows["4"][name])), name


def save_bpe_reward_model(path):
    """A reward model over the BPE vocabulary of tests/families.py (the policy uses the default char tokenizer)."""
    from families import chatml_tokenizer, family_config
    from transformers import AutoModelForSequenceClassification

    tok = chatml_tokenizer()
    config = family_config("llama", len(tok), tok.eos_token_id)
    config.num_labels = 1
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_tokenizer_mismatch_compares_vocabulary_and_eos():
    from families import chatml_tokenizer
    from transformers import AutoTokenizer

    char, bpe = AutoTokenizer.from_pretrained(engine.TOKENIZER), chatml_tokenizer()
    assert tokenizer_mismatch(char, AutoTokenizer.from_pretrained(engine.TOKENIZER)) is None
    assert "vocabular" in tokenizer_mismatch(char, bpe)
    other_eos = chatml_tokenizer()
    other_eos.eos_token = "<|endoftext|>"
    assert "EOS" in tokenizer_mismatch(bpe, other_eos)


def test_critic_from_a_reward_model_with_another_vocabulary_is_refused(tmp_path):
    rm = save_bpe_reward_model(tmp_path / "bpe_rm")
    for flags in (["--reward-path", rm], ["--critic-init", "policy", "--critic-path", rm]):
        out = tmp_path / "out"
        proc = run_script("ppo_max.py", *FAST, "--steps", "1", *flags, "--output-dir", out, check=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
        assert "tokenizer" in errors[0] and "--critic-init policy" in errors[0] and flags[-2] in errors[0], errors
        assert not out.exists(), "a refused run must write nothing"
    # the reward itself re-tokenizes text with the RM's tokenizer: a critic from the policy is fine
    out = tmp_path / "policy_critic"
    run_script("ppo_max.py", *FAST, "--steps", "1", "--critic-warmup-steps", "0", "--reward-path", rm,
               "--critic-init", "policy", "--output-dir", out)
    assert (out / "model.safetensors").exists()
