"""The variants researchers compare (README "Variants"): each loss against a plain loop written from its paper's
equation on random tensors (value and gradient), and each variant end to end on the built-in task for a few steps."""
import json
import math
import statistics

import pytest
import torch

from conftest import run_script

def random_batch(seed: int, n: int = 6, r: int = 5):
    """logp (N, R) with grad, old (N, R) within ~1 nat of it (ratios on both sides of every clip), advantages (N,) of
    both signs, and a ragged response mask (every row has at least one token)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, r, generator=g, dtype=torch.float64) * 3
    logp = (old + torch.randn(n, r, generator=g, dtype=torch.float64) * 0.6).requires_grad_()
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, r + 1, (n,), generator=g)
    mask = (torch.arange(r)[None] < lengths[:, None]).double()
    return logp, old, adv, mask


def grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


def token_mean(loop_terms, mask):
    """sum over valid tokens of a per-token python function / number of valid tokens."""
    n, r = mask.shape
    return sum(loop_terms(i, t) for i in range(n) for t in range(r) if mask[i, t]) / mask.sum()


# ---------------------------------------------------------------------------------------------- grpo.py losses


def ppo_token(r, a, eps_low, eps_high, dual_clip=0.0, delta=0.0):
    """Per-token PPO loss written from the papers, r and a scalars (r a torch scalar for the gradient)."""
    clipped = torch.clamp(r, 1 - eps_low, 1 + eps_high)
    unclipped = torch.clamp(r, max=delta) if delta else r  # INTELLECT-2: min(r, delta) in the unclipped term
    objective = torch.min(unclipped * a, clipped * a)
    if dual_clip and a < 0:  # Ye et al. 2020, eq. (5): max(min(r A, clip(r) A), c A) for A < 0
        objective = torch.max(objective, torch.tensor(dual_clip * a))
    return -objective


@pytest.mark.parametrize("dual_clip,delta", [(0.0, 0.0), (1.5, 0.0), (0.0, 1.5), (1.5, 1.5)])
def test_clipped_surrogate_dual_clip_and_delta_match_the_papers(dual_clip, delta):
    from grpo import aggregate, clipped_surrogate

    logp, old, adv, mask = random_batch(0)
    ratio_max = torch.exp(logp - old).max().item()
    assert ratio_max > 1.5  # the batch reaches past both bounds
    got = aggregate(clipped_surrogate(logp, old, adv[:, None], 0.2, 0.28, dual_clip, delta), mask, "token-mean", 5,
                    6, mask.sum())
    want = token_mean(lambda i, t: ppo_token(torch.exp(logp[i, t] - old[i, t]), adv[i].item(), 0.2, 0.28, dual_clip,
                                             delta), mask)
    assert abs(got.item() - want.item()) < 1e-10
    assert torch.allclose(grad(got, logp), grad(want, logp), atol=1e-10)


def test_dual_clip_bounds_the_loss_of_a_huge_ratio_on_a_bad_token():
    from grpo import clipped_surrogate

    logp, old, adv = torch.log(torch.tensor([10.0, 10.0], dtype=torch.float64)), torch.zeros(2), torch.tensor([-1.0, 1.0])
    plain = clipped_surrogate(logp, old, adv, 0.2, 0.2)
    dual = clipped_surrogate(logp, old, adv, 0.2, 0.2, dual_clip=3.0)
    assert abs(plain[0].item() - 10.0) < 1e-9 and abs(dual[0].item() - 3.0) < 1e-9  # -r A = 10 bounded by -c A = 3
    assert abs(dual[1].item() + 1.2) < 1e-9  # A > 0: unchanged, clip(10) A = 1.2


def test_gspo_is_one_clipped_ratio_per_sequence():
    from grpo import aggregate, gspo_surrogate

    logp, old, adv, mask = random_batch(1)
    eps_low, eps_high = 0.03, 0.04
    got = aggregate(gspo_surrogate(logp, old, adv[:, None], mask, eps_low, eps_high), mask, "seq-mean", 5, 6,
                    mask.sum())
    terms = []
    for i in range(6):  # GSPO eq.: s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|)
        n_tok = int(mask[i].sum())
        s = torch.exp(sum(logp[i, t] - old[i, t] for t in range(n_tok)) / n_tok)
        a = adv[i].item()
        terms.append(-torch.min(s * a, torch.clamp(s, 1 - eps_low, 1 + eps_high) * a))
    want = sum(terms) / 6
    assert abs(got.item() - want.item()) < 1e-10
    g = grad(got, logp)
    assert torch.allclose(g, grad(want, logp), atol=1e-10)
    assert g[mask == 0].abs().max() == 0  # padding gets no gradient


def test_cispo_keeps_a_gradient_on_every_token_through_a_detached_clipped_weight():
    from grpo import aggregate, cispo_surrogate

    logp, old, adv, mask = random_batch(2)
    eps_max = 1.3
    got = aggregate(cispo_surrogate(logp, old, adv[:, None], eps_max), mask, "token-mean", 5, 6, mask.sum())
    # MiniMax-M1 eq. (4): J = 1 / sum|o_i| sum_i sum_t sg(r_hat_it) A_it log pi(o_it), r_hat = min(r, eps_max)
    weight = lambda i, t: min(math.exp(logp[i, t].item() - old[i, t].item()), eps_max)  # a number: no gradient
    want = token_mean(lambda i, t: -weight(i, t) * adv[i].item() * logp[i, t], mask)
    assert abs(got.item() - want.item()) < 1e-10
    g = grad(got, logp)
    assert torch.allclose(g, grad(want, logp), atol=1e-10)
    clipped = (torch.exp(logp - old) > eps_max) & (mask > 0)
    assert clipped.any() and (g[clipped] != 0).all()  # clipped tokens still learn (PPO's clip would zero them)


def test_sapo_soft_gate_and_its_gradient_at_ratio_one():
    from grpo import aggregate, sapo_surrogate

    logp, old, adv, mask = random_batch(3)
    got = aggregate(sapo_surrogate(logp, old, adv[:, None], 1.0, 1.05), mask, "token-mean", 5, 6, mask.sum())

    def term(i, t):  # SAPO: f(r) = sigmoid(tau (r - 1)) 4 / tau, tau by the sign of A
        a, r = adv[i].item(), torch.exp(logp[i, t] - old[i, t])
        tau = 1.0 if a > 0 else 1.05
        return -a * torch.sigmoid(tau * (r - 1)) * 4 / tau

    want = token_mean(term, mask)
    assert abs(got.item() - want.item()) < 1e-10
    assert torch.allclose(grad(got, logp), grad(want, logp), atol=1e-10)
    at_one = logp.detach().clone().requires_grad_()  # old == logp: r = 1, gradient -A per token (d r / d logp = 1)
    g = grad(sapo_surrogate(at_one, at_one.detach(), adv[:, None], 1.0, 1.05).sum(), at_one)
    assert torch.allclose(g, -adv[:, None].expand_as(g), atol=1e-12)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_schulman(estimator):
    from grpo import kl_penalty

    logp, _, _, _ = random_batch(4)
    ref = logp.detach() + torch.randn_like(logp) * 0.5
    got = kl_penalty(logp, ref, estimator)
    for i in range(6):
        for t in range(5):
            d = logp[i, t].item() - ref[i, t].item()  # log(p / q)
            want = {"k1": d, "k2": d * d / 2, "k3": math.exp(-d) - 1 + d}[estimator]
            assert abs(got[i, t].item() - want) < 1e-9
    g = grad(got.sum(), logp)  # d/dlogp: 1, d, 1 - exp(-d)
    d = logp.detach() - ref
    want_g = {"k1": torch.ones_like(d), "k2": d, "k3": 1 - torch.exp(-d)}[estimator]
    assert torch.allclose(g, want_g, atol=1e-9)


def test_overlong_reward_is_dapo_piecewise():
    from grpo import overlong_reward

    lengths = torch.arange(0, 21)
    got = overlong_reward(lengths, max_len=16, buffer=4, penalty=0.5)
    for n, value in zip(lengths.tolist(), got.tolist()):
        # DAPO eq. (13): 0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache in the buffer; -1 beyond
        want = 0.0 if n <= 12 else ((12 - n) / 4 if n <= 16 else -1.0)
        assert abs(value - 0.5 * want) < 1e-9


def test_batch_scaled_advantages_divide_by_the_batch_std():
    from grpo import batch_scaled_advantages

    scores, n = torch.randn(12, generator=torch.Generator().manual_seed(5), dtype=torch.float64), 4
    got = batch_scaled_advantages(scores, n)
    std = statistics.stdev(scores.tolist())
    for g in range(3):
        group = scores[g * n: (g + 1) * n].tolist()
        for j, s in enumerate(group):
            assert abs(got[g * n + j].item() - (s - statistics.mean(group)) / (std + 1e-4)) < 1e-9


def test_gdpo_normalises_each_reward_in_its_group_then_sums_then_normalises_the_batch():
    from grpo import gdpo_advantages

    g = torch.Generator().manual_seed(6)
    parts = {"correct": (torch.rand(8, generator=g) > 0.5).double(), "format": torch.rand(8, generator=g, dtype=torch.float64)}
    parts["correct"][:4] = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)  # both groups have spread
    weights, n = [1.0, 0.5], 4
    got = gdpo_advantages(parts, weights, n)
    summed = [0.0] * 8
    for w, values in zip(weights, parts.values()):
        for k in range(2):
            group = values[k * n: (k + 1) * n].tolist()
            for j, v in enumerate(group):
                summed[k * n + j] += w * (v - statistics.mean(group)) / (statistics.stdev(group) + 1e-4)
    mean, std = statistics.mean(summed), statistics.stdev(summed)
    for i in range(8):
        assert abs(got[i].item() - (summed[i] - mean) / (std + 1e-4)) < 1e-9


def test_top_entropy_mask_keeps_the_top_fraction_of_valid_tokens():
    from grpo import top_entropy_mask

    _, _, _, mask = random_batch(7, n=8, r=10)
    entropy = torch.rand(8, 10, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    kept = top_entropy_mask(entropy, mask, 0.2)
    valid = sorted(entropy[i, t].item() for i in range(8) for t in range(10) if mask[i, t])
    pos = (len(valid) - 1) * 0.8  # the 0.8 quantile, linear between order statistics
    threshold = valid[int(pos)] + (pos - int(pos)) * (valid[min(int(pos) + 1, len(valid) - 1)] - valid[int(pos)])
    for i in range(8):
        for t in range(10):
            assert kept[i, t].item() == float(bool(mask[i, t]) and entropy[i, t].item() >= threshold)
    assert abs(kept.sum().item() - 0.2 * len(valid)) <= 1
    assert torch.equal(top_entropy_mask(entropy, mask, 1.0), mask)


# ---------------------------------------------------------------------------------------------- dpo.py losses


def logsig(x):
    return -torch.log1p(torch.exp(-x))


def pair_batch(seed: int, b: int = 8, average: bool = False):
    """Policy sequence log-probs (with grad) and reference ones; means per token (in (-3, 0)) when average."""
    g = torch.Generator().manual_seed(seed)
    if average:
        chosen, rejected = -torch.rand(b, generator=g, dtype=torch.float64) * 3, -torch.rand(b, generator=g,
                                                                                          dtype=torch.float64) * 3
    else:
        chosen, rejected = -torch.rand(b, generator=g, dtype=torch.float64) * 20, -torch.rand(b, generator=g,
                                                                                           dtype=torch.float64) * 20
    ref_c = chosen + torch.randn(b, generator=g, dtype=torch.float64)
    ref_r = rejected + torch.randn(b, generator=g, dtype=torch.float64)
    return chosen.requires_grad_(), rejected.requires_grad_(), ref_c, ref_r


def paper_pair_loss(loss, c, r, rc, rr, beta, eps, gamma, lam):
    """One pair's loss written from each paper (torch scalars for the gradient)."""
    h = (c - rc) - (r - rr)
    if loss == "hinge":  # SLiC-HF: max(0, delta - beta h), delta = 1
        return torch.clamp(1 - beta * h, min=0)
    if loss == "robust":  # Chowdhury et al. eq. (8)
        return ((1 - eps) * -logsig(beta * h) - eps * -logsig(-beta * h)) / (1 - 2 * eps)
    if loss == "simpo":  # Meng et al. eq. (6): beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma
        return -logsig(beta * c - beta * r - gamma)
    if loss == "orpo":  # Hong et al. eqs. (4)-(7): odds(y) = P(y) / (1 - P(y))
        p_w, p_l = torch.exp(c), torch.exp(r)
        return -c + lam * -logsig(torch.log(p_w / (1 - p_w)) - torch.log(p_l / (1 - p_l)))
    if loss == "apo-zero":  # D'Oosterlinck et al.: L = 1 - sigmoid(beta r_w) + sigmoid(beta r_l)
        return 1 - torch.sigmoid(beta * (c - rc)) + torch.sigmoid(beta * (r - rr))
    raise ValueError(loss)


@pytest.mark.parametrize("loss", ["hinge", "robust", "simpo", "orpo", "apo-zero"])
def test_dpo_family_losses_match_their_papers(loss):
    from dpo import AVERAGED, REFERENCE_FREE, dpo_loss

    c, r, rc, rr = pair_batch(8, average=loss in AVERAGED)
    if loss in REFERENCE_FREE:
        rc, rr = torch.zeros_like(rc), torch.zeros_like(rr)
    beta = 2.0 if loss == "simpo" else 0.3
    got = dpo_loss(c, r, rc, rr, beta, loss, label_smoothing=0.2 if loss == "robust" else 0.0, simpo_gamma=1.0,
                   orpo_lambda=0.1).mean()
    want = sum(paper_pair_loss(loss, c[i], r[i], rc[i], rr[i], beta, 0.2, 1.0, 0.1) for i in range(8)) / 8
    assert abs(got.item() - want.item()) < 1e-9
    g_got, g_want = torch.autograd.grad(got, (c, r)), torch.autograd.grad(want, (c, r))
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(g_got, g_want))
    assert any(a.abs().sum() > 0 for a in g_got)


def test_hinge_has_no_gradient_past_its_margin_and_robust_is_unbiased_to_label_flips():
    from dpo import dpo_loss

    c, r, rc, rr = pair_batch(9)
    h = ((c - rc) - (r - rr)).detach()
    g = torch.autograd.grad(dpo_loss(c, r, rc, rr, 1.0, "hinge").sum(), c)[0]
    assert ((g == 0) == (h >= 1)).all() and (h >= 1).any() and (h < 1).any()
    # robust DPO's point: the expected loss under flip rate eps equals the clean DPO loss (Chowdhury et al., Lemma 3.1)
    eps = 0.2
    clean = dpo_loss(c, r, rc, rr, 0.3, "sigmoid")
    noisy = (1 - eps) * dpo_loss(c, r, rc, rr, 0.3, "robust", eps) + eps * dpo_loss(r, c, rr, rc, 0.3, "robust", eps)
    assert torch.allclose(noisy, clean, atol=1e-9)


# ---------------------------------------------------------------------------------------------- train_sft.py turns

CONVERSATION = [{"role": "system", "content": "You add numbers."},
                {"role": "user", "content": "2+3="}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "add 7"}, {"role": "assistant", "content": "12 is the sum"},
                {"role": "user", "content": "and 1?"}, {"role": "assistant", "content": "13"}]


@pytest.mark.parametrize("turns", ["all", "last"])
def test_sft_loss_mask_is_exactly_the_assistant_turns_and_their_end_of_turn_tokens(turns):
    """A three-turn conversation through the real BPE ChatML tokenizer: the trained tokens are each assistant
    message's content followed by <|im_end|>, and nothing else (all); or the last one only (last)."""
    from families import build_family
    from shared import data
    from train_sft import Args, response_logprobs

    model, tok = build_family("llama")
    args = Args(assistant_turns=turns)
    (ex,) = data.tokenize([{"messages": CONVERSATION}], tok, "sft", args, log=lambda *a: None)
    # the whole sequence is the template's rendering of the conversation, up to the last end of turn
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(ex["input_ids"]) == rendered.removesuffix("\n")
    _, rmask, _ = response_logprobs(model, [ex], tok.pad_token_id, "cpu")  # what sft_loss averages over
    responses = torch.tensor([ex["input_ids"][ex["prompt_len"]:]])
    trained, runs, run = responses[0][rmask[0]].tolist(), [], []
    for t, on in zip(responses[0].tolist(), rmask[0].tolist()):  # contiguous trained spans
        if on:
            run.append(t)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"][(0 if turns == "all" else -1):]
    assert [tok.decode(r) for r in runs] == [a + "<|im_end|>" for a in answers]
    want = [t for a in answers for t in tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert trained == want
    assert tok.decode(ex["input_ids"][: ex["prompt_len"]]).endswith("<|im_start|>assistant\n")  # before the first


def test_sft_all_turns_refuses_a_template_that_renders_turns_otherwise():
    from shared import data
    from shared.dist import UserError
    from train_sft import Args
    from families import chatml_tokenizer

    tok = chatml_tokenizer()
    tok.chat_template = tok.chat_template.replace("{{ m['content'] }}", "{{ m['content'] | upper }}")
    with pytest.raises(UserError, match="--assistant-turns last"):
        data.tokenize([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                     {"role": "user", "content": "ok"}, {"role": "assistant", "content": "b"}]}],
                      tok, "sft", Args(assistant_turns="all"), log=lambda *a: None)


# ---------------------------------------------------------------------------------------------- end to end

TINY_RL = ("--steps", "2", "--prompts-per-step", "4", "--n-samples", "4", "--micro-batch-size", "8",
           "--eval-size", "8")
SHORT = """def short(prompts, responses, **extras):  # a second reward source for --multi-reward gdpo
    return [1.0 / (1 + len(r)) for r in responses]
"""


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("script,flags", [
    ("grpo.py", ["--loss-type", "gspo", "--dual-clip", "3", "--delta", "4", "--overlong-buffer", "2",
                 "--mask-truncated", "--kl-estimator", "k2", "--kl-in", "reward", "--scale-rewards", "batch",
                 "--num-minibatches", "2", "--micro-batch-size", "4"]),
    ("grpo.py", ["--loss-type", "cispo", "--loss-agg", "token-mean", "--entropy-coef", "0.01",
                 "--top-entropy-quantile", "0.2", "--multi-reward", "gdpo", "--reward-fn", "addition,short_len:short",
                 "--kl-estimator", "k1"]),
    ("grpo.py", ["--loss-type", "sapo", "--ppo-epochs", "2"]),
    ("rloo.py", ["--loss-type", "ppo", "--dual-clip", "3", "--delta", "4", "--kl-in", "loss",
                 "--kl-estimator", "k3"]),
    ("reinforce_pp.py", ["--baseline", "--dual-clip", "3", "--kl-in", "loss", "--kl-estimator", "k2"]),
    ("ppo_max.py", ["--dual-clip", "3", "--delta", "4", "--kl-in", "loss", "--kl-estimator", "k3",
                    "--critic-warmup-steps", "0"]),
], ids=["grpo-gspo-dapo-shaping", "grpo-cispo-entropy-gdpo", "grpo-sapo", "rloo", "reinforce_pp", "ppo_max"])
def test_rl_variants_run_end_to_end(tmp_path, script, flags):
    (tmp_path / "short_len.py").write_text(SHORT)
    out = tmp_path / "run"
    run_script(script, *TINY_RL, *flags, "--output-dir", out, cwd=tmp_path)
    rows = metrics(out)
    assert len(rows) == 2 and all(math.isfinite(r["loss/policy"]) for r in rows)
    assert (out / "model.safetensors").exists()
    if "gdpo" in flags:
        assert "rollout/reward_short" in rows[0]  # both reward sources reached the advantages


@pytest.mark.parametrize("loss", ["hinge", "robust", "simpo", "orpo", "apo-zero"])
def test_dpo_losses_run_end_to_end_and_reference_free_ones_load_no_reference(tmp_path, loss):
    out = tmp_path / "run"
    extra = {"robust": ["--label-smoothing", "0.1"], "simpo": ["--beta", "2", "--simpo-gamma", "1"]}.get(loss, [])
    proc = run_script("dpo.py", "--loss-type", loss, *extra, "--steps", "2", "--batch-size", "8",
                      "--micro-batch-size", "8", "--eval-size", "8", "--output-dir", out)
    rows = metrics(out)
    assert len(rows) == 2 and all(math.isfinite(r["train/loss"]) for r in rows)
    loads = proc.stdout.count("[model] loaded")
    assert loads == (1 if loss in ("simpo", "orpo") else 2), proc.stdout  # policy (+ reference)


def test_sft_all_assistant_turns_runs_end_to_end(tmp_path):
    from families import save_family

    model = save_family("llama", tmp_path / "model")
    rows = [{"messages": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)},
                          {"role": "user", "content": "plus 1?"}, {"role": "assistant", "content": str(a + b + 1)}]}
            for a in range(8) for b in range(4)]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    run_script("train_sft.py", "--model-path", model, "--dataset", tmp_path / "chats.jsonl", "--assistant-turns", "all",
               "--steps", "2", "--batch-size", "8", "--micro-batch-size", "8", "--eval-size", "8",
               "--max-new-tokens", "4", "--output-dir", out)
    assert len(metrics(out)) == 2 and (out / "model.safetensors").exists()


@pytest.mark.parametrize("script,flags,message", [
    ("grpo.py", ["--loss-type", "ppo"], "--loss-type must be grpo, gspo, cispo, sapo"),
    ("grpo.py", ["--loss-type", "cispo", "--dual-clip", "3"], "--dual-clip and --delta"),
    ("dpo.py", ["--loss-type", "simpo", "--ref-on-the-fly"], "reference-free"),
])
def test_bad_variant_flags_are_one_line_errors_and_write_nothing(tmp_path, script, flags, message):
    out = tmp_path / "run"
    proc = run_script(script, *flags, "--output-dir", out, check=False)
    assert proc.returncode == 2 and message in proc.stderr and not out.exists()
