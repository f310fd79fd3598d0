"""Logging: one concise line per step on rank 0, metrics.jsonl (one line per logged step, each step once also across
a --resume), summary.json, and wandb with --track (offline unless WANDB_MODE says otherwise)."""
import json
import math
import os
import time
from pathlib import Path


def truncate_metrics(out: Path, step: int):
    """On --resume: keep the rows of metrics.jsonl up to `step` (the checkpoint's). Later rows, logged by the stopped
    run after its last checkpoint, would otherwise appear twice: the resumed run logs those steps again. A row cut
    short by a kill goes too. Atomic: a temporary file, then a rename."""
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


class Tracker:
    def __init__(self, args, out: Path, ctx, script: str):
        self.out, self.main, self.script, self.start = out, ctx.main, script, time.time()
        self.wandb, self._last = None, time.time()
        if args.track and self.main:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb.init(project=args.wandb_project, name=out.name, config=vars(args), dir=str(out))

    def log(self, step: int, metrics: dict, show: tuple = ()):
        """Append to metrics.jsonl, print the `show` metrics on one line, and send everything to wandb."""
        if not self.main:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        elapsed = time.time() - self.start
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "elapsed_s": round(elapsed, 2), **metrics}) + "\n")
        line = " ".join(f"{k.removeprefix('train/').replace('/', '_')}={metrics[k]:.4g}" for k in show if k in metrics)
        print(f"[{self.script}] step {step} {line} ({elapsed:.0f}s)", flush=True)
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def step_time(self) -> float:
        """Seconds since the previous call (or since the tracker started)."""
        now = time.time()
        elapsed, self._last = now - self._last, now
        return elapsed

    def summary(self, summary: dict):
        if not self.main:
            return
        summary = {**summary, "elapsed_s": round(time.time() - self.start, 2)}
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))
        os.replace(tmp, self.out / "summary.json")
        if self.wandb:
            self.wandb.summary.update(summary)
            self.wandb.finish()

    def print(self, *a):
        if self.main:
            print(*a, flush=True)
