"""Supervised fine-tuning (step 1 of SFT -> RM -> RL): next-token NLL on the response tokens only.

    python train_sft.py                                   # tiny default model on the built-in addition task
    deepspeed train_sft.py --model-path MODEL --dataset data.jsonl --output-dir runs/sft
    deepspeed --num_gpus 8 train_sft.py --model-path MODEL --dataset HUB_NAME --zero-stage 3

Data: `prompt` + `response` columns (strings or chat messages), or one `messages` column holding whole
conversations (the last, assistant message is the response). The prompt is masked out of the loss; the
response ends with exactly one EOS, which is trained on. --assistant-turns all trains on every assistant turn
of a conversation (its content and EOS), the user/system turns and the template's markup masked.
"""
import functools
from dataclasses import dataclass

import torch

from shared import data, dist, engine, rewards, rollout
from shared.args import DataArgs, LoraArgs, RunArgs
from shared.tracking import Stats, Tracker


@dataclass
class Args(RunArgs, DataArgs, LoraArgs):
    model_path: str = "tiny"
    """model to fine-tune: a local HF directory, a hub name, or `tiny` (the tiny default Llama, built
    from scratch)"""
    steps: int = 600
    """optimizer steps"""
    batch_size: int = 64
    """global batch size (examples per optimizer step, all ranks together)"""
    micro_batch_size: int = 8
    """examples per forward pass per rank; batch_size / (micro_batch_size x ranks) gives the gradient
    accumulation steps"""
    lr: float = 2e-5
    """peak learning rate (AdamW; TRL's SFT default)"""
    warmup_steps: int = 20
    """linear learning-rate warmup steps (~3% of the steps, as OpenRLHF)"""
    eval_every: int = 0
    """evaluate every N steps (0: only before and after training)"""
    max_new_tokens: int = 256
    """response length limit of the greedy task-score eval"""
    assistant_turns: str = "last"
    """conversations: last, the loss on the last assistant message only (its EOS included); all, on every
    assistant message's content and its EOS (end-of-turn token), nothing else of the conversation"""


# Defaults tuned for the embedded 0.8M demo model (and models trained from it), which --defaults auto picks
# for it; the Args above hold the values for pretrained models. Flags you give always win.
EMBEDDED = dict(lr=1e-3, warmup_steps=50, micro_batch_size=64, max_new_tokens=8)


def sft_loss(logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens of -log p(y_t | x, y_<t): logprobs (B, R) of the response tokens,
    response_mask (B, R) marks the real ones (not padding)."""
    mask = response_mask.float()
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1)


def response_logprobs(model, examples: list[dict], pad_id: int, device):
    """(log-probs (B, R) of the response tokens, response_mask (B, R), attended tokens): prompts left-padded,
    responses right-padded; the LM head runs only on the positions that predict a response token, a chunk
    at a time (shared.rollout.response_logprobs: no (B, R, V) logits)."""
    ids, mask, rmask, p_len = data.collate_responses([e["input_ids"] for e in examples],
                                                     [e["prompt_len"] for e in examples], pad_id, device)
    if any("loss_mask" in e for e in examples):  # --assistant-turns all: only the response's assistant turns
        turns = torch.zeros_like(rmask)
        for i, e in enumerate(examples):
            m = e.get("loss_mask", [1] * (len(e["input_ids"]) - e["prompt_len"]))
            turns[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
        rmask = rmask & turns
    return rollout.response_logprobs(model, ids, mask, p_len), rmask, int(mask.sum())


@torch.no_grad()
def evaluate(model, tok, eval_examples, eval_prompts, scorers, args, ctx):
    """(metrics, samples): held-out NLL (token mean over all ranks) and the task score of greedy responses."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for mb in data.rank_micro_batches(eval_examples, args.micro_batch_size, ctx):  # same calls on every rank
        examples = mb or eval_examples[:1]  # (an empty micro-batch runs a stand-in, dropped)
        logprobs, rmask, _ = response_logprobs(model, examples, tok.pad_token_id, ctx.device)
        if mb:
            n_tokens = rmask.sum().double().cpu()
            totals += torch.stack([sft_loss(logprobs, rmask).double().cpu() * n_tokens, n_tokens])
    dist.all_reduce(totals)
    scores, samples = rollout.greedy_eval(model, tok, eval_prompts, scorers, ctx, args.max_new_tokens)
    model.train()
    return {"eval/loss": (totals[0] / totals[1].clamp(min=1)).item(), **scores}, samples


def main(args: Args):
    ctx = dist.init(args.seed)
    # 1. check flags and data before anything is written
    grad_accum = data.check_batch_sizes(args.batch_size, args, ctx.world)
    tok = engine.load_tokenizer(args.model_path, args)
    pad_id = tok.pad_token_id
    train_rows, eval_rows = data.train_eval_rows(args, "sft")
    train = data.tokenize(train_rows, tok, "sft", args, "train", dist.say)
    evals = data.tokenize(eval_rows, tok, "sft", args, "eval", dist.say) if eval_rows else []
    eval_prompts = data.eval_prompts(args, eval_rows, tok, dist.say)
    scorers = rewards.eval_scorers(args, eval_prompts)  # eval/task_score

    # 2. model, DeepSpeed engine, output directory, resume
    # (SFT keeps the model's own dropout; the other scripts switch it off)
    model = engine.load_model(args.model_path, args, ctx, seed=args.seed, dropout=True, lora="train")
    out = engine.prepare_output_dir(args, ctx, "train_sft")
    model = engine.wrap_trainable(model, args, ctx, args.lr, args.micro_batch_size, grad_accum, args.steps)
    tracker = Tracker(args, out, ctx, "train_sft")
    sampler = data.Sampler(len(train), args.seed)
    step, before = 0, None
    if args.resume:
        state = engine.load_checkpoint(out, {"model": model}, ctx)
        step, before = state["step"], state["before"]
        tracker.print(f"[train_sft] resumed at step {step}")
    evaluation = functools.partial(evaluate, model, tok, evals, eval_prompts, scorers, args, ctx)
    if before is None:
        before = tracker.evaluation("before", *evaluation())

    # 3. train
    while step < args.steps:
        stats = Stats()
        batch = sampler.rank_batch(step, args.batch_size, ctx)  # this rank's train indices at this step
        micro_batches = data.micro_batches(batch, args.micro_batch_size)
        for k, mb in enumerate(micro_batches):
            examples = [train[i] for i in mb]
            logprobs, rmask, attended = response_logprobs(model, examples, pad_id, ctx.device)
            # a micro-batch's share of the batch mean (micro-batches of equal size, on every rank)
            share = sft_loss(logprobs, rmask) / (grad_accum * ctx.world)
            engine.train_micro_batch(model, share, ctx, step + 1, last=k == len(micro_batches) - 1)
            stats.add(loss=share.item(), tokens=attended)
        step += 1
        totals = stats.all_ranks()  # sums over every micro-batch of every rank
        metrics = {"train/loss": totals["loss"], "train/lr": model.get_lr()[0],
                   "train/tokens_per_s": totals["tokens"] / max(1e-9, tracker.step_time())}
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            metrics.update(tracker.evaluation(f"step {step}", *evaluation()))
        tracker.log(step, metrics, show=("train/loss", "eval/loss", "eval/task_score", "train/tokens_per_s"))
        if engine.periodic_save(args, out, step, {"model": model},
                                {"step": step, "before": before}, tok, ctx):
            return

    # 4. final eval and export
    after = tracker.evaluation("after", *evaluation())
    engine.export_hf(model, tok, out, ctx)
    tracker.summary({"before": before, "after": after, "steps": step, "world_size": ctx.world,
                     "model_path": args.model_path, "dataset": args.dataset, "train_examples": len(train),
                     "sources": rewards.sources(scorers)})
    tracker.print(f"[train_sft] saved to {out}")


if __name__ == "__main__":
    dist.cli(main, Args, EMBEDDED)
