"""Supervised fine-tuning (step 1 of SFT -> RM -> RL): next-token NLL on the response tokens only.

    python train_sft.py                                   # tiny default model on the built-in addition task
    deepspeed train_sft.py --model-path MODEL --dataset data.jsonl --output-dir runs/sft
    deepspeed --num_gpus 8 train_sft.py --model-path MODEL --dataset HUB_NAME --zero-stage 3

Data: `prompt` + `response` columns (strings or chat messages), or one `messages` column holding whole
conversations (the last, assistant message is the response). The prompt is masked out of the loss; the response
ends with exactly one EOS, which is trained on.
"""
from dataclasses import dataclass

import torch

from shared import data, dist, engine, rollout, tasks
from shared.args import DataArgs, RunArgs
from shared.tracking import Tracker


@dataclass
class Args(RunArgs, DataArgs):
    model_path: str = "tiny"
    """model to fine-tune: a local HF directory, a hub name, or `tiny` (the tiny default Llama, built from scratch)"""
    steps: int = 600
    """optimizer steps"""
    batch_size: int = 64
    """global batch size (examples per optimizer step, all ranks together)"""
    micro_batch_size: int = 64
    """examples per forward pass per rank; batch_size / (micro_batch_size x ranks) gives gradient accumulation"""
    lr: float = 1e-3
    """peak learning rate (AdamW)"""
    warmup_steps: int = 50
    """linear learning-rate warmup steps"""
    eval_every: int = 0
    """evaluate every N steps (0: only before and after training)"""
    max_new_tokens: int = 8
    """generation length for the greedy exact-match eval on a built-in task"""


def sft_loss(logits: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens of -log p(y_t | x, y_<t).
    logits (B, R, V) at the positions that predict the response tokens `responses` (B, R); response_mask (B, R)
    marks the real ones (not padding)."""
    logprobs = torch.log_softmax(logits.float(), -1).gather(-1, responses[..., None]).squeeze(-1)
    mask = response_mask.float()
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1)


def response_logits(model, examples: list[dict], pad_id: int, device):
    """(logits (B, R, V), responses (B, R), response_mask (B, R), attended tokens): prompts left-padded, responses
    right-padded, and the LM head run only on the positions that predict a response token (no vocabulary-sized
    logits over the prompt)."""
    ids, mask, rmask, p_len = data.collate_responses([e["input_ids"] for e in examples],
                                                     [e["prompt_len"] for e in examples], pad_id, device)
    return engine.response_forward(model, ids, mask, p_len), ids[:, p_len:], rmask, int(mask.sum())


@torch.no_grad()
def evaluate(model, tok, eval_examples, eval_prompts, task, args, ctx) -> dict:
    """Held-out NLL (token mean over all ranks) and, on a built-in task, greedy exact-match accuracy."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for mb in data.rank_micro_batches(eval_examples, args.micro_batch_size, ctx):  # same number of calls per rank
        logits, responses, rmask, _ = response_logits(model, mb or eval_examples[:1], tok.pad_token_id, ctx.device)
        if mb:
            n_tokens = rmask.sum().double().cpu()
            totals += torch.stack([sft_loss(logits, responses, rmask).double().cpu() * n_tokens, n_tokens])
    dist.all_reduce(totals)
    metrics = {"eval/loss": (totals[0] / totals[1].clamp(min=1)).item()}
    if task:
        metrics["eval/accuracy"], samples = rollout.greedy_eval(model, tok, eval_prompts, task.reward, ctx,
                                                                args.max_new_tokens)
        metrics["eval/samples"] = samples
    model.train()
    return metrics


def main(args: Args):
    ctx = dist.init(args.seed)
    # 1. check flags and data before anything is written
    grad_accum = data.check_batch_sizes(args.batch_size, args.micro_batch_size, ctx.world)
    say = print if ctx.main else (lambda *a: None)
    tok = engine.load_tokenizer(args.model_path, args)
    train_rows, eval_rows = data.train_eval_rows(args, "sft")
    train = data.tokenize(train_rows, tok, "sft", args, "train", say)
    evals = data.tokenize(eval_rows, tok, "sft", args, "eval", say) if eval_rows else []
    task = tasks.get(args.dataset) if args.dataset in tasks.TASKS else None
    eval_prompts = data.tokenize(task.rows("prompt", "test"), tok, "prompt", args, "eval") if task else []

    # 2. model, DeepSpeed engine, output directory, resume
    model = engine.load_model(args.model_path, args, ctx, seed=args.seed, dropout=True)  # SFT keeps dropout
    out = engine.prepare_output_dir(args, ctx, "train_sft")
    model = engine.wrap_trainable(model, args, ctx, args.lr, args.micro_batch_size, grad_accum, args.steps)
    tracker = Tracker(args, out, ctx, "train_sft")
    sampler = data.Sampler(len(train), args.seed)
    step, before = 0, None
    if args.resume:
        state = engine.load_checkpoint(out, {"model": model}, ctx)
        step, before = state["step"], state["before"]
        tracker.print(f"[train_sft] resumed at step {step}")
    if before is None:
        before = evaluate(model, tok, evals, eval_prompts, task, args, ctx)
        tracker.print(f"[train_sft] before: {before}")

    # 3. train
    while step < args.steps:
        losses, n_tokens = [], 0
        for mb in data.micro_batches(sampler.rank_batch(step, args.batch_size, ctx), args.micro_batch_size):
            logits, responses, rmask, attended = response_logits(model, [train[i] for i in mb], tok.pad_token_id,
                                                                 ctx.device)
            loss = sft_loss(logits, responses, rmask)
            model.backward(loss)
            model.step()
            losses.append(loss.item())
            n_tokens += attended
        step += 1
        metrics = {"train/loss": sum(losses) / len(losses), "train/lr": model.get_lr()[0],
                   "train/tokens_per_s": n_tokens * ctx.world / max(1e-9, tracker.step_time())}
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            metrics.update({k: v for k, v in evaluate(model, tok, evals, eval_prompts, task, args, ctx).items()
                            if k != "eval/samples"})
        tracker.log(step, metrics, show=("train/loss", "eval/loss", "eval/accuracy", "train/tokens_per_s"))
        if engine.periodic_save(args, out, step, {"model": model}, {"step": step, "before": before}, tok, ctx):
            return

    # 4. final eval and export
    after = evaluate(model, tok, evals, eval_prompts, task, args, ctx)
    engine.export_hf(model, tok, out, ctx)
    tracker.summary({"before": before, "after": after, "steps": step, "world_size": ctx.world,
                     "model_path": args.model_path, "dataset": args.dataset, "train_examples": len(train)})
    tracker.print(f"[train_sft] after: {after}\n[train_sft] saved to {out}")


if __name__ == "__main__":
    dist.cli(main, Args)
