"""The SFT and Bradley-Terry losses against hand computations on tiny batches."""
import math

import torch

from train_rm import bradley_terry_loss
from train_sft import sft_loss


def test_sft_loss_is_mean_nll_over_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4], [0, 4, 2, 0]])
    response_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])  # row 1: prompt 1 token, response 2, then padding
    terms = []
    for b in range(2):
        for t in range(1, 4):
            if response_mask[b, t]:
                row = logits[b, t - 1].tolist()
                log_z = math.log(sum(math.exp(x) for x in row))
                terms.append(-(row[ids[b, t]] - log_z))
    expected = sum(terms) / len(terms)
    assert len(terms) == 4
    assert abs(sft_loss(logits, ids, response_mask).item() - expected) < 1e-6


def test_bradley_terry_loss_with_and_without_margin():
    chosen, rejected, margin = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5]), torch.tensor([0.5, 0.0, 1.0])
    plain = sum(math.log(1 + math.exp(-(c - r))) for c, r in zip(chosen.tolist(), rejected.tolist())) / 3
    with_margin = sum(math.log(1 + math.exp(-(c - r - m))) for c, r, m in
                      zip(chosen.tolist(), rejected.tolist(), margin.tolist())) / 3
    assert abs(bradley_terry_loss(chosen, rejected).item() - plain) < 1e-6
    assert abs(bradley_terry_loss(chosen, rejected, margin).item() - with_margin) < 1e-6
    assert bradley_terry_loss(chosen, rejected, margin) > bradley_terry_loss(chosen, rejected)  # margins ask for more
