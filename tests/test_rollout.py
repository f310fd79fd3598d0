"""HF rollout backend: sampler log-probs vs a teacher-forced recomputation, masks and EOS flags."""
import copy

import pytest
import torch

from conftest import tiny_llama
from shared import rollout


def reference_logprobs(model, prompt, response, temperature):
    """Log-probs of `response` after `prompt`, one unpadded sequence at a time (no masks, no batching)."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def check_rollout(ro, prompts, n, eos_id, model=None, temperature=1.0):
    for i in range(len(prompts) * n):
        prompt = prompts[i // n]
        ids = ro.input_ids[i].tolist()
        assert ids[ro.prompt_len - len(prompt): ro.prompt_len] == prompt  # left-padded prompt
        response = ids[ro.prompt_len:]
        first_eos = response.index(eos_id) if eos_id in response else None
        valid = len(response) if first_eos is None else first_eos + 1  # EOS included
        assert ro.response_mask[i].tolist() == [True] * valid + [False] * (len(response) - valid)
        assert bool(ro.eos[i]) == (first_eos is not None)
        assert ro.attention_mask[i, ro.prompt_len:].tolist() == [1] * valid + [0] * (len(response) - valid)
        if model is not None:
            ref = reference_logprobs(model, prompt, response[:valid], temperature)
            assert (ro.logprobs[i, :valid] - ref).abs().max() <= 1e-5
            assert (ro.logprobs[i, valid:] == 0).all()


PROMPTS = [[20, 21, 14], [22, 14, 23, 24, 30], [25]]


@torch.no_grad()
def test_sampler_logprobs_match_teacher_forcing_and_masks_are_right(tokenizer):
    model = tiny_llama(len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    ro = rollout.generate(model, tokenizer, PROMPTS, n=8, temperature=0.7, top_p=0.9, max_new_tokens=12)
    check_rollout(ro, PROMPTS, 8, tokenizer.eos_token_id, model, temperature=0.7)
    recomputed = rollout.response_logprobs(model, ro.input_ids, ro.attention_mask, ro.prompt_len, 0.7)
    assert ((recomputed - ro.logprobs) * ro.response_mask).abs().max() <= 1e-5
    assert ro.prompt_index.tolist() == [0] * 8 + [1] * 8 + [2] * 8


def test_sampler_logprobs_stand_in_for_the_old_forward_only_when_exact(tokenizer):
    """The RL scripts skip their old-log-prob forward when `Generator.exact_logprobs` (HF backend, fp32 policy):
    the rollout's log-probs must then equal what that forward gives (train mode, micro-batched as the scripts run it);
    a bf16 policy's are recomputed."""
    from types import SimpleNamespace

    from shared import data

    args, ctx = SimpleNamespace(rollout_backend="hf", seed=0), SimpleNamespace(device=torch.device("cpu"))
    policy = tiny_llama(len(tokenizer), eos_token_id=tokenizer.eos_token_id).train()
    generator = rollout.Generator(args, policy, tokenizer, ctx)
    assert generator.exact_logprobs
    torch.manual_seed(5)
    ro = generator.generate(PROMPTS, 4, 1.3, 1.0, 9)
    with torch.no_grad():
        old = torch.cat([rollout.response_logprobs(policy, ro.input_ids[mb], ro.attention_mask[mb], ro.prompt_len, 1.3)
                         for mb in data.micro_batches(torch.arange(len(ro.input_ids)), 5)])
    assert ro.response_mask.sum() > len(ro.input_ids)  # more than one token per response is compared
    assert ((old - ro.logprobs) * ro.response_mask).abs().max() <= 1e-5
    assert not rollout.Generator(args, copy.deepcopy(policy).bfloat16(), tokenizer, ctx).exact_logprobs


@pytest.mark.parametrize("pad_is_eos", [False, True])
@torch.no_grad()
def test_early_stops_limits_and_pad_equal_eos(tokenizer, pad_is_eos):
    tok = copy.deepcopy(tokenizer)
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    model = tiny_llama(len(tok), eos_token_id=tok.eos_token_id)
    model.lm_head.weight.data *= 0.05  # a near-uniform sampler: some rows stop at EOS early, others hit the limit
    torch.manual_seed(1)
    ro = rollout.generate(model, tok, PROMPTS, n=48, temperature=1.0, max_new_tokens=24)
    assert 0 < int(ro.eos.sum()) < len(ro.eos), "need both early stops and truncated rows"
    check_rollout(ro, PROMPTS, 48, tok.eos_token_id, model)
    for text, resp, mask in zip(ro.texts, ro.responses, ro.response_mask):
        assert text == tok.decode(resp[mask], skip_special_tokens=True) and "<eos>" not in text


def test_response_mask_against_hand_written_rows():
    eos = 1
    responses = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 1, 1, 1], [5, 6, 7, 8, 9], [1, 0, 0, 0, 0]])
    expected = [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert rollout.response_mask_from(responses, eos).long().tolist() == expected


@torch.no_grad()
def test_greedy_is_deterministic(tokenizer):
    model = tiny_llama(len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    a = rollout.generate(model, tokenizer, PROMPTS, greedy=True, max_new_tokens=6)
    b = rollout.generate(model, tokenizer, PROMPTS, greedy=True, max_new_tokens=6)
    assert torch.equal(a.input_ids, b.input_ids)


def test_shared_prompt_forward_matches_the_plain_forward_and_its_gradients(tokenizer, monkeypatch):
    """Repeated prompts run once with their cache shared (engine.response_forward): the log-probs, a critic's values
    and every parameter gradient must equal one plain forward over the full padded rows (rows shuffled, as in a PPO
    minibatch; ragged prompts, one of a single token)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from shared import engine

    model = tiny_llama(len(tokenizer), eos_token_id=tokenizer.eos_token_id).train()
    torch.manual_seed(3)
    with torch.no_grad():
        ro = rollout.generate(model, tokenizer, PROMPTS, n=4, max_new_tokens=7)
    perm = torch.randperm(len(ro.input_ids))
    ids, mask, p_len, rmask = ro.input_ids[perm], ro.attention_mask[perm], ro.prompt_len, ro.response_mask[perm]

    def plain(m):  # the whole row at once, no cache
        logits = m(input_ids=ids, attention_mask=mask, position_ids=engine.position_ids(mask)).logits
        return torch.log_softmax(logits[:, p_len - 1: -1].float(), -1).gather(-1, ids[:, p_len:, None]).squeeze(-1)

    def grads(m, fn):
        m.zero_grad()
        (fn(m) * rmask).sum().backward()
        return {k: p.grad.clone() for k, p in m.named_parameters()}

    # the backbone runs each distinct prompt once, then the response positions; the LM head (in chunks) runs on
    # the positions that predict a response token only
    rollout.lm_head_of(model)  # (its one-time check runs the model on 8 tokens)
    seen, head = [], rollout.HeadLogprobs.apply
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[:2])))
    monkeypatch.setattr(rollout.HeadLogprobs, "apply", lambda h, *a: (seen.append(len(h)), head(h, *a))[1])
    shared_lp = rollout.response_logprobs(model, ids, mask, p_len)
    hook.remove()
    assert seen == [(len(PROMPTS), p_len), (len(ids), ids.shape[1] - p_len - 1), len(ids) * (ids.shape[1] - p_len)]
    assert ((shared_lp - plain(model)) * rmask).abs().max() <= 1e-5
    g_plain, g_shared = grads(model, plain), grads(model, lambda m: rollout.response_logprobs(m, ids, mask, p_len))
    for k in g_plain:
        assert torch.allclose(g_shared[k], g_plain[k], rtol=1e-4, atol=1e-6), k

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, num_labels=1, pad_token_id=None)
    torch.manual_seed(4)
    critic = LlamaForSequenceClassification(cfg)
    full = engine.token_scores(critic, ids, mask)[:, p_len - 1: -1]
    assert ((engine.token_scores(critic, ids, mask, p_len) - full) * rmask).abs().max() <= 1e-5
    # distinct prompts (nothing to share): the plain path, same numbers
    one_each = torch.cat([(ro.prompt_index[perm] == i).nonzero()[:1, 0] for i in range(len(PROMPTS))])
    sub = rollout.response_logprobs(model, ids[one_each], mask[one_each], p_len)
    assert ((sub - shared_lp[one_each]) * rmask[one_each]).abs().max() <= 1e-5


def test_response_logprobs_and_entropy_equal_the_full_log_softmax_and_the_entropy_has_no_graph():
    """log p = z[y] - logsumexp(z) and the entropy computed a few rows at a time, against the plain formulas on the
    full log-softmax (float64); the entropy is a statistic: no gradient, nothing kept for the backward."""
    from families import build_family

    model, tok = build_family("qwen2")
    torch.manual_seed(0)
    ids = torch.randint(3, len(tok), (11, 9))
    mask = torch.ones_like(ids)
    logprobs, entropy = rollout.response_logprobs(model, ids, mask, 4, temperature=0.7, with_entropy=True)
    logp_all = torch.log_softmax(model(input_ids=ids).logits[:, 3:-1].double() / 0.7, -1)
    assert (logprobs.double() - logp_all.gather(-1, ids[:, 4:, None]).squeeze(-1)).abs().max() <= 1e-5
    assert (entropy.double() + (logp_all.exp() * logp_all).sum(-1)).abs().max() <= 1e-5
    assert logprobs.requires_grad and not entropy.requires_grad and entropy.grad_fn is None


def test_hf_sampling_sets_the_checkpoints_generation_config_aside():
    """A checkpoint's generation_config.json (here an n-gram ban and a repetition penalty, as chat models ship them)
    would change what `generate` samples but not the log-probs the trainer computes: greedy responses must be the
    argmax of the model's own logits at every step, and the model keeps its config for export."""
    from families import build_family

    from shared import engine

    model, tok = build_family("llama")
    model.eval()
    model.generation_config.no_repeat_ngram_size, model.generation_config.repetition_penalty = 1, 10.0
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("1+2=", "the sum of", "a")]
    ro = rollout.generate(model, tok, prompts, max_new_tokens=12, greedy=True)
    with torch.no_grad():
        logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                       position_ids=engine.position_ids(ro.attention_mask)).logits[:, ro.prompt_len - 1: -1]
    assert torch.equal(logits.argmax(-1)[ro.response_mask], ro.responses[ro.response_mask])
    assert (model.generation_config.no_repeat_ngram_size, model.generation_config.repetition_penalty) == (1, 10.0)
