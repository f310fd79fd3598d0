"""The same rollout with both backends of shared.rollout.Generator (hf: transformers generate; vllm: the colocated
vLLM engine), timed in one run: tokens/s of each and their ratio, for the tiny default policy's architecture and
~20M-parameter Llamas (two shapes) built in code, all over the default character tokenizer, with random weights (so
responses run long).

    OMP_NUM_THREADS=1 python benchmarks/rollout_backends.py                  # 64 prompts x 4 samples x 64 tokens
    OMP_NUM_THREADS=1 python benchmarks/rollout_backends.py --sizes 20m --repeats 5

Each size runs in its own child process (one vLLM engine per process, as in training); inside it the HF backend runs
first, then vLLM is started, synced and run on the same prompts with the same sampling settings. Every timing is one
`generate` call after a warm-up call; tokens/s counts generated tokens (up to and including EOS) per second. Start-up
and weight-push times are printed too: they are what a run pays once, and after every update.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # LlamaConfig fields; all over the default tokenizer's 99-token vocabulary
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),  # the default
    "20m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8),  # head_dim 64
    "21m": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4),  # head_dim 128
}


@dataclass
class Args:
    sizes: str = "tiny,20m"
    """comma-separated model sizes to time: tiny, 20m, 21m (see SIZES)"""
    prompts: int = 64
    """prompts per rollout (built-in addition prompts)"""
    n: int = 4
    """samples per prompt"""
    max_new_tokens: int = 64
    """response length limit"""
    temperature: float = 1.0
    """sampling temperature"""
    repeats: int = 3
    """timed generate calls per backend (after one warm-up call); the median is reported"""
    vllm_kv_cache_gb: float = 1.0
    """vLLM's KV cache on CPU, GiB"""
    only: str = ""
    """(internal) time this one size in this process and print its JSON line"""


def time_one_size(args: Args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shared import dist, engine, rollout, tasks
    from shared.args import RolloutArgs

    ctx = dist.init(0)
    tok = engine.load_tokenizer("tiny", SimpleNamespace(trust_remote_code=False))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=None,
                         num_key_value_heads=SIZES[args.only]["num_attention_heads"], max_position_embeddings=512,
                         tie_word_embeddings=False, **SIZES[args.only])
    model = LlamaForCausalLM(config).eval()
    model_dir = tempfile.mkdtemp(prefix="bench_rollout_")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = tasks.get("addition").rows("prompt", "test")[: args.prompts]
    prompt_ids = [tok(r["prompt"])["input_ids"] for r in rows]
    result = {"size": args.only, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
              "threads": torch.get_num_threads()}
    for backend in ("hf", "vllm"):
        flags = RolloutArgs(rollout_backend=backend, vllm_kv_cache_gb=args.vllm_kv_cache_gb)
        run_args = SimpleNamespace(**asdict(flags), model_path=model_dir, seed=0, max_len=64,
                                   max_new_tokens=args.max_new_tokens, trust_remote_code=False)
        t = time.time()
        generator = rollout.Generator(run_args, model, tok, ctx)
        start_s = time.time() - t
        sync_s = generator.sync(model)

        def rollout_once():
            t = time.time()
            ro = generator.generate(prompt_ids, args.n, args.temperature, 1.0, args.max_new_tokens)
            return time.time() - t, int(ro.response_mask.sum())

        rollout_once()  # warm-up
        runs = sorted(rollout_once() for _ in range(args.repeats))
        seconds, tokens = runs[len(runs) // 2]
        result[backend] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                           "startup_s": start_s, "weight_sync_s": sync_s}
    result["ratio"] = result["vllm"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    print("RESULT " + json.dumps(result), flush=True)
    dist.finish()


def main(args: Args):
    print(f"{args.prompts} prompts x {args.n} samples x {args.max_new_tokens} new tokens, temperature "
          f"{args.temperature}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    print(f"{'size':>5} {'params':>7} | {'hf tok/s':>9} {'vllm tok/s':>10} {'ratio':>6} | {'vllm start':>10} "
          f"{'weight push':>11}", flush=True)
    for size in args.sizes.split(","):
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(args).items() if k not in ("sizes", "only")]
        proc = subprocess.run([sys.executable, __file__, *flags, f"--only={size}"], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"size {size} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        r = json.loads(lines[0][len("RESULT "):])
        print(f"{size:>5} {r['params_M']:>6.1f}M | {r['hf']['tokens_per_s']:>9.0f} {r['vllm']['tokens_per_s']:>10.0f} "
              f"{r['ratio']:>5.1f}x | {r['vllm']['startup_s']:>9.1f}s {r['vllm']['weight_sync_s']:>10.3f}s", flush=True)
        print("  " + json.dumps(r), flush=True)


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    time_one_size(args) if args.only else main(args)
