"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv 2402.01306), alignment from unpaired
desirable / undesirable completions.

    python kto.py                                   # embedded SFT policy on the built-in pairs, split
    deepspeed kto.py --model-path SFT_DIR --dataset feedback.jsonl --output-dir runs/kto
    deepspeed kto.py ... --response-column completion --label-column thumbs_up --desirable-weight 1.33
    deepspeed kto.py --model-path SFT_DIR --dataset pairs.jsonl       # paired data: chosen/rejected split

Each example is (x, y, desirable). With r = log pi(y|x) - log ref(y|x) (sequence sums over the response
tokens, EOS included; prompt and padding excluded) and the reference point
    z0 = max(0, mean_i [log pi(y_j|x_i) - log ref(y_j|x_i)]),  j = (i + 1) mod B   (MISMATCHED pairs)
estimated per micro-batch, detached and averaged over ranks, the loss is
    desirable:   lambda_D (1 - sigmoid(beta (r - z0)))
    undesirable: lambda_U (1 - sigmoid(beta (z0 - r)))
averaged over the examples. The paper recommends lambda_D n_D / (lambda_U n_U) in [1, 4/3]; a warning with a
suggested --desirable-weight is printed outside that range.

Data: `prompt` + `--response-column` + `--label-column` (bool) rows. Rows with chosen/rejected columns and no
label column are preference pairs: each is split into a desirable (chosen) and an undesirable (rejected)
example; the no-argument run does this with the built-in pairs, so both classes cover the same prompts
(n_D = n_U).

Reference log-probs (of the matched and the mismatched completions) are computed once before training
(default) over exactly the micro-batches training will see, then the reference model is deleted;
--ref-on-the-fly keeps it and runs it inside every step. Both give the same numbers bit for bit. On --resume
they are computed again for the remaining steps.

Metrics: train/loss, train/kl (z0), train/rewards/{chosen,rejected,margin} (implicit rewards beta r of
desirable and undesirable examples), train/logps/{chosen,rejected}; eval/rewards/{chosen,rejected,margin},
eval/pair_accuracy on held-out pairs (when the held-out rows are pairs: implicit reward of chosen > rejected;
ties, |log-ratio margin| <= TIE_TOL as before training, count half) and eval/task_score (the mean task score
of greedy responses to the held-out prompts: --eval-reward-fn, or the built-in task's checker).
"""
import functools
import gc
from dataclasses import dataclass

import torch

from shared import data, dist, engine, lora, rewards, rollout, tasks, tracking
from shared.args import DataArgs, LoraArgs, RunArgs
from shared.tracking import Stats, Tracker


@dataclass
class Args(RunArgs, DataArgs, LoraArgs):
    model_path: str = engine.DEFAULT_SFT
    """policy to start from (usually the SFT model); also the frozen reference unless --ref-model-path"""
    ref_model_path: str = ""
    """the frozen reference model (default: --model-path)"""
    beta: float = 0.1
    """scale of the implicit reward inside the sigmoid (strength of the pull towards the reference). The paper
    uses 0.1; 0.5 is calibrated on the tiny default run (with 0.1 it reached 0.84 pair accuracy in 300
    steps there)"""
    desirable_weight: float = 1.0
    """lambda_D, the loss weight of desirable examples"""
    undesirable_weight: float = 1.0
    """lambda_U, the loss weight of undesirable examples"""
    ref_on_the_fly: bool = False
    """keep the reference model and run it in every step, instead of precomputing its log-probs
    before training"""
    steps: int = 300
    """optimizer steps"""
    batch_size: int = 64
    """global batch size in examples"""
    micro_batch_size: int = 8
    """examples per forward pass per rank (>= 2: the KL estimate pairs each prompt with another
    example's completion)"""
    lr: float = 1e-6
    """peak learning rate (AdamW; TRL 1e-6, the paper 5e-7)"""
    warmup_steps: int = 10
    """linear learning-rate warmup steps"""
    lr_decay: bool = True
    """decay the learning rate linearly to 0 at the last step"""
    eval_every: int = 0
    """evaluate every N steps (0: only before and after training)"""
    max_new_tokens: int = 256
    """response length limit of the greedy task-score eval"""


# Defaults tuned for the embedded 0.8M demo model (and models trained from it), which --defaults auto picks
# for it; the Args above hold the values for pretrained models. Flags you give always win.
EMBEDDED = dict(lr=2e-4, beta=0.5, micro_batch_size=64, max_new_tokens=8)


# ---------------------------------------------------------------------------------------------- the math


def sequence_logps(logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) = sum_t mask_t log pi(y_t | x, y_<t) per sequence, (N,). logprobs (N, R) of the response
    tokens; response_mask (N, R) is 1 on response tokens (EOS included), 0 on padding."""
    return (logprobs * response_mask.float()).sum(-1)


def mismatched(examples: list[dict], max_len: int) -> list[dict]:
    """The KL examples: prompt x_i followed by the completion y_j of example j = (i + 1) mod B
    (cut to max_len)."""
    out = []
    for i, ex in enumerate(examples):
        other = examples[(i + 1) % len(examples)]
        ids = ex["input_ids"][: ex["prompt_len"]] + other["input_ids"][other["prompt_len"]:]
        out.append({"input_ids": ids[:max_len], "prompt_len": ex["prompt_len"]})
    return out


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
                        world: int) -> torch.Tensor:
    """z0 = max(0, mean over ranks of mean_i [log pi(y_j|x_i) - log ref(y_j|x_i)]) on the mismatched pairs;
    detached (no gradient flows through it). Averaged BEFORE clamping, so every rank holds the same z0."""
    kl = (policy_kl_logps - ref_kl_logps).detach().float().mean()
    return (dist.all_reduce(kl.clone()) / world).clamp(min=0)


def kto_loss(logps, ref_logps, desirable, z0, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-example losses (B,), with r = logps - ref_logps (sequence log-probs (B,)), desirable a bool (B,):
    desirable:   lambda_D (1 - sigmoid(beta (r - z0)))
    undesirable: lambda_U (1 - sigmoid(beta (z0 - r)))"""
    r = logps - ref_logps
    return torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))


# A pair is a tie when |h| <= TIE_TOL nats. h subtracts four sequence log-probs, each a float32 sum of
# per-token log-probs; the same weights on a batch of another composition (padding, prompt sharing, kernel
# paths chosen by shape and alignment) round differently, ~1e-6 nats on the tiny models here and ~1e-5 over
# ~1000-token sequences. Before training (policy == reference) every pair is such a tie, and exact equality
# would score it 0 or 1 by the sign of that noise. Real preferences of a trained policy are orders of
# magnitude above 1e-4 nats. (As dpo.py.)
TIE_TOL = 1e-4


def pair_accuracy(log_ratio_margin: torch.Tensor, tol: float = TIE_TOL) -> float:
    """Fraction of pairs whose desirable (chosen) completion has the higher implicit reward, i.e. whose
    log-ratio margin h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) > tol; a tie,
    |h| <= tol, counts half."""
    h = log_ratio_margin.double()
    return ((h > tol).double() + 0.5 * (h.abs() <= tol).double()).mean().item()


def class_balance(n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float):
    """(ratio, suggestion): ratio = lambda_D n_D / (lambda_U n_U); outside the paper's [1, 4/3] the suggestion
    is the --desirable-weight that brings it to the nearest end of that range, else None."""
    ratio = desirable_weight * n_desirable / max(1e-12, undesirable_weight * n_undesirable)
    if n_desirable == 0 or n_undesirable == 0 or 1 <= ratio <= 4 / 3:
        return ratio, None
    target = 1.0 if ratio < 1 else 4 / 3
    return ratio, target * undesirable_weight * n_undesirable / n_desirable


# ------------------------------------------------------------------------------------------ data and forwards


def split_examples(rows: list[dict], tok, args, what: str, log) -> tuple[list[dict], bool]:
    """Tokenized {input_ids, prompt_len, label} examples, and whether the rows were pairs. Rows with
    chosen/rejected columns and no label column are pairs, split into (chosen, desirable) and (rejected,
    undesirable), kept adjacent."""
    first = rows[0]
    if args.label_column not in first and args.chosen_column in first and args.rejected_column in first:
        pairs = data.tokenize(rows, tok, "pair", args, what, log)
        return [{"input_ids": p[key], "prompt_len": p["prompt_len"], "label": key == "chosen_ids"}
                for p in pairs for key in ("chosen_ids", "rejected_ids")], True
    return data.tokenize(rows, tok, "unpaired", args, what, log), False


def batch_logps(model, examples: list[dict], pad_id: int, device) -> torch.Tensor:
    """Sequence log-probs (N,) of the examples in one pass; examples sharing a prompt (a split pair, an
    example and its mismatched KL row) compute it once (engine.response_forward)."""
    ids, mask, rmask, p_len = data.collate_responses([e["input_ids"] for e in examples],
                                                     [e["prompt_len"] for e in examples], pad_id, device)
    return sequence_logps(rollout.response_logprobs(model, ids, mask, p_len), rmask)


@torch.no_grad()
def ref_logps_of(ref, examples: list[dict], pad_id: int, args, device) -> torch.Tensor:
    """(2, B) reference log-probs of the matched and of the mismatched (KL) completions, in one forward."""
    both = batch_logps(ref, examples + mismatched(examples, args.max_len), pad_id, device)
    return both.view(2, len(examples))


@torch.no_grad()
def all_logps(model, examples: list[dict], pad_id: int, args, ctx) -> torch.Tensor:
    """(N,) float64 sequence log-probs of every example, sharded over ranks, complete on every rank. Every
    rank makes the same number of forward calls (ZeRO-3 forwards are collective)."""
    out = torch.zeros(len(examples), dtype=torch.float64)
    for idx in data.rank_micro_batches(list(range(len(examples))), args.micro_batch_size, ctx):
        logps = batch_logps(model, [examples[i] for i in idx or [0]], pad_id, ctx.device)
        if idx:
            out[idx] = logps.double().cpu()
    return dist.all_reduce(out.to(ctx.device)).cpu()


@torch.no_grad()
def evaluate(policy, evals, eval_ref, eval_paired, eval_prompts, scorers, tok, args, ctx):
    """(metrics, samples): held-out implicit rewards of desirable and undesirable examples, pair accuracy when
    they come from pairs (examples 2i and 2i+1), the task score of greedy responses to the held-out prompts.
    """
    metrics = {}
    if evals:
        policy.eval()
        logps = all_logps(policy, evals, tok.pad_token_id, args, ctx)
        implicit, good = args.beta * (logps - eval_ref), torch.tensor([e["label"] for e in evals])
        metrics = {"eval/rewards/chosen": implicit[good].mean().item(),
                   "eval/rewards/rejected": implicit[~good].mean().item()}
        metrics["eval/rewards/margin"] = metrics["eval/rewards/chosen"] - metrics["eval/rewards/rejected"]
        if eval_paired:
            log_ratio = logps - eval_ref
            metrics["eval/pair_accuracy"] = pair_accuracy(log_ratio[0::2] - log_ratio[1::2])
        policy.train()
    scores, samples = rollout.greedy_eval(policy, tok, eval_prompts, scorers, ctx, args.max_new_tokens)
    return {**metrics, **scores}, samples


# ---------------------------------------------------------------------------------------------- the loop


def check_args(args: Args):
    if args.beta <= 0 or args.desirable_weight < 0 or args.undesirable_weight < 0:
        raise dist.UserError("--beta must be > 0 and --desirable-weight / --undesirable-weight >= 0")
    if args.micro_batch_size < 2:
        raise dist.UserError("--micro-batch-size must be >= 2: the KL estimate pairs each prompt with the "
                             "completion of another example of the micro-batch")


def report_class_balance(train: list[dict], paired: bool, args) -> int:
    """Print n_D, n_U and lambda_D n_D / (lambda_U n_U), with a warning and a suggested --desirable-weight
    outside the paper's [1, 4/3]; return n_D."""
    n_desirable = sum(e["label"] for e in train)
    n_undesirable = len(train) - n_desirable
    ratio, suggestion = class_balance(n_desirable, n_undesirable, args.desirable_weight,
                                      args.undesirable_weight)
    dist.say(f"[kto] {n_desirable} desirable, {n_undesirable} undesirable train examples"
             f"{' (split from pairs)' if paired else ''}; lambda_D n_D / (lambda_U n_U) = {ratio:.3f}")
    if suggestion is not None:
        dist.say(f"[kto] warning: lambda_D n_D / (lambda_U n_U) = {ratio:.3f} is outside the KTO paper's "
                 f"recommended [1, 4/3]; try --desirable-weight {suggestion:.3g}")
    return n_desirable


def load_reference(policy, args, ctx):
    """The frozen reference model: with LoRA, the policy with its adapters off; else a frozen copy of
    --ref-model-path, or of the starting model (--model-path, with --lora-path's adapter if one is given)."""
    ref = lora.reference(policy, args, explicit=args.ref_model_path)
    if ref is not None:
        return ref
    if args.ref_model_path:
        model = engine.load_model(args.ref_model_path, args, ctx, flag="--ref-model-path", seed=args.seed)
    else:
        model = engine.load_model(args.model_path, args, ctx, seed=args.seed, lora="start")
    return engine.wrap_frozen(model, args, ctx)


def reference_logps(ref, train: list[dict], micro_batches_at, steps, pad_id: int, args, ctx) -> dict:
    """{(step, k): (2, B) reference log-probs (matched, mismatched completions) of micro-batch k of that step}
    for every step in `steps`, over exactly the micro-batches training will see (`micro_batches_at(step)`)."""
    table = {}
    for s in tracking.progress(steps, "reference log-probs", ctx):
        for k, mb in enumerate(micro_batches_at(s)):
            table[s, k] = ref_logps_of(ref, [train[i] for i in mb], pad_id, args, ctx.device)
    return table


def example_statistics(logps, ref_logps, desirable, beta: float) -> dict:
    """One micro-batch's sums of the implicit rewards beta (log pi - log ref) and of the policy's sequence
    log-probs over its desirable (chosen) and undesirable (rejected) examples, and their counts."""
    implicit, good = beta * (logps - ref_logps), desirable.double()
    return {"rewards/chosen": (implicit * good).sum().item(),
            "rewards/rejected": (implicit * (1 - good)).sum().item(),
            "logps/chosen": (logps * good).sum().item(),
            "logps/rejected": (logps * (1 - good)).sum().item(),
            "desirable": good.sum().item(),
            "undesirable": (1 - good).sum().item()}


def main(args: Args):
    ctx = dist.init(args.seed)
    # 1. check flags and data before anything is written
    check_args(args)
    grad_accum = data.check_batch_sizes(args.batch_size, args, ctx.world)
    tok = engine.load_tokenizer(args.model_path, args)
    pad_id = tok.pad_token_id
    train_rows, eval_rows = data.train_eval_rows(args, "pair" if args.dataset in tasks.TASKS else "unpaired")
    train, paired = split_examples(train_rows, tok, args, "train", dist.say)
    evals, eval_paired = split_examples(eval_rows, tok, args, "eval", dist.say) if eval_rows else ([], False)
    eval_prompts = data.eval_prompts(args, eval_rows, tok, dist.say)
    scorers = rewards.eval_scorers(args, eval_prompts)  # eval/task_score
    n_desirable = report_class_balance(train, paired, args)

    # 2. models: policy (trained), reference (frozen); output directory; resume
    policy = engine.load_model(args.model_path, args, ctx, seed=args.seed, lora="train")
    ref = load_reference(policy, args, ctx)
    out = engine.prepare_output_dir(args, ctx, "kto")
    policy = engine.wrap_trainable(policy, args, ctx, args.lr, args.micro_batch_size, grad_accum, args.steps)
    tracker = Tracker(args, out, ctx, "kto")
    sampler = data.Sampler(len(train), args.seed)
    step, before = 0, None
    if args.resume:
        state = engine.load_checkpoint(out, {"policy": policy}, ctx)
        step, before = state["step"], state["before"]
        tracker.print(f"[kto] resumed at step {step}")

    def step_micro_batches(s: int) -> list[list[int]]:  # this rank's micro-batches (train indices) at step s
        return data.micro_batches(sampler.rank_batch(s, args.batch_size, ctx), args.micro_batch_size)

    # 3. reference log-probs: held-out examples once; train examples of every remaining step unless on the fly
    eval_ref = all_logps(ref, evals, pad_id, args, ctx)  # (N_eval,)
    ref_table = {}  # (step, micro-batch) -> (2, B) reference log-probs: matched, mismatched
    if not args.ref_on_the_fly:
        last = args.stop_after if 0 < args.stop_after < args.steps else args.steps
        ref_table = reference_logps(ref, train, step_micro_batches, range(step, last), pad_id, args, ctx)
        ref = None  # the reference model is freed
        gc.collect()
    evaluation = functools.partial(evaluate, policy, evals, eval_ref, eval_paired, eval_prompts, scorers, tok,
                                   args, ctx)
    if before is None:
        before = tracker.evaluation("before", *evaluation())

    # 4. train
    while step < args.steps:
        stats = Stats()
        micro_batches = step_micro_batches(step)
        for k, mb in enumerate(micro_batches):
            examples = [train[i] for i in mb]
            desirable = torch.tensor([e["label"] for e in examples], device=ctx.device)
            if ref is not None:  # --ref-on-the-fly
                ref_logps, ref_kl_logps = ref_logps_of(ref, examples, pad_id, args, ctx.device)
            else:
                ref_logps, ref_kl_logps = ref_table.pop((step, k))
            # 4a. the reference point from mismatched pairs (no gradient), the same on every rank
            with torch.no_grad():
                policy_kl_logps = batch_logps(policy, mismatched(examples, args.max_len), pad_id, ctx.device)
            z0 = kto_reference_point(policy_kl_logps, ref_kl_logps, ctx.world)
            # 4b. the loss on the matched completions
            logps = batch_logps(policy, examples, pad_id, ctx.device)  # (B,)
            losses = kto_loss(logps, ref_logps, desirable, z0, args.beta, args.desirable_weight,
                              args.undesirable_weight)  # (B,)
            # a micro-batch's share of the batch mean (micro-batches of equal size, on every rank)
            share = losses.mean() / (grad_accum * ctx.world)
            engine.train_micro_batch(policy, share, ctx, step + 1, last=k == len(micro_batches) - 1)
            sums = example_statistics(logps.detach(), ref_logps, desirable, args.beta)
            stats.add(loss=share.item(), kl=z0.item(), micro_batches=1, **sums)
        step += 1
        totals = stats.all_ranks()  # sums over every micro-batch of every rank
        n_good, n_bad = max(totals["desirable"], 1.0), max(totals["undesirable"], 1.0)
        reward_good, reward_bad = totals["rewards/chosen"] / n_good, totals["rewards/rejected"] / n_bad
        metrics = {"train/loss": totals["loss"], "train/kl": totals["kl"] / totals["micro_batches"],
                   "train/rewards/chosen": reward_good, "train/rewards/rejected": reward_bad,
                   "train/rewards/margin": reward_good - reward_bad,
                   "train/logps/chosen": totals["logps/chosen"] / n_good,
                   "train/logps/rejected": totals["logps/rejected"] / n_bad,
                   "train/lr": policy.get_lr()[0],
                   "train/examples_per_s": args.batch_size / max(1e-9, tracker.step_time())}
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            metrics.update(tracker.evaluation(f"step {step}", *evaluation()))
        tracker.log(step, metrics, show=("train/loss", "train/kl", "train/rewards/margin",
                                         "eval/pair_accuracy", "eval/task_score"))
        if engine.periodic_save(args, out, step, {"policy": policy},
                                {"step": step, "before": before}, tok, ctx):
            return

    # 5. final eval and export
    after = tracker.evaluation("after", *evaluation())
    engine.export_hf(policy, tok, out, ctx)
    tracker.summary({"before": before, "after": after, "steps": step, "world_size": ctx.world,
                     "model_path": args.model_path, "dataset": args.dataset, "train_examples": len(train),
                     "desirable_examples": n_desirable, "split_from_pairs": paired,
                     "sources": rewards.sources(scorers)})
    tracker.print(f"[kto] saved to {out}")


if __name__ == "__main__":
    dist.cli(main, Args, EMBEDDED)
