"""The loss contract with DeepSpeed (shared.engine.train_micro_batch), logged losses that do not depend on how a
batch is cut into micro-batches, and --no-prompt-sharing."""
import json
import types

import pytest
import torch

from conftest import run_script
from shared import engine


def ds_args(**kw):
    base = dict(gradient_checkpointing=False, warmup_steps=0, lr_decay=False, zero_stage=0, offload=False,
                max_grad_norm=1.0, dtype="fp32", seed=1)
    return types.SimpleNamespace(**{**base, **kw})


def ctx1():
    from shared import dist

    return dist.init(1)


def rows_loss(model, ids):
    """Mean next-token NLL of each row, (rows,)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return nll.mean(1)


def test_train_micro_batch_scales_shares_to_the_batch_gradient_and_refuses_a_broken_count(tiny_model_dir):
    """Two micro-batches passing shares mean(rows_k) x 2/4 of a 4-row batch: the gradient DeepSpeed accumulates has
    the norm of the plain gradient of the batch mean (computed here with torch alone). A script whose count of
    micro-batches per optimizer step disagrees with DeepSpeed's accumulation count stops with an error."""
    from transformers import AutoModelForCausalLM

    ctx = ctx1()
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (4, 12))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows_loss(plain, ids).mean().backward()
    expected = torch.cat([p.grad.flatten() for p in plain.parameters() if p.grad is not None]).norm().item()

    model = engine.wrap_trainable(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ds_args(), ctx, 1e-3, 2, 2,
                                  10)
    norms = [engine.train_micro_batch(model, rows_loss(model, ids[2 * k: 2 * k + 2]).mean() * 2 / 4, ctx, 1, last)
             for k, last in ((0, False), (1, True))]
    assert norms[0] is None and norms[1] == pytest.approx(expected, rel=1e-4)

    with pytest.raises(RuntimeError, match="loss contract broken"):  # the script thinks one micro-batch is a step
        engine.train_micro_batch(model, rows_loss(model, ids[:2]).mean(), ctx, 2, True)


def test_no_prompt_sharing_runs_one_plain_forward_with_the_same_numbers(family_dir, monkeypatch):
    """Repeated prompts: with sharing, the model runs once on the distinct prompts and once on the responses; with
    --no-prompt-sharing (engine.PROMPT_SHARING off), once on the full rows, and the log-probs agree."""
    from transformers import AutoModelForCausalLM

    from shared import rollout

    model = AutoModelForCausalLM.from_pretrained(family_dir).eval()
    torch.manual_seed(0)
    prompts = torch.randint(3, 300, (2, 6)).repeat_interleave(3, 0)  # 2 prompts x 3 samples
    ids = torch.cat([prompts, torch.randint(3, 300, (6, 5))], 1)
    mask = torch.ones_like(ids)
    calls, (backbone, _) = [], rollout.lm_head_of(model)  # (the head runs in chunks on the backbone's output)
    backbone.register_forward_hook(lambda m, a, kw, out: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    with torch.no_grad():
        shared_lp = rollout.response_logprobs(model, ids, mask, 6)
        assert calls == [(2, 6), (6, 4)]
        calls.clear()
        monkeypatch.setattr(engine, "PROMPT_SHARING", False)
        plain_lp = rollout.response_logprobs(model, ids, mask, 6)
    assert calls == [(6, 11)]
    assert (shared_lp - plain_lp).abs().max() <= 1e-5


def metrics_row(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]


@pytest.mark.parametrize("script,losses", [("grpo", ["loss/policy"]), ("rloo", ["loss/policy"]),
                                           ("reinforce_pp", ["loss/policy"]),
                                           ("ppo_max", ["loss/policy", "loss/value"])])
def test_logged_losses_do_not_depend_on_the_micro_batch_size(tmp_path, script, losses):
    """One step on the same batch cut into 64-row and 16-row micro-batches (4x the accumulation count): the logged
    optimizer-step losses agree (they are the step's loss, not a sum or mean of micro-batch figures), and so do the
    step's figures; the 16-row run also turns prompt sharing off (the plain forward, same numbers)."""
    runs = {}
    for mbs, extra in ((64, []), (16, ["--no-prompt-sharing"])):
        out = tmp_path / f"mbs{mbs}"
        run_script(f"{script}.py", "--steps", "1", "--eval-every", "0", "--eval-size", "8", "--micro-batch-size",
                   str(mbs), "--output-dir", str(out), *extra)
        runs[mbs] = out
    big, small = metrics_row(runs[64]), metrics_row(runs[16])
    for name in losses:
        assert small[name] == pytest.approx(big[name], rel=1e-4, abs=1e-6), (name, big[name], small[name])
