"""RLOO and REINFORCE++ math against independent computations, remote rewards against a real HTTP server, global
batch statistics over 2 ranks, and each critic-free script end to end with its no-argument learning run."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from conftest import ROOT, run_script
from reinforce_pp import discounted_returns, global_whiten, group_baseline, token_rewards
from rloo import kl_rewards, reinforce_loss, rloo_advantages
from shared.dist import UserError
from shared.rewards import RemoteReward


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    torch.manual_seed(0)
    scores, k = torch.randn(12), 4
    adv = rloo_advantages(scores, k)
    for i in range(12):
        g = i // k
        others = [scores[j].item() for j in range(g * k, (g + 1) * k) if j != i]
        assert abs(adv[i].item() - (scores[i].item() - sum(others) / len(others))) < 1e-5


def test_rloo_sequence_and_per_token_kl():
    scores = torch.tensor([1.0, 0.0])
    logp, ref = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]]), torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    seq, none = kl_rewards(scores, logp, ref, mask, 0.1, per_token=False)
    assert none is None and torch.allclose(seq, torch.tensor([1.0 - 0.1 * (0.5 - 1.0), 0.0 - 0.1 * 1.0]))
    same, to_go = kl_rewards(scores, logp, ref, mask, 0.1, per_token=True)
    assert torch.equal(same, scores)
    assert torch.allclose(to_go, 0.1 * torch.tensor([[-0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))


def test_reinforce_loss_is_advantage_times_sequence_logprob():
    logp = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    expected = -((2.0 * (-3.0)) + (-1.0 * (-1.5))) / 2
    assert abs(reinforce_loss(logp, torch.tensor([2.0, -1.0]), mask).item() - expected) < 1e-6


def test_token_rewards_returns_and_whitening():
    scores = torch.tensor([1.0, -1.0])
    logp, ref = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, -1.0]]), torch.tensor([[-2.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # row 0 ends at t=1, row 1 truncated at t=2
    r = token_rewards(scores, logp, ref, mask, kl_coef=0.5)
    expected_r = [[-0.5, 1.0, 0.0], [0.0, 0.5, -1.0]]
    assert torch.allclose(r, torch.tensor(expected_r))
    gamma = 0.9
    g = discounted_returns(r, mask, gamma)
    for b in range(2):
        n = int(mask[b].sum())
        for t in range(3):
            want = sum(gamma ** (k - t) * expected_r[b][k] for k in range(t, n)) if t < n else 0.0
            assert abs(g[b, t].item() - want) < 1e-6
    w = global_whiten(g, mask)
    vals = [g[b, t].item() for b in range(2) for t in range(3) if mask[b, t]]
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
    assert abs(w[0, 0].item() - (vals[0] - mean) / std) < 1e-5 and w[0, 2] == 0  # padding stays 0


def test_group_baseline():
    assert torch.allclose(group_baseline(torch.tensor([1.0, 3.0, 0.0, 0.0]), 2), torch.tensor([-1.0, 1.0, 0.0, 0.0]))


# ------------------------------------------------------------------------------------------------ remote reward


class Handler(BaseHTTPRequestHandler):
    mode = "ok"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if Handler.mode == "slow":
            threading.Event().wait(2.0)
        payload = {"rewards": [float(len(r)) for r in body["responses"]]} if Handler.mode != "garbage" else "nope"
        raw = json.dumps(payload).encode() if Handler.mode != "garbage" else b"<html>oops"
        self.send_response(200)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/score"
    httpd.shutdown()
    Handler.mode = "ok"


def test_remote_reward_scores_times_out_and_rejects_garbage(server):
    assert RemoteReward(server)(["a", "b"], ["xyz", "q"]).tolist() == [3.0, 1.0]
    Handler.mode = "slow"
    with pytest.raises(UserError, match="did not answer after 2 tries"):
        RemoteReward(server, timeout=0.3, retries=1)(["a"], ["b"])
    Handler.mode = "garbage"
    with pytest.raises(UserError, match='expected JSON {"rewards"'):
        RemoteReward(server)(["a"], ["b"])
    with pytest.raises(UserError, match="did not answer"):
        RemoteReward("http://127.0.0.1:9/none", timeout=0.3, retries=0)(["a"], ["b"])


def test_remote_reward_drives_a_run(server, tmp_path):
    out = tmp_path / "run"
    run_script("reinforce_pp.py", "--steps", "1", "--prompts-per-step", "4", "--micro-batch-size", "16",
               "--eval-size", "8", "--reward-url", server, "--output-dir", out)
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["rollout/reward"] >= 1.0  # length of the response text: the server's scores were used


# ------------------------------------------------------------------------------------------------ multi-rank


def test_global_whitening_over_two_ranks_equals_one_rank(tmp_path):
    """Each rank whitens its half; the result must equal whitening the whole batch in one process."""
    script = tmp_path / "whiten.py"
    script.write_text(f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from shared import dist
from reinforce_pp import global_whiten
ctx = dist.init(0)
torch.manual_seed(0)
x, mask = torch.randn(4, 5), (torch.rand(4, 5) > 0.3).float()
half = slice(2 * ctx.rank, 2 * ctx.rank + 2)
torch.save(global_whiten(x[half], mask[half]), {str(tmp_path)!r} + f"/rank{{ctx.rank}}.pt")
torch.save((x, mask), {str(tmp_path)!r} + "/data.pt")
dist.finish()
""")
    run_script(str(script), ranks=2)
    x, mask = torch.load(tmp_path / "data.pt", weights_only=True)
    both = torch.cat([torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)])
    vals = x[mask.bool()]
    expected = (x - vals.mean()) / vals.std(unbiased=False) * mask
    assert torch.allclose(both, expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("script", ["rloo.py", "reinforce_pp.py"])
@pytest.mark.parametrize("ranks", [0, 2])
def test_runs_end_to_end(tmp_path, script, ranks):
    out = tmp_path / "run"
    run_script(script, "--steps", "2", "--prompts-per-step", "4", "--n-samples", "4", "--micro-batch-size", "8",
               "--eval-size", "8", "--output-dir", out, *(["--zero-stage", "3"] if ranks else []), ranks=ranks)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == max(ranks, 1) and (out / "model.safetensors").exists()


# Each with a loss that is not ~0 at ratio 1 on the first step: the mean over a batch of group-standardised
# (GRPO) or whitened (REINFORCE++) advantages is 0, so GRPO adds its entropy bonus (a share like the others).
@pytest.mark.parametrize("script,flags", [("grpo.py", ["--entropy-coef", "0.01"]), ("rloo.py", [])])
def test_logged_loss_does_not_depend_on_the_micro_batch_size(tmp_path, script, flags):
    """loss/policy is the mean over the step's optimizer steps of each one's loss (the sum of its micro-batches'
    shares): minibatches of 8 sequences in one micro-batch or in four of 2 log the same figure (up to float
    rounding) for the same first step; RLOO's was 4x apart, GRPO's 16x at the default sizes. A tiny learning
    rate: Adam's first step moves every weight by ~lr whatever its gradient (rounding noise included), so the
    second minibatch would otherwise meet different weights in the two runs."""
    losses = []
    for micro in (8, 2):
        out = tmp_path / f"micro{micro}"
        run_script(script, "--steps", "1", "--prompts-per-step", "4", "--n-samples", "4", "--num-minibatches", "2",
                   "--micro-batch-size", micro, "--lr", "1e-9", "--eval-size", "8", "--output-dir", out, *flags)
        (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses.append(row["loss/policy"])
    assert abs(losses[0]) > 1e-4 and abs(losses[0] - losses[1]) < 1e-4 * abs(losses[0]), losses


@pytest.mark.parametrize("script", ["grpo.py", "rloo.py", "reinforce_pp.py"])
def test_no_argument_run_raises_heldout_accuracy_by_15_points(tmp_path, script):
    run_script(script, cwd=tmp_path)
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["before"]["eval/task_score"], summary["after"]["eval/task_score"]
    assert after >= before + 0.15 or after >= 0.8, (before, after)


def test_rewards_combine_with_weights_and_user_functions(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from shared import rewards

    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, responses, answer):\n    return [float(len(r)) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = SimpleNamespace(reward_path="", reward_fn="addition,my_rewards:length", reward_url="", reward_weights="2,0.5",
                           reward_timeout=1.0, dataset="addition")
    total, parts = rewards.build(args, None)(["1+2=", "2+2="], ["3", "22"], [True, True], {"answer": ["3", "4"]})
    assert parts["addition"].tolist() == [1.0, 0.0] and parts["length"].tolist() == [1.0, 2.0]
    assert total.tolist() == [2 * 1.0 + 0.5 * 1.0, 2 * 0.0 + 0.5 * 2.0]
    with pytest.raises(UserError, match="2 values for 3 reward sources"):
        rewards.build(SimpleNamespace(**{**vars(args), "reward_url": "http://127.0.0.1:9"}), None)
