"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300), with the variants
researchers compare: DAPO's token-mean loss, clip-higher and dynamic sampling (Yu et al. 2025, arXiv 2503.14476) and
Dr. GRPO's constant normaliser without std division (Liu et al. 2025, arXiv 2503.20783).

    python grpo.py                                  # embedded SFT policy, built-in addition task, exact-match reward
    deepspeed grpo.py --model-path SFT_DIR --dataset prompts.jsonl --reward-fn my_rewards:score
    deepspeed grpo.py ... --loss-agg token-mean --eps-high 0.28 --dynamic-sampling --beta 0     # DAPO
    deepspeed grpo.py ... --loss-agg dr-grpo --no-std-normalize                                 # Dr. GRPO

For each prompt, n responses are sampled and scored; a response's advantage is its score standardised within its
group, A_i = (s_i - mean(s)) / (std(s) + eps), the same for all of its tokens. The loss is the PPO-clipped surrogate
plus beta * KL(policy || reference) with the k3 estimator (with --beta 0 no reference model is loaded).
"""
import time
from dataclasses import dataclass

import torch

from shared import data, dist, engine, rewards, rollout, tasks
from shared.args import DataArgs, RewardArgs, RolloutArgs, RunArgs
from shared.tracking import Tracker


@dataclass
class Args(RunArgs, DataArgs, RewardArgs, RolloutArgs):
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
    max_new_tokens: int = 8
    """response length limit"""
    lr: float = 1e-4
    """policy learning rate"""
    beta: float = 0.04
    """KL coefficient (k3 estimator, as a loss term); 0 loads no reference model"""
    eps_low: float = 0.2
    """clip range below 1 for the ratio"""
    eps_high: float = 0.2
    """clip range above 1 (DAPO clip-higher: 0.28)"""
    loss_agg: str = "seq-mean"
    """seq-mean: mean over each sequence's tokens, then over sequences (paper); token-mean: mean over all tokens of the
    batch (DAPO); dr-grpo: sum over tokens / (sequences x max_new_tokens) (Dr. GRPO)"""
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
    micro_batch_size: int = 64
    """sequences per forward/backward pass per rank"""
    eval_every: int = 10
    """evaluate on held-out prompts every N steps"""


# ---------------------------------------------------------------------------------------------- the math


def group_advantages(scores: torch.Tensor, n: int, std_normalize: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (s_i - mean_group(s)) / (std_group(s) + eps); scores (N,) with each group's n samples contiguous.
    std is the unbiased sample std (as in the paper's code and TRL)."""
    groups = scores.view(-1, n)
    adv = groups - groups.mean(1, keepdim=True)
    if std_normalize:
        adv = adv / (groups.std(1, keepdim=True) + eps)
    return adv.view(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k3 = exp(d) - d - 1 >= 0, d = ref - logp (Schulman 2020), unclamped as in TRL:
    a clamp would zero the gradient where the policy has drifted furthest (an overflow trips the non-finite-loss
    check)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def clipped_surrogate(logprobs, old_logprobs, advantages, eps_low: float, eps_high: float):
    """Per-token PPO loss -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A), rho = exp(logp - old); (N, R)."""
    ratio = torch.exp(logprobs - old_logprobs)
    return -torch.min(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)


def aggregate(per_token, mask, mode: str, max_new_tokens: int, n_seqs: float, n_tokens: float):
    """This micro-batch's share of the minibatch loss. n_seqs and n_tokens count the WHOLE minibatch (all ranks, all
    micro-batches), so the shares add up to: seq-mean, mean over sequences of each one's token mean; token-mean, sum
    over tokens / n_tokens; dr-grpo, sum over tokens / (n_seqs x max_new_tokens)."""
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


def check_args(args: Args, world: int):
    if args.loss_agg not in ("seq-mean", "token-mean", "dr-grpo"):
        raise dist.UserError(f"--loss-agg must be seq-mean, token-mean or dr-grpo, got {args.loss_agg}")
    if args.n_samples < 2:
        raise dist.UserError("--n-samples must be >= 2: GRPO normalises within groups of samples")
    rollout_per_rank = args.prompts_per_step * args.n_samples // world
    if args.prompts_per_step % world:
        raise dist.UserError(f"--prompts-per-step {args.prompts_per_step} must divide by the {world} ranks")
    if rollout_per_rank % args.num_minibatches:
        raise dist.UserError("--num-minibatches must divide the samples per rank (prompts-per-step x n-samples / ranks)")
    return data.check_batch_sizes(rollout_per_rank // args.num_minibatches, args.micro_batch_size, 1,
                                  "samples per minibatch per rank")


def main(args: Args):
    ctx = dist.init(args.seed)
    # 1. check flags, data and rewards before anything is written
    grad_accum = check_args(args, ctx.world)
    rollout.check_args(args, ctx)
    say = print if ctx.main else (lambda *a: None)
    tok = engine.load_tokenizer(args.model_path, args)
    train_rows, eval_rows = data.train_eval_rows(args, "prompt")
    prompts = data.tokenize(train_rows, tok, "prompt", args, "train", say)
    eval_prompts = data.tokenize(eval_rows, tok, "prompt", args, "eval", say) if eval_rows else []
    reward_fn = rewards.build(args, ctx, probe=prompts[0])  # one trial call, before anything is written
    eval_fn = tasks.get(args.dataset).reward if args.dataset in tasks.TASKS else (
        lambda prompts, responses, **x: reward_fn(prompts, responses, [True] * len(responses), x)[0])

    # 2. models: policy (trained), reference (frozen; only with beta > 0)
    policy = engine.load_model(args.model_path, args, ctx)
    ref = engine.wrap_frozen(engine.load_model(args.model_path, args, ctx), args, ctx) if args.beta > 0 else None
    out = engine.prepare_output_dir(args, ctx, "grpo")
    total_updates = args.steps * args.ppo_epochs * args.num_minibatches
    policy = engine.wrap_trainable(policy, args, ctx, args.lr, args.micro_batch_size, grad_accum, total_updates)
    tracker = Tracker(args, out, ctx, "grpo")
    sampler = data.Sampler(len(prompts), args.seed)
    step, draws, before = 0, 0, None
    if args.resume:
        state = engine.load_checkpoint(out, {"policy": policy}, ctx)
        step, draws, before = state["step"], state["draws"], state["before"]
    generator = rollout.Generator(args, policy, tok, ctx)  # --rollout-backend hf or vllm; synced after updates
    if before is None:
        before = {"eval/accuracy": rollout.greedy_eval(generator, tok, eval_prompts, eval_fn, ctx,
                                                       args.max_new_tokens)[0]}
        tracker.print(f"[grpo] before: {before}")
    prompts_per_rank = args.prompts_per_step // ctx.world

    while step < args.steps:
        t0, timing, metrics = time.time(), {}, {}
        # 3. sample n responses per prompt and score them; with dynamic sampling keep only groups with reward spread.
        # All ranks sample the same number of rounds (generation and scoring can be collective)
        kept, dropped, tries = [], [], 0
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
            scores, parts = reward_fn(texts, ro.texts, ro.eos.tolist(), extras, step=step + 1)
            timing["score"] = timing.get("score", 0) + time.time() - t
            spread = scores.view(-1, args.n_samples).std(1) > 0
            metrics["rollout/zero_std_groups_frac"] = 1 - spread.float().mean().item()
            for g in range(len(batch)):
                (kept if spread[g] or not args.dynamic_sampling else dropped).append((ro, scores, parts, g))
            full = torch.tensor(float(len(kept) >= prompts_per_rank or tries >= args.max_sample_tries))
            if dist.all_reduce(full, "min").item() == 1:  # every rank decides together
                break
        # Out of tries: top up with dropped zero-spread groups (advantage 0: no policy gradient, only the KL term), so
        # every rank trains on prompts_per_rank groups, i.e. grad_accum micro-batches per optimizer step on all ranks
        topped_up = max(0, prompts_per_rank - len(kept))
        kept = kept[:prompts_per_rank] + dropped[:topped_up]
        resampled, topped_up = dist.all_reduce(torch.tensor([float(len(dropped)), float(topped_up)])).tolist()
        ro, scores, parts = merge_groups(kept, args.n_samples, tok.pad_token_id)
        if not torch.isfinite(scores).all():
            raise dist.Diverged(f"non-finite reward at step {step + 1}; stopping (the last checkpoint is intact)")

        # 4. advantages within each group; reference log-probs for the KL term
        t = time.time()
        advantages = group_advantages(scores, args.n_samples, args.std_normalize).to(ctx.device)
        with torch.no_grad():  # one forward per micro-batch: a whole rollout's logits (N x T x vocab) would not fit
            chunks = data.micro_batches(torch.arange(len(scores)), args.micro_batch_size)
            ref_logprobs = torch.cat([rollout.response_logprobs(ref, ro.input_ids[mb], ro.attention_mask[mb],
                                                                ro.prompt_len, args.temperature) for mb in chunks]) \
                if ref is not None else None
            reuse_old = args.ppo_epochs == 1 and args.num_minibatches == 1  # old == current policy: skip a forward
            if not reuse_old:  # the sampler's log-probs when exact (HF backend in fp32), else a recomputation
                old_logprobs = ro.logprobs if generator.exact_logprobs else torch.cat([rollout.response_logprobs(
                    policy, ro.input_ids[mb], ro.attention_mask[mb], ro.prompt_len, args.temperature)
                    for mb in chunks])
        timing["forward"] = time.time() - t

        # 5. clipped-surrogate + k3 KL updates over minibatches
        t = time.time()
        stats, gap = torch.zeros(6, dtype=torch.float64), rollout.SamplerGap()
        n_total = len(scores)
        for _ in range(args.ppo_epochs):
            order = torch.randperm(n_total)
            for minibatch in order.chunk(args.num_minibatches):
                first = gap.count == 0  # before this step's first update: the sampler's error alone
                mb_tokens = dist.all_reduce(ro.response_mask[minibatch].sum().float()).item()
                mb_seqs = len(minibatch) * ctx.world
                for idx in data.micro_batches(minibatch, args.micro_batch_size):
                    mask = ro.response_mask[idx]
                    logprobs, entropy = rollout.response_logprobs(
                        policy, ro.input_ids[idx], ro.attention_mask[idx], ro.prompt_len, args.temperature, True)
                    old = logprobs.detach() if reuse_old else old_logprobs[idx]
                    if first:
                        gap.add(logprobs, ro.logprobs[idx], mask)
                    per_token = clipped_surrogate(logprobs, old, advantages[idx, None], args.eps_low, args.eps_high)
                    per_token = per_token * tis_weights(old, ro.logprobs[idx], args.tis_cap)
                    pg_loss = aggregate(per_token, mask, args.loss_agg, args.max_new_tokens, mb_seqs, mb_tokens)
                    kl = k3_kl(logprobs, ref_logprobs[idx]) if ref is not None else torch.zeros_like(logprobs)
                    kl_loss = aggregate(kl, mask, args.loss_agg, args.max_new_tokens, mb_seqs, mb_tokens)
                    # DeepSpeed divides by grad_accum and averages over ranks; the shares above already sum to 1
                    loss = (pg_loss + args.beta * kl_loss) * grad_accum * ctx.world
                    if not torch.isfinite(loss):
                        raise dist.Diverged(f"non-finite loss at step {step + 1}; stopping (the last checkpoint is intact)")
                    policy.backward(loss)
                    policy.step()
                    m = mask.float()
                    ratio = torch.exp(logprobs.detach() - old)
                    clipped = ((ratio < 1 - args.eps_low) | (ratio > 1 + args.eps_high)).float()
                    stats += torch.tensor([pg_loss.item() * mb_seqs / len(idx), (kl * m).sum().item(),
                                           (entropy * m).sum().item(), (clipped * m).sum().item(),
                                           ((old - logprobs.detach()) * m).sum().item(), m.sum().item()],
                                          dtype=torch.float64)
                grad_norm = policy.get_global_grad_norm()
                if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
                    raise dist.Diverged(f"non-finite gradient norm at step {step + 1}; stopping (the last checkpoint "
                                       f"is intact)")
        timing["train"] = time.time() - t
        timing["weight_sync"] = generator.sync(policy)  # the next rollout samples from the updated policy
        step += 1

        # 6. log, evaluate, save
        n_tok = max(stats[5].item(), 1)
        metrics.update({
            "rollout/reward": scores.mean().item(), "rollout/reward_std": scores.std().item(),
            **{f"rollout/reward_{k}": v.mean().item() for k, v in parts.items() if len(parts) > 1},
            "rollout/response_length": ro.response_mask.sum(1).float().mean().item(),
            "rollout/truncated_frac": 1 - ro.eos.float().mean().item(),
            "rollout/resampled_groups": resampled, "rollout/topped_up_groups": topped_up,
            "policy/kl_ref": stats[1].item() / n_tok, "policy/entropy": stats[2].item() / n_tok,
            "policy/clip_frac": stats[3].item() / n_tok, "policy/approx_kl": stats[4].item() / n_tok,
            **gap.check(args, generator.backend, step),
            "loss/policy": stats[0].item() / max(1, n_total), "train/lr": policy.get_lr()[0],
            "train/optimizer_steps": policy.global_steps,
            "perf/tokens_per_s": ro.attention_mask.sum().item() * ctx.world / (time.time() - t0),
            **{f"time/{k}": v for k, v in timing.items()}})
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            metrics["eval/accuracy"] = rollout.greedy_eval(generator, tok, eval_prompts, eval_fn, ctx,
                                                           args.max_new_tokens)[0]
        tracker.log(step, metrics, show=("rollout/reward", "policy/kl_ref", "rollout/response_length", "eval/accuracy"))
        state = {"step": step, "draws": draws, "before": before}
        if engine.periodic_save(args, out, step, {"policy": policy}, state, tok, ctx):
            return

    # 7. final eval and export
    after = {"eval/accuracy": rollout.greedy_eval(generator, tok, eval_prompts, eval_fn, ctx, args.max_new_tokens)[0]}
    engine.export_hf(policy, tok, out, ctx)
    tracker.summary({"before": before, "after": after, "steps": step, "world_size": ctx.world,
                     "model_path": args.model_path, "dataset": args.dataset})
    tracker.print(f"[grpo] after: {after}\n[grpo] saved to {out}")


def merge_groups(groups, n: int, pad_id: int):
    """Stack the kept groups (from one or several rollouts) into one padded batch."""
    from shared.rollout import Rollout

    rows = [(ro, g * n + j, s, p) for ro, s, p, g in groups for j in range(n)]
    p_len = max(ro.prompt_len for ro, *_ in rows)
    r_len = max(ro.response_mask.shape[1] for ro, *_ in rows)
    ids = torch.full((len(rows), p_len + r_len), pad_id, dtype=torch.long)
    attn, rmask, logp = torch.zeros_like(ids), torch.zeros(len(rows), r_len, dtype=torch.bool), torch.zeros(len(rows), r_len)
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


if __name__ == "__main__":
    dist.cli(main, Args)
