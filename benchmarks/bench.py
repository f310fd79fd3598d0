"""Ours vs TRL on one CPU: time and peak memory per step, equal work, learning efficiency, and where the time goes.

Run through benchmarks/run.sh (it activates the environment, installs TRL into its own folder and sets 1 thread):

    bash benchmarks/run.sh                   # full run: ~29 min measuring + up to 5 min waiting for a quiet machine
    bash benchmarks/run.sh --only realistic  # the realistic shape only: ~15 min
    bash benchmarks/run.sh --quick           # smoke run, ~3 min

Method (benchmarks/README.md):
- Each comparison starts its processes together (one per side: our script run as `python X.py FLAGS` through
  benchmarks/ours.py, TRL's trainer through benchmarks/trl_run.py), on the same model directory, data, batch sizes,
  sequence lengths, generation settings, optimizer settings and number of steps, each with 1 torch thread.
- After step 1 (set-up and step 1 overlap and are never timed) the processes take turns one STEP at a time (a pipe
  gate), A B B A A B ..., so both sides see the same background load; a step is timed from its turn's start to the
  end of its optimizer step. The first WARMUP steps are excluded; the table shows the median of the rest.
- Memory: at each turn's start the process's peak-RSS counter is reset (/proc/self/clear_refs); at the step's end
  the peak since then is read (VmHWM). Per side: the highest peak over the timed steps ("memory ratio" = ours / other)
  and the most a step rose above its own start. The same reading in both processes (benchmarks/instrument.py).
- Equal work is counted, not assumed, by the same hooks in both processes (benchmarks/instrument.py): sampled
  sequences and tokens, decode forwards, forward passes with and without gradient (calls, rows, token positions),
  backward passes, optimizer steps.
- Sizes: the tiny default policy (assets/sft, 0.8M parameters) and a 14M-parameter Llama over the same character
  tokenizer, built here from a seeded config and saved to a temporary directory that both sides load; the TRL pairs
  again with that backbone and a 32k-token vocabulary (tied embeddings, 26M parameters); and `realistic`: SmolLM2-135M's
  shape (GQA, tied embeddings, 49152 tokens, 134.5M parameters) with 64-token prompts and 128-token responses
  (build_realistic).
"""
import argparse
import importlib.util
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
WARMUP = 2  # steps excluded from the medians (step 1 overlaps the other side's set-up; step 2 warms caches)
WARMUP_BY_SIZE = {"realistic": 1}  # seconds-long steps: step 1 (set-up overlap, caches, optimizer state) suffices

# the larger model: a Llama over the committed character tokenizer, ~14M parameters
BIG = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
           max_position_embeddings=512, tie_word_embeddings=False)


def machine_facts() -> dict:
    import importlib.metadata as md

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) // 2**20 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    versions = {}
    for pkg in ("torch", "transformers", "deepspeed", "accelerate"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "-"
    trl_home = os.environ.get("TRL_HOME", "")
    versions["trl"] = next((p.name.split("-")[1].removesuffix(".dist") for p in Path(trl_home).glob("trl-*.dist-info")), "-") if trl_home else "-"
    return {"cpus": os.cpu_count(), "cpu": cpu, "mem_gib": mem, "python": sys.version.split()[0],
            "torch_threads": 1, **versions}


def build_big_model(path: Path, vocab_size: int = 0) -> int:
    """The 14M Llama; with vocab_size, the same backbone with a vocabulary of that size and tied embeddings (the
    proportions of real small models, e.g. 32k tokens: 26M parameters; ids past the tokenizer's decode to nothing)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(ROOT / "assets" / "tokenizer"))
    config = LlamaConfig(vocab_size=vocab_size or len(tok), eos_token_id=tok.eos_token_id, bos_token_id=None,
                         pad_token_id=tok.pad_token_id, rms_norm_eps=1e-6,
                         **dict(BIG, tie_word_embeddings=bool(vocab_size)))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


# the realistic shape: SmolLM2-135M's architecture (Llama, GQA 9 query / 3 KV heads, tied embeddings, 49152 tokens)
REALISTIC = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64, max_position_embeddings=2048, rope_theta=100000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.02)
PROMPT_LEN, RESPONSE_LEN = 64, 128  # characters = tokens of the character tokenizer
FILLER = ("Compute the sum of the two numbers below and reply with the digits of the result first, then any "
          "words you like. ")


def _pad(text: str, width: int, tail: bool) -> str:
    """`text` brought to exactly `width` characters with FILLER: in front of a prompt, behind a response."""
    fill = (FILLER * (width // len(FILLER) + 1))
    return (text + " " + fill)[:width] if tail else (fill[: max(0, width - len(text) - 1)] + " " + text)[-width:]


def build_realistic(path: Path, layers: int = REALISTIC["num_hidden_layers"]) -> int:
    """A random-weight model of SmolLM2-135M's shape over the committed character tokenizer (ids past its 99 tokens
    decode to nothing), and data files of the built-in addition task lengthened to PROMPT_LEN-token prompts and
    RESPONSE_LEN-token responses (the problem and its answer kept, filler text around them), for both sides:
    sft.jsonl (prompt, response), pairs.jsonl (prompt, chosen, rejected), prompts.jsonl (prompt, answer), and 16-row
    *_eval.jsonl files from the held-out split. Random weights at this vocabulary sample the EOS with probability
    ~1/49152 per token, so responses run to the length limit (the counters show the sampled tokens)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(ROOT / "assets" / "tokenizer"))
    config = LlamaConfig(eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=tok.pad_token_id,
                         **dict(REALISTIC, num_hidden_layers=layers))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    write_task_files(path, PROMPT_LEN, RESPONSE_LEN)
    return sum(p.numel() for p in model.parameters())


def write_task_files(path: Path, prompt_len: int, response_len: int, n_train: int = 2000, n_eval: int = 16):
    """sft / pairs / prompts (.jsonl, and *_eval.jsonl) of the addition task at the given lengths (characters)."""
    sys.path.insert(0, str(ROOT))
    from shared import tasks

    task = tasks.get("addition")
    P = lambda text: _pad(text, prompt_len, False)  # noqa: E731
    R = lambda text: _pad(text, response_len, True)  # noqa: E731
    for split, suffix, n in (("train", "", n_train), ("test", "_eval", n_eval)):
        files = {"sft": [{"prompt": P(r["prompt"]), "response": R(r["response"])} for r in task.rows("sft", split)[:n]],
                 "pairs": [{"prompt": P(r["prompt"]), "chosen": R(r["chosen"]), "rejected": R(r["rejected"])}
                           for r in task.rows("pair", split)[:n]],
                 "prompts": [{"prompt": P(r["prompt"]), "answer": r["answer"]} for r in task.rows("prompt", split)[:n]]}
        for name, rows in files.items():
            (path / f"{name}{suffix}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------- one comparison


@dataclass
class Worker:
    label: str  # e.g. "ours:grpo.py" or "trl:GRPOTrainer"
    cmd: list
    trl: bool = False
    record: Path = None
    proc: subprocess.Popen = None
    go: int = -1
    rep: int = -1
    buf: bytes = b""
    last: object = None
    failed: str = ""
    log: object = None
    data: dict = field(default_factory=dict)


def ours(script: str, flags: list, learn_every: int = 0) -> Worker:
    extra = ["--learn-eval-every", str(learn_every)] if learn_every else []
    return Worker(f"ours:{script}", [PY, "benchmarks/ours.py", *extra, "--record", "{record}", script, *flags])


def trl(name: str, cfg: dict) -> Worker:
    return Worker(f"trl:{name}", [PY, "benchmarks/trl_run.py", "--record", "{record}", "--config", json.dumps(cfg)],
                  trl=True)


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


class Quiet:
    """Wait for the 1-minute load average to drop below `threshold` before each comparison, within a total budget."""

    def __init__(self, threshold: float, budget_s: float):
        self.threshold, self.budget, self.waited = threshold, budget_s, 0.0

    def wait(self) -> float:
        while load1() > self.threshold and self.waited < self.budget:
            time.sleep(10)
            self.waited += 10
        return load1()


def read_line(w: Worker, timeout: float):
    while b"\n" not in w.buf:
        ready, _, _ = select.select([w.rep], [], [], timeout)
        if not ready:
            return None
        chunk = os.read(w.rep, 256)
        if not chunk:
            return None
        w.buf += chunk
    line, w.buf = w.buf.split(b"\n", 1)
    return line.decode().strip()


def run_group(name: str, workers: list, n_steps: int, out: Path, step_timeout: float = 600):
    """Start the workers together; after each has reported its first event, give them turns one step at a time."""
    for w in workers:
        r_go, w_go = os.pipe()
        r_rep, w_rep = os.pipe()
        w.record = out / f"{name}__{w.label.replace(':', '_')}.json"
        env = dict(os.environ, BENCH_GATE=f"{r_go},{w_rep}")
        if w.trl:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("TRL_HOME", ""),
                                                              os.environ.get("PYTHONPATH", "")]))
        w.log = log = open(out / f"{name}__{w.label.replace(':', '_')}.log", "w")
        cmd = [str(c).replace("{record}", str(w.record)) for c in w.cmd]
        if not w.trl:  # our script's run directory (metrics.jsonl, summary.json) inside the results directory
            cmd += ["--output-dir", str(out / f"{name}__{w.label.split(':')[1].replace('.py', '')}"), "--overwrite"]
        log.write(" ".join(cmd) + "\n")
        log.flush()
        w.proc = subprocess.Popen(cmd, env=env, pass_fds=(r_go, w_rep), stdout=log, stderr=subprocess.STDOUT,
                                  cwd=ROOT)
        os.close(r_go)
        os.close(w_rep)
        w.go, w.rep = w_go, r_rep
    for w in workers:  # set-up (and, when timing, step 1) run side by side
        w.last = read_line(w, step_timeout * 3)
        if w.last is None:
            w.failed = "exited or hung before its first step"
    order = list(workers)
    while True:
        active = [w for w in order if not w.failed and w.last != str(n_steps)]
        if not active:
            break
        for w in active:
            try:
                os.write(w.go, b"go\n")
            except OSError:  # it exited
                pass
            last, w.last = w.last, read_line(w, step_timeout)
            if w.last is None:
                w.failed = f"exited or hung after step {last}"
        order.reverse()  # A B, B A, A B, ...: neither side always runs right after the other
    for w in workers:
        try:
            os.write(w.go, b"free\n")
        except OSError:
            pass
    for w in workers:
        try:
            w.proc.wait(timeout=step_timeout)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.failed = w.failed or "did not exit"
        os.close(w.go)
        os.close(w.rep)
        w.log.close()
        if w.proc.returncode and not w.failed:
            w.failed = f"exit code {w.proc.returncode}"
        if w.record.exists():
            w.data = json.loads(w.record.read_text())
        for f in out.glob(f"{name}__*/**/*.safetensors"):  # the exported models are not needed
            f.unlink()
        if w.failed:
            tail = (out / f"{name}__{w.label.replace(':', '_')}.log").read_text().splitlines()[-15:]
            print(f"[bench] {name} {w.label} FAILED ({w.failed}):\n    " + "\n    ".join(tail), flush=True)
    return workers


# ---------------------------------------------------------------------------------------------- analysis

WORK_KEYS = [("optimizer_steps", "opt steps"), ("sampled_seqs", "sampled seqs"), ("sampled_tokens", "sampled tokens"),
             ("decode_forwards", "decode fwds"), ("fwd_nograd_calls", "no-grad fwds"),
             ("fwd_nograd_rows", "no-grad rows"), ("fwd_nograd_positions", "no-grad positions"),
             ("fwd_grad_calls", "grad fwds"), ("fwd_grad_rows", "grad rows"), ("fwd_grad_positions", "grad positions"),
             ("backward_calls", "backwards"), ("decode_positions", "sampled positions"),
             ("old_from_sampler_rows", "old log-probs from the sampler (rows)")]
EQUAL_KEYS = ["optimizer_steps", "sampled_seqs", "fwd_nograd_rows", "fwd_grad_rows", "backward_calls"]


def per_step(w: Worker, warmup: int = WARMUP) -> list[dict]:
    """Timed steps after warm-up: {'s': seconds, work counters..., metrics, mem}."""
    steps, out = w.data.get("steps", []), []
    for prev, cur in zip([None] + steps, steps):
        if cur["step"] <= warmup or cur["t_go"] is None:
            continue
        base = prev["counts"] if prev else {}
        work = {k: cur["counts"].get(k, 0.0) - base.get(k, 0.0) for k in cur["counts"]}
        out.append({"s": cur["t_end"] - cur["t_go"], **work, "metrics": cur.get("metrics", {}), "mem": cur.get("mem")})
    return out


def summarize(w: Worker, warmup: int = WARMUP) -> dict:
    rows = per_step(w, warmup)
    if not rows:
        return {"label": w.label, "failed": w.failed or "no timed steps"}
    times = [r["s"] for r in rows]
    s = {"label": w.label, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
         "n": len(times), "failed": w.failed}
    for k, _ in WORK_KEYS:
        s[k] = statistics.mean(r.get(k, 0.0) for r in rows)
    phases = ["generate_s", "reward_s", "fwd_nograd_s", "fwd_grad_s", "backward_s", "optimizer_s"]
    s["phases"] = {k: statistics.mean(r.get(k, 0.0) for r in rows) for k in phases}
    s["phases"]["other_s"] = statistics.mean(times) - sum(s["phases"].values())
    s["mean_s"] = statistics.mean(times)
    mem = [r["mem"] for r in rows if r.get("mem") and r["mem"].get("rss_go_mb") is not None]
    if mem:  # peak RSS of the timed steps (MiB), and the most a step rose above its own start
        s["peak_mb"] = max(m["peak_mb"] for m in mem)
        s["step_delta_mb"] = max(m["peak_mb"] - m["rss_go_mb"] for m in mem)
        s["rss_go_mb"] = statistics.mean(m["rss_go_mb"] for m in mem)
        s["peak_reset"] = all(m.get("peak_reset") for m in mem)
    if s.get("sampled_tokens") and s["phases"]["generate_s"]:
        s["rollout_tokens_per_s"] = s["sampled_tokens"] / s["phases"]["generate_s"]
    if rows[0]["metrics"]:  # our scripts: their own per-step timers
        keys = sorted({k for r in rows for k in r["metrics"] if k.startswith("time/")})
        s["script_timers"] = {k: statistics.mean(r["metrics"].get(k, 0.0) for r in rows) for k in keys}
    return s


def equal_work(a: dict, b: dict) -> str:
    """Ours (a) may replace its old-log-prob forward by the sampler's own log-probs (HF backend, fp32: the same
    numbers); those rows count as that no-grad forward's, and the answer says so."""
    reused = a.get("old_from_sampler_rows", 0)
    a = dict(a, fwd_nograd_rows=a.get("fwd_nograd_rows", 0) + reused)
    bad = [k for k in EQUAL_KEYS if abs(a.get(k, 0) - b.get(k, 0)) > 1e-6]
    note = f" (old log-probs: the sampler's, {reused:.0f} rows)" if reused else ""
    return ("yes" if not bad else "NO: " + ", ".join(bad)) + note


def arithmetic(w: dict) -> float:
    """A step's model arithmetic in forward token positions: a backward costs about two forwards, a sampled (decode
    or prefill) position about one; attention over these short rows is a few percent. At the same arithmetic rate on
    both sides the time ratio would be the ratio of these: the floor for the same precision on this machine."""
    return w.get("decode_positions", 0) + w.get("fwd_nograd_positions", 0) + 3 * w.get("fwd_grad_positions", 0)


def fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def _div(a, b):
    return a / b if a is not None and b else None


def ratio_rows(r: dict) -> list[dict]:
    """One row per pair compared (ours / other): `name`, `time_ratio` (median s/step), `memory_ratio` (peak RSS of
    the timed steps; null where not measured), and beside them the step's rise above its start, the arithmetic ratio,
    equal work and, where both sample, rollout tokens/s. A comparison with our vLLM-backend grpo.py beside the HF one
    adds `<name>-vllm` (vLLM vs the other side) and `<name>-vllm-vs-hf` (vLLM vs HF, our two processes)."""
    out = []
    for c in r["comparisons"]:
        ws = c["workers"]
        pairs = [(w, ws[-1]) for w in ws[:-1]]
        hf = next((w for w in ws[:-1] if w["label"] == "ours:grpo.py"), None)
        vl = next((w for w in ws[:-1] if w["label"].endswith("+vllm")), None)
        if hf and vl:
            pairs.append((vl, hf))
        for w, base in pairs:
            if c["name"].startswith("internal"):
                name = f"{c['name']}:{w['label'].split(':')[1]}"
            else:
                name = c["name"] + ("-vllm" if w is vl else "") + ("-vs-hf" if base is hf else "")
            ratio = _div(w.get("median_s"), base.get("median_s"))
            eq = equal_work(w, base) if ratio else (w.get("failed") or base.get("failed") or "?")
            if c["name"].startswith("internal"):
                eq = "equal samples" if w.get("sampled_seqs") == base.get("sampled_seqs") else "NO: samples"
            unseen = any(x.get("sampled_seqs", 0) and not x.get("decode_positions", 0) for x in (w, base))  # vLLM
            arith = _div(arithmetic(w), arithmetic(base)) if ratio and not unseen else None
            out.append({"name": name, "comparison": c["name"], "size": c["size"], "ours": w["label"],
                        "other": base["label"],
                        "ours_s": w.get("median_s"), "other_s": base.get("median_s"), "time_ratio": ratio,
                        "memory_ratio": _div(w.get("peak_mb"), base.get("peak_mb")),
                        "ours_peak_mb": w.get("peak_mb"), "other_peak_mb": base.get("peak_mb"),
                        "ours_step_delta_mb": w.get("step_delta_mb"), "other_step_delta_mb": base.get("step_delta_mb"),
                        "step_delta_ratio": _div(w.get("step_delta_mb"), base.get("step_delta_mb")),
                        "arithmetic_ratio": arith, "equal_work": eq, "load": c["load_before"],
                        "ours_rollout_tokens_per_s": w.get("rollout_tokens_per_s"),
                        "other_rollout_tokens_per_s": base.get("rollout_tokens_per_s"),
                        "rollout_tokens_per_s_ratio": _div(w.get("rollout_tokens_per_s"),
                                                           base.get("rollout_tokens_per_s"))})
    return out


# ---------------------------------------------------------------------------------------------- the plan


def plan(big_dir: str, quick: bool, vocab_dir: str = "", real_dir: str = ""):
    """(name, size, workers, steps) for every timing comparison. Tiny: our scripts' default batch sizes. 14M and
    26M-v32k: RL with 8 prompts x 4 samples and offline methods with 32 examples per step, to keep the run short.
    --quick: every pair on the tiny model and GRPO on the 14M one, 4 steps each (2 timed)."""
    common = ["--eval-every", "0", "--eval-size", "16", "--defaults", "embedded"]  # the values TRL is given too
    out = []
    sizes = [("tiny", str(ROOT / "assets" / "sft"), 4 if quick else 22), ("14M", big_dir, 4 if quick else 12)]
    sizes += [("26M-v32k", vocab_dir, 12)] if vocab_dir and not quick else []
    for size, model, n in sizes:
        b = 64 if size == "tiny" else 32  # offline batch (examples or pairs per step), one micro-batch
        p, k = (16, 8) if size == "tiny" else (8, 4)  # RL prompts per step x samples per prompt
        mb = 64 if size == "tiny" else 32
        ga = p * k // mb
        bs = ["--batch-size", str(b), "--micro-batch-size", str(b)]
        tcfg = dict(model=model, steps=n, micro_batch_size=b, grad_accum=1, max_len=256)
        out.append((f"sft-{size}", size, [
            ours("train_sft.py", ["--model-path", model, "--steps", str(n), *bs, "--lr", "1e-3", "--warmup-steps", "50",
                                  *common]),
            trl("SFTTrainer", dict(tcfg, algo="sft", lr=1e-3, warmup_steps=50))], n))
        out.append((f"rm-{size}", size, [
            ours("train_rm.py", ["--model-path", model, "--steps", str(n), *bs, *common]),
            trl("RewardTrainer", dict(tcfg, algo="rm", lr=3e-4, warmup_steps=50, lr_decay=True))], n))
        if (ROOT / "dpo.py").exists():
            out.append((f"dpo-{size}", size, [
                ours("dpo.py", ["--model-path", model, "--steps", str(n), *bs, "--ref-on-the-fly", *common]),
                trl("DPOTrainer", dict(tcfg, algo="dpo", lr=1e-4, warmup_steps=10, beta=0.1))], n))
        if (ROOT / "kto.py").exists():
            out.append((f"kto-{size}", size, [
                ours("kto.py", ["--model-path", model, "--steps", str(n), *bs, "--ref-on-the-fly", *common]),
                trl("KTOTrainer", dict(tcfg, algo="kto", lr=1e-4, warmup_steps=10, beta=0.1))], n))
        rl = ["--model-path", model, "--steps", str(n), "--prompts-per-step", str(p), "--n-samples", str(k),
              "--micro-batch-size", str(mb), "--max-new-tokens", "8", *common]
        rcfg = dict(model=model, steps=n, micro_batch_size=mb, grad_accum=ga, n_samples=k, max_new_tokens=8)
        grpo_cfg = dict(rcfg, algo="grpo", lr=1e-4, beta=0.04)
        out.append((f"grpo-{size}", size, [ours("grpo.py", rl), trl("GRPOTrainer", grpo_cfg)], n))
        has_vllm = "RolloutArgs" in (ROOT / "grpo.py").read_text() and importlib.util.find_spec("vllm")
        if size == "14M" and has_vllm and not quick:  # our optional vLLM rollout backend, same comparison
            out.append((f"grpo-{size}-vllm", size, [ours("grpo.py", rl + ["--rollout-backend", "vllm"]),
                                                     trl("GRPOTrainer", grpo_cfg)], n))
        out.append((f"rloo-{size}", size, [ours("rloo.py", rl), trl("RLOOTrainer", dict(rcfg, algo="rloo", lr=1e-4,
                                                                                         beta=0.05))], n))
        if size == "26M-v32k":  # the vocabulary's effect is shown on the TRL pairs only
            continue
        # TRL has no PPO and no REINFORCE++: both against our grpo at equal samples (their defaults: 16 x 4 on tiny)
        p2, k2 = (16, 4) if size == "tiny" else (8, 4)
        eq = ["--model-path", model, "--steps", str(n), "--prompts-per-step", str(p2), "--n-samples", str(k2),
              "--max-new-tokens", "8", *common]
        ppo_mb = p2 * k2 // 2  # ppo_max: 2 minibatches per epoch, one micro-batch each
        rm = ["--reward-path", str(ROOT / "assets" / "rm") if size == "tiny" else model]
        out.append((f"internal-{size}", size, [
            ours("ppo_max.py", eq + rm + ["--micro-batch-size", str(ppo_mb), "--critic-warmup-steps", "0"]),
            ours("reinforce_pp.py", eq + ["--micro-batch-size", str(p2 * k2)]),
            ours("grpo.py", eq + ["--micro-batch-size", str(p2 * k2)])], n))
    if quick:
        out = [c for c in out if c[1] == "tiny" or c[0] == "grpo-14M"]
    if real_dir:
        out += realistic_plan(real_dir, common, quick)
    return out


def realistic_plan(d: str, common: list, quick: bool):
    """The realistic shape (build_realistic): SFT and DPO with 4 examples / 2 pairs per step, GRPO and RLOO with
    2 prompts x 2 samples of 128 new tokens, one micro-batch each, and in the GRPO comparison a third process, our
    grpo.py with the vLLM rollout backend (its rollout tokens/s against the HF backend's). Same learning rates as
    the other sizes. SFT and DPO 4 steps, RL 3 (the first is set-up and never timed: 3 and 2 timed steps per side;
    --quick: 3 and 2 steps); a full `--only realistic` run then measures for ~15 min."""
    n = 3 if quick else 4
    ln = ["--max-len", "256"]
    tcfg = dict(model=d, steps=n, grad_accum=1, max_len=256)
    data = lambda name: ["--dataset", f"{d}/{name}.jsonl", "--eval-dataset", f"{d}/{name}_eval.jsonl"]  # noqa: E731
    out = [("sft-realistic", "realistic", [
        ours("train_sft.py", ["--model-path", d, "--steps", str(n), "--batch-size", "4", "--micro-batch-size", "4",
                              "--lr", "1e-3", "--warmup-steps", "50", *data("sft"), *ln, *common]),
        trl("SFTTrainer", dict(tcfg, algo="sft", data=f"{d}/sft.jsonl", micro_batch_size=4, lr=1e-3,
                               warmup_steps=50))], n)]
    out.append(("dpo-realistic", "realistic", [
        ours("dpo.py", ["--model-path", d, "--steps", str(n), "--batch-size", "2", "--micro-batch-size", "2",
                        "--ref-on-the-fly", "--lr", "1e-4", "--warmup-steps", "10", "--beta", "0.1", *data("pairs"),
                        *ln, *common]),
        trl("DPOTrainer", dict(tcfg, algo="dpo", data=f"{d}/pairs.jsonl", micro_batch_size=2, lr=1e-4,
                               warmup_steps=10, beta=0.1))], n))
    p, k = 2, 2
    n = n - 1  # RL steps are 2-3x longer
    rl = ["--model-path", d, "--steps", str(n), "--prompts-per-step", str(p), "--n-samples", str(k),
          "--micro-batch-size", str(p * k), "--max-new-tokens", str(RESPONSE_LEN), "--lr", "1e-4",
          "--reward-fn", "addition", *data("prompts"), *ln, *common]
    rcfg = dict(tcfg, steps=n, data=f"{d}/prompts.jsonl", micro_batch_size=p * k, n_samples=k,
                max_new_tokens=RESPONSE_LEN)
    grpo_workers = [ours("grpo.py", rl + ["--kl-coef", "0.04"])]
    if importlib.util.find_spec("vllm") and "RolloutArgs" in (ROOT / "grpo.py").read_text():
        grpo_workers.append(ours("grpo.py", rl + ["--kl-coef", "0.04", "--rollout-backend", "vllm"]))
        grpo_workers[-1].label = "ours:grpo.py+vllm"
    out.append(("grpo-realistic", "realistic", grpo_workers + [trl("GRPOTrainer", dict(rcfg, algo="grpo", lr=1e-4,
                                                                                       beta=0.04))], n))
    out.append(("rloo-realistic", "realistic", [
        ours("rloo.py", rl + ["--kl-coef", "0.05"]),
        trl("RLOOTrainer", dict(rcfg, algo="rloo", lr=1e-4, beta=0.05))], n))
    return out


def learning(out: Path, steps: int, every: int):
    """GRPO from assets/sft on addition, ours vs TRL, held-out greedy accuracy (500 problems, shared evaluator)
    against training wall time (evaluation excluded), same 16 prompts x 8 samples, lr 1e-4, beta 0.04."""
    model = str(ROOT / "assets" / "sft")
    flags = ["--model-path", model, "--steps", str(steps), "--eval-every", "0", "--eval-size", "16"]
    cfg = dict(algo="grpo", model=model, steps=steps, micro_batch_size=64, grad_accum=2, n_samples=8,
               max_new_tokens=8, lr=1e-4, beta=0.04, learn_eval_every=every)
    workers = run_group("learn-grpo", [ours("grpo.py", flags, learn_every=every), trl("GRPOTrainer", cfg)], steps,
                        out)
    curves = {}
    for w in workers:
        steps_ = w.data.get("steps", [])
        clock, t = {0: 0.0}, 0.0
        for s in steps_:
            t += s["t_end"] - s["t_go"]
            clock[s["step"]] = t
        curves[w.label] = [(e["step"], clock.get(e["step"]), e["accuracy"]) for e in w.data.get("evals", [])]
    return curves


def time_to(curve, target):
    for step, t, acc in curve:
        if acc >= target - 1e-9:
            return step, t
    return None, None


# ---------------------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 steps of every tiny pair and of GRPO-14M")
    ap.add_argument("--only", default="", help="comma-separated comparison names (e.g. grpo-14M,learn); default all")
    ap.add_argument("--out", default="", help="results directory (default runs/bench__<time>)")
    ap.add_argument("--quiet-load", type=float, default=1.5, help="wait for the 1-minute load average to drop below")
    ap.add_argument("--realistic-layers", type=int, default=REALISTIC["num_hidden_layers"],
                    help="layers of the realistic model (fewer: a fast check of its plumbing, not its figures)")
    ap.add_argument("--max-wait", type=float, default=None, help="total seconds to wait for a quiet machine, over the whole run (default 300; --quick 30)")
    a = ap.parse_args()
    out = Path(a.out or f"runs/bench__{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    quiet = Quiet(a.quiet_load, a.max_wait if a.max_wait is not None else (30 if a.quick else 300))
    only = set(filter(None, a.only.split(",")))
    started = time.time()
    def chosen(name, size):  # --quick leaves the realistic size out unless it is named
        named = name in only or name.split("-")[0] in only or size in only
        if size == "realistic" and a.quick:
            return name in only or size in only
        return not only or named

    wanted = {size for name, size, _, _ in plan("14M", a.quick, "v32k", "realistic") if chosen(name, size)}
    dirs, results = {}, {"machine": machine_facts(), "quick": a.quick, "comparisons": [], "learning": None}
    for size, build in (("14M", build_big_model), ("26M-v32k", lambda d: build_big_model(d, vocab_size=32000)),
                        ("realistic", lambda d: build_realistic(d, a.realistic_layers))):
        if size in wanted:
            tmpdir = tempfile.TemporaryDirectory(prefix=f"bench_{size}_")
            dirs[size] = tmpdir
            n_params = build(Path(tmpdir.name))
            results[f"params_{size}"] = n_params
            print(f"[bench] {size} model: {n_params / 1e6:.2f}M parameters in {tmpdir.name}", flush=True)
    print(f"[bench] results in {out}", flush=True)
    path = {k: v.name for k, v in dirs.items()}

    for name, size, workers, n in plan(path.get("14M", ""), a.quick, path.get("26M-v32k", ""),
                                       path.get("realistic", "")):
        if not chosen(name, size):
            continue
        warmup = WARMUP_BY_SIZE.get(size, WARMUP)
        before = quiet.wait()
        t = time.time()
        run_group(name, workers, n, out)
        summ = [summarize(w, warmup) for w in workers]
        results["comparisons"].append({"name": name, "size": size, "steps": n, "warmup": warmup,
                                       "load_before": before, "load_after": load1(), "wall_s": time.time() - t,
                                       "workers": summ})
        results["rows"] = ratio_rows(results)
        line = "  ".join(f"{s['label']} {fmt(s.get('median_s'))} s/step" for s in summ)
        print(f"[bench] {name}: {line}  (load {before:.2f}, {time.time() - t:.0f} s)", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))

    if not only or "learn" in only:
        quiet.wait()
        steps, every = (6, 3) if a.quick else (60, 5)
        curves = learning(out, steps, every)
        results["learning"] = {"steps": steps, "eval_every": every, "curves": curves}
        (out / "results.json").write_text(json.dumps(results, indent=1))

    results["rows"] = ratio_rows(results)
    results["total_wall_s"] = time.time() - started
    results["waited_for_quiet_s"] = quiet.waited
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = render(results)
    (out / "results.md").write_text(report)
    print(report)


def render(r: dict) -> str:
    m = r["machine"]
    lines = [f"Machine: {m['cpus']} CPUs ({m['cpu']}), {m.get('mem_gib', '?')} GiB, Python {m['python']}, torch "
             f"{m.get('torch', '?')}, transformers {m.get('transformers', '?')}, DeepSpeed {m.get('deepspeed', '?')}, "
             f"TRL {m.get('trl', '?')}; 1 torch thread per process. Total {r.get('total_wall_s', 0) / 60:.1f} min, "
             f"of which {r.get('waited_for_quiet_s', 0):.0f} s waiting for a quieter machine; the 1-minute load "
             f"average before each comparison is in the last column.", ""]
    lines += ["| comparison | size | ours | s/step | vs | s/step | time ratio | arithmetic ratio | peak RSS MiB "
              "(ours; other) | memory ratio | step rise MiB (ours; other) | work/step: opt steps, fwd rows, sampled "
              "tokens (ours; other) | equal work | load |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def work(w):
        return (f"{w.get('optimizer_steps', 0):.0f}, {w.get('fwd_grad_rows', 0) + w.get('fwd_nograd_rows', 0):.0f}, "
                f"{w.get('sampled_tokens', 0):.0f}")

    labels = {(c["name"], w["label"]): w for c in r["comparisons"] for w in c["workers"]}
    for row in r.get("rows") or ratio_rows(r):
        w, base = labels[(row["comparison"], row["ours"])], labels[(row["comparison"], row["other"])]
        lines.append(f"| {row['name']} | {row['size']} | {row['ours'].split(':')[1]} | {fmt(row['ours_s'])} | "
                     f"{row['other']} | {fmt(row['other_s'])} | {fmt(row['time_ratio'], 2)} | "
                     f"{fmt(row['arithmetic_ratio'], 2)} | {fmt(row['ours_peak_mb'], 0)}; {fmt(row['other_peak_mb'], 0)} | "
                     f"{fmt(row['memory_ratio'], 2)} | {fmt(row['ours_step_delta_mb'], 0)}; "
                     f"{fmt(row['other_step_delta_mb'], 0)} | {work(w)}; {work(base)} | {row['equal_work']} | "
                     f"{row['load']:.1f} |")
    roll = [row for row in r.get("rows") or ratio_rows(r) if row["ours_rollout_tokens_per_s"]]
    if roll:
        lines += ["", "Rollout tokens/s (sampled tokens / time in generation, per timed step; the weight push to vLLM "
                  "is not generation: it is in our scripts' time/weight_sync):", "",
                  "| comparison | ours | tokens/s | vs | tokens/s | ratio |", "| --- | --- | --- | --- | --- | --- |"]
        for row in roll:
            lines.append(f"| {row['name']} | {row['ours'].split(':')[1]} | {fmt(row['ours_rollout_tokens_per_s'], 0)} | "
                         f"{row['other']} | {fmt(row['other_rollout_tokens_per_s'], 0)} | "
                         f"{fmt(row['rollout_tokens_per_s_ratio'], 2)} |")
    lines += ["", "Work per timed step (mean), counted by the same hooks on both sides:", "",
              "| comparison | side | " + " | ".join(n for _, n in WORK_KEYS) + " |",
              "| --- | --- | " + " | ".join("---" for _ in WORK_KEYS) + " |"]
    for c in r["comparisons"]:
        for w in c["workers"]:
            if "median_s" in w:
                lines.append(f"| {c['name']} | {w['label']} | " + " | ".join(f"{w.get(k, 0):.0f}" for k, _ in WORK_KEYS)
                             + " |")
    lines += ["", "Where a step's time goes (mean shares over the timed steps; hooks, same for both sides):", "",
              "| comparison | side | s/step | generate | reward | no-grad fwd | grad fwd | backward | optimizer | other |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in r["comparisons"]:
        for w in c["workers"]:
            if "phases" in w:
                ph, tot = w["phases"], w["mean_s"]
                lines.append(f"| {c['name']} | {w['label']} | {tot:.3f} | " + " | ".join(
                    f"{100 * ph[k] / tot:.0f}%" for k in ["generate_s", "reward_s", "fwd_nograd_s", "fwd_grad_s",
                                                          "backward_s", "optimizer_s", "other_s"]) + " |")
    lines += ["", "Our RL scripts' own timers (metrics.jsonl time/*), overhead = step - their sum:", "",
              "| comparison | script | s/step | generate | score | forward (ref/old/critic) | train | weight sync | overhead |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in r["comparisons"]:
        for w in c["workers"]:
            st = w.get("script_timers")
            if st and "time/generate" in st:
                tot = w["mean_s"]
                over = tot - sum(st.values())
                lines.append(f"| {c['name']} | {w['label'].split(':')[1]} | {tot:.3f} | " + " | ".join(
                    f"{100 * st.get(k, 0) / tot:.0f}%" for k in ["time/generate", "time/score", "time/forward",
                                                                 "time/train", "time/weight_sync"])
                             + f" | {100 * over / tot:.0f}%{' (!)' if over / tot > 0.10 else ''} |")
    lr = r.get("learning")
    if lr:
        curves = lr["curves"]
        lines += ["", f"Learning efficiency: GRPO from assets/sft, 16 prompts x 8 samples, {lr['steps']} steps, held-out "
                  "greedy accuracy (500 problems) vs training time (evaluation excluded):", "",
                  "| side | " + " | ".join(f"step {s}" for s, _, _ in next(iter(curves.values()))) + " |",
                  "| --- | " + " | ".join("---" for _ in next(iter(curves.values()))) + " |"]
        for label, curve in curves.items():
            lines.append(f"| {label} | " + " | ".join(f"{acc:.3f} @ {fmt(t, 1)} s" for _, t, acc in curve) + " |")
        trl_curve = next((c for l, c in curves.items() if l.startswith("trl")), None)
        our_curve = next((c for l, c in curves.items() if l.startswith("ours")), None)
        if trl_curve and our_curve:
            target = statistics.mean(acc for _, _, acc in trl_curve[-3:])  # TRL's final accuracy, last 3 evals
            (ts, tt), (os_, ot) = time_to(trl_curve, target), time_to(our_curve, target)
            ratio = ot / tt if ot is not None and tt else None
            lines += ["", f"Target = TRL's final held-out accuracy (mean of its last 3 evaluations) {target:.3f}: TRL "
                      f"first reached it at step {ts} ({fmt(tt, 1)} s), ours at step {os_} ({fmt(ot, 1)} s); "
                      f"ours/TRL time {fmt(ratio, 2)}.", "",
                      "| accuracy reached | ours (grpo.py) | TRL (GRPOTrainer) | ours/TRL time |",
                      "| --- | --- | --- | --- |"]
            for level in (0.5, 0.6, 0.65, 0.7):
                times = [time_to(c, level) for c in (our_curve, trl_curve)]
                r_ = times[0][1] / times[1][1] if times[0][1] is not None and times[1][1] else None
                lines.append(f"| {level:.2f} | " + " | ".join(f"step {s_} ({fmt(t_, 1)} s)" if t_ is not None else
                                                            "not reached" for s_, t_ in times) + f" | {fmt(r_, 2)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
