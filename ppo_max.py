"""PPO-max (Zheng et al. 2023, "Secrets of RLHF in Large Language Models Part I: PPO", arXiv 2307.04964): PPO
with a critic and the paper's full set of stabilising tricks, each its own flag; `--preset vanilla` turns them
all off (plain PPO with a KL penalty), so the paper's ablation is one flag.

    python ppo_max.py                              # embedded SFT policy and reward model, built-in task
    deepspeed ppo_max.py --model-path SFT_DIR --reward-path RM_DIR --dataset prompts.jsonl
    deepspeed --num_gpus 8 ppo_max.py ... --zero-stage 3 --offload-frozen
    python ppo_max.py --preset vanilla             # the ablation baseline

Models: policy (trained, from --model-path), reference (frozen copy of the initial policy), reward model
(frozen, --reward-path), critic (trained; initialised FROM THE REWARD MODEL, its value head starting as the
RM's score head).
Each step: 1. sample, 2. score, 3. old/ref log-probs and values, 4. normalise and clip the score with running
moments, 5. token-level KL penalty (k1) with the score at the last real token, 6. GAE, 7. whiten advantages,
8. PPO epochs over minibatches (clipped policy loss, clipped value loss, PPO-ptx), 9. critic-only warmup,
10. log. In main() these are the helpers sample_batch (1-2), compute_advantages (3-7), ppo_update (8-9:
critic_update and policy_update per micro-batch) and log_metrics (10).

Where the released MOSS-RLHF code differs from the paper, the flag docstring says so; we follow the paper.
"""
import functools
import time
from dataclasses import dataclass, fields

import torch

from shared import data, dist, engine, lora, rewards, rollout, tasks
from shared.args import DataArgs, LoraArgs, RewardArgs, RolloutArgs, RunArgs
from shared.tracking import Stats, Tracker


@dataclass
class Args(RunArgs, DataArgs, RewardArgs, RolloutArgs, LoraArgs):
    model_path: str = engine.DEFAULT_SFT
    """policy to start from (also the frozen reference)"""
    reward_path: str = ""
    """reward model (from train_rm.py); the critic starts from it unless --critic-path is given, and then it
    must have the policy's tokenizer (the critic reads the policy's token ids; the reward re-tokenizes text
    with the RM's own). Default: the demo reward model (assets/rm) on the built-in task when no other reward
    is given; none otherwise"""
    critic_path: str = ""
    """critic initialisation (default: the reward model, as the paper does); saved with the policy's
    tokenizer"""
    preset: str = "ppo-max"
    """ppo-max: every trick at the paper's value; vanilla: all tricks off (plain PPO + KL penalty). Explicit
    trick flags override the preset"""
    # --- PPO-max tricks (None = take the preset's value; the ppo-max value is given first) ---
    reward_norm: str | None = None
    """ppo-max: normalize, (s - running mean) / running std (Sec. 5.3.1, all-reduced across ranks); scale: s /
    running std (what the released code did); none (vanilla)"""
    reward_clip: float | None = None
    """ppo-max: 5.0, clip the normalised score to [-c, c] (Sec. 5.3.1); vanilla: 0 (off)"""
    whiten_advantages: bool | None = None
    """ppo-max: True, advantages whitened over all valid tokens of the global batch (Sec. 5.3.1; the paper
    notes it overlaps with reward normalisation, we keep both on as the released code did); vanilla: False"""
    value_clip: float | None = None
    """ppo-max: 0.2, clipped value loss 0.5 max((V-R)^2, (V_clip-R)^2) (Sec. 5.3.2); vanilla: 0 (unclipped)"""
    critic_init: str | None = None
    """ppo-max: reward, critic from the reward model (Sec. 5.3.3); vanilla: policy (the SFT model plus a
    fresh head)"""
    critic_warmup_steps: int | None = None
    """ppo-max: 5, only the critic learns during the first steps (Sec. 5.3.3; NOT in the released
    code); vanilla: 0"""
    ptx_coef: float | None = None
    """ppo-max: 0.05, PPO-ptx: add coef x SFT NLL on --ptx-dataset (Sec. 5.3.3; the released run had it off);
    vanilla: 0"""
    global_grad_clip: float | None = None
    """ppo-max: 1.0, global gradient-norm clipping of policy and critic (Sec. 5.3.2); vanilla: 0 (off)"""
    # --- PPO ---
    kl_coef: float = 0.01
    """beta of the token-level KL penalty r_t = -beta (logp_t - ref_t) (k1)"""
    target_kl: float = 0.0
    """adaptive KL controller (Ziegler et al. 2019): steer beta so the KL stays near this (0: fixed beta)"""
    truncated_penalty: float = 0.0
    """added to the score of a response that hit --max-new-tokens without EOS (e.g. -1)"""
    gamma: float = 1.0
    """GAE discount"""
    lam: float = 0.95
    """GAE lambda"""
    eps_low: float = 0.2
    """clip range below 1 for the policy ratio"""
    eps_high: float = 0.2
    """clip range above 1 for the policy ratio (DAPO's clip-higher: 0.28)"""
    ptx_dataset: str = ""
    """SFT data for PPO-ptx (same forms as --dataset; default: the built-in task's SFT split)"""
    steps: int = 60
    """RL steps (each: sample, score, update)"""
    prompts_per_step: int = 16
    """prompts sampled per step, all ranks together"""
    n_samples: int = 4
    """responses per prompt"""
    temperature: float = 0.8
    """sampling temperature (the paper's)"""
    top_p: float = 0.9
    """nucleus sampling (the paper's)"""
    max_new_tokens: int = 256
    """response length limit"""
    lr: float = 5e-7
    """policy learning rate (the paper's released 7B run)"""
    critic_lr: float = 1.5e-6
    """critic learning rate (the paper's released 7B run)"""
    ppo_epochs: int = 2
    """passes over each rollout batch"""
    num_minibatches: int = 2
    """optimizer steps per epoch"""
    micro_batch_size: int = 8
    """sequences per forward/backward pass per rank (memory only: the losses are token means over
    the minibatch)"""
    offload_frozen: bool = False
    """keep the frozen models' parameters on CPU (ZeRO-3 offload) to save GPU memory"""
    save_critic: bool = False
    """also export the critic to <output-dir>/critic"""
    eval_every: int = 10
    """evaluate on held-out prompts every N steps"""
    # --- variants researchers compare (all off by default; README "Variants") ---
    dual_clip: float = 0.0
    """dual-clip PPO (Ye et al. 2020, arXiv 1912.09729): for A < 0 the loss is at most -c A, c > 1
    (e.g. 3); 0: off"""
    delta: float = 0.0
    """two-sided clipping (INTELLECT-2, arXiv 2505.07291): the unclipped term uses min(r, delta),
    delta > 1 + eps_high (e.g. 4); 0: off"""
    kl_estimator: str = "k1"
    """KL(policy || reference) per token, d = logp - ref: k1 = d (paper), k2 = d^2 / 2,
    k3 = exp(-d) - 1 + d"""
    kl_in: str = "reward"
    """reward: r_t = -beta KL_t in the token rewards before GAE (paper); loss: beta x the token-mean KL added
    to the policy loss instead (use k2 or k3 there); --target-kl adapts beta either way"""


# Defaults tuned for the embedded 0.8M demo model (and models trained from it), which --defaults auto picks
# for it; the Args above hold the values for pretrained models. Flags you give always win.
EMBEDDED = dict(lr=3e-5, critic_lr=1e-4, kl_coef=0.05, temperature=1.0, top_p=1.0, max_new_tokens=8,
                micro_batch_size=32)


PRESETS = {
    "ppo-max": dict(reward_norm="normalize", reward_clip=5.0, whiten_advantages=True, value_clip=0.2,
                    critic_init="reward", critic_warmup_steps=5, ptx_coef=0.05, global_grad_clip=1.0),
    "vanilla": dict(reward_norm="none", reward_clip=0.0, whiten_advantages=False, value_clip=0.0,
                    critic_init="policy", critic_warmup_steps=0, ptx_coef=0.0, global_grad_clip=0.0),
}


def resolve_preset(args: Args) -> Args:
    """Fill every trick left unset (None) from --preset. Nothing of the demo is used implicitly on your own
    data: the demo reward model only on the built-in task with no reward given, the critic from the policy
    when there is no reward model, and ptx (unset) off when there is no SFT data for it; each said in one
    line."""
    if args.preset not in PRESETS:
        raise dist.UserError(f"--preset must be one of {sorted(PRESETS)}, got {args.preset}")
    builtin = args.dataset in tasks.TASKS
    if not (args.reward_path or args.reward_fn or args.reward_url) and builtin:
        args.reward_path = engine.DEFAULT_RM
        dist.say(f"[ppo_max] reward: the demo reward model of the built-in task ({args.reward_path})")
    if args.critic_init is None and not args.reward_path and not args.critic_path:
        args.critic_init = "policy"
        dist.say("[ppo_max] no reward model: the critic starts from the policy (--critic-init policy)")
    if args.ptx_coef is None and PRESETS[args.preset]["ptx_coef"] > 0 and not (args.ptx_dataset or builtin):
        args.ptx_coef = 0.0
        dist.say("[ppo_max] PPO-ptx off: it needs SFT data, give --ptx-dataset (and --ptx-coef 0.05 as in "
                 "the paper)")
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.reward_norm not in ("normalize", "scale", "none"):
        raise dist.UserError(f"--reward-norm must be normalize, scale or none, got {args.reward_norm}")
    if args.critic_init not in ("reward", "policy"):
        raise dist.UserError(f"--critic-init must be reward or policy, got {args.critic_init}")
    args.max_grad_norm = args.global_grad_clip  # DeepSpeed clips by the global norm, per model
    return args


# ---------------------------------------------------------------------------------------------- the math


class RunningMoments:
    """Mean and (population) variance of every score seen so far, merged batch by batch (Chan et al.) with the
    batch's sums all-reduced over ranks, so every rank holds the same statistics."""

    def __init__(self):
        self.count, self.mean, self.var = 0.0, 0.0, 1.0

    def update(self, x: torch.Tensor):
        s = dist.all_reduce(torch.tensor([x.numel(), x.sum().item(), (x.double() ** 2).sum().item()],
                                         dtype=torch.float64))
        n, mean = s[0].item(), (s[1] / s[0]).item()
        var = max(s[2].item() / n - mean**2, 0.0)
        total = self.count + n
        delta = mean - self.mean
        self.var = (self.count * self.var + n * var + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 1e-12) ** 0.5


def normalise_scores(scores, moments: RunningMoments, mode: str, clip: float):
    """normalize: (s - mu) / sigma; scale: s / sigma; none: s; then clip to [-clip, clip] if clip > 0."""
    if mode == "normalize":
        scores = (scores - moments.mean) / moments.std
    elif mode == "scale":
        scores = scores / moments.std
    return scores.clamp(-clip, clip) if clip > 0 else scores


def shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float, estimator: str = "k1"):
    """r_t = -beta KL_t on every response token, KL_t = k1 = logp_t - ref_t (or k2, k3: kl_penalty), plus the
    score at the last real token; (N, R)."""
    rewards = -kl_coef * kl_penalty(logprobs, ref_logprobs, estimator) * mask
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards, values, mask, gamma: float, lam: float):
    """delta_t = r_t + gamma V_{t+1} - V_t (V after the last valid token is 0);
    A_t = sum_k (gamma lam)^k delta_{t+k}; returns R_t = A_t + V_t. All (N, R); 0 outside the mask."""
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_valid = mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        next_value = values[:, t + 1] * next_valid if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * next_valid
        advantages[:, t] = last * mask[:, t]
    return advantages, (advantages + values) * mask


def whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / std over every valid token of the GLOBAL batch (sums all-reduced across ranks)."""
    sums = dist.all_reduce(torch.stack([(x * mask).sum(), mask.sum()]).double())
    mean = sums[0] / sums[1]
    var = dist.all_reduce((((x - mean) ** 2) * mask).sum().double()) / sums[1]
    return (((x - mean) / (var.sqrt() + eps)) * mask).to(x.dtype)


def policy_loss(logprobs, old_logprobs, advantages, mask, eps_low: float, eps_high: float,
                n_tokens: float | None = None, dual_clip: float = 0.0, delta: float = 0.0):
    """-min(rho A, clip(rho, 1-eps_low, 1+eps_high) A), rho = exp(logp - old), summed over this batch's valid
    tokens and divided by n_tokens: the valid tokens of the WHOLE minibatch (all micro-batches, all ranks), so
    the micro-batches' shares add up to the minibatch's token mean. n_tokens None: this batch's own count.
    delta > 0, two-sided clipping (INTELLECT-2, arXiv 2505.07291): -min(min(rho, delta) A, clip(rho) A).
    dual_clip c > 0 (Ye et al. 2020, arXiv 1912.09729): for A < 0, -max(min(rho A, clip(rho) A), c A), i.e.
    the loss is at most -c A however large rho grows (with c = delta the two give the same loss)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio.clamp(max=delta) if delta > 0 else ratio
    per_token = -torch.min(unclipped * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)
    if dual_clip > 0:
        per_token = torch.where(advantages < 0, torch.min(per_token, -dual_clip * advantages), per_token)
    return (per_token * mask).sum() / _count(mask, n_tokens)


def kl_penalty(logprobs, ref_logprobs, estimator: str):
    """Per-token KL(pi || ref) estimate (Schulman 2020), d = logp - ref: k1 = d (unbiased, can be negative),
    k2 = d^2 / 2, k3 = exp(-d) - 1 + d. As a loss term, k2's gradient is the KL's on-policy gradient; k1's
    gradient is grad logp (0 in expectation), so k1 belongs in the reward."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    return torch.exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1


def value_loss(values, old_values, returns, mask, clip: float, n_tokens: float | None = None):
    """0.5 max((V - R)^2, (V_clip - R)^2) with V_clip = V_old + clip(V - V_old, -c, c); 0.5 (V - R)^2 if
    c == 0; summed over this batch's valid tokens and divided by n_tokens, the minibatch's valid tokens (as
    policy_loss)."""
    loss = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.max(loss, (clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum() / _count(mask, n_tokens)


def sft_nll(logprobs, response_mask, n_tokens: float | None = None):
    """PPO-ptx term: NLL of the SFT response tokens, summed and divided by n_tokens, the SFT response tokens
    of every ptx batch of the minibatch (all micro-batches, all ranks; `ptx_tokens`); None: this batch's
    mean NLL. logprobs (B, L - 1): of tokens 1 .. L - 1 of the right-padded ptx rows."""
    mask = response_mask[:, 1:].float()
    return -(logprobs * mask).sum() / _count(mask, n_tokens)


def ptx_tokens(response_mask) -> torch.Tensor:
    """The tokens sft_nll averages over in one ptx batch: response tokens that have a preceding token."""
    return response_mask[:, 1:].sum()


def _count(mask, n_tokens):
    return mask.sum().clamp(min=1) if n_tokens is None else max(n_tokens, 1)


class AdaptiveKL:
    """beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) (Ziegler et al. 2019)."""

    def __init__(self, beta: float, target: float, horizon: int = 10000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int):
        if self.target > 0:
            self.beta *= 1 + max(-0.2, min(0.2, kl / self.target - 1)) * n / self.horizon


def tis_weights(old_logprobs, sampler_logprobs, cap: float):
    """Truncated importance weights min(exp(old_t - sampler_t), cap) per token, detached; all 1 when cap is 0
    (TIS, Yao et al. 2025: the sampler's distribution, not the trainer's, produced the tokens)."""
    if cap <= 0:
        return torch.ones_like(old_logprobs)
    return torch.exp(old_logprobs - sampler_logprobs).clamp(max=cap).detach()


# ---------------------------------------------------------------------------------------------- the loop


def check_args(args: Args, world: int):
    for name, allowed in {"kl_estimator": ("k1", "k2", "k3"), "kl_in": ("reward", "loss")}.items():
        if getattr(args, name) not in allowed:
            flag, choices = name.replace("_", "-"), ", ".join(allowed)
            raise dist.UserError(f"--{flag} must be {choices}; got {getattr(args, name)}")
    if args.dual_clip and args.dual_clip <= 1:
        raise dist.UserError(f"--dual-clip must be > 1 (e.g. 3), or 0 for off; got {args.dual_clip}")
    if args.delta and args.delta <= 1 + args.eps_high:
        raise dist.UserError(f"--delta must be > 1 + --eps-high (e.g. 4), or 0 for off; got {args.delta}")
    if args.prompts_per_step % world:
        raise dist.UserError(f"--prompts-per-step {args.prompts_per_step} must divide by the {world} ranks")
    rollout_per_rank = args.prompts_per_step * args.n_samples // world
    if rollout_per_rank % args.num_minibatches:
        raise dist.UserError("--num-minibatches must divide the samples per rank (prompts-per-step x "
                             "n-samples / ranks)")
    return data.check_batch_sizes(rollout_per_rank // args.num_minibatches, args, 1,
                                  "samples per minibatch per rank")


def tokenizer_mismatch(policy_tok, critic_tok) -> str | None:
    """What makes the critic's tokenizer unfit to read the policy's token ids, or None: the critic gets the
    POLICY's ids, so both must map every id to the same token (equal vocabularies, added tokens included) and
    mark the end of a response with the same EOS id (a reward model's head was trained to read the score at
    its own EOS)."""
    a, b = policy_tok.get_vocab(), critic_tok.get_vocab()
    if a != b:
        moved = sum(b.get(t) != i for t, i in a.items())
        return (f"the vocabularies differ ({len(a)} vs {len(b)} tokens; {moved} of the policy's have another "
                f"id or none)")
    if policy_tok.eos_token_id != critic_tok.eos_token_id:
        return f"the EOS ids differ ({policy_tok.eos_token_id} vs {critic_tok.eos_token_id})"
    return None


def check_critic_tokenizer(args: Args, tok, critic_path: str):
    """Refuse a critic initialised from a model (--reward-path or --critic-path) whose tokenizer is not the
    policy's: it would read the policy's token ids as other tokens and give silently wrong values. (The reward
    itself is fine: the reward model re-tokenizes the text with its own tokenizer.)"""
    if critic_path == args.model_path:
        return
    flag = "--critic-path" if args.critic_path else "--reward-path"
    problem = tokenizer_mismatch(tok, engine.load_tokenizer(critic_path, args, flag))
    if problem:
        if args.critic_path:
            fix = ("use a --critic-path saved with the policy's tokenizer, or drop --critic-path and use "
                   "--critic-init policy")
        else:
            fix = ("use --critic-init policy (the critic starts from the policy with a fresh value head), or "
                   f"a reward model trained from the policy's tokenizer (e.g. train_rm.py --model-path "
                   f"{args.model_path})")
        raise dist.UserError(f"the critic starts from {flag} {critic_path}, whose tokenizer is not the "
                             f"policy's (--model-path {args.model_path}): {problem}, so the critic would "
                             f"read the policy's token ids as other tokens; {fix}")


def chunked(fn, ro, micro: int):
    """Apply fn(input_ids, attention_mask) over micro-batches of a rollout and concatenate."""
    return torch.cat([fn(ro.input_ids[mb], ro.attention_mask[mb])
                      for mb in data.micro_batches(torch.arange(len(ro.input_ids)), micro)])


def load_ptx(args: Args, tok) -> list[dict]:
    """PPO-ptx's SFT examples: --ptx-dataset, or the built-in task's SFT split; none with --ptx-coef 0."""
    if args.ptx_coef <= 0:
        return []
    spec = args.ptx_dataset or (args.dataset if args.dataset in tasks.TASKS else "")
    if not spec:
        raise dist.UserError("--ptx-coef > 0 needs --ptx-dataset (SFT data), or set --ptx-coef 0")
    return data.tokenize(data.load_table(spec, "train", "sft"), tok, "sft", args, "ptx", dist.say)


@dataclass
class Batch:
    """One step's rollout on this rank and everything the PPO epochs read from it: N rows (prompts x samples),
    prompts left-padded to P tokens, responses right-padded to R; every (N, R) tensor is 0 outside `mask`."""
    input_ids: torch.Tensor         # (N, P + R)
    attention_mask: torch.Tensor    # (N, P + R)
    prompt_len: int                 # P
    mask: torch.Tensor              # (N, R) 1.0 on the response tokens up to and including EOS
    scores: torch.Tensor            # (N,) the reward (--truncated-penalty included)
    norm_scores: torch.Tensor       # (N,) normalised and clipped with the running moments
    sampler_logprobs: torch.Tensor  # (N, R) the sampler's log-probs (TIS weights, the sampler gap)
    old_logprobs: torch.Tensor      # (N, R) the policy's before this step's updates
    ref_logprobs: torch.Tensor      # (N, R) the frozen reference's
    old_values: torch.Tensor        # (N, R) the critic's before this step's updates
    advantages: torch.Tensor        # (N, R) GAE, whitened with --whiten-advantages
    returns: torch.Tensor           # (N, R) advantages + old values: the critic's targets

    def rows(self, idx) -> "Batch":
        """The rows `idx` (a micro-batch)."""
        return Batch(**{k: v[idx] if torch.is_tensor(v) else v for k, v in vars(self).items()})


def sample_batch(args: Args, step: int, prompts, sampler, generator, reward_fn, ctx, timing: dict):
    """1. Sample --n-samples responses to each of this rank's prompts of the step; 2. score them (the reward
    model or any other reward source, plus --truncated-penalty). Returns the rollout, the scores (N,) and the
    reward's parts (by source)."""
    batch = [prompts[i] for i in sampler.rank_batch(step, args.prompts_per_step, ctx)]
    t = time.time()
    ro = generator.generate([p["prompt_ids"] for p in batch], args.n_samples, args.temperature,
                            args.top_p, args.max_new_tokens)
    timing["generate"] = time.time() - t
    t = time.time()
    texts = [batch[i]["prompt"] for i in ro.prompt_index.tolist()]
    extras = {k: [batch[i]["extras"][k] for i in ro.prompt_index.tolist()] for k in batch[0]["extras"]}
    scores, parts = reward_fn(texts, ro.texts, ro.eos.tolist(), extras, step=step + 1)
    scores = scores + args.truncated_penalty * (~ro.eos).float().cpu()
    timing["score"] = time.time() - t
    if not torch.isfinite(scores).all():
        raise dist.Diverged(f"non-finite reward at step {step + 1}; stopping (the last checkpoint is intact)")
    return ro, scores, parts


def compute_advantages(args: Args, ro, scores, policy, ref, critic, generator, moments: RunningMoments,
                       kl_coef: float, ctx, timing: dict) -> Batch:
    """3. Old log-probs (the sampler's when exact: HF backend in fp32), reference log-probs and values;
    4. normalise and clip the score with the running moments; 5. token-level KL penalty (--kl-in reward) with
    the score at the last real token; 6. GAE; 7. whiten the advantages over the global batch."""
    t = time.time()
    mask = ro.response_mask.float()
    p_len = ro.prompt_len
    with torch.no_grad():
        def logprobs(model):
            return chunked(lambda i, a: rollout.response_logprobs(model, i, a, p_len, args.temperature), ro,
                           args.micro_batch_size)

        old_logprobs = ro.logprobs if generator.exact_logprobs else logprobs(policy)
        ref_logprobs = logprobs(ref)
        old_values = chunked(lambda i, a: engine.token_scores(critic, i, a, p_len), ro,
                             args.micro_batch_size) * mask
    timing["forward"] = time.time() - t

    moments.update(scores)
    norm_scores = normalise_scores(scores, moments, args.reward_norm, args.reward_clip).to(ctx.device)
    beta_reward = kl_coef if args.kl_in == "reward" else 0.0  # --kl-in loss: the KL is a loss term instead
    token_rewards = shaped_rewards(norm_scores, old_logprobs, ref_logprobs, mask, beta_reward,
                                   args.kl_estimator)
    advantages, returns = gae(token_rewards, old_values, mask, args.gamma, args.lam)
    if args.whiten_advantages:
        advantages = whiten(advantages, mask)
    return Batch(ro.input_ids, ro.attention_mask, p_len, mask, scores, norm_scores, ro.logprobs, old_logprobs,
                 ref_logprobs, old_values, advantages, returns)


def ptx_minibatch(args: Args, ptx: list, ptx_sampler, draw: int, size: int, tok, ctx):
    """PPO-ptx: `size` SFT examples for one minibatch, in micro-batches as the minibatch, and their response
    tokens over all ranks (drawn before the minibatch's first micro-batch: sft_nll divides by that count)."""
    batches = []
    for sub in data.micro_batches(ptx_sampler.global_batch(draw, size), args.micro_batch_size):
        seqs, prompt_lens = [ptx[i]["input_ids"] for i in sub], [ptx[i]["prompt_len"] for i in sub]
        batch = data.collate(seqs, prompt_lens, tok.pad_token_id)
        batches.append({k: v.to(ctx.device) for k, v in batch.items()})
    n_tokens = sum(ptx_tokens(b["response_mask"]) for b in batches)
    return batches, dist.all_reduce(n_tokens.double()).item()


def ppo_update(args: Args, step: int, b: Batch, policy, critic, kl_coef: float, train_policy: bool, ptx: list,
               ptx_sampler, tok, ctx):
    """8. --ppo-epochs passes over the rollout in --num-minibatches minibatches, each one optimizer step of
    the critic and (9. unless the critic is warming up) of the policy. Every loss is a token mean over the
    WHOLE minibatch (all micro-batches, all ranks): each micro-batch contributes its token sum over the
    minibatch's token count, so a short micro-batch weighs no more than its tokens, whatever
    --micro-batch-size and the number of ranks. Returns the step's statistics (summed over micro-batches)
    and the sampler gap."""
    stats, gap = Stats(), rollout.SamplerGap()
    for epoch in range(args.ppo_epochs):
        for j, minibatch in enumerate(torch.randperm(len(b.scores)).chunk(args.num_minibatches)):
            micros = data.micro_batches(minibatch, args.micro_batch_size)
            n_tokens = dist.all_reduce(b.mask[minibatch].sum().double()).item()
            ptx_batches, ptx_total = [], 0.0
            if ptx and train_policy:
                draw = step * 10_000 + epoch * args.num_minibatches + j
                ptx_batches, ptx_total = ptx_minibatch(args, ptx, ptx_sampler, draw, len(minibatch), tok, ctx)
            for k, idx in enumerate(micros):
                mb, last = b.rows(idx), k == len(micros) - 1
                ptx_batch = ptx_batches[k] if ptx_batches else None
                first = epoch == 0 and j == 0  # before this step's first update: the sampler's error alone
                v_loss = critic_update(args, critic, mb, n_tokens, ctx, step + 1, last)
                policy_stats = policy_update(args, policy, mb, n_tokens, kl_coef, ptx_batch, ptx_total,
                                             gap if first else None, train_policy, ctx, step + 1, last)
                stats.add(value_loss=v_loss, **policy_stats)
    return stats, gap


def critic_update(args: Args, critic, mb: Batch, n_tokens: float, ctx, step: int, last: bool) -> float:
    """The clipped value loss of one micro-batch, its share of the minibatch's token mean; backward, step."""
    values = engine.token_scores(critic, mb.input_ids, mb.attention_mask, mb.prompt_len)
    v_loss = value_loss(values, mb.old_values, mb.returns, mb.mask, args.value_clip, n_tokens)
    engine.train_micro_batch(critic, v_loss, ctx, step, last)
    return v_loss.item()


def policy_update(args: Args, policy, mb: Batch, n_tokens: float, kl_coef: float, ptx_batch: dict | None,
                  ptx_total: float, gap, train: bool, ctx, step: int, last: bool) -> dict:
    """The policy's share of the minibatch loss on one micro-batch: the clipped surrogate (advantages times
    the TIS weights), with --kl-in loss plus beta x the token-mean KL, plus --ptx-coef x the NLL of the
    micro-batch's ptx examples; backward and step when `train`. Returns its statistics (sums) by name."""
    logprobs, entropy = rollout.response_logprobs(policy, mb.input_ids, mb.attention_mask, mb.prompt_len,
                                                  args.temperature, True)
    if gap is not None:
        gap.add(logprobs, mb.sampler_logprobs, mb.mask)
    tis = tis_weights(mb.old_logprobs, mb.sampler_logprobs, args.tis_cap)
    pg_loss = policy_loss(logprobs, mb.old_logprobs, mb.advantages * tis, mb.mask, args.eps_low,
                          args.eps_high, n_tokens, args.dual_clip, args.delta)
    if args.kl_in == "loss":  # share of beta x the minibatch's token-mean KL
        kl = kl_penalty(logprobs, mb.ref_logprobs, args.kl_estimator)
        pg_loss = pg_loss + kl_coef * (kl * mb.mask).sum() / n_tokens
    ptx_loss = torch.zeros((), device=ctx.device)
    if ptx_batch is not None:
        ids, mask = ptx_batch["input_ids"], ptx_batch["attention_mask"]
        ptx_logprobs = rollout.response_logprobs(policy, ids, mask, 1)
        ptx_loss = sft_nll(ptx_logprobs, ptx_batch["response_mask"], ptx_total)
    if train:
        engine.train_micro_batch(policy, pg_loss + args.ptx_coef * ptx_loss, ctx, step, last)
    with torch.no_grad():
        ratio = torch.exp(logprobs - mb.old_logprobs)
        clipped = ((ratio < 1 - args.eps_low) | (ratio > 1 + args.eps_high)).float()
        return dict(policy_loss=pg_loss.item(), ptx_loss=ptx_loss.item(),
                    clipped=(clipped * mb.mask).sum().item(),
                    approx_kl=((mb.old_logprobs - logprobs) * mb.mask).sum().item(),
                    entropy=(entropy * mb.mask).sum().item(),
                    tokens=mb.mask.sum().item())


def log_metrics(args: Args, step: int, ro, parts: dict, b: Batch, stats: Stats, gap, backend: str) -> dict:
    """10. The step's figures: the rollout's; the policy's statistics, token means over all ranks; each loss
    as the optimizer step's loss (the sum of its micro-batches' shares over all ranks), averaged over the
    step's optimizer steps; the critic's explained variance."""
    totals = stats.all_ranks()
    n_tok = max(totals["tokens"], 1)
    n_updates = args.ppo_epochs * args.num_minibatches
    valid = b.mask.bool()
    residual = ((b.returns - b.old_values) * b.mask)[valid]
    explained_var = 1 - residual.var().item() / max(b.returns[valid].var().item(), 1e-12)
    return {
        "rollout/reward": b.scores.mean().item(), "rollout/reward_normalized": b.norm_scores.mean().item(),
        **{f"rollout/reward_{k}": v.mean().item() for k, v in parts.items() if len(parts) > 1},
        "rollout/response_length": ro.response_mask.sum(1).float().mean().item(),
        "rollout/truncated_frac": 1 - ro.eos.float().mean().item(),
        "policy/kl_ref": (((b.old_logprobs - b.ref_logprobs) * b.mask).sum() / b.mask.sum()).item(),
        "policy/entropy": totals["entropy"] / n_tok, "policy/clip_frac": totals["clipped"] / n_tok,
        "policy/approx_kl": totals["approx_kl"] / n_tok, **gap.check(args, backend, step),
        "loss/policy": totals["policy_loss"] / n_updates, "loss/value": totals["value_loss"] / n_updates,
        "loss/ptx": totals["ptx_loss"] / n_updates, "critic/explained_variance": explained_var}


def main(args: Args):
    ctx = dist.init(args.seed)
    # 1. check flags, data and rewards before anything is written
    resolve_preset(args)
    grad_accum = check_args(args, ctx.world)
    rollout.check_args(args, ctx)
    tok = engine.load_tokenizer(args.model_path, args)
    train_rows, eval_rows = data.train_eval_rows(args, "prompt")
    prompts = data.tokenize(train_rows, tok, "prompt", args, "train", dist.say)
    eval_prompts = data.tokenize(eval_rows, tok, "prompt", args, "eval", dist.say) if eval_rows else []
    ptx = load_ptx(args, tok)
    critic_path = args.critic_path or (args.reward_path if args.critic_init == "reward" else args.model_path)
    if not critic_path:
        raise dist.UserError("the critic starts from the reward model (--critic-init reward) but there is no "
                             "--reward-path; give --critic-path, or --critic-init policy")
    check_critic_tokenizer(args, tok, critic_path)
    frozen_args = args if not args.offload_frozen else type(args)(**{**vars(args), "offload": True})
    reward_fn = rewards.build(frozen_args, ctx, probe=prompts[0])  # a trial call, before anything is written
    scorers = rewards.eval_scorers(args, eval_prompts, reward_fn, rule_rewards=True)  # eval/task_score, ...

    # 2. models: policy and critic (trained), reference and reward model (frozen)
    # With LoRA: the reference is the policy with its adapters off; the critic has its own adapters and value
    # head on its own base (the reward model or the policy, per --critic-init), as when fully fine-tuned
    policy = engine.load_model(args.model_path, args, ctx, lora="train")
    ref = lora.reference(policy, args) or engine.wrap_frozen(
        engine.load_model(args.model_path, args, ctx, lora="start"), frozen_args, ctx)
    critic = engine.load_model(critic_path, args, ctx, kind="score", flag="--critic-path", seed=args.seed,
                               lora="new")
    out = engine.prepare_output_dir(args, ctx, "ppo_max")
    updates = args.steps * args.ppo_epochs * args.num_minibatches
    policy = engine.wrap_trainable(policy, args, ctx, args.lr, args.micro_batch_size, grad_accum, updates)
    critic = engine.wrap_trainable(critic, args, ctx, args.critic_lr, args.micro_batch_size, grad_accum,
                                   updates)
    tracker = Tracker(args, out, ctx, "ppo_max")
    sampler = data.Sampler(len(prompts), args.seed)
    ptx_sampler = data.Sampler(max(1, len(ptx)), args.seed + 1)
    moments, kl_ctl = RunningMoments(), AdaptiveKL(args.kl_coef, args.target_kl)
    step, before = 0, None
    if args.resume:
        state = engine.load_checkpoint(out, {"policy": policy, "critic": critic}, ctx)
        step, before, kl_ctl.beta = state["step"], state["before"], state["kl_coef"]
        moments.count, moments.mean, moments.var = state["moments"]

    generator = rollout.Generator(args, policy, tok, ctx)  # --rollout-backend; synced after the updates
    evaluate = functools.partial(rollout.greedy_eval, generator, tok, eval_prompts, scorers, ctx,
                                 args.max_new_tokens)
    if before is None:
        before = tracker.evaluation("before", *evaluate())

    while step < args.steps:
        t0, timing = time.time(), {}
        # 1. sample responses; 2. score them
        ro, scores, parts = sample_batch(args, step, prompts, sampler, generator, reward_fn, ctx, timing)
        # 3. old log-probs, reference log-probs and values; 4. normalise and clip the score; 5. KL penalty;
        # 6. GAE; 7. whitening
        b = compute_advantages(args, ro, scores, policy, ref, critic, generator, moments, kl_ctl.beta, ctx,
                               timing)
        # 8. PPO epochs over minibatches; 9. during critic warmup only the critic learns
        t = time.time()
        train_policy = step >= args.critic_warmup_steps
        stats, gap = ppo_update(args, step, b, policy, critic, kl_ctl.beta, train_policy, ptx, ptx_sampler,
                                tok, ctx)
        timing["train"] = time.time() - t
        timing["weight_sync"] = generator.sync(policy)  # the next rollout samples from the updated policy
        step += 1

        # 10. log, adapt the KL coefficient, evaluate, save
        metrics = log_metrics(args, step, ro, parts, b, stats, gap, generator.backend)
        kl_ctl.update(metrics["policy/kl_ref"], args.prompts_per_step * args.n_samples)
        metrics.update({
            "train/kl_coef": kl_ctl.beta, "train/lr": policy.get_lr()[0],
            "train/critic_lr": critic.get_lr()[0], "train/policy_updated": float(train_policy),
            "perf/tokens_per_s": ro.attention_mask.sum().item() * ctx.world / (time.time() - t0),
            **{f"time/{k}": v for k, v in timing.items()}})
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            metrics.update(tracker.evaluation(f"step {step}", *evaluate()))
        tracker.log(step, metrics, show=("rollout/reward", "policy/kl_ref", "loss/value", "eval/task_score"))
        state = {"step": step, "before": before, "kl_coef": kl_ctl.beta,
                 "moments": [moments.count, moments.mean, moments.var]}
        if engine.periodic_save(args, out, step, {"policy": policy, "critic": critic}, state, tok, ctx):
            return

    # final eval and export
    after = tracker.evaluation("after", *evaluate())
    engine.export_hf(policy, tok, out, ctx)
    if args.save_critic:
        engine.export_hf(critic, tok, out / "critic", ctx)
    resolved = {f.name: getattr(args, f.name) for f in fields(args) if f.name in PRESETS["ppo-max"]}
    tracker.summary({"before": before, "after": after, "steps": step, "world_size": ctx.world,
                     "model_path": args.model_path, "reward_path": args.reward_path, "dataset": args.dataset,
                     "sources": rewards.sources(scorers, **{"rollout/reward": reward_fn}),
                     "resolved": resolved})
    tracker.print(f"[ppo_max] saved to {out}")


if __name__ == "__main__":
    dist.cli(main, Args, EMBEDDED)
