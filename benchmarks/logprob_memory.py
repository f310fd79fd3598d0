"""Peak memory of the LM head and the log-prob / entropy computation, from the last hidden state to the per-token
log-probs (and their backward), three ways, at the realistic shape's sizes (4 rows x 128 response tokens, hidden 576,
vocabulary 49152):

    plain    logits = h W^T (all positions), log_softmax, the entropy of the full softmax (what transformers-based
             trainers do)
    lse      the same logits, log p = z[y] - logsumexp(z), the entropy detached a few rows at a time (this project
             before the chunked head)
    chunked  shared.rollout.HeadLogprobs: the head a chunk of positions at a time, its backward recomputing each
             chunk's logits (no (N, R, V) tensor)

Each way runs in its own child process; the reading is the peak RSS above the start (hidden states and weight
already made), as bench.py's, and the seconds of one forward (+ backward).

    OMP_NUM_THREADS=1 python benchmarks/logprob_memory.py [--rows 4] [--tokens 128] [--vocab 49152] [--hidden 576]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WAYS = ("plain", "lse", "chunked")


def child(way: str, rows: int, tokens: int, vocab: int, hidden: int, grad: bool):
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    import instrument
    from shared import rollout

    torch.set_num_threads(1)
    torch.manual_seed(0)
    h = torch.randn(rows * tokens, hidden, requires_grad=grad)
    weight = (torch.randn(vocab, hidden) * hidden ** -0.5).requires_grad_(grad)
    ids = torch.randint(vocab, (rows * tokens,))
    start = instrument.reset_peak()
    t = time.perf_counter()
    with torch.set_grad_enabled(grad):
        if way == "chunked":
            lp, ent = rollout.HeadLogprobs.apply(h, weight, None, ids, 1.0, True)
            ent = ent.detach()
        else:
            logits = torch.nn.functional.linear(h, weight)
            if way == "lse":
                lp = logits.gather(-1, ids[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
                ent = rollout.entropy(logits.detach())
            else:
                logp = torch.log_softmax(logits, -1)
                lp = logp.gather(-1, ids[:, None]).squeeze(-1)
                ent = -(logp.exp() * logp).sum(-1).detach()
        if grad:
            lp.sum().backward()
    seconds = time.perf_counter() - t
    m = instrument.memory()
    print(json.dumps({"way": way, "rise_mb": m["peak_mb"] - start, "logits_mb": rows * tokens * vocab * 4 / 2**20,
                      "seconds": seconds, "logprob_sum": lp.sum().item(), "entropy_sum": ent.sum().item(),
                      "grad_sum": h.grad.double().abs().sum().item() if grad else 0.0}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--child", default="", help="(internal) WAY:grad|nograd in this process")
    a = ap.parse_args()
    shape = ["--rows", str(a.rows), "--tokens", str(a.tokens), "--vocab", str(a.vocab), "--hidden", str(a.hidden)]
    if a.child:
        return child(a.child.split(":")[0], a.rows, a.tokens, a.vocab, a.hidden, a.child.endswith(":grad"))
    print(f"{a.rows} rows x {a.tokens} tokens, hidden {a.hidden}, vocabulary {a.vocab}: full fp32 logits "
          f"{a.rows * a.tokens * a.vocab * 4 / 2**20:.0f} MiB")
    for mode in ("grad", "nograd"):
        out = {}
        for way in WAYS:
            proc = subprocess.run([sys.executable, __file__, "--child", f"{way}:{mode}", *shape],
                                  capture_output=True, text=True, check=True)
            out[way] = json.loads(proc.stdout.strip().splitlines()[-1])
        what = "forward+backward" if mode == "grad" else "no-grad forward"
        print(f"{what}: peak rise " + ", ".join(
            f"{w} {out[w]['rise_mb']:.0f} MiB ({out[w]['rise_mb'] / out['plain']['rise_mb']:.2f}, "
            f"{out[w]['seconds']:.2f} s)" for w in WAYS))
        print("  sums (log-prob, entropy, |grad h|): " + "; ".join(
            f"{w} {out[w]['logprob_sum']:.3f}, {out[w]['entropy_sum']:.3f}, {out[w]['grad_sum']:.3f}" for w in WAYS))


if __name__ == "__main__":
    main()
