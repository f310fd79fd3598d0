"""dpo.py and kto.py: the losses against hand computations, sequence log-probs against a per-example loop, the KTO
reference point (mismatched pairs, clamping, two ranks), precomputed vs on-the-fly reference, exact resume, runs end
to end (python, 2 ranks, ZeRO-3), bad input, and the no-argument learning runs."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import dpo
import kto
from conftest import ROOT, run_script, tiny_llama


def log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------- DPO math

# sequence log-probs of 3 pairs under the policy and the reference
PI_W, PI_L, REF_W, REF_L = [-2.0, -5.0, -1.0], [-4.0, -3.0, -1.5], [-3.0, -4.0, -1.0], [-3.5, -3.5, -2.0]
H = [1.5, -1.5, -0.5]  # by hand: (pi_w - ref_w) - (pi_l - ref_l) = (1) - (-0.5), (-1) - (0.5), (0) - (0.5)


def dpo_losses(beta, loss_type="sigmoid", eps=0.0):
    t = [torch.tensor(x) for x in (PI_W, PI_L, REF_W, REF_L)]
    return dpo.dpo_loss(*t, beta, loss_type, eps).tolist()


def test_dpo_loss_is_minus_log_sigmoid_of_beta_times_h():
    for beta in (0.1, 1.0):
        expected = [math.log(1 + math.exp(-beta * h)) for h in H]
        assert all(abs(a - b) < 1e-6 for a, b in zip(dpo_losses(beta), expected))
    assert abs(dpo_losses(0.1)[0] - math.log(1 + math.exp(-0.15))) < 1e-6  # beta inside the sigmoid, h = +1.5
    # the chosen response winning by more than the reference says lowers the loss below log 2; losing raises it
    assert dpo_losses(0.1)[0] < math.log(2) < dpo_losses(0.1)[1]


def test_ipo_loss_is_squared_distance_to_one_over_two_beta():
    assert all(abs(a - b) < 1e-5 for a, b in zip(dpo_losses(0.1, "ipo"), [12.25, 42.25, 30.25]))  # (h - 5)^2
    assert all(abs(a - (h - 1.0) ** 2) < 1e-6 for a, h in zip(dpo_losses(0.5, "ipo"), H))  # (h - 1)^2


def test_cdpo_label_smoothing_mixes_both_directions():
    beta, eps = 0.1, 0.2
    expected = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in H]
    assert all(abs(a - b) < 1e-6 for a, b in zip(dpo_losses(beta, "sigmoid", eps), expected))
    assert dpo_losses(beta, "sigmoid", 0.0) == dpo_losses(beta)


def test_pair_accuracy_counts_ties_half():
    assert dpo.pair_accuracy(torch.tensor([1.5, -1.5, 0.0, 2.0])) == (1 + 0 + 0.5 + 1) / 4


@pytest.mark.parametrize("module", [dpo, kto])
def test_pair_accuracy_counts_float_rounding_as_a_tie(module):
    """A log-ratio margin within TIE_TOL nats of 0 is a tie (half), beyond it a win or a loss."""
    tol = module.TIE_TOL
    assert 1e-6 <= tol <= 1e-3  # above float32 rounding of a sequence log-prob, below any real preference
    h = torch.tensor([0.5 * tol, -0.5 * tol, 0.0, 2 * tol, -2 * tol, 1.0])
    assert module.pair_accuracy(h) == (0.5 + 0.5 + 0.5 + 1 + 0 + 1) / 6


# ---------------------------------------------------------------------------------------------- sequence log-probs


def loop_logp(model, prompt: list[int], response: list[int]) -> float:
    """log p(response | prompt) from ONE unpadded sequence, summed token by token with math.log/exp."""
    seq = prompt + response
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].double()
    total = 0.0
    for t in range(len(prompt), len(seq)):
        row = logits[t - 1].tolist()
        log_z = math.log(sum(math.exp(v) for v in row))
        total += row[seq[t]] - log_z
    return total


TEXTS = [("1+2=", "3", "4"), ("10+25=", "35", "53"), ("7+80=", "87", "77")]  # prompts and responses of 3 lengths


def encoded(tok):
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [(enc(p), enc(c) + [tok.eos_token_id], enc(r) + [tok.eos_token_id]) for p, c, r in TEXTS]


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_sequence_logps_sum_response_tokens_only(tokenizer, pad_is_eos):
    model = tiny_llama(len(tokenizer))
    pad_id = tokenizer.eos_token_id if pad_is_eos else tokenizer.pad_token_id
    triples = encoded(tokenizer)
    pairs = [{"chosen_ids": p + c, "rejected_ids": p + r, "prompt_len": len(p)} for p, c, r in triples]
    with torch.no_grad():
        chosen, rejected = dpo.pair_logps(model, pairs, pad_id, "cpu")
        chosen_mean, _ = dpo.pair_logps(model, pairs, pad_id, "cpu", average=True)
        unpaired = kto.batch_logps(model, [{"input_ids": p + c, "prompt_len": len(p)} for p, c, _ in triples],
                                   pad_id, "cpu")
    for i, (p, c, r) in enumerate(triples):
        assert abs(chosen[i].item() - loop_logp(model, p, c)) < 1e-4
        assert abs(rejected[i].item() - loop_logp(model, p, r)) < 1e-4
        assert abs(chosen_mean[i].item() - loop_logp(model, p, c) / len(c)) < 1e-4  # IPO: mean over response tokens
        assert abs(unpaired[i].item() - loop_logp(model, p, c)) < 1e-4


@pytest.mark.parametrize("script", ["dpo", "kto"])
def test_pair_accuracy_is_one_half_when_the_policy_is_the_reference(tokenizer, script):
    """Before training (policy == reference) every held-out pair is a tie, even when the reference log-probs come
    from batches of another composition (one pair at a time, as against all pairs in one batch) and so round
    differently: the accuracy the script's evaluate() reports is exactly 0.5."""
    from shared.dist import Ctx

    model, pad, ctx = tiny_llama(len(tokenizer)), tokenizer.pad_token_id, Ctx(0, 1, 0, torch.device("cpu"))
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = []
    for a in range(1, 40, 3):
        for b in (7, 123):
            p = enc(f"{a}+{b}=")
            pairs.append({"chosen_ids": p + enc(str(a + b)) + [tokenizer.eos_token_id],
                          "rejected_ids": p + enc(str(a * b + 1)) + [tokenizer.eos_token_id], "prompt_len": len(p)})
    if script == "dpo":
        args, one_at_a_time = dpo.Args(micro_batch_size=64), dpo.Args(micro_batch_size=1)
        ref = dpo.all_pair_logps(model, pairs, pad, one_at_a_time, ctx)
        noise = (dpo.all_pair_logps(model, pairs, pad, args, ctx) - ref).abs().max().item()
        metrics, _ = dpo.evaluate(model, pairs, ref, [], {}, tokenizer, args, ctx)
    else:
        examples = [{"input_ids": p[key], "prompt_len": p["prompt_len"], "label": key == "chosen_ids"}
                    for p in pairs for key in ("chosen_ids", "rejected_ids")]  # as kto.split_examples lays out pairs
        args, one_at_a_time = kto.Args(micro_batch_size=64), kto.Args(micro_batch_size=1)
        ref = kto.all_logps(model, examples, pad, one_at_a_time, ctx)
        noise = (kto.all_logps(model, examples, pad, args, ctx) - ref).abs().max().item()
        metrics, _ = kto.evaluate(model, examples, ref, True, [], {}, tokenizer, args, ctx)
    assert 0 < noise < 1e-5  # the two compositions do round differently, by float noise only
    assert metrics["eval/pair_accuracy"] == 0.5


# ---------------------------------------------------------------------------------------------- KTO math


def test_kto_mismatched_pairs_and_kl_estimate_match_a_loop(tokenizer):
    policy, ref = tiny_llama(len(tokenizer), seed=0), tiny_llama(len(tokenizer), seed=1)
    triples = encoded(tokenizer)
    examples = [{"input_ids": p + c, "prompt_len": len(p), "label": True} for p, c, _ in triples]
    kl_examples = kto.mismatched(examples, max_len=256)
    for i, (p, _, _) in enumerate(triples):  # x_i followed by y_{(i+1) mod 3}
        assert kl_examples[i]["input_ids"] == p + triples[(i + 1) % 3][1]
    raw = sum(loop_logp(policy, p, triples[(i + 1) % 3][1]) - loop_logp(ref, p, triples[(i + 1) % 3][1])
              for i, (p, _, _) in enumerate(triples)) / 3
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        pi_kl, ref_kl = (kto.batch_logps(m, kl_examples, pad, "cpu") for m in (policy, ref))
    z_forward = kto.kto_reference_point(pi_kl, ref_kl, world=1).item()
    z_swapped = kto.kto_reference_point(ref_kl, pi_kl, world=1).item()  # -raw: exactly one of the two is clamped
    assert abs(z_forward - max(0.0, raw)) < 1e-4 and abs(z_swapped - max(0.0, -raw)) < 1e-4
    assert abs(raw) > 1e-3


def test_kto_reference_point_is_clamped_at_zero_and_detached():
    logps = torch.tensor([1.0, -3.0, 0.5], requires_grad=True)
    z0 = kto.kto_reference_point(logps, torch.tensor([0.0, -2.0, 0.0]), world=1)
    assert abs(z0.item() - (1.0 - 1.0 + 0.5) / 3) < 1e-6 and not z0.requires_grad
    assert kto.kto_reference_point(torch.tensor([-1.0, -2.0]), torch.zeros(2), world=1).item() == 0.0


def test_kto_loss_with_weights_matches_hand_computation():
    logps, ref = [-1.0, -4.0, -2.0, -6.0], [-2.0, -3.0, -2.5, -5.0]
    desirable, z0, beta, w_d, w_u = [True, True, False, False], 0.3, 0.1, 2.0, 0.5
    expected = []
    for lp, rf, good in zip(logps, ref, desirable):
        r = lp - rf
        expected.append(w_d * (1 - sigmoid(beta * (r - z0))) if good else w_u * (1 - sigmoid(beta * (z0 - r))))
    got = kto.kto_loss(torch.tensor(logps), torch.tensor(ref), torch.tensor(desirable), torch.tensor(z0), beta,
                       w_d, w_u)
    assert all(abs(a - b) < 1e-6 for a, b in zip(got.tolist(), expected))
    # a desirable completion above the reference point costs less than one below it
    assert got[0] < w_d * 0.5 < got[1]


def test_kto_class_balance_warning_suggests_a_weight():
    assert kto.class_balance(100, 100, 1.0, 1.0) == (1.0, None)
    assert kto.class_balance(100, 100, 1.2, 1.0)[1] is None  # inside [1, 4/3]
    ratio, w = kto.class_balance(50, 150, 1.0, 1.0)  # too few desirable: raise lambda_D to reach 1
    assert abs(ratio - 1 / 3) < 1e-9 and abs(w - 3.0) < 1e-9
    ratio, w = kto.class_balance(300, 100, 1.0, 1.0)  # too many: lower lambda_D to reach 4/3
    assert abs(ratio - 3.0) < 1e-9 and abs(w - (4 / 3) / 3) < 1e-9


def test_kto_splits_pairs_and_reads_unpaired_labels(tokenizer):
    pairs = [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}, {"prompt": "5+5=", "chosen": "10", "rejected": "1"}]
    examples, paired = kto.split_examples(pairs, tokenizer, kto.Args(), "train", print)
    assert paired and [e["label"] for e in examples] == [True, False, True, False]
    assert [tokenizer.decode(e["input_ids"]) for e in examples] == ["1+2=3<eos>", "1+2=4<eos>", "5+5=10<eos>",
                                                                     "5+5=1<eos>"]
    rows = [{"q": "1+2=", "completion": "3", "ok": "true"}, {"q": "5+5=", "completion": "1", "ok": False}]
    args = kto.Args(prompt_column="q", response_column="completion", label_column="ok")
    examples, paired = kto.split_examples(rows, tokenizer, args, "train", print)
    assert not paired and [e["label"] for e in examples] == [True, False] and examples[1]["prompt_len"] == 4


HELPER = """
import json, sys
sys.path.insert(0, {root!r})
import torch
from shared import dist
from kto import kto_reference_point
out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
ctx = dist.init(0)
# mismatched log-ratios: rank 0 averages +3, rank 1 averages -1
log_ratio = torch.tensor([4.0, 2.0]) if ctx.rank == 0 else torch.tensor([-1.0, -1.0])
up = kto_reference_point(log_ratio, torch.zeros(2), ctx.world).item()
down = kto_reference_point(-log_ratio, torch.zeros(2), ctx.world).item()
json.dump({{"world": ctx.world, "up": up, "down": down}}, open(f"{{out}}/rank{{ctx.rank}}.json", "w"))
dist.finish()  # leave the process group together: a rank exiting mid-collective aborts the other
"""


def test_kto_reference_point_is_the_mean_over_two_ranks(tmp_path):
    helper = tmp_path / "z0_worker.py"
    helper.write_text(HELPER.format(root=str(ROOT)))
    run_script(str(helper), tmp_path, ranks=2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["world"] == 2
        assert got["up"] == 1.0  # (3 + -1) / 2 on both ranks, not each rank's own value
        assert got["down"] == 0.0  # (-3 + 1) / 2 = -1, clamped after averaging (clamping first would give 0.5)


# ---------------------------------------------------------------------------------------------- runs

FAST = ["--batch-size", "8", "--micro-batch-size", "4", "--eval-size", "16", "--steps", "4", "--lr", "1e-3"]
NOT_COMPARED = {"elapsed_s", "train/pairs_per_s", "train/examples_per_s"}


def metrics(run) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in NOT_COMPARED}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run) -> dict:
    return load_file(run / "model.safetensors")


@pytest.fixture(scope="module", params=["dpo.py", "kto.py"])
def three_runs(request, tmp_path_factory):
    """The same 4 steps three ways: precomputed reference; reference on the fly; precomputed, stopped after 2 steps
    and resumed (the reference log-probs are computed again on resume)."""
    script, base = request.param, tmp_path_factory.mktemp(request.param.removesuffix(".py"))
    run_script(script, *FAST, "--output-dir", base / "precomputed", "--save-every", "2")
    run_script(script, *FAST, "--output-dir", base / "on_the_fly", "--ref-on-the-fly")
    run_script(script, *FAST, "--output-dir", base / "resumed", "--stop-after", "2")
    assert not (base / "resumed" / "model.safetensors").exists()
    run_script(script, *FAST, "--output-dir", base / "resumed", "--resume")
    return script, base


def test_precomputed_and_on_the_fly_reference_give_identical_runs(three_runs):
    _, base = three_runs
    a, b = base / "precomputed", base / "on_the_fly"
    assert len(metrics(a)) == 4 and metrics(a) == metrics(b)
    assert metrics(a)[-1]["train/rewards/margin"] != 0  # the runs did move away from the reference
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_is_bit_identical(three_runs):
    _, base = three_runs
    a, b = weights(base / "precomputed"), weights(base / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(base / "precomputed")[2:] == metrics(base / "resumed")[2:]


def test_outputs_have_the_documented_metrics_and_reload(three_runs):
    script, base = three_runs
    run = base / "precomputed"
    summary = json.loads((run / "summary.json").read_text())
    names = {"train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margin",
             "train/logps/chosen", "train/logps/rejected"} | ({"train/rewards/accuracy"} if script == "dpo.py" else
                                                              {"train/kl"})
    assert names <= set(metrics(run)[0])
    for when in ("before", "after"):
        assert 0 <= summary[when]["eval/pair_accuracy"] <= 1 and 0 <= summary[when]["eval/task_score"] <= 1
    # policy == reference before training: every implicit reward is 0 up to float rounding (two model copies need not
    # round alike: the LM head runs on a few positions, where kernels pick paths by alignment)
    rewards = {k: v for k, v in summary["before"].items() if k.startswith("eval/rewards/")}
    assert rewards and all(abs(v) < 1e-5 for v in rewards.values()), rewards
    assert summary["before"]["eval/pair_accuracy"] == 0.5  # every pair a tie, whatever the rounding
    assert (run / "step_2" / "model.safetensors").exists() and (run / "checkpoint" / "state.json").exists()
    tok, model = AutoTokenizer.from_pretrained(run), AutoModelForCausalLM.from_pretrained(run)
    ids = torch.tensor([tok("12+30=")["input_ids"]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


@pytest.mark.parametrize("script,extra", [("dpo.py", ["--zero-stage", "3"]),
                                          ("kto.py", ["--zero-stage", "2", "--ref-on-the-fly"])])
def test_two_ranks_run_end_to_end(tmp_path, script, extra):
    out = tmp_path / "run"
    run_script(script, *FAST, "--output-dir", out, *extra, ranks=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(metrics(out)) == 4
    assert 0 <= summary["after"]["eval/pair_accuracy"] <= 1 and (out / "model.safetensors").exists()


def test_kto_trains_on_unbalanced_unpaired_data_and_warns(tmp_path):
    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a if a % 4 else a), "good": a % 4 != 0} for a in range(40)]
    rows += [{"prompt": f"{a}+1=", "completion": str(a), "good": False} for a in range(40)]  # 30 good, 50 bad
    data_file = tmp_path / "feedback.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    proc = run_script("kto.py", *FAST, "--dataset", data_file, "--response-column", "completion", "--label-column",
                      "good", "--output-dir", out)
    assert "warning" in proc.stdout and "--desirable-weight" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["split_from_pairs"] and "eval/pair_accuracy" not in summary["after"]
    assert "eval/rewards/margin" in summary["after"] and "eval/task_score" not in summary["after"]  # no scorer given


def refused(tmp_path, script, *args) -> str:
    out = tmp_path / "out"
    proc = run_script(script, *FAST, "--output-dir", out, *args, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert not out.exists(), "a refused run must write nothing"
    return lines[0]


def test_bad_flags_give_one_line_and_write_nothing(tmp_path):
    assert "--loss-type must be" in refused(tmp_path, "dpo.py", "--loss-type", "hinj")
    assert "applies to --loss-type sigmoid or robust only" in refused(tmp_path, "dpo.py", "--loss-type", "ipo",
                                                                       "--label-smoothing", "0.1")
    assert "--micro-batch-size must be >= 2" in refused(tmp_path, "kto.py", "--micro-batch-size", "1")


# ---------------------------------------------------------------------------------------------- learning


@pytest.mark.parametrize("script", ["dpo.py", "kto.py"])
def test_default_run_learns_the_preferences_without_losing_the_task(tmp_path, script):
    run_script(script, cwd=tmp_path)
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert abs(before["eval/task_score"] - 0.354) < 1e-9  # the embedded SFT policy
    assert after["eval/pair_accuracy"] >= 0.9
    assert after["eval/task_score"] >= before["eval/task_score"] - 0.05
