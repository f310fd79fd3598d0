"""DPO: Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290), with the IPO loss
(Azar et al. 2023, arXiv 2310.12036) and conservative DPO / label smoothing (cDPO, Mitchell 2023).

    python dpo.py                                   # embedded SFT policy on the built-in addition pairs
    deepspeed dpo.py --model-path SFT_DIR --dataset pairs.jsonl --output-dir runs/dpo
    deepspeed dpo.py ... --loss-type ipo            # IPO
    deepspeed dpo.py ... --label-smoothing 0.1      # cDPO
    deepspeed dpo.py ... --loss-type simpo --beta 2 --simpo-gamma 1   # reference-free (also orpo)
    deepspeed --num_gpus 8 dpo.py ... --zero-stage 3 --ref-on-the-fly

No reward model and no sampling: the policy learns from preference pairs (x, y_w, y_l) directly. With sequence
log-probs (SUMS over the response tokens, EOS included; prompt and padding excluded)
    h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
DPO minimises -log sigmoid(beta h); cDPO -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h);
IPO (h - 1/(2 beta))^2, where h uses MEAN log-probs per response token (as the IPO paper and TRL do, so that
its target margin 1/(2 beta) does not grow with the response length). beta (log pi(y|x) - log ref(y|x)) is the
implicit reward. Also --loss-type hinge (SLiC), robust (robust DPO), simpo and orpo (reference-free, mean
log-probs; the reference's log-probs count as 0 in the metrics; no reference model is loaded) and apo-zero:
equations in `dpo_loss`, table in README "Variants".

Reference log-probs are computed once before training (default) over exactly the micro-batches training will
see (the data order is a deterministic function of --seed and the step), then the reference model is deleted;
--ref-on-the-fly keeps it and runs it inside every step. Both give the same numbers bit for bit; precomputing
frees the reference's memory during training. On --resume they are computed again for the remaining steps.

Data: `prompt` + `chosen` + `rejected` columns, or `chosen` + `rejected` as two whole conversations that
differ only in the last (assistant) message.

Metrics: train/loss, train/rewards/{chosen,rejected,accuracy,margin}, train/logps/{chosen,rejected};
eval/pair_accuracy (implicit reward of chosen > rejected on held-out pairs; ties, |h| <= TIE_TOL, as before
training when every implicit reward is 0 up to float rounding, count half) and eval/task_score (the mean task
score of greedy responses to the held-out prompts: --eval-reward-fn, or the built-in task's checker). Pair
accuracy can rank runs the wrong way on a task: choose by eval/task_score.
"""
import functools
import gc
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared import data, dist, engine, lora, rewards, rollout, tracking
from shared.args import DataArgs, LoraArgs, RunArgs
from shared.tracking import Stats, Tracker


@dataclass
class Args(RunArgs, DataArgs, LoraArgs):
    model_path: str = engine.DEFAULT_SFT
    """policy to start from (usually the SFT model); also the frozen reference unless --ref-model-path"""
    ref_model_path: str = ""
    """the frozen reference model (default: --model-path)"""
    loss_type: str = "sigmoid"
    """sigmoid: DPO, -log sigmoid(beta h) (cDPO with --label-smoothing); ipo: (h - 1/(2 beta))^2 on mean
    log-probs; hinge (SLiC); robust (robust DPO, flip rate --label-smoothing); simpo, orpo (reference-free);
    apo-zero"""
    beta: float = 0.1
    """strength of the implicit KL constraint to the reference (the temperature of the implicit reward). The
    papers use 0.1; 0.25 is calibrated on the tiny default run (with 0.1 it hovered at 0.84-0.91 pair
    accuracy there)"""
    label_smoothing: float = 0.0
    """cDPO: assumed fraction eps of flipped labels, loss -(1-eps) log sigmoid(beta h) - eps log
    sigmoid(-beta h) (with --loss-type robust: the flip rate of robust DPO)"""
    ref_on_the_fly: bool = False
    """keep the reference model and run it in every step, instead of precomputing its log-probs
    before training"""
    steps: int = 250
    """optimizer steps"""
    batch_size: int = 64
    """global batch size in pairs"""
    micro_batch_size: int = 8
    """pairs per forward pass per rank (chosen and rejected go through one concatenated forward)"""
    lr: float = 1e-6
    """peak learning rate (AdamW; TRL 1e-6, OpenRLHF 5e-7)"""
    warmup_steps: int = 10
    """linear learning-rate warmup steps"""
    lr_decay: bool = True
    """decay the learning rate linearly to 0 at the last step"""
    eval_every: int = 0
    """evaluate every N steps (0: only before and after training)"""
    max_new_tokens: int = 256
    """response length limit of the greedy task-score eval"""
    # --- the DPO family (README "Variants"); --loss-type also takes hinge, robust, simpo, orpo, apo-zero ---
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma (--loss-type simpo; the paper: beta 2-2.5, gamma / beta ~0.5)"""
    orpo_lambda: float = 0.1
    """ORPO's weight lambda of the odds-ratio term beside the chosen response's NLL (--loss-type orpo; TRL
    calls it beta)"""


# Defaults tuned for the embedded 0.8M demo model (and models trained from it), which --defaults auto picks
# for it; the Args above hold the values for pretrained models. Flags you give always win.
EMBEDDED = dict(lr=2e-4, beta=0.25, micro_batch_size=64, max_new_tokens=8)


# ---------------------------------------------------------------------------------------------- the math


def sequence_logps(logprobs: torch.Tensor, response_mask: torch.Tensor, average: bool = False):
    """log pi(y|x) = sum_t mask_t log pi(y_t | x, y_<t) per sequence, (N,); with average=True divided by the
    number of response tokens. logprobs (N, R) of the response tokens; response_mask (N, R) is 1 on response
    tokens (EOS included), 0 on padding."""
    mask = response_mask.float()
    total = (logprobs * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "apo-zero")
AVERAGED = ("ipo", "simpo", "orpo")  # losses on MEAN per-token log-probs (their papers); the others on sums
REFERENCE_FREE = ("simpo", "orpo")  # no reference model is loaded: its log-probs count as 0


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
             orpo_lambda: float = 0.1) -> torch.Tensor:
    """Per-pair losses (B,) from sequence log-probs (B,) of the policy and the reference (means per token for
    AVERAGED losses; 0 for REFERENCE_FREE ones).
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    sigmoid:  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (DPO when eps = 0, cDPO otherwise)
    ipo:      (h - 1 / (2 beta))^2   (Azar et al. 2023, arXiv 2310.12036)
    hinge:    max(0, 1 - beta h)   (SLiC, Zhao et al. 2023, arXiv 2305.10425)
    robust:   (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)
              (robust DPO, Chowdhury et al. 2024, arXiv 2403.00409; eps = label_smoothing, the flip rate)
    simpo:    -log sigmoid(beta (chosen - rejected) - gamma), mean log-probs, no reference
              (Meng et al. 2024, arXiv 2405.14734)
    orpo:     -chosen + lambda (-log sigmoid(log odds(y_w) - log odds(y_l))), odds = P / (1 - P), P = exp(mean
              log-prob), no reference: the chosen response's mean NLL plus the odds-ratio term
              (Hong et al. 2024, arXiv 2403.07691)
    apo-zero: (1 - sigmoid(beta r_w)) + sigmoid(beta r_l), r = logpi - logref: push the chosen up and the
              rejected down, each on its own (D'Oosterlinck et al. 2024, arXiv 2408.06266)"""
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "robust":
        eps = label_smoothing
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "simpo":
        return -F.logsigmoid(beta * (chosen - rejected) - simpo_gamma)
    if loss_type == "orpo":
        log_odds_chosen = chosen - torch.log1p(-torch.exp(chosen))  # log(P / (1 - P)), P = exp(mean log-prob)
        log_odds_rejected = rejected - torch.log1p(-torch.exp(rejected))
        return -chosen - orpo_lambda * F.logsigmoid(log_odds_chosen - log_odds_rejected)
    if loss_type == "apo-zero":
        chosen_up = 1 - torch.sigmoid(beta * (chosen - ref_chosen))
        rejected_down = torch.sigmoid(beta * (rejected - ref_rejected))
        return chosen_up + rejected_down
    raise ValueError(loss_type)


# A pair is a tie when |h| <= TIE_TOL nats. h subtracts four sequence log-probs, each a float32 sum of
# per-token log-probs; the same weights on a batch of another composition (padding, prompt sharing, kernel
# paths chosen by shape and alignment) round differently, ~1e-6 nats on the tiny models here and ~1e-5 over
# ~1000-token sequences. Before training (policy == reference) every pair is such a tie, and exact equality
# would score it 0 or 1 by the sign of that noise. Real preferences of a trained policy are orders of
# magnitude above 1e-4 nats.
TIE_TOL = 1e-4


def pair_accuracy(log_ratio_margin: torch.Tensor, tol: float = TIE_TOL) -> float:
    """Fraction of pairs whose chosen response has the higher implicit reward, i.e. whose log-ratio margin
    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) > tol; a tie, |h| <= tol, counts half."""
    h = log_ratio_margin.double()
    return ((h > tol).double() + 0.5 * (h.abs() <= tol).double()).mean().item()


# --------------------------------------------------------------------------------------------- forward passes


def pair_logps(model, pairs: list[dict], pad_id: int, device, average: bool = False):
    """Sequence log-probs (chosen (B,), rejected (B,)) in ONE pass over the concatenated batch; each pair's
    prompt is computed once for its two responses (engine.response_forward)."""
    seqs = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    prompt_lens = [p["prompt_len"] for p in pairs] * 2
    ids, mask, rmask, p_len = data.collate_responses(seqs, prompt_lens, pad_id, device)
    logps = sequence_logps(rollout.response_logprobs(model, ids, mask, p_len), rmask, average)
    return logps[: len(pairs)], logps[len(pairs):]


@torch.no_grad()
def all_pair_logps(model, pairs: list[dict], pad_id: int, args, ctx) -> torch.Tensor:
    """(N, 2) float64 sequence log-probs (chosen, rejected) of every pair, sharded over ranks, complete on
    every rank. Every rank makes the same number of forward calls (ZeRO-3 forwards are collective)."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for idx in data.rank_micro_batches(list(range(len(pairs))), args.micro_batch_size, ctx):
        chosen, rejected = pair_logps(model, [pairs[i] for i in idx or [0]], pad_id, ctx.device,
                                      args.loss_type in AVERAGED)
        if idx:
            out[idx] = torch.stack([chosen, rejected], 1).double().cpu()
    return dist.all_reduce(out.to(ctx.device)).cpu()


@torch.no_grad()
def evaluate(policy, evals, eval_ref, eval_prompts, scorers, tok, args, ctx):
    """(metrics, samples): held-out DPO loss, implicit-reward pair accuracy and margin; the task score of
    greedy responses to the held-out prompts."""
    metrics = {}
    if evals:
        policy.eval()
        logps = all_pair_logps(policy, evals, tok.pad_token_id, args, ctx)  # (N, 2): chosen, rejected
        implicit = args.beta * (logps - eval_ref)
        losses = dpo_loss(logps[:, 0], logps[:, 1], eval_ref[:, 0], eval_ref[:, 1], args.beta, args.loss_type,
                          args.label_smoothing, args.simpo_gamma, args.orpo_lambda)
        margin = implicit[:, 0] - implicit[:, 1]
        h = (logps[:, 0] - eval_ref[:, 0]) - (logps[:, 1] - eval_ref[:, 1])
        metrics = {"eval/pair_accuracy": pair_accuracy(h), "eval/loss": losses.mean().item(),
                   "eval/rewards/margin": margin.mean().item(),
                   "eval/logps/chosen": logps[:, 0].mean().item(),
                   "eval/logps/rejected": logps[:, 1].mean().item()}
        policy.train()
    scores, samples = rollout.greedy_eval(policy, tok, eval_prompts, scorers, ctx, args.max_new_tokens)
    return {**metrics, **scores}, samples


# ---------------------------------------------------------------------------------------------- the loop


def check_args(args: Args):
    if args.loss_type not in LOSSES:
        raise dist.UserError(f"--loss-type must be one of {', '.join(LOSSES)}; got '{args.loss_type}'")
    if args.beta <= 0:
        raise dist.UserError(f"--beta must be > 0, got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        raise dist.UserError(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.label_smoothing and args.loss_type not in ("sigmoid", "robust"):
        raise dist.UserError("--label-smoothing (cDPO, or robust DPO's flip rate) applies to --loss-type "
                             "sigmoid or robust only")
    if args.loss_type in REFERENCE_FREE and (args.ref_model_path or args.ref_on_the_fly):
        raise dist.UserError(f"--loss-type {args.loss_type} is reference-free: drop --ref-model-path and "
                             f"--ref-on-the-fly")


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
    """Before training: {(step, k): (2, B) reference log-probs (chosen, rejected) of micro-batch k of that
    step} for every step in `steps`, over exactly the micro-batches training will see (`micro_batches_at`)."""
    table, average = {}, args.loss_type in AVERAGED
    with torch.no_grad():
        for s in tracking.progress(steps, "reference log-probs", ctx):
            for k, mb in enumerate(micro_batches_at(s)):
                chosen, rejected = pair_logps(ref, [train[i] for i in mb], pad_id, ctx.device, average)
                table[s, k] = torch.stack([chosen, rejected])
    return table


def pair_statistics(chosen, rejected, ref_chosen, ref_rejected, beta: float) -> dict:
    """One micro-batch's means (train/rewards/*, train/logps/*): the implicit rewards beta (log pi - log ref)
    of chosen and rejected responses, their margin, the pair accuracy, the policy's sequence log-probs."""
    reward_chosen = beta * (chosen - ref_chosen)
    reward_rejected = beta * (rejected - ref_rejected)
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    return {"rewards/chosen": reward_chosen.mean().item(),
            "rewards/rejected": reward_rejected.mean().item(),
            "rewards/accuracy": pair_accuracy(h),
            "rewards/margin": (reward_chosen - reward_rejected).mean().item(),
            "logps/chosen": chosen.mean().item(),
            "logps/rejected": rejected.mean().item()}


def main(args: Args):
    ctx = dist.init(args.seed)
    # 1. check flags and data before anything is written
    check_args(args)
    grad_accum = data.check_batch_sizes(args.batch_size, args, ctx.world)
    tok = engine.load_tokenizer(args.model_path, args)
    pad_id, average = tok.pad_token_id, args.loss_type in AVERAGED
    train_rows, eval_rows = data.train_eval_rows(args, "pair")
    train = data.tokenize(train_rows, tok, "pair", args, "train", dist.say)
    evals = data.tokenize(eval_rows, tok, "pair", args, "eval", dist.say) if eval_rows else []
    eval_prompts = data.eval_prompts(args, eval_rows, tok, dist.say)
    scorers = rewards.eval_scorers(args, eval_prompts)  # eval/task_score

    # 2. models: policy (trained), reference (frozen); output directory; resume
    policy = engine.load_model(args.model_path, args, ctx, seed=args.seed, lora="train")
    needs_ref = args.loss_type not in REFERENCE_FREE  # SimPO and ORPO load no reference model
    ref = load_reference(policy, args, ctx) if needs_ref else None
    out = engine.prepare_output_dir(args, ctx, "dpo")
    policy = engine.wrap_trainable(policy, args, ctx, args.lr, args.micro_batch_size, grad_accum, args.steps)
    tracker = Tracker(args, out, ctx, "dpo")
    sampler = data.Sampler(len(train), args.seed)
    step, before = 0, None
    if args.resume:
        state = engine.load_checkpoint(out, {"policy": policy}, ctx)
        step, before = state["step"], state["before"]
        tracker.print(f"[dpo] resumed at step {step}")

    def step_micro_batches(s: int) -> list[list[int]]:  # this rank's micro-batches (train indices) at step s
        return data.micro_batches(sampler.rank_batch(s, args.batch_size, ctx), args.micro_batch_size)

    # 3. reference log-probs: held-out pairs once; train pairs of every remaining step unless --ref-on-the-fly
    eval_ref = torch.zeros(len(evals), 2, dtype=torch.float64)  # (N_eval, 2); zeros for a reference-free loss
    if needs_ref:
        eval_ref = all_pair_logps(ref, evals, pad_id, args, ctx)
    ref_table = {}  # (step, micro-batch) -> (2, B) reference log-probs: chosen, rejected
    if needs_ref and not args.ref_on_the_fly:
        last = args.stop_after if 0 < args.stop_after < args.steps else args.steps
        ref_table = reference_logps(ref, train, step_micro_batches, range(step, last), pad_id, args, ctx)
        ref = None  # the reference model is freed
        gc.collect()
    evaluation = functools.partial(evaluate, policy, evals, eval_ref, eval_prompts, scorers, tok, args, ctx)
    if before is None:
        before = tracker.evaluation("before", *evaluation())

    # 4. train
    while step < args.steps:
        stats = Stats()
        micro_batches = step_micro_batches(step)
        for k, mb in enumerate(micro_batches):
            pairs = [train[i] for i in mb]
            chosen, rejected = pair_logps(policy, pairs, pad_id, ctx.device, average)  # (B,), (B,)
            if ref is not None:  # --ref-on-the-fly
                with torch.no_grad():
                    ref_chosen, ref_rejected = pair_logps(ref, pairs, pad_id, ctx.device, average)
            elif needs_ref:
                ref_chosen, ref_rejected = ref_table.pop((step, k))
            else:  # reference-free: the reference's log-probs count as 0
                ref_chosen, ref_rejected = torch.zeros(2, len(pairs), device=ctx.device)
            losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta, args.loss_type,
                              args.label_smoothing, args.simpo_gamma, args.orpo_lambda)  # (B,)
            # a micro-batch's share of the batch mean (micro-batches of equal size, on every rank)
            share = losses.mean() / (grad_accum * ctx.world)
            engine.train_micro_batch(policy, share, ctx, step + 1, last=k == len(micro_batches) - 1)
            means = pair_statistics(chosen.detach(), rejected.detach(), ref_chosen, ref_rejected, args.beta)
            stats.add(loss=share.item(), micro_batches=1, **means)
        step += 1
        totals = stats.all_ranks()  # sums over every micro-batch of every rank
        n_micro = totals.pop("micro_batches")
        metrics = {"train/loss": totals.pop("loss")}  # the optimizer step's loss: the sum of the shares
        metrics.update({f"train/{name}": total / n_micro for name, total in totals.items()})  # the means
        metrics.update({"train/lr": policy.get_lr()[0],
                        "train/pairs_per_s": args.batch_size / max(1e-9, tracker.step_time())})
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            metrics.update(tracker.evaluation(f"step {step}", *evaluation()))
        tracker.log(step, metrics, show=("train/loss", "train/rewards/accuracy", "train/rewards/margin",
                                         "eval/pair_accuracy", "eval/task_score"))
        if engine.periodic_save(args, out, step, {"policy": policy},
                                {"step": step, "before": before}, tok, ctx):
            return

    # 5. final eval and export
    after = tracker.evaluation("after", *evaluation())
    engine.export_hf(policy, tok, out, ctx)
    tracker.summary({"before": before, "after": after, "steps": step, "world_size": ctx.world,
                     "loss_type": args.loss_type, "model_path": args.model_path, "dataset": args.dataset,
                     "train_pairs": len(train), "sources": rewards.sources(scorers)})
    tracker.print(f"[dpo] saved to {out}")


if __name__ == "__main__":
    dist.cli(main, Args, EMBEDDED)
