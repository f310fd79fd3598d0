"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300), with the
variants researchers compare: DAPO's token-mean loss, clip-higher and dynamic sampling (Yu et al. 2025,
arXiv 2503.14476) and Dr. GRPO's constant normaliser without std division (Liu et al. 2025, arXiv 2503.20783).

    python grpo.py                          # embedded SFT policy, built-in addition task, exact-match reward
    deepspeed grpo.py --model-path SFT_DIR --dataset prompts.jsonl --reward-fn my_rewards:score
    deepspeed grpo.py ... --loss-agg token-mean --eps-high 0.28 --dynamic-sampling --kl-coef 0  # DAPO
    deepspeed grpo.py ... --loss-agg dr-grpo --no-std-normalize                                 # Dr. GRPO
    deepspeed grpo.py ... --loss-type gspo --kl-coef 0                                          # GSPO
    deepspeed grpo.py ... --loss-type cispo --loss-agg token-mean --kl-coef 0                   # CISPO

For each prompt, n responses are sampled and scored; a response's advantage is its score standardised within
its group, A_i = (s_i - mean(s)) / (std(s) + eps), the same for all of its tokens. The loss is the PPO-clipped
surrogate plus kl_coef * KL(policy || reference) with the k3 estimator (with --kl-coef 0 no reference model is
loaded). The other policy losses (GSPO, CISPO, SAPO), dual-clip and two-sided clipping, DAPO's overlong
shaping and filtering, an entropy bonus, top-entropy tokens, batch-level advantage scale, GDPO and the KL
choices are flags, off by default: their equations are in the functions below, the table in README "Variants".
"""
import functools
import time
from dataclasses import dataclass

import torch

from shared import data, dist, engine, lora, rewards, rollout
from shared.args import DataArgs, LoraArgs, RewardArgs, RolloutArgs, RunArgs
from shared.tracking import Stats, Tracker


@dataclass
class Args(RunArgs, DataArgs, RewardArgs, RolloutArgs, LoraArgs):
    model_path: str = engine.DEFAULT_SFT
    """policy to start from (also the frozen reference)"""
    steps: int = 60
    """RL steps (each: sample, score, update)"""
    prompts_per_step: int = 16
    """prompts sampled per step, all ranks together"""
    n_samples: int = 8
    """responses per prompt (the group size G)"""
    temperature: float = 1.0
    """sampling temperature (the trainer's log-probs use the same temperature)"""
    top_p: float = 1.0
    """nucleus sampling"""
    max_new_tokens: int = 256
    """response length limit"""
    lr: float = 1e-6
    """policy learning rate (TRL's GRPO default)"""
    kl_coef: float = 0.04
    """KL coefficient (k3 estimator, as a loss term); 0 loads no reference model"""
    eps_low: float = 0.2
    """clip range below 1 for the ratio"""
    eps_high: float = 0.2
    """clip range above 1 (DAPO clip-higher: 0.28)"""
    loss_agg: str = "seq-mean"
    """seq-mean: mean over each sequence's tokens, then over sequences (paper); token-mean: mean over all
    tokens of the batch (DAPO); dr-grpo: sum over tokens / (sequences x max_new_tokens) (Dr. GRPO)"""
    std_normalize: bool = True
    """divide advantages by the group's std (Dr. GRPO: off)"""
    dynamic_sampling: bool = False
    """drop groups whose rewards are all equal and sample more prompts until the batch is full (DAPO); when
    --max-sample-tries runs out, the batch is topped up with dropped groups (advantage 0)"""
    max_sample_tries: int = 4
    """cap on sampling rounds per step with --dynamic-sampling"""
    ppo_epochs: int = 1
    """passes over each rollout batch"""
    num_minibatches: int = 1
    """optimizer steps per epoch"""
    micro_batch_size: int = 8
    """sequences per forward/backward pass per rank"""
    eval_every: int = 10
    """evaluate on held-out prompts every N steps"""
    # --- variants researchers compare (all off by default; README "Variants") ---
    loss_type: str = "grpo"
    """grpo: PPO-clipped token ratio (paper); gspo: one ratio per sequence, exp(mean_t log-ratio), clipped
    with --gspo-eps-low/high (arXiv 2507.18071); cispo: -sg(min(r, --cispo-eps-max)) A logp, every token keeps
    a gradient (MiniMax-M1, arXiv 2506.13585; use --loss-agg token-mean as the paper); sapo: soft gate
    -A sigmoid(tau (r - 1)) 4 / tau instead of the clip (arXiv 2511.20347)"""
    gspo_eps_low: float = 3e-4
    """GSPO's clip range below 1 of the sequence ratio (the paper's 3e-4)"""
    gspo_eps_high: float = 4e-4
    """GSPO's clip range above 1 of the sequence ratio (the paper's 4e-4)"""
    cispo_eps_max: float = 5.0
    """CISPO's cap on the detached IS weight (no lower bound, as MiniMax-M1; TRL passes it as epsilon_high)"""
    sapo_tau_pos: float = 1.0
    """SAPO gate temperature for tokens with A > 0"""
    sapo_tau_neg: float = 1.05
    """SAPO gate temperature for tokens with A <= 0"""
    dual_clip: float = 0.0
    """dual-clip PPO (Ye et al. 2020, arXiv 1912.09729): for A < 0 the loss is at most -c A, c > 1 (e.g. 3);
    0: off"""
    delta: float = 0.0
    """two-sided clipping (INTELLECT-2, arXiv 2505.07291): the unclipped term uses min(r, delta),
    delta > 1 + eps_high (e.g. 4); 0: off"""
    entropy_coef: float = 0.0
    """entropy bonus: loss -= coef x entropy, aggregated as the policy loss (--loss-agg)"""
    top_entropy_quantile: float = 1.0
    """keep in the policy loss only tokens whose entropy is in this top fraction of the micro-batch's valid
    tokens (arXiv 2506.01939: 0.2); 1.0: all tokens"""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment: the last L_cache tokens before --max-new-tokens cost up to
    --overlong-penalty, linearly (arXiv 2503.14476); 0: off"""
    overlong_penalty: float = 1.0
    """the score added at the length limit with --overlong-buffer is -this (DAPO: 1.0)"""
    mask_truncated: bool = False
    """DAPO overlong filtering: responses cut at --max-new-tokens (no EOS) are masked out of the loss"""
    scale_rewards: str = "group"
    """divide the group-centred scores by: group, each group's std (paper); batch, the std of the whole batch,
    all ranks (PPO Lite, arXiv 2508.08221); none (Dr. GRPO; the same as --no-std-normalize)"""
    multi_reward: str = "sum"
    """with several reward sources: sum, the weighted sum is normalised as one score (GRPO); gdpo, each source
    is normalised within its group, then weighted and summed, then normalised over the batch
    (arXiv 2601.05242)"""
    kl_estimator: str = "k3"
    """KL(policy || reference) per token, d = logp - ref: k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d
    (paper: k3)"""
    kl_in: str = "loss"
    """loss: kl_coef x KL aggregated as the policy loss (paper); reward: s_i - kl_coef x sum_t KL_t (old
    log-probs, detached) before the group advantages (as OpenRLHF without --use_kl_loss)"""


# Defaults tuned for the embedded 0.8M demo model (and models trained from it), which --defaults auto picks
# for it; the Args above hold the values for pretrained models. Flags you give always win.
EMBEDDED = dict(lr=1e-4, max_new_tokens=8, micro_batch_size=64)


# ---------------------------------------------------------------------------------------------- the math


def group_advantages(scores: torch.Tensor, n: int, std_normalize: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """A_i = (s_i - mean_group(s)) / (std_group(s) + eps); scores (N,) with each group's n samples contiguous.
    std is the unbiased sample std (as in the paper's code and TRL)."""
    groups = scores.view(-1, n)
    adv = groups - groups.mean(1, keepdim=True)
    if std_normalize:
        adv = adv / (groups.std(1, keepdim=True) + eps)
    return adv.view(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k3 = exp(d) - d - 1 >= 0, d = ref - logp (Schulman 2020), unclamped as
    in TRL: a clamp would zero the gradient where the policy has drifted furthest (an overflow trips the
    non-finite-loss check)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def clipped_surrogate(logprobs, old_logprobs, advantages, eps_low: float, eps_high: float,
                      dual_clip: float = 0.0, delta: float = 0.0):
    """Per-token PPO loss -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A), rho = exp(logp - old); (N, R).
    delta > 0, two-sided clipping (INTELLECT-2, arXiv 2505.07291): -min(min(rho, delta) A, clip(rho) A).
    dual_clip c > 0 (Ye et al. 2020, arXiv 1912.09729): for A < 0, -max(min(rho A, clip(rho) A), c A), i.e.
    the loss is at most -c A however large rho grows (with c = delta the two give the same loss)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio.clamp(max=delta) if delta > 0 else ratio
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = -torch.min(unclipped * advantages, clipped * advantages)
    if dual_clip > 0:
        loss = torch.where(advantages < 0, torch.min(loss, -dual_clip * advantages), loss)
    return loss


def gspo_surrogate(logprobs, old_logprobs, advantages, mask, eps_low: float, eps_high: float,
                   dual_clip: float = 0.0, delta: float = 0.0):
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): one ratio per sequence from the length-normalised
    log-ratio, s_i = exp(sum_t m_t (logp_t - old_t) / |y_i|),
    loss_i = -min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i), repeated on each of the sequence's tokens
    (N, R): --loss-agg seq-mean gives the paper's mean over sequences. advantages (N, 1)."""
    mask = mask.float()
    lengths = mask.sum(1, keepdim=True).clamp(min=1)
    seq_log_ratio = ((logprobs - old_logprobs) * mask).sum(1, keepdim=True) / lengths
    loss = clipped_surrogate(seq_log_ratio, torch.zeros_like(seq_log_ratio), advantages, eps_low, eps_high,
                             dual_clip, delta)
    return loss.expand_as(logprobs)


def cispo_surrogate(logprobs, old_logprobs, advantages, eps_max: float):
    """CISPO (MiniMax-M1, arXiv 2506.13585): -sg(min(r_t, eps_max)) A logp_t, r_t = exp(logp_t - old_t); the
    IS weight is clipped and detached instead of the update, so every token keeps its gradient
    A r_t grad logp_t (N, R)."""
    weight = torch.exp(logprobs - old_logprobs).clamp(max=eps_max).detach()
    return -weight * advantages * logprobs


def sapo_surrogate(logprobs, old_logprobs, advantages, tau_pos: float, tau_neg: float):
    """SAPO (arXiv 2511.20347): a soft gate instead of the clip, -A sigmoid(tau (r_t - 1)) 4 / tau with
    tau = tau_pos where A > 0 and tau_neg otherwise; at r = 1 its gradient is the unclipped surrogate's,
    -A grad r (N, R)."""
    ratio = torch.exp(logprobs - old_logprobs)
    pos, neg = torch.full_like(advantages, tau_pos), torch.full_like(advantages, tau_neg)
    tau = torch.where(advantages > 0, pos, neg)
    return -advantages * torch.sigmoid(tau * (ratio - 1)) * 4 / tau


def surrogate(args, logprobs, old_logprobs, advantages, mask):
    """The per-token policy loss (N, R) of --loss-type; advantages (N, 1)."""
    if args.loss_type == "gspo":
        return gspo_surrogate(logprobs, old_logprobs, advantages, mask, args.gspo_eps_low, args.gspo_eps_high,
                              args.dual_clip, args.delta)
    if args.loss_type == "cispo":
        return cispo_surrogate(logprobs, old_logprobs, advantages, args.cispo_eps_max)
    if args.loss_type == "sapo":
        return sapo_surrogate(logprobs, old_logprobs, advantages, args.sapo_tau_pos, args.sapo_tau_neg)
    return clipped_surrogate(logprobs, old_logprobs, advantages, args.eps_low, args.eps_high, args.dual_clip,
                             args.delta)


def kl_penalty(logprobs, ref_logprobs, estimator: str):
    """Per-token KL(pi || ref) estimate (Schulman 2020), d = logp - ref: k1 = d (unbiased, can be negative),
    k2 = d^2 / 2, k3 = exp(-d) - 1 + d (k3_kl). As a loss term, k2's gradient is the KL's on-policy gradient;
    k1's gradient is grad logp (0 in expectation), so k1 belongs in the reward."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    return k3_kl(logprobs, ref_logprobs)


def overlong_reward(lengths, max_len: int, buffer: int, penalty: float = 1.0):
    """DAPO soft overlong punishment (arXiv 2503.14476), added to the score: 0 if |y| <= L_max - L_cache;
    penalty x ((L_max - L_cache) - |y|) / L_cache within the last L_cache tokens; -penalty beyond L_max."""
    start = max_len - buffer
    shaped = ((start - lengths.float()) / buffer).clamp(min=-1, max=0)
    return penalty * shaped


def batch_scaled_advantages(scores, n: int, eps: float = 1e-4):
    """PPO Lite's batch-level scale (arXiv 2508.08221): A_i = (s_i - mean_group(s)) / (std_batch(s) + eps),
    the unbiased std of every score of the GLOBAL batch (sums all-reduced across ranks)."""
    groups = scores.view(-1, n)
    moments = [scores.numel(), scores.sum().item(), (scores.double() ** 2).sum().item()]
    s = dist.all_reduce(torch.tensor(moments, dtype=torch.float64))  # count, sum, sum of squares
    std = max((s[2] - s[1] ** 2 / s[0]).item() / max(s[0].item() - 1, 1), 0.0) ** 0.5
    return ((groups - groups.mean(1, keepdim=True)) / (std + eps)).view(-1)


def gdpo_advantages(parts: dict, weights, n: int, eps: float = 1e-4):
    """GDPO (arXiv 2601.05242): with several rewards r_k,
    A_k = (r_k - mean_group(r_k)) / (std_group(r_k) + eps) per source, then A = sum_k w_k A_k, then normalised
    over the GLOBAL batch, (A - mean) / (std + eps)."""
    total = sum(w * group_advantages(p, n, eps=eps) for w, p in zip(weights, parts.values()))
    moments = [total.numel(), total.sum().item(), (total.double() ** 2).sum().item()]
    s = dist.all_reduce(torch.tensor(moments, dtype=torch.float64))  # count, sum, sum of squares
    mean = (s[1] / s[0]).item()
    std = max((s[2] - s[1] ** 2 / s[0]).item() / max(s[0].item() - 1, 1), 0.0) ** 0.5
    return (total - mean) / (std + eps)


def top_entropy_mask(entropy, mask, rho: float):
    """The valid tokens whose entropy is in the top rho fraction of the valid tokens given (>= their (1 - rho)
    quantile) (arXiv 2506.01939: the ~20% high-entropy "forking" tokens); every valid token when rho >= 1."""
    if rho >= 1:
        return mask
    threshold = torch.quantile(entropy[mask.bool()].float(), 1 - rho)
    return mask * (entropy >= threshold)


def aggregate(per_token, mask, mode: str, max_new_tokens: int, n_seqs: float, n_tokens: float):
    """This micro-batch's share of the minibatch loss. n_seqs and n_tokens count the WHOLE minibatch (all
    ranks, all micro-batches), so the shares add up to: seq-mean, mean over sequences of each one's token
    mean; token-mean, sum over tokens / n_tokens; dr-grpo, sum over tokens / (n_seqs x max_new_tokens)."""
    mask = mask.float()
    if mode == "seq-mean":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    if mode == "token-mean":
        return (per_token * mask).sum() / n_tokens
    if mode == "dr-grpo":
        return (per_token * mask).sum() / (n_seqs * max_new_tokens)
    raise ValueError(mode)


def tis_weights(old_logprobs, sampler_logprobs, cap: float):
    """Truncated importance weights min(exp(old_t - sampler_t), cap) per token, detached; all 1 when cap is 0
    (TIS, Yao et al. 2025: the sampler's distribution, not the trainer's, produced the tokens)."""
    if cap <= 0:
        return torch.ones_like(old_logprobs)
    return torch.exp(old_logprobs - sampler_logprobs).clamp(max=cap).detach()


# ---------------------------------------------------------------------------------------------- the loop


def check_variants(args: Args):
    """The variant flags (README "Variants"): known values and combinations that mean something."""
    choices = {"loss_type": ("grpo", "gspo", "cispo", "sapo"), "scale_rewards": ("group", "batch", "none"),
               "multi_reward": ("sum", "gdpo"), "kl_estimator": ("k1", "k2", "k3"),
               "kl_in": ("loss", "reward")}
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            raise dist.UserError(f"--{name.replace('_', '-')} must be {', '.join(allowed)}; "
                                 f"got {getattr(args, name)}")
    if (args.dual_clip or args.delta) and args.loss_type in ("cispo", "sapo"):
        raise dist.UserError(f"--dual-clip and --delta bound a clipped ratio: use them with --loss-type grpo "
                             f"or gspo, not {args.loss_type}")
    if args.dual_clip and args.dual_clip <= 1:
        raise dist.UserError(f"--dual-clip must be > 1 (e.g. 3), or 0 for off; got {args.dual_clip}")
    if args.delta and args.delta <= 1 + args.eps_high:
        raise dist.UserError(f"--delta must be > 1 + --eps-high (e.g. 4), or 0 for off; got {args.delta}")
    if not 0 < args.top_entropy_quantile <= 1:
        raise dist.UserError(f"--top-entropy-quantile must be in (0, 1] (1: all tokens); "
                             f"got {args.top_entropy_quantile}")
    if not 0 <= args.overlong_buffer < args.max_new_tokens:
        raise dist.UserError(f"--overlong-buffer must be in [0, --max-new-tokens {args.max_new_tokens}); got "
                             f"{args.overlong_buffer}")
    if args.scale_rewards != "group" and (not args.std_normalize or args.multi_reward == "gdpo"):
        other = "--no-std-normalize" if not args.std_normalize else "--multi-reward gdpo"
        raise dist.UserError(f"--scale-rewards {args.scale_rewards} conflicts with {other} (which sets its "
                             f"own scale); give one of them")


def check_args(args: Args, world: int):
    if args.loss_agg not in ("seq-mean", "token-mean", "dr-grpo"):
        raise dist.UserError(f"--loss-agg must be seq-mean, token-mean or dr-grpo, got {args.loss_agg}")
    if args.n_samples < 2:
        raise dist.UserError("--n-samples must be >= 2: GRPO normalises within groups of samples")
    check_variants(args)
    if args.prompts_per_step % world:
        raise dist.UserError(f"--prompts-per-step {args.prompts_per_step} must divide by the {world} ranks")
    rollout_per_rank = args.prompts_per_step * args.n_samples // world
    if rollout_per_rank % args.num_minibatches:
        raise dist.UserError("--num-minibatches must divide the samples per rank "
                             "(prompts-per-step x n-samples / ranks)")
    return data.check_batch_sizes(rollout_per_rank // args.num_minibatches, args, 1,
                                  "samples per minibatch per rank")


def rollout_logprobs(model, ro, args):
    """log pi(y_t) of the rollout's response tokens under `model`, without gradients, one forward per
    micro-batch (a whole rollout's logits, N x T x vocab, would not fit); (N, R)."""
    chunks = data.micro_batches(torch.arange(len(ro.input_ids)), args.micro_batch_size)
    with torch.no_grad():
        per_chunk = [rollout.response_logprobs(model, ro.input_ids[mb], ro.attention_mask[mb], ro.prompt_len,
                                               args.temperature) for mb in chunks]
    return torch.cat(per_chunk)


def sample_batch(args, prompts, sampler, draws, step, generator, reward_fn, ctx, timing):
    """n responses per prompt from the current policy, scored: (rollout, scores (N,), reward parts, draws, the
    sampling's metrics). With --dynamic-sampling only groups with reward spread are kept, and more prompts are
    drawn until every rank holds prompts_per_step / ranks groups; all ranks sample the same number of rounds
    (generation and scoring can be collective)."""
    prompts_per_rank = args.prompts_per_step // ctx.world
    kept, dropped, tries, metrics = [], [], 0, {}
    while True:
        batch = [prompts[i] for i in sampler.rank_batch(draws, args.prompts_per_step, ctx)]
        draws, tries = draws + 1, tries + 1
        t = time.time()
        ro = generator.generate([p["prompt_ids"] for p in batch], args.n_samples, args.temperature,
                                args.top_p, args.max_new_tokens)
        timing["generate"] = timing.get("generate", 0) + time.time() - t
        t = time.time()
        texts = [batch[i]["prompt"] for i in ro.prompt_index.tolist()]
        extras = {k: [batch[i]["extras"][k] for i in ro.prompt_index.tolist()] for k in batch[0]["extras"]}
        scores, parts = reward_fn(texts, ro.texts, ro.eos.tolist(), extras, step=step)
        timing["score"] = timing.get("score", 0) + time.time() - t
        spread = scores.view(-1, args.n_samples).std(1) > 0
        metrics["rollout/zero_std_groups_frac"] = 1 - spread.float().mean().item()
        for g in range(len(batch)):
            keep = spread[g] or not args.dynamic_sampling
            (kept if keep else dropped).append((ro, scores, parts, g))
        full = torch.tensor(float(len(kept) >= prompts_per_rank or tries >= args.max_sample_tries))
        if dist.all_reduce(full, "min").item() == 1:  # every rank decides together
            break
    # Out of tries: top up with dropped zero-spread groups (advantage 0: no policy gradient, only the KL
    # term), so every rank trains on prompts_per_rank groups, i.e. grad_accum micro-batches per optimizer step
    topped_up = max(0, prompts_per_rank - len(kept))
    kept = kept[:prompts_per_rank] + dropped[:topped_up]
    resampled, topped_up = dist.all_reduce(torch.tensor([float(len(dropped)), float(topped_up)])).tolist()
    metrics.update({"rollout/resampled_groups": resampled, "rollout/topped_up_groups": topped_up})
    ro, scores, parts = merge_groups(kept, args.n_samples, generator.tok.pad_token_id)
    if not torch.isfinite(scores).all():
        raise dist.Diverged(f"non-finite reward at step {step}; stopping (the last checkpoint is intact)")
    return ro, scores, parts, draws, metrics


def merge_groups(groups, n: int, pad_id: int):
    """Stack the kept groups (from one or several rollouts) into one padded batch."""
    from shared.rollout import Rollout

    rows = [(ro, g * n + j, s, p) for ro, s, p, g in groups for j in range(n)]
    p_len = max(ro.prompt_len for ro, *_ in rows)
    r_len = max(ro.response_mask.shape[1] for ro, *_ in rows)
    ids = torch.full((len(rows), p_len + r_len), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    rmask = torch.zeros(len(rows), r_len, dtype=torch.bool)
    logp = torch.zeros(len(rows), r_len)
    for k, (ro, i, _, _) in enumerate(rows):
        pl, rl = ro.prompt_len, ro.response_mask.shape[1]
        ids[k, p_len - pl: p_len + rl] = ro.input_ids[i]
        attn[k, p_len - pl: p_len + rl] = ro.attention_mask[i]
        rmask[k, :rl], logp[k, :rl] = ro.response_mask[i], ro.logprobs[i]
    eos = torch.stack([ro.eos[i] for ro, i, *_ in rows])
    ro = Rollout(ids, attn, rmask, logp, eos, p_len, [ro.texts[i] for ro, i, *_ in rows],
                 torch.arange(len(groups)).repeat_interleave(n))
    scores = torch.stack([s[i] for ro, i, s, _ in rows])
    parts = {k: torch.stack([p[k][i] for ro, i, _, p in rows]) for k in rows[0][3]}
    return ro, scores, parts


def compute_advantages(args, policy, ref, generator, ro, scores, parts, reward_fn, ctx, timing):
    """Old log-probs (the sampler's when exact: HF backend in fp32; none when the step's one update is
    on-policy) and reference log-probs (none without a reference model), and the group advantages (N,) of the
    scores plus any shaping terms: (old_logprobs, ref_logprobs, advantages)."""
    t = time.time()
    old_logprobs = None  # one epoch, one minibatch, the KL in the loss: old == current (detached)
    if not (args.ppo_epochs == 1 and args.num_minibatches == 1 and args.kl_in == "loss"):
        old_logprobs = ro.logprobs if generator.exact_logprobs else rollout_logprobs(policy, ro, args)
    ref_logprobs = rollout_logprobs(ref, ro, args) if ref is not None else None
    timing["forward"] = time.time() - t
    shaping = {}  # score terms added to the reward sources (each its own source for --multi-reward gdpo)
    if args.overlong_buffer:
        lengths = ro.response_mask.sum(1).cpu()
        shaping["overlong"] = overlong_reward(lengths, args.max_new_tokens, args.overlong_buffer,
                                              args.overlong_penalty)
    if ref is not None and args.kl_in == "reward":
        kl_seq = (kl_penalty(old_logprobs, ref_logprobs, args.kl_estimator) * ro.response_mask).sum(1)
        shaping["kl"] = -args.kl_coef * kl_seq.cpu()
    shaped = scores + sum(shaping.values()) if shaping else scores
    if args.multi_reward == "gdpo":
        weights = list(reward_fn.weights or [1.0] * len(parts)) + [1.0] * len(shaping)
        advantages = gdpo_advantages({**parts, **shaping}, weights, args.n_samples)
    elif args.scale_rewards == "batch":
        advantages = batch_scaled_advantages(shaped, args.n_samples)
    else:
        std_normalize = args.std_normalize and args.scale_rewards == "group"
        advantages = group_advantages(shaped, args.n_samples, std_normalize)
    return old_logprobs, ref_logprobs, advantages.to(ctx.device)


def policy_update(args, policy, ro, old_logprobs, ref_logprobs, advantages, step, ctx, timing):
    """Epochs x minibatches (one optimizer step each) x micro-batches of the --loss-type surrogate plus the KL
    term: (the statistics summed over micro-batches and ranks, with "loss" the optimizer steps' mean loss; the
    sampler/trainer log-prob gap)."""
    t = time.time()
    mask = ro.response_mask.float()
    loss_mask = ro.response_mask & ro.eos[:, None] if args.mask_truncated else ro.response_mask  # DAPO filter
    stats, gap = Stats(), rollout.SamplerGap()
    n_total, epochs = len(advantages), args.ppo_epochs
    for _ in range(epochs):
        for minibatch in torch.randperm(n_total).chunk(args.num_minibatches):
            first = gap.count == 0  # before this step's first update: the sampler's error alone
            # the minibatch's tokens and sequences, all ranks: the normalisers of --loss-agg
            mb_tokens = max(1.0, dist.all_reduce(loss_mask[minibatch].sum().float()).item())
            mb_seqs = len(minibatch) * ctx.world
            if args.mask_truncated:
                mb_seqs = max(1.0, dist.all_reduce(loss_mask[minibatch].any(1).sum().float()).item())
            share_of = functools.partial(aggregate, mode=args.loss_agg, max_new_tokens=args.max_new_tokens,
                                         n_seqs=mb_seqs, n_tokens=mb_tokens)
            micro = data.micro_batches(minibatch, args.micro_batch_size)
            for k, idx in enumerate(micro):
                m, lmask = mask[idx], loss_mask[idx]
                with_entropy = "grad" if args.entropy_coef else True  # a gradient for the entropy bonus only
                logprobs, entropy = rollout.response_logprobs(
                    policy, ro.input_ids[idx], ro.attention_mask[idx], ro.prompt_len, args.temperature,
                    with_entropy)
                if first:
                    gap.add(logprobs, ro.logprobs[idx], m)
                old = logprobs.detach() if old_logprobs is None else old_logprobs[idx]
                per_token = surrogate(args, logprobs, old, advantages[idx, None], m)
                per_token = per_token * tis_weights(old, ro.logprobs[idx], args.tis_cap)
                if args.top_entropy_quantile < 1:  # the normaliser still counts every token (as TRL)
                    top = top_entropy_mask(entropy.detach(), lmask, args.top_entropy_quantile)
                    per_token = per_token * top
                kl = torch.zeros_like(logprobs)
                if ref_logprobs is not None:
                    kl = kl_penalty(logprobs, ref_logprobs[idx], args.kl_estimator)
                share = share_of(per_token, lmask)  # this micro-batch's share of the minibatch's loss
                if args.kl_in == "loss":
                    share = share + args.kl_coef * share_of(kl, lmask)
                if args.entropy_coef:
                    share = share - args.entropy_coef * share_of(entropy, lmask)
                engine.train_micro_batch(policy, share, ctx, step, last=k == len(micro) - 1)
                ratio = torch.exp(logprobs.detach() - old)
                clipped = ((ratio < 1 - args.eps_low) | (ratio > 1 + args.eps_high)).float()
                stats.add(loss=share.item(), kl_ref=(kl * m).sum().item(), entropy=(entropy * m).sum().item(),
                          clipped=(clipped * m).sum().item(), tokens=m.sum().item(),
                          approx_kl=((old - logprobs.detach()) * m).sum().item())
    totals = stats.all_ranks()
    totals["loss"] /= epochs * args.num_minibatches  # each optimizer step's loss is the sum of its shares
    timing["train"] = time.time() - t
    return totals, gap


def step_metrics(args, step, ro, scores, parts, totals, gap, policy, generator) -> dict:
    """The step's figures under stable names: the rollout, the update's statistics per response token (all
    ranks), the sampler/trainer gap (it stops a run whose sampler is stale), the loss, the learning rate."""
    tokens = max(totals["tokens"], 1)
    return {
        "rollout/reward": scores.mean().item(), "rollout/reward_std": scores.std().item(),
        **{f"rollout/reward_{k}": v.mean().item() for k, v in parts.items() if len(parts) > 1},
        "rollout/response_length": ro.response_mask.sum(1).float().mean().item(),
        "rollout/truncated_frac": 1 - ro.eos.float().mean().item(),
        "policy/kl_ref": totals["kl_ref"] / tokens, "policy/entropy": totals["entropy"] / tokens,
        "policy/clip_frac": totals["clipped"] / tokens, "policy/approx_kl": totals["approx_kl"] / tokens,
        **gap.check(args, generator.backend, step),
        "loss/policy": totals["loss"], "train/lr": policy.get_lr()[0],
        "train/optimizer_steps": policy.global_steps}


def main(args: Args):
    ctx = dist.init(args.seed)
    # 1. check flags, data and rewards before anything is written
    grad_accum = check_args(args, ctx.world)
    rollout.check_args(args, ctx)
    tok = engine.load_tokenizer(args.model_path, args)
    train_rows, eval_rows = data.train_eval_rows(args, "prompt")
    prompts = data.tokenize(train_rows, tok, "prompt", args, "train", dist.say)
    eval_prompts = data.tokenize(eval_rows, tok, "prompt", args, "eval", dist.say) if eval_rows else []
    reward_fn = rewards.build(args, ctx, probe=prompts[0])  # one trial call, before anything is written
    # held-out scorers: eval/task_score, eval/reward
    scorers = rewards.eval_scorers(args, eval_prompts, reward_fn, rule_rewards=True)

    # 2. models: policy (trained), reference (frozen; kl_coef > 0 only): with LoRA the policy, adapters off
    policy = engine.load_model(args.model_path, args, ctx, lora="train")
    ref = None
    if args.kl_coef > 0:
        ref = lora.reference(policy, args) or engine.wrap_frozen(
            engine.load_model(args.model_path, args, ctx, lora="start"), args, ctx)
    out = engine.prepare_output_dir(args, ctx, "grpo")
    total_updates = args.steps * args.ppo_epochs * args.num_minibatches
    policy = engine.wrap_trainable(policy, args, ctx, args.lr, args.micro_batch_size, grad_accum,
                                   total_updates)
    tracker = Tracker(args, out, ctx, "grpo")
    sampler = data.Sampler(len(prompts), args.seed)
    step, draws, before = 0, 0, None
    if args.resume:
        state = engine.load_checkpoint(out, {"policy": policy}, ctx)
        step, draws, before = state["step"], state["draws"], state["before"]
    generator = rollout.Generator(args, policy, tok, ctx)  # --rollout-backend hf/vllm; synced after updates
    evaluate = functools.partial(rollout.greedy_eval, generator, tok, eval_prompts, scorers, ctx,
                                 args.max_new_tokens)
    if before is None:
        before = tracker.evaluation("before", *evaluate())

    while step < args.steps:
        step += 1  # the step trained now, 1-based as in the logs
        t0, timing = time.time(), {}
        # 3. sample n responses per prompt and score them (--dynamic-sampling: groups with reward spread)
        ro, scores, parts, draws, metrics = sample_batch(args, prompts, sampler, draws, step, generator,
                                                         reward_fn, ctx, timing)

        # 4. reference (and old) log-probs; advantages within each group
        old_logprobs, ref_logprobs, advantages = compute_advantages(args, policy, ref, generator, ro, scores,
                                                                    parts, reward_fn, ctx, timing)

        # 5. clipped-surrogate + k3 KL updates: epochs x minibatches (an optimizer step each) x micro-batches
        totals, gap = policy_update(args, policy, ro, old_logprobs, ref_logprobs, advantages, step, ctx,
                                    timing)
        timing["weight_sync"] = generator.sync(policy)  # the next rollout samples from the updated policy

        # 6. log, evaluate, save
        metrics.update(step_metrics(args, step, ro, scores, parts, totals, gap, policy, generator))
        metrics["perf/tokens_per_s"] = ro.attention_mask.sum().item() * ctx.world / (time.time() - t0)
        metrics.update({f"time/{k}": v for k, v in timing.items()})
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            metrics.update(tracker.evaluation(f"step {step}", *evaluate()))
        tracker.log(step, metrics, show=("rollout/reward", "policy/kl_ref", "rollout/response_length",
                                         "eval/task_score"))
        state = {"step": step, "draws": draws, "before": before}
        if engine.periodic_save(args, out, step, {"policy": policy}, state, tok, ctx):
            return

    # 7. final eval and export
    after = tracker.evaluation("after", *evaluate())
    engine.export_hf(policy, tok, out, ctx)
    tracker.summary({"before": before, "after": after, "steps": step, "world_size": ctx.world,
                     "sources": rewards.sources(scorers, **{"rollout/reward": reward_fn}),
                     "model_path": args.model_path, "dataset": args.dataset})
    tracker.print(f"[grpo] saved to {out}")


if __name__ == "__main__":
    dist.cli(main, Args, EMBEDDED)
