"""Reward model (step 2 of SFT -> RM -> RL): Bradley-Terry on preference pairs, scored at the last token
that is not the pad token (the EOS, or the token before it when pad == eos: where transformers reads a
sequence classifier).

    python train_rm.py                                    # the embedded SFT model, built-in addition pairs
    deepspeed train_rm.py --model-path SFT_DIR --dataset pairs.jsonl --output-dir runs/rm

Data: `prompt` + `chosen` + `rejected` columns, or `chosen` + `rejected` as two whole conversations that
differ only in the last (assistant) message. An optional `--margin-column` gives a per-pair margin (Llama 2).

The saved directory loads with `AutoModelForSequenceClassification.from_pretrained(dir, num_labels=1)`; its
config carries `reward_mean` and `reward_std` (over train responses) for the RL scripts to normalise with.
"""
import gc
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared import data, dist, engine, rewards, rollout
from shared.args import DataArgs, LoraArgs, RunArgs
from shared.tracking import Stats, Tracker


@dataclass
class Args(RunArgs, DataArgs, LoraArgs):
    model_path: str = engine.DEFAULT_SFT
    """model to start from (usually the SFT model); a scalar score head is added on top"""
    margin_column: str = ""
    """column with a per-pair margin m in the loss -log sigmoid(r_chosen - r_rejected - m)
    (empty: no margin)"""
    steps: int = 1000
    """optimizer steps"""
    batch_size: int = 64
    """global batch size in pairs"""
    micro_batch_size: int = 8
    """pairs per forward pass per rank (chosen and rejected go through one concatenated forward)"""
    lr: float = 1e-5
    """peak learning rate (AdamW; TRL 1e-5, OpenRLHF 9e-6)"""
    warmup_steps: int = 30
    """linear learning-rate warmup steps (~3% of the steps)"""
    lr_decay: bool = True
    """decay the learning rate linearly to 0 at the last step"""
    eval_every: int = 0
    """evaluate every N steps (0: only before and after training)"""
    stats_examples: int = 1024
    """train pairs used to measure the reward mean/std saved in the config"""
    eval_policy_path: str = ""
    """a policy whose greedy responses to the held-out prompts are scored with the task score
    (--eval-reward-fn, or the built-in task's checker) once, before training: eval/task_score, a reference
    beside the RM's figures"""
    max_new_tokens: int = 256
    """response length limit of --eval-policy-path's greedy responses"""


# Defaults tuned for the embedded 0.8M demo model (and models trained from it), which --defaults auto picks
# for it; the Args above hold the values for pretrained models. Flags you give always win.
EMBEDDED = dict(lr=3e-4, warmup_steps=50, micro_batch_size=64, max_new_tokens=8)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None):
    """-log sigmoid(r_chosen - r_rejected - margin), averaged over pairs. chosen, rejected, margin: (B,)."""
    diff = chosen - rejected - (margin if margin is not None else 0.0)
    return -F.logsigmoid(diff).mean()


def score_pairs(model, pairs, pad_id, device):
    """Scores (chosen (B,), rejected (B,)) in ONE pass over the concatenated batch, read at
    `engine.score_index`; each pair's prompt is computed once for its two responses
    (engine.response_forward)."""
    seqs = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    prompt_lens = [p["prompt_len"] for p in pairs] * 2
    ids, mask, rmask, p_len = data.collate_responses(seqs, prompt_lens, pad_id, device)
    values = engine.token_scores(model, ids, mask, p_len, to_end=True)  # positions prompt_len - 1 .. end
    # read where transformers reads an exported classifier: the last token that is not the pad token
    # (before the EOS when pad == eos); a row whose response is only that token and whose prompt ends in it
    # (never with a chat template) is read at the prompt's last token instead of earlier
    at = (engine.score_index(ids, mask, pad_id) - (p_len - 1)).clamp(min=0)
    scores = values.gather(1, at[:, None]).squeeze(1)
    return scores[: len(pairs)], scores[len(pairs):]


@torch.no_grad()
def evaluate(model, pairs, pad_id, args, ctx) -> dict:
    """Held-out pair accuracy (r_chosen > r_rejected), loss and mean margin, over all ranks."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # correct, loss sum, margin sum, count
    for mb in data.rank_micro_batches(pairs, args.micro_batch_size, ctx):  # the same calls on every rank
        c, r = score_pairs(model, mb or pairs[:1], pad_id, ctx.device)
        if mb:
            totals += torch.tensor([(c > r).sum().item(), bradley_terry_loss(c, r).item() * len(mb),
                                    (c - r).sum().item(), len(mb)], dtype=torch.float64)
    dist.all_reduce(totals)
    model.train()
    n = totals[3].clamp(min=1)
    return {"eval/pair_accuracy": (totals[0] / n).item(), "eval/loss": (totals[1] / n).item(),
            "eval/margin": (totals[2] / n).item()}


@torch.no_grad()
def reward_stats(model, pairs, pad_id, args, ctx) -> tuple[float, float]:
    """Mean and std of the scores of chosen and rejected train responses (all ranks)."""
    model.eval()
    s = torch.zeros(3, dtype=torch.float64)
    for mb in data.rank_micro_batches(pairs[: args.stats_examples], args.micro_batch_size, ctx):
        scores = torch.cat(score_pairs(model, mb or pairs[:1], pad_id, ctx.device)).double().cpu()
        if mb:
            count = torch.tensor(float(len(scores)), dtype=torch.float64)
            s += torch.stack([scores.sum(), (scores**2).sum(), count])
    dist.all_reduce(s)
    mean = s[0] / s[2]
    return mean.item(), (s[1] / s[2] - mean**2).clamp(min=1e-12).sqrt().item()


def policy_task_score(args, ctx, tok, prompts, scorers):
    """(eval/task_score, samples) of --eval-policy-path's greedy responses to the held-out prompts; the policy
    is loaded for this and freed."""
    if not scorers:
        return {}, []
    policy = engine.load_model(args.eval_policy_path, args, ctx, flag="--eval-policy-path")
    policy = engine.wrap_frozen(policy, args, ctx)
    scores = rollout.greedy_eval(policy, tok, prompts, scorers, ctx, args.max_new_tokens)
    del policy
    gc.collect()
    return scores


def main(args: Args):
    ctx = dist.init(args.seed)
    # 1. check flags and data before anything is written
    grad_accum = data.check_batch_sizes(args.batch_size, args, ctx.world)
    tok = engine.load_tokenizer(args.model_path, args)
    pad_id = tok.pad_token_id
    train_rows, eval_rows = data.train_eval_rows(args, "pair")
    train = data.tokenize(train_rows, tok, "pair", args, "train", dist.say)
    evals = data.tokenize(eval_rows, tok, "pair", args, "eval", dist.say) if eval_rows else []
    margins = None
    if args.margin_column:
        if args.margin_column not in train_rows[0]:
            raise dist.UserError(f"--margin-column '{args.margin_column}' not found; available columns: "
                                 f"{sorted(train_rows[0])}")
        margins = torch.tensor([float(r[args.margin_column]) for r in train_rows])
        if len(margins) != len(train):
            raise dist.UserError("--margin-column needs every pair kept: use --overlong truncate")
    ptok = tok  # the tokenizer of --eval-policy-path
    if args.eval_policy_path:
        ptok = engine.load_tokenizer(args.eval_policy_path, args, "--eval-policy-path")
    eval_prompts = data.eval_prompts(args, eval_rows, ptok, dist.say) if args.eval_policy_path else []
    scorers = rewards.eval_scorers(args, eval_prompts) if args.eval_policy_path else {}  # eval/task_score
    if not args.eval_policy_path:
        dist.say("[train_rm] no task score: give --eval-policy-path (and --eval-reward-fn on your own data)")

    # 2. model, DeepSpeed engine, output directory, resume
    model = engine.load_model(args.model_path, args, ctx, kind="score", seed=args.seed, lora="train")
    out = engine.prepare_output_dir(args, ctx, "train_rm")
    model = engine.wrap_trainable(model, args, ctx, args.lr, args.micro_batch_size, grad_accum, args.steps)
    tracker = Tracker(args, out, ctx, "train_rm")
    sampler = data.Sampler(len(train), args.seed)
    step, before = 0, None
    if args.resume:
        state = engine.load_checkpoint(out, {"model": model}, ctx)
        step, before = state["step"], state["before"]
    if before is None:
        scores, samples = policy_task_score(args, ctx, ptok, eval_prompts, scorers)
        held_out = evaluate(model, evals, pad_id, args, ctx)
        before = tracker.evaluation("before", {**held_out, **scores}, samples)

    # 3. train
    while step < args.steps:
        stats = Stats()
        batch = sampler.rank_batch(step, args.batch_size, ctx)  # this rank's train indices at this step
        micro_batches = data.micro_batches(batch, args.micro_batch_size)
        for k, mb in enumerate(micro_batches):
            chosen, rejected = score_pairs(model, [train[i] for i in mb], pad_id, ctx.device)
            margin = margins[mb].to(ctx.device) if margins is not None else None
            # a micro-batch's share of the batch mean (micro-batches of equal size, on every rank)
            share = bradley_terry_loss(chosen, rejected, margin) / (grad_accum * ctx.world)
            engine.train_micro_batch(model, share, ctx, step + 1, last=k == len(micro_batches) - 1)
            stats.add(loss=share.item(), correct=(chosen > rejected).sum().item(), pairs=len(mb))
        step += 1
        totals = stats.all_ranks()  # sums over every micro-batch of every rank
        metrics = {"train/loss": totals["loss"], "train/pair_accuracy": totals["correct"] / totals["pairs"],
                   "train/lr": model.get_lr()[0],
                   "train/pairs_per_s": args.batch_size / max(1e-9, tracker.step_time())}
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            metrics.update(tracker.evaluation(f"step {step}", evaluate(model, evals, pad_id, args, ctx)))
        tracker.log(step, metrics, show=("train/loss", "train/pair_accuracy", "eval/pair_accuracy"))
        if engine.periodic_save(args, out, step, {"model": model},
                                {"step": step, "before": before}, tok, ctx):
            return

    # 4. final eval, reward statistics, export
    after = evaluate(model, evals, pad_id, args, ctx)
    after = tracker.evaluation("after", {**after, **{k: before[k] for k in scorers if k in before}})
    mean, std = reward_stats(model, train, pad_id, args, ctx)
    engine.export_hf(model, tok, out, ctx, {"reward_mean": mean, "reward_std": std})
    tracker.summary({"before": before, "after": after, "steps": step, "world_size": ctx.world,
                     "reward_mean": mean, "reward_std": std, "model_path": args.model_path,
                     "dataset": args.dataset, "sources": rewards.sources(scorers)})
    tracker.print(f"[train_rm] reward mean {mean:.3f} std {std:.3f}; saved to {out}")


if __name__ == "__main__":
    dist.cli(main, Args, EMBEDDED)
