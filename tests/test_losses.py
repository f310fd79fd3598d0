"""The SFT and Bradley-Terry losses against hand computations on tiny batches."""
import math

import torch

from train_rm import bradley_terry_loss
from train_sft import sft_loss


def test_sft_loss_is_mean_nll_over_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)  # the positions predicting the response tokens
    responses = torch.tensor([[3, 4, 0], [4, 2, 0]])
    response_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1: two response tokens, then padding
    terms = []
    for b in range(2):
        for t in range(3):
            if response_mask[b, t]:
                row = logits[b, t].tolist()
                log_z = math.log(sum(math.exp(x) for x in row))
                terms.append(-(row[responses[b, t]] - log_z))
    expected = sum(terms) / len(terms)
    assert len(terms) == 5
    logprobs = torch.log_softmax(logits, -1).gather(-1, responses[..., None]).squeeze(-1)
    assert abs(sft_loss(logprobs, response_mask).item() - expected) < 1e-6


def test_sft_batch_equals_each_sequence_alone_and_runs_the_lm_head_on_responses_only(tokenizer, monkeypatch):
    """train_sft's batch (prompts left-padded, responses right-padded, logits only where a response token is
    predicted) gives the token-mean NLL of a plain full forward over each unpadded sequence."""
    from conftest import tiny_llama
    from shared import rollout
    from train_sft import response_logprobs

    model = tiny_llama(len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    examples = [{"input_ids": [20, 21, 14, 30, 31, 1], "prompt_len": 3}, {"input_ids": [25, 26, 1], "prompt_len": 1},
                {"input_ids": [22, 14, 23, 24, 30, 33, 34, 35, 1], "prompt_len": 5}]
    seen = []
    rollout.lm_head_of(model)  # (its one-time check runs the head on 8 tokens)
    head = rollout.HeadLogprobs.apply
    monkeypatch.setattr(rollout.HeadLogprobs, "apply", lambda h, *a: (seen.append(h.shape[:1]), head(h, *a))[1])
    logprobs, rmask, attended = response_logprobs(model, examples, tokenizer.pad_token_id, "cpu")
    loss = sft_loss(logprobs, rmask)
    nll, n = 0.0, 0
    for e in examples:
        ids, k = torch.tensor([e["input_ids"]]), e["prompt_len"]
        logp = torch.log_softmax(model(input_ids=ids).logits[0, k - 1: -1], -1)
        nll -= logp.gather(-1, ids[0, k:, None]).sum().item()
        n += len(e["input_ids"]) - k
    assert abs(loss.item() - nll / n) < 1e-5
    assert attended == sum(len(e["input_ids"]) for e in examples)
    assert seen == [torch.Size([3 * 4])]  # 3 rows x the longest response (4), not x the padded length 10


def test_bradley_terry_loss_with_and_without_margin():
    chosen, rejected, margin = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5]), torch.tensor([0.5, 0.0, 1.0])
    plain = sum(math.log(1 + math.exp(-(c - r))) for c, r in zip(chosen.tolist(), rejected.tolist())) / 3
    with_margin = sum(math.log(1 + math.exp(-(c - r - m))) for c, r, m in
                      zip(chosen.tolist(), rejected.tolist(), margin.tolist())) / 3
    assert abs(bradley_terry_loss(chosen, rejected).item() - plain) < 1e-6
    assert abs(bradley_terry_loss(chosen, rejected, margin).item() - with_margin) < 1e-6
    assert bradley_terry_loss(chosen, rejected, margin) > bradley_terry_loss(chosen, rejected)  # margins ask for more
