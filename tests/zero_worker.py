"""Run by test_deepspeed.py under `python` or `deepspeed --num_gpus N`: wrap a model with ZeRO stage S, take one
optimizer step, record the logits, export in HF format. The test reloads the export and compares. On the way, the
shared-prompt forward is run with rank 0 holding repeated prompts and rank 1 distinct ones (under ZeRO-3 the ranks
must still make the same forward calls) and checked against a plain forward."""
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shared import dist, engine, rollout  # noqa: E402

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
model_dir, stage, out = argv[0], int(argv[1]), Path(argv[2])
args = SimpleNamespace(zero_stage=stage, offload=False, dtype="fp32", max_grad_norm=1.0, warmup_steps=0, lr_decay=False,
                       gradient_checkpointing=False, trust_remote_code=False)
ctx = dist.init(0)
ds_config = engine.ds_config


def every_parameter_partitioned(*a, **kw):  # the tiny model's tensors are all below ZeRO-3's persistence threshold
    cfg = ds_config(*a, **kw)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return cfg


engine.ds_config = every_parameter_partitioned
tok = engine.load_tokenizer(model_dir, args)
model = engine.wrap_trainable(engine.load_model(model_dir, args, ctx), args, ctx, lr=1e-2, micro_batch_size=2,
                              grad_accum=1, total_steps=1)
ids = torch.arange(2 * 7).reshape(2, 7) % 90 + 4
with torch.no_grad():
    before = model(input_ids=ids).logits
loss = model(input_ids=ids).logits.float().pow(2).mean()
model.backward(loss)
model.step()
with torch.no_grad():
    after = model(input_ids=ids).logits
assert not torch.allclose(before, after), "the optimizer step changed nothing"
prompts = torch.tensor([[5, 6, 7], [5, 6, 7], [8, 9, 10], [8, 9, 10]]) if ctx.rank == 0 else \
    torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 16]])
rows = torch.cat([prompts, torch.tensor([[20, 21, 22], [23, 24, 25], [26, 27, 28], [29, 30, 31]])], 1)
shared_lp = rollout.response_logprobs(model, rows, torch.ones_like(rows), 3)
plain = torch.log_softmax(model(input_ids=rows).logits[:, 2:-1].float(), -1).gather(-1, rows[:, 3:, None]).squeeze(-1)
assert torch.allclose(shared_lp, plain, atol=1e-5), (shared_lp - plain).abs().max()
frozen = engine.wrap_frozen(engine.load_model(model_dir, args, ctx), args, ctx)
with torch.no_grad():
    assert torch.allclose(frozen(input_ids=ids).logits, before, atol=1e-5), "the frozen wrap changed the outputs"
engine.export_hf(model, tok, out, ctx)
if ctx.main:
    torch.save({"ids": ids, "logits": after, "world": ctx.world}, out / "expected.pt")
dist.finish()  # leave the process group together: a rank exiting mid-collective aborts the other
