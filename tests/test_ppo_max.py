"""PPO-max math against independent computations, the presets, critic warmup, end to end, and the learning run."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script
from ppo_max import (PRESETS, Args, RunningMoments, gae, normalise_scores, policy_loss, resolve_preset, shaped_rewards,
                     value_loss, whiten)
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
    assert abs(policy_loss(logp, old, adv, mask, 0.2).item() - sum(per_token) / 3) < 1e-6


def test_value_loss_clipped_and_unclipped():
    values, old, returns = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[2.0, -1.0, 0.0]])
    mask = torch.ones(1, 3)
    clipped = [o + max(-0.2, min(0.2, v - o)) for v, o in zip([1.0, 0.0, 2.0], [0.5, 0.5, 0.0])]
    want = [0.5 * max((v - r) ** 2, (c - r) ** 2) for v, c, r in zip([1.0, 0.0, 2.0], clipped, [2.0, -1.0, 0.0])]
    assert abs(value_loss(values, old, returns, mask, 0.2).item() - sum(want) / 3) < 1e-6
    plain = [0.5 * (v - r) ** 2 for v, r in zip([1.0, 0.0, 2.0], [2.0, -1.0, 0.0])]
    assert abs(value_loss(values, old, returns, mask, 0.0).item() - sum(plain) / 3) < 1e-6


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
    before, after = summary["before"]["eval/accuracy"], summary["after"]["eval/accuracy"]
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
        "    return [float('nan') if calls >= 3 else 1.0 for _ in responses]\n")  # eval, step 1, then NaN at step 2
    out = tmp_path / "run"
    proc = run_script("ppo_max.py", *FAST, "--steps", "3", "--save-every", "1", "--reward-path", "", "--reward-fn",
                      "nanreward:score", "--critic-init", "policy", "--output-dir", out, check=False, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "stopped: non-finite reward at step 2" in proc.stderr
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1
    assert (out / "step_1" / "model.safetensors").exists() and not (out / "checkpoint.tmp").exists()
