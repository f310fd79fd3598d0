"""Peak memory of the log-prob and entropy computation over a vocabulary-sized logits tensor: ours
(shared.rollout: gather - logsumexp, entropy detached and a few rows at a time) against the plain way (log_softmax,
then the entropy of the full softmax), forward and backward, at the realistic shape's sizes (4 rows x 128 response
tokens x 49152). Each way runs in its own child process; the reading is the peak RSS above the start (as bench.py's).

    OMP_NUM_THREADS=1 python benchmarks/logprob_memory.py [--rows 4] [--tokens 128] [--vocab 49152]
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(way: str, rows: int, tokens: int, vocab: int, grad: bool):
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    import instrument
    from shared import rollout

    torch.manual_seed(0)
    logits = torch.randn(rows, tokens, vocab, requires_grad=grad)
    ids = torch.randint(vocab, (rows, tokens))
    start = instrument.reset_peak()  # after the logits exist: the rise is what the computation adds
    if way == "ours":
        lp = logits.gather(-1, ids[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
        ent = rollout.entropy(logits.detach())
    else:
        logp = torch.log_softmax(logits, -1)
        lp = logp.gather(-1, ids[..., None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1).detach()
    if grad:
        lp.sum().backward()
    m = instrument.memory()
    print(json.dumps({"way": way, "rise_mb": m["peak_mb"] - start, "logits_mb": logits.numel() * 4 / 2**20,
                      "logprob_sum": lp.sum().item(), "entropy_sum": ent.sum().item()}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--child", default="", help="(internal) WAY:grad|nograd in this process")
    a = ap.parse_args()
    if a.child:
        return child(a.child.split(":")[0], a.rows, a.tokens, a.vocab, a.child.endswith(":grad"))
    for mode in ("grad", "nograd"):
        out = {}
        for way in ("plain", "ours"):
            proc = subprocess.run([sys.executable, __file__, "--child", f"{way}:{mode}", "--rows", str(a.rows),
                                   "--tokens", str(a.tokens), "--vocab", str(a.vocab)], capture_output=True, text=True,
                                  check=True)
            out[way] = json.loads(proc.stdout.strip().splitlines()[-1])
        what = "forward+backward" if mode == "grad" else "no-grad forward"
        print(f"{what}: logits {out['ours']['logits_mb']:.0f} MiB; peak rise above them: plain (log_softmax + "
              f"full-softmax entropy) {out['plain']['rise_mb']:.0f} MiB, ours {out['ours']['rise_mb']:.0f} MiB "
              f"(ratio {out['ours']['rise_mb'] / out['plain']['rise_mb']:.2f}); log-prob sums "
              f"{out['plain']['logprob_sum']:.3f} / {out['ours']['logprob_sum']:.3f}, entropy sums "
              f"{out['plain']['entropy_sum']:.3f} / {out['ours']['entropy_sum']:.3f}")


if __name__ == "__main__":
    main()
