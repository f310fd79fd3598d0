"""Run by test_deepspeed.py under `python` or `deepspeed --num_gpus N`: wrap a model with ZeRO stage S, take one
optimizer step, record the logits, export in HF format. The test reloads the export and compares."""
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shared import dist, engine  # noqa: E402

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
model_dir, stage, out = argv[0], int(argv[1]), Path(argv[2])
args = SimpleNamespace(zero_stage=stage, offload=False, bf16=False, max_grad_norm=1.0, warmup_steps=0, lr_decay=False,
                       gradient_checkpointing=False, trust_remote_code=False)
ctx = dist.init(0)
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
frozen = engine.wrap_frozen(engine.load_model(model_dir, args, ctx), args, ctx)
with torch.no_grad():
    assert torch.allclose(frozen(input_ids=ids).logits, before, atol=1e-5), "the frozen wrap changed the outputs"
engine.export_hf(model, tok, out, ctx)
if ctx.main:
    torch.save({"ids": ids, "logits": after, "world": ctx.world}, out / "expected.pt")
dist.finish()  # leave the process group together: a rank exiting mid-collective aborts the other
