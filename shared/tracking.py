"""Logging on rank 0: a progress bar (on a terminal) with a metrics line every --log-every steps and at each
evaluation, a few sample responses per evaluation, metrics.jsonl (every step, each once also across a
--resume), summary.json, and wandb with --track (offline unless WANDB_MODE says otherwise)."""
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from shared import dist


def truncate_metrics(out: Path, step: int):
    """On --resume: keep the rows of metrics.jsonl up to `step` (the checkpoint's). Later rows, logged by the
    stopped run after its last checkpoint, would otherwise appear twice: the resumed run logs those steps
    again. A row cut short by a kill goes too. Atomic: a temporary file, then a rename."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def progress(iterable, desc: str, ctx, total: int | None = None):
    """A progress bar around `iterable` on rank 0, shown on a terminal only (reference log-probs,
    evaluation)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                disable=None if ctx.main else True)


class Stats(dict):
    """Per-step statistics summed by name: `stats.add(kl=..., tokens=...)` once per micro-batch, then
    `stats.all_ranks()` (sums over ranks) and ratios by name, `stats["kl"] / stats["tokens"]`."""

    def add(self, **values):
        for name, value in values.items():
            self[name] = self.get(name, 0.0) + float(value)

    def all_ranks(self) -> "Stats":
        totals = dist.all_reduce(torch.tensor(list(self.values()), dtype=torch.float64))
        return Stats(zip(self, totals.tolist()))


def _fmt(metrics: dict, keys=None) -> str:
    return " ".join(f"{k.removeprefix('train/')}={metrics[k]:.4g}" for k in (keys or metrics) if k in metrics)


class Tracker:
    def __init__(self, args, out: Path, ctx, script: str):
        from tqdm import tqdm

        self.out, self.main, self.script, self.start = out, ctx.main, script, time.time()
        self.wandb, self._last, self.steps = None, time.time(), args.steps
        self.every = args.log_every if args.log_every > 0 else max(1, args.steps // 20)
        self.bar = tqdm(total=args.steps, desc=script, unit="step", leave=False, dynamic_ncols=True,
                        disable=None if self.main else True)  # None: shown on a terminal only
        if args.track and self.main:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb.init(project=args.wandb_project, name=out.name, config=vars(args),
                                    dir=str(out))

    def log(self, step: int, metrics: dict, show: tuple = ()):
        """Append to metrics.jsonl, print the `show` metrics on one line, and send everything to wandb."""
        if not self.main:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        elapsed = time.time() - self.start
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "elapsed_s": round(elapsed, 2), **metrics}) + "\n")
        self.bar.update(step - self.bar.n)
        if step % self.every == 0 or step == self.steps or any(k.startswith("eval/") for k in metrics):
            self._write(f"[{self.script}] step {step} {_fmt(metrics, show)} ({elapsed:.0f}s)")
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def evaluation(self, when: str, metrics: dict, samples=()):
        """Print an evaluation's figures (`when`: before, after, or a step) and up to three sample responses;
        the clock of `step_time` restarts, so the first step's throughput leaves the evaluation out."""
        if self.main:
            self._write(f"[{self.script}] {when}: {_fmt(metrics) or 'no held-out figures'}")
            for prompt, response in list(samples)[:3]:
                self._write(f"    {str(prompt)[-60:]!r} -> {response[:100]!r}")
        self._last = time.time()
        return metrics

    def step_time(self) -> float:
        """Seconds since the previous call (or since the tracker started)."""
        now = time.time()
        elapsed, self._last = now - self._last, now
        return elapsed

    def summary(self, summary: dict):
        self.bar.close()
        if not self.main:
            return
        summary = {**summary, "elapsed_s": round(time.time() - self.start, 2)}
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(
            summary, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))
        os.replace(tmp, self.out / "summary.json")
        if self.wandb:
            self.wandb.summary.update(summary)
            self.wandb.finish()

    def print(self, *a):
        if self.main:
            self._write(" ".join(map(str, a)))

    def _write(self, line: str):
        self.bar.write(line)
        sys.stdout.flush()
