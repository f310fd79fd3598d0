"""Rewards: a trained reward model (scored where transformers reads it, `engine.score_index`), a built-in task's checker, a user's
`module:function`, or an HTTP endpoint. Each maps (prompts, responses, eos, extras) to one float per response."""
import importlib
import json
import os
import sys
import time
import urllib.error
import urllib.request

import torch

from shared import data, engine, tasks
from shared.dist import UserError


class RewardModel:
    """A frozen scalar-head model from train_rm.py (or any HF sequence-classification model with one label).
    The text is re-tokenized with the reward model's own tokenizer; a truncated response gets no EOS. The score is
    read at `engine.score_index`, the token transformers reads."""

    def __init__(self, path: str, args, ctx, micro_batch_size: int = 64):
        self.tok = engine.load_tokenizer(path, args, "--reward-path")
        model = engine.load_model(path, args, ctx, kind="score", flag="--reward-path")
        self.mean = float(getattr(model.config, "reward_mean", 0.0))
        self.std = float(getattr(model.config, "reward_std", 1.0))
        self.model, self.ctx, self.micro = engine.wrap_frozen(model, args, ctx), ctx, micro_batch_size

    @torch.no_grad()
    def __call__(self, prompts, responses, eos, extras=None) -> torch.Tensor:
        seqs = []
        for p, r, e in zip(prompts, responses, eos):
            resp = data.encode_response(self.tok, r) if e else self.tok(r, add_special_tokens=False)["input_ids"]
            seqs.append(data.encode_prompt(self.tok, p) + resp)
        scores = []
        for chunk in data.micro_batches(seqs, self.micro):
            ids, mask = (t.to(self.ctx.device) for t in data.pad(chunk, self.tok.pad_token_id))
            values = engine.token_scores(self.model, ids, mask)
            scores.append(values.gather(1, engine.score_index(ids, mask, self.tok.pad_token_id)[:, None]).squeeze(1))
        return torch.cat(scores).cpu()


def load_function(spec: str):
    """A built-in task's checker by name, or `package.module:function` importable from the working directory."""
    if spec in tasks.TASKS:
        return tasks.get(spec).reward
    module, _, name = spec.partition(":")
    if not name:
        raise UserError(f"--reward-fn {spec}: give a built-in task ({sorted(tasks.TASKS)}) or module:function")
    if os.getcwd() not in sys.path:  # `module:function` is looked up from where the user runs the script
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--reward-fn {spec}: cannot import it ({e}); run from the directory that holds the module, or add it to PYTHONPATH") from None


class RemoteReward:
    """POST {"prompts": [...], "responses": [...], "extras": {column: [...]}} -> {"rewards": [float, ...]}."""

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 2):
        self.url, self.timeout, self.retries = url, timeout, retries

    def __call__(self, prompts, responses, eos=None, extras=None) -> torch.Tensor:
        body = json.dumps({"prompts": prompts, "responses": responses, "extras": extras or {}}).encode()
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.retries:
                    raise UserError(f"--reward-url {self.url} did not answer after {attempt + 1} tries ({e}); is the "
                                    f"server up?") from None
                time.sleep(0.5 * 2**attempt)
        try:
            rewards = json.loads(raw)["rewards"]
            assert len(rewards) == len(responses)
            return torch.tensor([float(r) for r in rewards])
        except (ValueError, KeyError, TypeError, AssertionError):
            raise UserError(f"--reward-url {self.url} answered {raw[:80]!r}; expected JSON "
                            f'{{"rewards": [{len(responses)} numbers]}}') from None


def call_function(fn, prompts, responses, eos, extras) -> torch.Tensor:
    out = fn(prompts=prompts, responses=responses, **(extras or {}))
    if len(out) != len(responses):
        raise UserError(f"the reward function returned {len(out)} rewards for {len(responses)} responses")
    return torch.tensor([float(x) for x in out])


def build(args, ctx):
    """The weighted sum of every reward source given by the flags. Returns fn(prompts, responses, eos, extras) ->
    (total (N,), {source name: (N,) tensor})."""
    sources = []
    if args.reward_path:
        sources.append(("rm", RewardModel(args.reward_path, args, ctx)))
    for spec in filter(None, args.reward_fn.split(",")):
        fn = load_function(spec.strip())
        sources.append((spec.strip().split(":")[-1], lambda p, r, e, x, fn=fn: call_function(fn, p, r, e, x)))
    if args.reward_url:
        sources.append(("remote", RemoteReward(args.reward_url, args.reward_timeout)))
    if not sources:
        if args.dataset not in tasks.TASKS:
            raise UserError("no reward: give --reward-fn, --reward-path or --reward-url")
        sources.append((args.dataset, lambda p, r, e, x: call_function(tasks.get(args.dataset).reward, p, r, e, x)))
    weights = [float(w) for w in args.reward_weights.split(",")] if args.reward_weights else [1.0] * len(sources)
    if len(weights) != len(sources):
        raise UserError(f"--reward-weights has {len(weights)} values for {len(sources)} reward sources")

    def total(prompts, responses, eos, extras):
        parts = {name: src(prompts, responses, eos, extras).float() for name, src in sources}
        return sum(w * p for w, p in zip(weights, parts.values())), parts

    return total
