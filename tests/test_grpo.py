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


def test_k3_has_no_clamp_value_and_gradient_beyond_10():
    d = torch.tensor([-25.0, -15.0, -10.5, 10.5, 15.0, 25.0], dtype=torch.float64)  # d = ref - logp
    logp64 = torch.full_like(d, -3.0, requires_grad=True)
    expected = torch.exp(d - 3.0 - logp64) - (d - 3.0 - logp64) - 1  # exp(d) - d - 1, written out
    expected.sum().backward()
    logp = torch.full((6,), -3.0, requires_grad=True)
    k3 = k3_kl(logp, (d - 3.0).float())
    k3.sum().backward()
    assert torch.allclose(k3.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(logp.grad.double(), logp64.grad, rtol=1e-5, atol=1e-5)  # 1 - exp(d): not 0 past |d| = 10


SPY = """import runpy, sys, torch
sys.path.insert(0, {root!r})
from shared import rollout
plain, rows = rollout.response_logprobs, []
def spy(model, input_ids, *a, **k):
    if not torch.is_grad_enabled():  # reference (and old-policy) forwards
        rows.append(len(input_ids))
    return plain(model, input_ids, *a, **k)
rollout.response_logprobs = spy
sys.argv[0] = {script!r}
try:
    runpy.run_path({script!r}, run_name="__main__")
finally:
    print("no-grad forward rows:", rows)
"""


def test_reference_logprobs_are_micro_batched(tmp_path):
    from conftest import ROOT

    spy = tmp_path / "spy.py"
    spy.write_text(SPY.format(root=str(ROOT), script=str(ROOT / "grpo.py")))
    proc = run_script(spy, "--steps", "1", "--prompts-per-step", "4", "--n-samples", "4", "--micro-batch-size", "4",
                      "--max-new-tokens", "4", "--eval-size", "8", "--output-dir", tmp_path / "run")
    rows = json.loads(proc.stdout.strip().splitlines()[-1].split(":", 1)[1])
    assert rows == [4] * 4  # 16 rollout rows: four reference forwards of 4, none of 16


REWARD = """def score(prompts, responses, **extras):  # spread only for some prompts: dynamic sampling drops the others
    return [float(sum(map(ord, r)) % 7) if sum(map(ord, p)) % 2 else 1.0 for p, r in zip(prompts, responses)]
"""


@pytest.mark.parametrize("ranks", [0, 2])
def test_dynamic_sampling_keeps_the_batch_size_when_tries_run_out(tmp_path, tiny_model_dir, ranks):
    (tmp_path / "half_flat.py").write_text(REWARD)
    out = tmp_path / "run"
    run_script("grpo.py", "--model-path", tiny_model_dir, "--reward-fn", "half_flat:score", "--steps", "3",
               "--prompts-per-step", "4", "--n-samples", "4", "--micro-batch-size", "4", "--max-new-tokens", "4",
               "--eval-size", "8", "--dynamic-sampling", "--max-sample-tries", "1",
               *(["--zero-stage", "3"] if ranks else []), "--output-dir", out, ranks=ranks, cwd=tmp_path, timeout=300)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/optimizer_steps"] for r in rows] == [1, 2, 3]  # steps x ppo_epochs x num_minibatches
    assert sum(r["rollout/topped_up_groups"] for r in rows) > 0  # the tries did run out with groups missing
