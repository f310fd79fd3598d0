"""GRPO math against independent computations; dynamic sampling and the no-argument learning run."""
import json
import math
import statistics

import pytest
import torch

from conftest import run_script
from grpo import aggregate, clipped_surrogate, group_advantages, k3_kl


def test_group_advantages_match_a_per_group_loop():
    torch.manual_seed(0)
    scores, n = torch.randn(12), 4
    adv = group_advantages(scores, n, eps=1e-4)
    plain = group_advantages(scores, n, std_normalize=False)  # Dr. GRPO: no std division
    for g in range(3):
        group = scores[g * n: (g + 1) * n].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)
        for j, s in enumerate(group):
            assert abs(adv[g * n + j].item() - (s - mean) / (std + 1e-4)) < 1e-5
            assert abs(plain[g * n + j].item() - (s - mean)) < 1e-6


def test_equal_rewards_give_zero_advantage():
    assert torch.equal(group_advantages(torch.ones(8), 4), torch.zeros(8))


def test_k3_matches_definition_and_is_non_negative():
    torch.manual_seed(1)
    logp, ref = torch.randn(50) - 2, torch.randn(50) - 2
    k3 = k3_kl(logp, ref)
    for a, b, k in zip(logp.tolist(), ref.tolist(), k3.tolist()):
        assert abs(k - (math.exp(b - a) - (b - a) - 1)) < 1e-5
    assert (k3 >= 0).all() and k3_kl(logp, logp).abs().max() == 0


def test_clipped_surrogate_branches():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.5]))  # ratios
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    expected = [-min(1.5, 1.2), -min(0.5, 0.8), -min(-1.1, -1.1), -min(-0.5, -0.8)]
    got = clipped_surrogate(logp, old, adv, 0.2, 0.2)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    high = clipped_surrogate(logp, old, adv, 0.2, 0.28)  # clip-higher: ratio 1.5 now clipped at 1.28
    assert abs(high[0].item() + 1.28) < 1e-6


def test_loss_aggregation_modes_on_ragged_lengths():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    seq = aggregate(x, mask, "seq-mean", 4, n_seqs=2, n_tokens=5)
    tok = aggregate(x, mask, "token-mean", 4, n_seqs=2, n_tokens=5)
    dr = aggregate(x, mask, "dr-grpo", 4, n_seqs=2, n_tokens=5)
    assert abs(seq.item() - (2.5 + 10) / 2) < 1e-6  # each sequence weighs the same
    assert abs(tok.item() - 20 / 5) < 1e-6  # each token weighs the same
    assert abs(dr.item() - 20 / (2 * 4)) < 1e-6  # constant normaliser: no length bias
    # micro-batch shares add up to the whole-batch value
    halves = sum(aggregate(x[i: i + 1], mask[i: i + 1], "token-mean", 4, 2, 5) for i in range(2))
    assert abs(halves.item() - tok.item()) < 1e-6


def test_dynamic_sampling_keeps_only_groups_with_spread(tmp_path):
    out = tmp_path / "run"
    run_script("grpo.py", "--steps", "2", "--prompts-per-step", "4", "--n-samples", "4", "--micro-batch-size", "16",
               "--eval-size", "8", "--dynamic-sampling", "--max-sample-tries", "3", "--output-dir", out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:  # every kept group had spread, so the mean |advantage| batch has reward std > 0
        assert r["rollout/reward_std"] > 0
        assert r["rollout/resampled_groups"] <= 3 * 4


@pytest.mark.parametrize("ranks", [0, 2])
def test_grpo_runs_end_to_end(tmp_path, ranks):
    out = tmp_path / "run"
    run_script("grpo.py", "--steps", "2", "--prompts-per-step", "4", "--n-samples", "4", "--micro-batch-size", "8",
               "--eval-size", "8", "--output-dir", out, ranks=ranks)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == max(ranks, 1) and (out / "model.safetensors").exists()


def test_bad_rollout_flags_write_nothing(tmp_path):
    out = tmp_path / "run"
    proc = run_script("grpo.py", "--rollout-backend", "vlm", "--output-dir", out, check=False)
    assert proc.returncode == 2 and "--rollout-backend must be auto, vllm or hf" in proc.stderr
    assert not out.exists()


def test_tis_weights_are_truncated_ratios_and_off_by_default():
    from grpo import tis_weights

    old, sampler = torch.log(torch.tensor([0.5, 0.2, 0.9])), torch.log(torch.tensor([0.25, 0.4, 0.1]))
    assert torch.allclose(tis_weights(old, sampler, 3.0), torch.tensor([2.0, 0.5, 3.0]))  # 9.0 truncated at 3
    assert torch.equal(tis_weights(old, sampler, 0.0), torch.ones(3))


@pytest.mark.parametrize("script", ["grpo.py", "ppo_max.py"])
def test_tis_runs(tmp_path, script):
    out = tmp_path / "run"
    run_script(script, "--steps", "1", "--prompts-per-step", "4", "--n-samples", "4", "--micro-batch-size", "8",
               "--eval-size", "8", "--tis-cap", "2", "--output-dir", out)
    assert (out / "model.safetensors").exists()
