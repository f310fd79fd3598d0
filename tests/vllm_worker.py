"""Run by test_vllm.py under `python` or `deepspeed --num_gpus N`: a policy, a vLLM Generator beside it, weights
pushed with `sync`, rollouts saved for the test to check against transformers.

    python tests/vllm_worker.py push  MODEL_DIR OUT_DIR NEW_DIR ONE_TOKEN_DIR   # pushes two other models in turn
    python tests/vllm_worker.py seeds MODEL_DIR OUT_DIR                         # one sampled rollout only
    deepspeed --num_gpus 2 tests/vllm_worker.py zero3 MODEL_DIR OUT_DIR         # ZeRO-3 policy, a step, a push
"""
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shared import dist, engine, rollout  # noqa: E402
from shared.args import RolloutArgs  # noqa: E402

PROMPTS = [[20, 21, 14], [22, 14, 23, 24, 30], [25]]
argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
scenario, model_dir, out = argv[0], argv[1], Path(argv[2])
args = SimpleNamespace(**asdict(RolloutArgs(rollout_backend="vllm", vllm_sleep=torch.cuda.is_available())),
                       model_path=model_dir, seed=3, max_len=64, max_new_tokens=12, zero_stage=3 if scenario == "zero3"
                       else 0, offload=False, dtype="fp32", max_grad_norm=1.0, warmup_steps=0, lr_decay=False,
                       gradient_checkpointing=False, trust_remote_code=False)
ctx = dist.init(args.seed)
tok = engine.load_tokenizer(model_dir, args)
policy = engine.wrap_trainable(engine.load_model(model_dir, args, ctx), args, ctx, lr=1e-2, micro_batch_size=2,
                               grad_accum=1, total_steps=1)
generator = rollout.Generator(args, policy, tok, ctx)
result = {"world": torch.distributed.get_world_size(), "backend": generator.backend,
          "sleep_mode": getattr(generator, "sleep_mode", False)}


def sample(temperature=0.7, greedy=False):
    ro = generator.generate(PROMPTS, n=4, temperature=temperature, max_new_tokens=12, greedy=greedy)
    return {k: getattr(ro, k).cpu() if torch.is_tensor(getattr(ro, k)) else getattr(ro, k)
            for k in ("input_ids", "attention_mask", "response_mask", "logprobs", "eos", "prompt_len", "texts")}


def load_weights(path):
    from transformers import AutoModelForCausalLM

    policy.module.load_state_dict(AutoModelForCausalLM.from_pretrained(path).state_dict())


if scenario == "seeds":
    result["sampled"] = sample()
elif scenario == "push":
    result["before"] = sample()
    load_weights(argv[3])
    result["sync_s"] = generator.sync(policy)
    result["sampled"], result["greedy"] = sample(), sample(greedy=True)
    load_weights(argv[4])
    generator.sync(policy)
    result["one_token"] = sample(temperature=1.0)
elif scenario == "zero3":  # one optimizer step moves the sharded weights away from MODEL_DIR's; then a push
    ids = torch.arange(2 * 7).reshape(2, 7) % 90 + 4
    policy.backward(policy(input_ids=ids).logits.float().pow(2).mean())
    policy.step()
    generator.sync(policy)
    engine.export_hf(policy, tok, out / "export", ctx)
    result["sampled"], result["greedy"] = sample(), sample(greedy=True)
torch.save(result, out / f"rank{ctx.rank}.pt")
dist.finish()
