"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740).

    python rloo.py                                  # embedded SFT policy, built-in addition task, exact-match reward
    deepspeed rloo.py --model-path SFT_DIR --dataset prompts.jsonl --reward-path RM_DIR
    deepspeed rloo.py ... --loss ppo --kl-per-token

k samples per prompt; the baseline of sample i is the mean score of the OTHER k-1 samples, A_i = s_i - mean_{j!=i} s_j.
The KL to the reference enters the reward: sequence-level s_i - beta * sum_t (logp_t - ref_t) as in the paper
(--kl-per-token: the KL of the tokens from t on is subtracted from token t's advantage instead). Loss: REINFORCE on the
sequence, -A_i * sum_t logp_t (paper), or the PPO-clipped token loss (--loss ppo).
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
    """responses per prompt (k)"""
    temperature: float = 1.0
    """sampling temperature (the trainer's log-probs use the same temperature)"""
    top_p: float = 1.0
    """nucleus sampling"""
    max_new_tokens: int = 8
    """response length limit"""
    lr: float = 1e-4
    """policy learning rate"""
    beta: float = 0.05
    """KL coefficient in the reward (k1 estimator); 0 loads no reference model"""
    kl_per_token: bool = False
    """subtract the KL per token (from t to the end) from token t's advantage instead of from the sequence score"""
    loss: str = "reinforce"
    """reinforce: -A_i * sum_t logp_t, mean over sequences (paper); ppo: clipped token loss, mean over tokens"""
    eps: float = 0.2
    """clip range of the ratio with --loss ppo"""
    ppo_epochs: int = 1
    """passes over each rollout batch (--loss ppo)"""
    num_minibatches: int = 1
    """optimizer steps per epoch"""
    micro_batch_size: int = 64
    """sequences per forward/backward pass per rank"""
    eval_every: int = 10
    """evaluate on held-out prompts every N steps"""


# ---------------------------------------------------------------------------------------------- the math


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = s_i - (sum_j s_j - s_i) / (k - 1) within each group of k contiguous samples; scores (N,)."""
    groups = scores.view(-1, k)
    baseline = (groups.sum(1, keepdim=True) - groups) / (k - 1)
    return (groups - baseline).view(-1)


def kl_rewards(scores, logprobs, ref_logprobs, mask, beta: float, per_token: bool):
    """Sequence level: (s_i - beta * sum_t KL_t, None); per token: (s_i, beta * sum_{k>=t} KL_k) with KL_t = k1 =
    logp_t - ref_t over response tokens; the second term is subtracted from each token's advantage."""
    kl = (logprobs - ref_logprobs) * mask
    if not per_token:
        return scores - beta * kl.sum(1), None
    return scores, beta * kl.flip(1).cumsum(1).flip(1)


def reinforce_loss(logprobs, advantages, mask):
    """-A_i * sum_t logp_t, averaged over this micro-batch's sequences; advantages (N,) or (N, R)."""
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    return -((adv * logprobs * mask).sum(1)).mean()


def clipped_surrogate(logprobs, old_logprobs, advantages, eps: float):
    """Per-token PPO loss -min(rho A, clip(rho, 1-eps, 1+eps) A), rho = exp(logp - old); (N, R)."""
    ratio = torch.exp(logprobs - old_logprobs)
    return -torch.min(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages)


def tis_weights(old_logprobs, sampler_logprobs, cap: float):
    """Truncated importance weights min(exp(old_t - sampler_t), cap) per token, detached; all 1 when cap is 0
    (TIS, Yao et al. 2025: the sampler's distribution, not the trainer's, produced the tokens)."""
    if cap <= 0:
        return torch.ones_like(old_logprobs)
    return torch.exp(old_logprobs - sampler_logprobs).clamp(max=cap).detach()


# ---------------------------------------------------------------------------------------------- the loop


def check_args(args: Args, world: int):
    if args.loss not in ("reinforce", "ppo"):
        raise dist.UserError(f"--loss must be reinforce or ppo, got {args.loss}")
    if args.n_samples < 2:
        raise dist.UserError("--n-samples must be >= 2: the leave-one-out baseline needs other samples")
    if args.prompts_per_step % world:
        raise dist.UserError(f"--prompts-per-step {args.prompts_per_step} must divide by the {world} ranks")
    rollout_per_rank = args.prompts_per_step * args.n_samples // world
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
    out = engine.prepare_output_dir(args, ctx, "rloo")
    total_updates = args.steps * args.ppo_epochs * args.num_minibatches
    policy = engine.wrap_trainable(policy, args, ctx, args.lr, args.micro_batch_size, grad_accum, total_updates)
    tracker = Tracker(args, out, ctx, "rloo")
    sampler = data.Sampler(len(prompts), args.seed)
    step, before = 0, None
    if args.resume:
        state = engine.load_checkpoint(out, {"policy": policy}, ctx)
        step, before = state["step"], state["before"]
    generator = rollout.Generator(args, policy, tok, ctx)  # --rollout-backend hf or vllm; synced after updates
    if before is None:
        before = {"eval/accuracy": rollout.greedy_eval(generator, tok, eval_prompts, eval_fn, ctx,
                                                       args.max_new_tokens)[0]}
        tracker.print(f"[rloo] before: {before}")

    while step < args.steps:
        t0, timing, metrics = time.time(), {}, {}
        # 3. sample k responses per prompt and score them
        batch = [prompts[i] for i in sampler.rank_batch(step, args.prompts_per_step, ctx)]
        t = time.time()
        ro = generator.generate([p["prompt_ids"] for p in batch], args.n_samples, args.temperature,
                                args.top_p, args.max_new_tokens)
        timing["generate"] = time.time() - t
        t = time.time()
        texts = [batch[i]["prompt"] for i in ro.prompt_index.tolist()]
        extras = {k: [batch[i]["extras"][k] for i in ro.prompt_index.tolist()] for k in batch[0]["extras"]}
        scores, parts = reward_fn(texts, ro.texts, ro.eos.tolist(), extras, step=step + 1)
        timing["score"] = time.time() - t
        metrics["rollout/zero_std_groups_frac"] = (scores.view(-1, args.n_samples).std(1) == 0).float().mean().item()
        if not torch.isfinite(scores).all():
            raise dist.Diverged(f"non-finite reward at step {step + 1}; stopping (the last checkpoint is intact)")

        # 4. old (the sampler's when exact: HF backend in fp32) and reference log-probs; KL-penalised scores;
        # leave-one-out advantages
        t = time.time()
        mask = ro.response_mask.float()
        with torch.no_grad():
            chunks = data.micro_batches(torch.arange(len(scores)), args.micro_batch_size)
            old_logprobs = ro.logprobs if generator.exact_logprobs else torch.cat([rollout.response_logprobs(
                policy, ro.input_ids[mb], ro.attention_mask[mb], ro.prompt_len, args.temperature) for mb in chunks])
            ref_logprobs = torch.cat([rollout.response_logprobs(ref, ro.input_ids[mb], ro.attention_mask[mb],
                                                                ro.prompt_len, args.temperature) for mb in chunks]) \
                if ref is not None else old_logprobs
        timing["forward"] = time.time() - t
        penalised, kl_to_go = kl_rewards(scores.to(ctx.device), old_logprobs, ref_logprobs, mask, args.beta,
                                         args.kl_per_token)
        advantages = rloo_advantages(penalised, args.n_samples)
        advantages = advantages[:, None] - kl_to_go if kl_to_go is not None else advantages[:, None].expand_as(mask)

        # 5. REINFORCE (or PPO-clipped) updates over minibatches
        t = time.time()
        stats, gap = torch.zeros(5, dtype=torch.float64), rollout.SamplerGap()
        n_total = len(scores)
        for _ in range(args.ppo_epochs if args.loss == "ppo" else 1):
            for minibatch in torch.randperm(n_total).chunk(args.num_minibatches):
                first = gap.count == 0  # before this step's first update: the sampler's error alone
                mb_tokens = dist.all_reduce(mask[minibatch].sum()).item()
                for idx in data.micro_batches(minibatch, args.micro_batch_size):
                    logprobs, entropy = rollout.response_logprobs(
                        policy, ro.input_ids[idx], ro.attention_mask[idx], ro.prompt_len, args.temperature, True)
                    m = mask[idx]
                    if first:
                        gap.add(logprobs, ro.logprobs[idx], m)
                    w = tis_weights(old_logprobs[idx], ro.logprobs[idx], args.tis_cap)
                    if args.loss == "reinforce":  # share of the mean over the minibatch's sequences
                        loss = reinforce_loss(logprobs, advantages[idx] * w, m) * len(idx) / len(minibatch)
                    else:  # share of the token mean over the minibatch (all ranks)
                        per_token = clipped_surrogate(logprobs, old_logprobs[idx], advantages[idx], args.eps) * w
                        loss = (per_token * m).sum() / mb_tokens * ctx.world
                    # DeepSpeed divides by grad_accum and averages over ranks
                    loss = loss * grad_accum
                    if not torch.isfinite(loss):
                        raise dist.Diverged(f"non-finite loss at step {step + 1}; stopping (the last checkpoint is intact)")
                    policy.backward(loss)
                    policy.step()
                    ratio = torch.exp(logprobs.detach() - old_logprobs[idx])
                    clipped = ((ratio - 1).abs() > args.eps).float()
                    stats += torch.tensor([loss.item(), ((old_logprobs[idx] - ref_logprobs[idx]) * m).sum().item(),
                                           (entropy * m).sum().item(), (clipped * m).sum().item(), m.sum().item()],
                                          dtype=torch.float64)
                grad_norm = policy.get_global_grad_norm()
                if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
                    raise dist.Diverged(f"non-finite gradient norm at step {step + 1}; stopping (the last checkpoint "
                                       f"is intact)")
        timing["train"] = time.time() - t
        timing["weight_sync"] = generator.sync(policy)  # the next rollout samples from the updated policy
        step += 1

        # 6. log, evaluate, save
        n_tok = max(stats[4].item(), 1)
        metrics.update({
            "rollout/reward": scores.mean().item(), "rollout/reward_std": scores.std().item(),
            **{f"rollout/reward_{k}": v.mean().item() for k, v in parts.items() if len(parts) > 1},
            "rollout/response_length": ro.response_mask.sum(1).float().mean().item(),
            "rollout/truncated_frac": 1 - ro.eos.float().mean().item(), "policy/kl_ref": stats[1].item() / n_tok,
            "policy/entropy": stats[2].item() / n_tok, "policy/clip_frac": stats[3].item() / n_tok,
            **gap.check(args, generator.backend, step),
            "loss/policy": stats[0].item(), "train/lr": policy.get_lr()[0],
            "perf/tokens_per_s": ro.attention_mask.sum().item() * ctx.world / (time.time() - t0),
            **{f"time/{k}": v for k, v in timing.items()}})
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            metrics["eval/accuracy"] = rollout.greedy_eval(generator, tok, eval_prompts, eval_fn, ctx,
                                                           args.max_new_tokens)[0]
        tracker.log(step, metrics, show=("rollout/reward", "policy/kl_ref", "rollout/response_length", "eval/accuracy"))
        if engine.periodic_save(args, out, step, {"policy": policy}, {"step": step, "before": before}, tok, ctx):
            return

    # 7. final eval and export
    after = {"eval/accuracy": rollout.greedy_eval(generator, tok, eval_prompts, eval_fn, ctx, args.max_new_tokens)[0]}
    engine.export_hf(policy, tok, out, ctx)
    tracker.summary({"before": before, "after": after, "steps": step, "world_size": ctx.world,
                     "model_path": args.model_path, "dataset": args.dataset})
    tracker.print(f"[rloo] after: {after}\n[rloo] saved to {out}")


if __name__ == "__main__":
    dist.cli(main, Args)
