"""Collectives under NCCL's device rule, on CPU: the default group of every multi-rank test run refuses CPU tensors
from our code (tests/nccl_like.py), as NCCL does on GPUs; the project's own statistics travel on shared.dist's gloo
group. The eval, running-moments, token-count and dynamic-sampling paths of every script run under that rule in their
2-rank tests (test_scripts, test_grpo, test_ppo_max, test_dpo_kto, test_families)."""
from conftest import ROOT, run_script

SCRIPT = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from shared import dist
ctx = dist.init(0)
if sys.argv[-1] == "raw":  # what shared.dist.all_reduce did before it had a CPU group
    torch.distributed.all_reduce(torch.ones(1))
x = dist.all_reduce(torch.tensor([float(ctx.rank + 1)]))
y = dist.all_reduce(torch.tensor([float(ctx.rank)]), "max")
objs = dist.all_gather_object({{"rank": ctx.rank}})
stamp = dist.broadcast_object(f"from rank {{ctx.rank}}")
assert x.item() == 3.0 and y.item() == 1.0, (x, y)
assert objs == [{{"rank": 0}}, {{"rank": 1}}] and stamp == "from rank 0", (objs, stamp)
dist.barrier()
print("collectives ok", flush=True)
dist.finish()
"""


def test_default_group_refuses_cpu_tensors_and_the_cpu_group_carries_them(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(SCRIPT)
    ok = run_script(str(script), "ours", ranks=2)
    assert ok.stdout.count("collectives ok") == 2
    raw = run_script(str(script), "raw", ranks=2, check=False)
    assert raw.returncode != 0 and "No backend type associated with device type cpu" in raw.stdout + raw.stderr
