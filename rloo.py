"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740).

    python rloo.py                          # embedded SFT policy, built-in addition task, exact-match reward
    deepspeed rloo.py --model-path SFT_DIR --dataset prompts.jsonl --reward-path RM_DIR
    deepspeed rloo.py ... --loss-type ppo --kl-per-token

k samples per prompt; the baseline of sample i is the mean score of the OTHER k-1 samples,
A_i = s_i - mean_{j!=i} s_j. The KL to the reference enters the reward: sequence-level
s_i - kl_coef * sum_t (logp_t - ref_t) as in the paper (--kl-per-token: the KL of the tokens from t on is
subtracted from token t's advantage instead). Loss: REINFORCE on the sequence, -A_i * sum_t logp_t (paper), or
the PPO-clipped token loss (--loss-type ppo).
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
    """responses per prompt (k)"""
    temperature: float = 1.0
    """sampling temperature (the trainer's log-probs use the same temperature)"""
    top_p: float = 1.0
    """nucleus sampling"""
    max_new_tokens: int = 256
    """response length limit"""
    lr: float = 1e-6
    """policy learning rate (TRL's RLOO default)"""
    kl_coef: float = 0.05
    """KL coefficient in the reward (k1 estimator); 0 loads no reference model"""
    kl_per_token: bool = False
    """subtract the KL per token (from t to the end) from token t's advantage instead of from the sequence
    score"""
    loss_type: str = "reinforce"
    """reinforce: -A_i * sum_t logp_t, mean over sequences (paper); ppo: clipped token loss, mean over
    tokens"""
    eps_low: float = 0.2
    """clip range below 1 for the ratio (--loss-type ppo)"""
    eps_high: float = 0.2
    """clip range above 1 for the ratio (--loss-type ppo)"""
    ppo_epochs: int = 1
    """passes over each rollout batch (--loss-type ppo)"""
    num_minibatches: int = 1
    """optimizer steps per epoch"""
    micro_batch_size: int = 8
    """sequences per forward/backward pass per rank"""
    eval_every: int = 10
    """evaluate on held-out prompts every N steps"""
    # --- variants researchers compare (all off by default; README "Variants") ---
    dual_clip: float = 0.0
    """dual-clip PPO (Ye et al. 2020, arXiv 1912.09729): for A < 0 the loss is at most -c A, c > 1 (e.g. 3);
    0: off"""
    delta: float = 0.0
    """two-sided clipping (INTELLECT-2, arXiv 2505.07291): the unclipped term uses min(r, delta),
    delta > 1 + eps_high (e.g. 4); 0: off (both with --loss-type ppo)"""
    kl_estimator: str = "k1"
    """KL(policy || reference) per token, d = logp - ref: k1 = d (paper), k2 = d^2 / 2,
    k3 = exp(-d) - 1 + d"""
    kl_in: str = "reward"
    """reward: kl_coef x KL subtracted from the score (paper; --kl-per-token: from the advantages); loss:
    kl_coef x the token-mean KL added to the loss instead (use k2 or k3 there)"""


# Defaults tuned for the embedded 0.8M demo model (and models trained from it), which --defaults auto picks
# for it; the Args above hold the values for pretrained models. Flags you give always win.
EMBEDDED = dict(lr=1e-4, max_new_tokens=8, micro_batch_size=64)


# ---------------------------------------------------------------------------------------------- the math


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = s_i - (sum_j s_j - s_i) / (k - 1) within each group of k contiguous samples; scores (N,)."""
    groups = scores.view(-1, k)
    baseline = (groups.sum(1, keepdim=True) - groups) / (k - 1)
    return (groups - baseline).view(-1)


def kl_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float, per_token: bool, estimator: str = "k1"):
    """Sequence level: (s_i - kl_coef * sum_t KL_t, None); per token: (s_i, kl_coef * sum_{k>=t} KL_k) with
    KL_t = k1 = logp_t - ref_t (or k2, k3: kl_penalty) over response tokens; the second term is subtracted
    from each token's advantage."""
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask
    if not per_token:
        return scores - kl_coef * kl.sum(1), None
    return scores, kl_coef * kl.flip(1).cumsum(1).flip(1)


def reinforce_loss(logprobs, advantages, mask):
    """-A_i * sum_t logp_t, averaged over this micro-batch's sequences; advantages (N,) or (N, R)."""
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    return -((adv * logprobs * mask).sum(1)).mean()


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


def kl_penalty(logprobs, ref_logprobs, estimator: str):
    """Per-token KL(pi || ref) estimate (Schulman 2020), d = logp - ref: k1 = d (unbiased, can be negative),
    k2 = d^2 / 2, k3 = exp(-d) - 1 + d. As a loss term, k2's gradient is the KL's on-policy gradient; k1's
    gradient is grad logp (0 in expectation), so k1 belongs in the reward."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    return torch.exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1


def tis_weights(old_logprobs, sampler_logprobs, cap: float):
    """Truncated importance weights min(exp(old_t - sampler_t), cap) per token, detached; all 1 when cap is 0
    (TIS, Yao et al. 2025: the sampler's distribution, not the trainer's, produced the tokens)."""
    if cap <= 0:
        return torch.ones_like(old_logprobs)
    return torch.exp(old_logprobs - sampler_logprobs).clamp(max=cap).detach()


# ---------------------------------------------------------------------------------------------- the loop


def check_variants(args: Args):
    """The variant flags (README "Variants"): known values and combinations that mean something."""
    choices = {"kl_estimator": ("k1", "k2", "k3"), "kl_in": ("reward", "loss")}
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            raise dist.UserError(f"--{name.replace('_', '-')} must be {', '.join(allowed)}; "
                                 f"got {getattr(args, name)}")
    if (args.dual_clip or args.delta) and args.loss_type != "ppo":
        raise dist.UserError("--dual-clip and --delta bound the clipped ratio of --loss-type ppo; add "
                             "--loss-type ppo")
    if args.dual_clip and args.dual_clip <= 1:
        raise dist.UserError(f"--dual-clip must be > 1 (e.g. 3), or 0 for off; got {args.dual_clip}")
    if args.delta and args.delta <= 1 + args.eps_high:
        raise dist.UserError(f"--delta must be > 1 + --eps-high (e.g. 4), or 0 for off; got {args.delta}")


def check_args(args: Args, world: int):
    if args.loss_type not in ("reinforce", "ppo"):
        raise dist.UserError(f"--loss-type must be reinforce or ppo, got {args.loss_type}")
    if args.n_samples < 2:
        raise dist.UserError("--n-samples must be >= 2: the leave-one-out baseline needs other samples")
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


def sample_batch(args, prompts, sampler, step, generator, reward_fn, ctx, timing):
    """k responses per prompt from the current policy, scored: (rollout, scores (N,), reward parts, the
    sampling's metrics)."""
    draw = step - 1  # the data position of step s is draw s - 1 of the sampler
    batch = [prompts[i] for i in sampler.rank_batch(draw, args.prompts_per_step, ctx)]
    t = time.time()
    ro = generator.generate([p["prompt_ids"] for p in batch], args.n_samples, args.temperature,
                            args.top_p, args.max_new_tokens)
    timing["generate"] = time.time() - t
    t = time.time()
    texts = [batch[i]["prompt"] for i in ro.prompt_index.tolist()]
    extras = {k: [batch[i]["extras"][k] for i in ro.prompt_index.tolist()] for k in batch[0]["extras"]}
    scores, parts = reward_fn(texts, ro.texts, ro.eos.tolist(), extras, step=step)
    timing["score"] = time.time() - t
    flat = scores.view(-1, args.n_samples).std(1) == 0
    metrics = {"rollout/zero_std_groups_frac": flat.float().mean().item()}
    if not torch.isfinite(scores).all():
        raise dist.Diverged(f"non-finite reward at step {step}; stopping (the last checkpoint is intact)")
    return ro, scores, parts, metrics


def compute_advantages(args, policy, ref, generator, ro, scores, ctx, timing):
    """Old log-probs (the sampler's when exact: HF backend in fp32) and reference log-probs (the old ones
    without a reference model), the KL-penalised scores and their leave-one-out advantages, (N, R) with
    --kl-per-token's KL to go subtracted: (old_logprobs, ref_logprobs, advantages)."""
    t = time.time()
    mask = ro.response_mask.float()
    old_logprobs = ro.logprobs if generator.exact_logprobs else rollout_logprobs(policy, ro, args)
    ref_logprobs = rollout_logprobs(ref, ro, args) if ref is not None else old_logprobs
    timing["forward"] = time.time() - t
    reward_kl_coef = args.kl_coef if args.kl_in == "reward" else 0.0  # --kl-in loss: a loss term instead
    penalised, kl_to_go = kl_rewards(scores.to(ctx.device), old_logprobs, ref_logprobs, mask, reward_kl_coef,
                                     args.kl_per_token, args.kl_estimator)
    advantages = rloo_advantages(penalised, args.n_samples)[:, None]  # (N, 1)
    if kl_to_go is not None:
        return old_logprobs, ref_logprobs, advantages - kl_to_go
    return old_logprobs, ref_logprobs, advantages.expand_as(mask)


def policy_update(args, policy, ro, old_logprobs, ref_logprobs, advantages, step, ctx, timing):
    """Epochs x minibatches (one optimizer step each) x micro-batches of the REINFORCE (or PPO-clipped) loss:
    (the statistics summed over micro-batches and ranks, with "loss" the optimizer steps' mean loss; the
    sampler/trainer log-prob gap)."""
    t = time.time()
    mask = ro.response_mask.float()
    stats, gap = Stats(), rollout.SamplerGap()
    n_total, epochs = len(advantages), args.ppo_epochs if args.loss_type == "ppo" else 1
    for _ in range(epochs):
        for minibatch in torch.randperm(n_total).chunk(args.num_minibatches):
            first = gap.count == 0  # before this step's first update: the sampler's error alone
            mb_tokens = dist.all_reduce(mask[minibatch].sum()).item()  # the minibatch's tokens, all ranks
            micro = data.micro_batches(minibatch, args.micro_batch_size)
            for k, idx in enumerate(micro):
                m = mask[idx]
                logprobs, entropy = rollout.response_logprobs(
                    policy, ro.input_ids[idx], ro.attention_mask[idx], ro.prompt_len, args.temperature, True)
                if first:
                    gap.add(logprobs, ro.logprobs[idx], m)
                w = tis_weights(old_logprobs[idx], ro.logprobs[idx], args.tis_cap)
                if args.loss_type == "reinforce":  # share of the minibatch's mean over sequences, all ranks
                    loss = reinforce_loss(logprobs, advantages[idx] * w, m)  # this micro-batch's mean
                    share = loss * len(idx) / (len(minibatch) * ctx.world)
                else:  # share of the token mean over the minibatch, all ranks
                    per_token = clipped_surrogate(logprobs, old_logprobs[idx], advantages[idx], args.eps_low,
                                                  args.eps_high, args.dual_clip, args.delta)
                    per_token = per_token * w
                    share = (per_token * m).sum() / mb_tokens
                if args.kl_in == "loss" and args.kl_coef > 0:  # share of kl_coef x the token-mean KL
                    kl = kl_penalty(logprobs, ref_logprobs[idx], args.kl_estimator)
                    share = share + args.kl_coef * (kl * m).sum() / mb_tokens
                engine.train_micro_batch(policy, share, ctx, step, last=k == len(micro) - 1)
                ratio = torch.exp(logprobs.detach() - old_logprobs[idx])
                clipped = ((ratio < 1 - args.eps_low) | (ratio > 1 + args.eps_high)).float()
                kl_ref = (old_logprobs[idx] - ref_logprobs[idx]) * m  # k1 of the sampled tokens
                stats.add(loss=share.item(), kl_ref=kl_ref.sum().item(), entropy=(entropy * m).sum().item(),
                          clipped=(clipped * m).sum().item(), tokens=m.sum().item())
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
        "policy/clip_frac": totals["clipped"] / tokens,
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
    out = engine.prepare_output_dir(args, ctx, "rloo")
    total_updates = args.steps * args.ppo_epochs * args.num_minibatches
    policy = engine.wrap_trainable(policy, args, ctx, args.lr, args.micro_batch_size, grad_accum,
                                   total_updates)
    tracker = Tracker(args, out, ctx, "rloo")
    sampler = data.Sampler(len(prompts), args.seed)
    step, before = 0, None
    if args.resume:
        state = engine.load_checkpoint(out, {"policy": policy}, ctx)
        step, before = state["step"], state["before"]
    generator = rollout.Generator(args, policy, tok, ctx)  # --rollout-backend hf/vllm; synced after updates
    evaluate = functools.partial(rollout.greedy_eval, generator, tok, eval_prompts, scorers, ctx,
                                 args.max_new_tokens)
    if before is None:
        before = tracker.evaluation("before", *evaluate())

    while step < args.steps:
        step += 1  # the step trained now, 1-based as in the logs
        t0, timing = time.time(), {}
        # 3. sample k responses per prompt and score them
        ro, scores, parts, metrics = sample_batch(args, prompts, sampler, step, generator, reward_fn, ctx,
                                                  timing)

        # 4. old and reference log-probs; KL-penalised scores; leave-one-out advantages
        old_logprobs, ref_logprobs, advantages = compute_advantages(args, policy, ref, generator, ro, scores,
                                                                    ctx, timing)

        # 5. REINFORCE (or PPO-clipped) updates: epochs x minibatches (an optimizer step each) x micro-batches
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
        state = {"step": step, "before": before}
        if engine.periodic_save(args, out, step, {"policy": policy}, state, tok, ctx):
            return

    # 7. final eval and export
    after = tracker.evaluation("after", *evaluate())
    engine.export_hf(policy, tok, out, ctx)
    tracker.summary({"before": before, "after": after, "steps": step, "world_size": ctx.world,
                     "sources": rewards.sources(scorers, **{"rollout/reward": reward_fn}),
                     "model_path": args.model_path, "dataset": args.dataset})
    tracker.print(f"[rloo] saved to {out}")


if __name__ == "__main__":
    dist.cli(main, Args, EMBEDDED)
