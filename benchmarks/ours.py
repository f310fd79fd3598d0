"""Run one of our scripts as `python SCRIPT.py FLAGS` does (its own Args parsed by tyro, its main() called through
shared.dist.cli, nothing in it changed), with the counters of benchmarks/instrument.py installed. At the end of every
step (when the script logs it) the counters are snapshotted and the step gate is passed. Used by benchmarks/bench.py.

    python benchmarks/ours.py --record OUT.json [--learn-eval-every K] SCRIPT.py FLAGS...

--learn-eval-every K: the learning-efficiency mode. The clock starts after the script's own "before" evaluation (the
first greedy_eval); every K steps the policy's held-out greedy accuracy is measured with the benchmark's shared
evaluator, outside the timed steps.
"""
import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import instrument  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--record", required=True)
    p.add_argument("--learn-eval-every", type=int, default=0)
    p.add_argument("--learn-eval-rows", type=int, default=500)
    p.add_argument("script")
    p.add_argument("flags", nargs=argparse.REMAINDER)
    a = p.parse_args()
    torch.set_num_threads(1)
    instrument.install()
    gate = instrument.Gate()

    from transformers import AutoTokenizer

    from shared import engine, rewards, rollout, tasks
    from shared.tracking import Tracker

    steps, evals, captured = [], [], {"t_go": None}
    eval_rows = tasks.get("addition").rows("prompt", "test")[: a.learn_eval_rows]
    tok = AutoTokenizer.from_pretrained(str(ROOT / "assets" / "tokenizer"))

    wrap_trainable = engine.wrap_trainable

    def capture(model, *args, **kwargs):  # the first trainable engine is the policy (ppo_max: the critic comes next)
        eng = wrap_trainable(model, *args, **kwargs)
        captured.setdefault("policy", eng)
        return eng

    engine.wrap_trainable = capture
    rewards.call_function = instrument.timed_reward(rewards.call_function)
    greedy_eval = rollout.greedy_eval

    def gated_greedy_eval(*args, **kwargs):  # the script's own evaluations: before the loop, or after it
        out = greedy_eval(*args, **kwargs)
        if a.learn_eval_every and not steps and captured["t_go"] is None:  # the "before" eval: training starts now
            t = time.perf_counter()
            acc = instrument.greedy_accuracy(captured["policy"].module, tok, eval_rows)
            evals.append({"step": 0, "accuracy": acc, "eval_s": time.perf_counter() - t})
            captured["t_go"] = gate.report("begin")
        return out

    rollout.greedy_eval = gated_greedy_eval
    rollout.generate = instrument.generation(rollout.generate)
    generator = getattr(rollout, "Generator", None)  # --rollout-backend (hf | vllm), where the scripts have it
    if generator is not None:
        sample = generator.generate

        def counted_sample(self, *args, **kwargs):
            t = time.perf_counter()
            ro = sample(self, *args, **kwargs)
            if getattr(self, "backend", "hf") != "hf":  # HF generate is counted by its own hook
                instrument.count_rollout(ro, time.perf_counter() - t)
            self._rows = len(ro.input_ids)
            return ro

        def reused_logprobs(self):  # a script asks (only) when it would otherwise run its old-log-prob forward:
            if self._exact:  # when the answer is yes, that forward is replaced by the rollout's own log-probs
                instrument.COUNTS["old_from_sampler_rows"] += getattr(self, "_rows", 0)
            return self._exact

        generator.generate = counted_sample
        generator.exact_logprobs = property(reused_logprobs, lambda self, v: setattr(self, "_exact", v))
    log = Tracker.log

    def logged(self, step, metrics, show=()):
        log(self, step, metrics, show)
        snap = instrument.snapshot()
        steps.append({"step": step, "t_go": captured["t_go"], "t_end": snap.pop("t"), "counts": snap,
                      "mem": instrument.memory(),
                      "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))}})
        if a.learn_eval_every and step % a.learn_eval_every == 0:
            t = time.perf_counter()
            acc = instrument.greedy_accuracy(captured["policy"].module, tok, eval_rows)
            evals.append({"step": step, "accuracy": acc, "eval_s": time.perf_counter() - t})
        captured["t_go"] = gate.report(step)

    Tracker.log = logged

    script = ROOT / a.script
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[script.stem] = module
    spec.loader.exec_module(module)
    sys.argv = [str(script)] + a.flags
    from shared import dist

    try:
        dist.cli(module.main, module.Args)
    finally:
        Path(a.record).write_text(json.dumps({"script": a.script, "flags": a.flags, "steps": steps, "evals": evals}))


if __name__ == "__main__":
    main()
