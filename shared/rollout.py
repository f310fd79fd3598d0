"""Generation: prompts -> n samples per prompt -> padded tensors the RL scripts train on.

Layout of a Rollout (N = prompts x n samples, samples of one prompt contiguous; P = longest prompt,
R = longest response):
    input_ids      (N, P + R)  prompts LEFT-padded to P, then responses RIGHT-padded to R
    attention_mask (N, P + R)  1 on real prompt tokens and on response tokens up to and including EOS
    response_mask  (N, R)      1 on response tokens up to and including the first EOS; 0 after it and on padding,
                               also when the pad token IS the EOS token
    logprobs       (N, R)      the sampler's log-probs of the sampled tokens: log_softmax(logits / temperature),
                               before top-p truncation, i.e. exactly what the trainer recomputes (0 where masked)
    eos            (N,)        True if the response ended with EOS, False if it hit max_new_tokens (truncated)
"""
from dataclasses import dataclass

import torch

from shared.data import pad
from shared.engine import gathered, position_ids


@dataclass
class Rollout:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    eos: torch.Tensor
    prompt_len: int
    texts: list[str]
    prompt_index: torch.Tensor  # (N,) which prompt each sample answers

    @property
    def responses(self) -> torch.Tensor:  # (N, R)
        return self.input_ids[:, self.prompt_len:]


def response_mask_from(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS of each row (the whole row if there is none)."""
    is_eos = (responses == eos_id).long()
    return (is_eos.cumsum(1) - is_eos) == 0


@torch.no_grad()
def generate(model, tok, prompt_ids: list[list[int]], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
             max_new_tokens: int = 32, greedy: bool = False) -> Rollout:
    """HF `generate` backend. Under ZeRO-3 the full parameters are gathered once for the whole call."""
    module = getattr(model, "module", model)
    device = next(module.parameters()).device
    repeated = [p for p in prompt_ids for _ in range(n)]
    ids, mask = (t.to(device) for t in pad(repeated, tok.pad_token_id, left=True))
    was_training = module.training
    module.eval()
    with gathered(model):
        out = module.generate(
            input_ids=ids, attention_mask=mask, do_sample=not greedy, temperature=temperature if not greedy else None,
            top_p=top_p if not greedy else None, top_k=0 if not greedy else None, max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, return_dict_in_generate=True,
            output_logits=True, use_cache=True)
    module.train(was_training)
    prompt_len = ids.shape[1]
    responses = out.sequences[:, prompt_len:]
    response_mask = response_mask_from(responses, tok.eos_token_id)
    logits = torch.stack(out.logits, 1).float() / (1.0 if greedy else temperature)
    logprobs = torch.log_softmax(logits, -1).gather(-1, responses[..., None]).squeeze(-1) * response_mask
    texts = [tok.decode(r[m], skip_special_tokens=True) for r, m in zip(responses, response_mask)]
    return Rollout(
        input_ids=out.sequences, attention_mask=torch.cat([mask, response_mask.long()], 1),
        response_mask=response_mask, logprobs=logprobs, eos=(responses == tok.eos_token_id).any(1),
        prompt_len=prompt_len, texts=texts, prompt_index=torch.arange(len(prompt_ids), device=device).repeat_interleave(n))


def response_logprobs(model, input_ids, attention_mask, prompt_len: int, temperature: float = 1.0,
                      with_entropy: bool = False):
    """Teacher-forced log-probs of the response tokens (N, R) under `model`, with the sampler's temperature;
    optionally also the per-token entropy of that distribution."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids(attention_mask)).logits[:, prompt_len - 1: -1].float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    logprobs = logp_all.gather(-1, input_ids[:, prompt_len:, None]).squeeze(-1)
    if with_entropy:
        return logprobs, -(logp_all.exp() * logp_all).sum(-1)
    return logprobs


def greedy_eval(model, tok, examples: list[dict], reward_fn, ctx, max_new_tokens: int, batch_size: int = 128):
    """Mean reward of greedy responses to held-out prompts (exact-match accuracy for a task checker), sharded over
    ranks. Every rank makes the same number of generate calls (ZeRO-3 gathers are collective)."""
    from shared import dist

    mine = examples[ctx.rank:: ctx.world]
    n_calls = -(-(-(-len(examples) // ctx.world)) // batch_size)
    total, samples = torch.zeros(2, dtype=torch.float64), []
    for i in range(n_calls):
        chunk = mine[i * batch_size: (i + 1) * batch_size]
        ro = generate(model, tok, [e["prompt_ids"] for e in (chunk or examples[:1])], max_new_tokens=max_new_tokens,
                      greedy=True)
        if not chunk:
            continue
        extras = {k: [e["extras"][k] for e in chunk] for k in chunk[0]["extras"]}
        prompts = [e["prompt"] for e in chunk]
        rewards = torch.as_tensor(reward_fn(prompts=prompts, responses=ro.texts, **extras), dtype=torch.float64)
        total += torch.stack([rewards.sum(), torch.tensor(float(len(chunk)), dtype=torch.float64)])
        samples += list(zip(prompts, ro.texts))[: 4 - len(samples)]
    dist.all_reduce(total)
    return (total[0] / total[1]).item(), samples
