"""One-GPU bf16 steps of train_sft.py, dpo.py, grpo.py and ppo_max.py on a ~0.5B Qwen2-shaped random model
(Qwen2.5-0.5B's shape: hidden 896, 24 layers, 14 query / 2 KV heads, MLP 4864, tied embeddings, 151936 tokens), built
here from a config (no download). Prints, per script: tokens/s, peak GPU memory and the MFU of the policy update. Run
through benchmarks/gpu.sh (it installs what the machine lacks first); `--tiny` runs the same code path on CPU with a
tiny Qwen2 in fp32 (tests/test_benchmarks.py runs it so that this file does not rot).

    python benchmarks/gpu_bench.py [--tiny] [--steps N] [--scripts train_sft,dpo,grpo,ppo_max] [--out DIR]

Each script runs as `python SCRIPT.py FLAGS` does, through benchmarks/ours.py (its counters: benchmarks/instrument.py;
on a GPU every hooked phase synchronises, so its wall time is its own). Per timed step (the first WARMUP excluded):
- tokens/s: SFT and DPO, the batch's tokens (forward positions with gradient) per second of the step; GRPO and
  PPO, sampled tokens per second of generation (rollout) and trained positions per second of the update;
- peak GPU memory: torch.cuda.max_memory_allocated over the step (reset at its start), the highest step;
- MFU of the policy update: 6 x (non-embedding parameters) x (positions through the backbone with gradient)
  / (time of the grad forwards + backwards + optimizer steps) / peak bf16 FLOP/s (--peak-tflops, default 989: H100/
  H200 SXM dense). It leaves out attention and the LM head, so it is a lower bound. PPO's update includes its critic's
  forwards and backwards (the positions count too).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1000000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(QWEN2_05B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
WARMUP = 1


def build(path: Path, cfg: dict) -> dict:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(ROOT / "assets" / "tokenizer"))
    torch.manual_seed(0)
    config = Qwen2Config(eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=tok.pad_token_id, **cfg)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return {"params": total, "non_embedding": total - embed}


def plans(d: str, tiny: bool, steps: int) -> dict:
    """Flags per script. GPU: SFT 16 examples, DPO 8 pairs, GRPO/PPO 8 prompts x 4 samples of 256 new tokens (tiny:
    4, 2, 2 x 2 x 8)."""
    b, pairs, p, k, new = (4, 2, 2, 2, 8) if tiny else (16, 8, 8, 4, 256)
    common = ["--model-path", d, "--steps", str(steps), "--eval-every", "0", "--eval-size", "4", "--defaults",
              "pretrained", "--max-new-tokens", "8", "--max-len", "512", "--dtype", "fp32" if tiny else "bf16"]
    data = lambda name: ["--dataset", f"{d}/{name}.jsonl", "--eval-dataset", f"{d}/{name}_eval.jsonl"]  # noqa: E731
    rl = [*data("prompts"), "--prompts-per-step", str(p), "--n-samples", str(k), "--micro-batch-size", str(p * k),
          "--reward-fn", "addition", "--lr", "1e-6"]
    return {
        "train_sft": [*common, *data("sft"), "--batch-size", str(b), "--micro-batch-size", str(b), "--lr", "2e-5"],
        "dpo": [*common, *data("pairs"), "--batch-size", str(pairs), "--micro-batch-size", str(pairs), "--lr", "1e-6",
                "--ref-on-the-fly"],
        # --max-new-tokens: the rollout length (the evaluation's 8 above is overridden for RL, which samples with it)
        "grpo": [*common, *rl, "--max-new-tokens", str(new), "--rollout-backend", "hf"],
        "ppo_max": [*common, *rl, "--max-new-tokens", str(new), "--rollout-backend", "hf", "--critic-warmup-steps", "0",
                    "--micro-batch-size", str(p * k // 2)],
    }


def summarize(record: dict, n_nonembed: int, peak_flops: float) -> dict:
    steps = record["steps"]
    rows = []
    for prev, cur in zip([None] + steps, steps):
        if cur["step"] <= WARMUP or cur["t_go"] is None:
            continue
        base = prev["counts"] if prev else {}
        w = {k: cur["counts"].get(k, 0.0) - base.get(k, 0.0) for k in cur["counts"]}
        w["s"] = cur["t_end"] - cur["t_go"]
        w.update(cur.get("mem") or {})
        rows.append(w)
    if not rows:
        return {"failed": "no timed steps"}
    m = lambda k: statistics.mean(r.get(k, 0.0) for r in rows)  # noqa: E731
    update_s = m("fwd_grad_s") + m("backward_s") + m("optimizer_s")
    out = {"s_per_step": statistics.median(r["s"] for r in rows), "steps_timed": len(rows),
           "trained_positions": m("fwd_grad_positions"), "sampled_tokens": m("sampled_tokens"),
           "train_tokens_per_s": m("fwd_grad_positions") / m("s") if m("s") else None,
           "rollout_tokens_per_s": m("sampled_tokens") / m("generate_s") if m("generate_s") else None,
           "update_s": update_s,
           "update_tokens_per_s": m("fwd_grad_positions") / update_s if update_s else None,
           "mfu_update": 6 * n_nonembed * m("fwd_grad_positions") / update_s / peak_flops if update_s else None,
           "peak_gpu_mb": max((r.get("gpu_peak_mb") or 0.0) for r in rows) or None,
           "peak_rss_mb": max(r.get("peak_mb", 0.0) for r in rows)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny Qwen2, fp32: the code path only (the test runs it)")
    ap.add_argument("--steps", type=int, default=0, help="steps per script (default 6; --tiny 2)")
    ap.add_argument("--scripts", default="train_sft,dpo,grpo,ppo_max")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, TFLOP/s")
    ap.add_argument("--out", default="", help="results directory (default: a temporary one)")
    a = ap.parse_args()
    steps = a.steps or (2 if a.tiny else 6)
    import torch

    if not a.tiny and not torch.cuda.is_available():
        sys.exit("gpu_bench: no GPU visible (torch.cuda.is_available() is False); --tiny runs the CPU check")
    out = Path(a.out or tempfile.mkdtemp(prefix="gpu_bench_"))
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    model_dir.mkdir(exist_ok=True)
    import bench

    sizes = build(model_dir, TINY if a.tiny else QWEN2_05B)
    bench.write_task_files(model_dir, 16 if a.tiny else 64, 16 if a.tiny else 256, n_train=200 if a.tiny else 2000,
                           n_eval=4)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"[gpu_bench] {device}; Qwen2 {'tiny' if a.tiny else '~0.5B'}: {sizes['params'] / 1e6:.1f}M parameters "
          f"({sizes['non_embedding'] / 1e6:.1f}M non-embedding); {steps} steps per script, {WARMUP} untimed",
          flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("BENCH_GATE", None)
    results = {"device": device, "tiny": a.tiny, **sizes, "steps": steps, "peak_tflops": a.peak_tflops, "scripts": {}}
    flags = plans(str(model_dir), a.tiny, steps)
    for name in a.scripts.split(","):
        record = out / f"{name}.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "ours.py"), "--record", str(record), f"{name}.py",
               *flags[name], "--output-dir", str(out / f"run_{name}"), "--overwrite"]
        t = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode or not record.exists():
            tail = (proc.stdout + proc.stderr)[-3000:]
            results["scripts"][name] = {"failed": f"exit code {proc.returncode}", "log_tail": tail}
            print(f"[gpu_bench] {name} FAILED (exit {proc.returncode}); log: {out / (name + '.log')}\n" + tail,
                  flush=True)
            continue
        s = summarize(json.loads(record.read_text()), sizes["non_embedding"], a.peak_tflops * 1e12)
        s["wall_s"] = time.time() - t
        results["scripts"][name] = s
        print(f"[gpu_bench] {name}: {s.get('s_per_step', 0):.3f} s/step, train {s.get('train_tokens_per_s') or 0:.0f} "
              f"tok/s, rollout {s.get('rollout_tokens_per_s') or 0:.0f} tok/s, update MFU "
              f"{100 * (s.get('mfu_update') or 0):.1f}%, peak GPU {s.get('peak_gpu_mb') or 0:.0f} MiB "
              f"(RSS {s.get('peak_rss_mb', 0):.0f} MiB), {s['wall_s']:.0f} s", flush=True)
    (out / "gpu_results.json").write_text(json.dumps(results, indent=1))
    print(f"[gpu_bench] results: {out / 'gpu_results.json'}", flush=True)
    sys.exit(1 if any("failed" in s for s in results["scripts"].values()) else 0)


if __name__ == "__main__":
    main()
