"""The LM head in chunks (shared.rollout.response_logprobs / HeadLogprobs): the same log-probs, entropies and
gradients as the model's own full logits through log_softmax (computed here in float64), on every family of the
matrix (untied, tied, tied with learned positions), with several chunks; no (N, R, V) tensor is ever made; the
models whose logits are not head(hidden) take the model's own forward."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from families import FAMILIES, build_family
from shared import rollout

T = 0.7  # a sampling temperature


def plain(model, ids, mask, p_len):
    """log p(y) and the entropy of softmax(logits / T) from the model's full logits, in float64."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, p_len - 1: -1].double() / T
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, ids[:, p_len:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def batch(tok, rows=6, length=12, p_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tok), (rows, length), generator=g)
    ids[1::2, :p_len] = ids[0::2, :p_len]  # pairs share a prompt (the shared-prompt path)
    return ids, torch.ones_like(ids), p_len


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_head_equals_the_full_log_softmax_with_its_gradients(family, monkeypatch):
    model, tok = build_family(family)
    model.eval()  # (gpt2's dropout)
    monkeypatch.setitem(rollout.HEAD_CHUNK, "cpu", 7 * len(tok))  # 7 positions a chunk: 6 x 7 positions -> 6 chunks
    assert rollout.lm_head_of(model) is not None
    ids, mask, p_len = batch(tok)
    w_lp = torch.randn(ids.shape[0], ids.shape[1] - p_len, generator=torch.Generator().manual_seed(1))
    w_ent = torch.randn(w_lp.shape, generator=torch.Generator().manual_seed(2))

    def grads(fn):
        model.zero_grad()
        lp, ent = fn()
        ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
        return lp.detach().double(), ent.detach().double(), {k: p.grad.double() for k, p in model.named_parameters()}

    lp, ent, g = grads(lambda: rollout.response_logprobs(model, ids, mask, p_len, T, "grad"))
    want_lp, want_ent, want_g = grads(lambda: plain(model, ids, mask, p_len))
    assert (lp - want_lp).abs().max() <= 1e-6
    assert (ent - want_ent).abs().max() <= 1e-6
    assert g.keys() == want_g.keys()
    for k in g:
        scale = want_g[k].abs().max().item()
        assert (g[k] - want_g[k]).abs().max() <= 1e-5 * max(scale, 1e-3), k
    # the detached entropy and the log-probs alone: the same numbers
    lp2, ent2 = rollout.response_logprobs(model, ids, mask, p_len, T, True)
    assert torch.equal(lp2.detach().double(), lp) and torch.equal(ent2.double(), ent) and ent2.grad_fn is None


class LargestLogits(TorchDispatchMode):
    """The largest tensor allocated (views and in-place results aside) whose last dimension is the vocabulary."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):  # a view, or an in-place op
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_no_vocabulary_sized_tensor_over_all_positions_forward_or_backward(family, monkeypatch):
    model, tok = build_family(family)
    rows = 4
    monkeypatch.setitem(rollout.HEAD_CHUNK, "cpu", rows * len(tok))
    rollout.lm_head_of(model)
    ids, mask, p_len = batch(tok, rows=8, length=20)
    positions = ids.shape[0] * (ids.shape[1] - p_len)
    for fallback in (False, True):
        model.__dict__["_lm_head"] = None if fallback else rollout._find_lm_head(model)
        with LargestLogits(len(tok)) as seen:
            lp, ent = rollout.response_logprobs(model, ids, mask, p_len, T, "grad")
            (lp.sum() + ent.sum()).backward()
        if fallback:  # the model's own logits: (N, R + 1, V) at least
            assert seen.largest >= positions * len(tok)
        else:
            assert seen.largest == rows * len(tok)


def test_models_whose_logits_are_not_the_head_on_the_hidden_state_take_their_own_forward(capsys):
    model, tok = build_family("llama")
    model.config.final_logit_softcapping = 30.0  # Gemma 2's: logits = 30 tanh(z / 30)
    assert rollout.lm_head_of(model) is None

    class Scaled(type(model)):  # e.g. remote code that scales its logits in forward
        def forward(self, *a, **kw):
            out = super().forward(*a, **kw)
            out.logits = out.logits * 2
            return out

    scaled = Scaled(model.config)
    scaled.config.final_logit_softcapping = None
    assert rollout.lm_head_of(scaled) is None
    assert "logits are not its head on its backbone's output" in capsys.readouterr().out
    ids, mask, p_len = batch(tok)
    with torch.no_grad():
        lp = rollout.response_logprobs(scaled, ids, mask, p_len, T)
        assert (lp.double() - plain(scaled, ids, mask, p_len)[0]).abs().max() <= 1e-6


def test_lora_adapted_backbone_uses_the_chunked_head_with_the_adapters():
    """PEFT: the adapters sit in the backbone's layers, the head is a plain Linear: the chunked path applies."""
    from peft import LoraConfig, get_peft_model

    model, tok = build_family("qwen2")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert rollout.lm_head_of(model) is not None
    ids, mask, p_len = batch(tok)
    lp = rollout.response_logprobs(model, ids, mask, p_len, T)
    want = plain(model, ids, mask, p_len)[0]
    assert (lp.detach().double() - want).abs().max() <= 1e-6
    lp.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_bf16_head_matches_the_bf16_full_logits():
    model, tok = build_family("qwen2")
    model.to(torch.bfloat16)
    ids, mask, p_len = batch(tok)
    lp = rollout.response_logprobs(model, ids, mask, p_len, T)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, p_len - 1: -1].float() / T
    want = logits.gather(-1, ids[:, p_len:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    assert (lp.detach() - want).abs().max() <= 1e-5  # the same bf16 matmul, the same fp32 arithmetic after it
