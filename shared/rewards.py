"""Rewards: a trained reward model (scored where transformers reads it, `engine.score_index`), a built-in
task's checker, a user's `module:function`, or an HTTP endpoint. Each maps (prompts, responses, eos, extras)
to one float per response."""
import http.client
import importlib
import json
import numbers
import os
import sys
import time
import urllib.error
import urllib.request

import torch

from shared import data, dist, engine, tasks
from shared.dist import UserError


class RewardModel:
    """A frozen scalar-head model from train_rm.py (or any HF sequence-classification model with one label).
    The text is re-tokenized with the reward model's own tokenizer; a truncated response gets no EOS. The
    score is read at `engine.score_index`, the token transformers reads."""

    def __init__(self, path: str, args, ctx, micro_batch_size: int = 64):
        self.tok = engine.load_tokenizer(path, args, "--reward-path")
        model = engine.load_model(path, args, ctx, kind="score", flag="--reward-path", trained_head=True)
        self.mean = float(getattr(model.config, "reward_mean", 0.0))
        self.std = float(getattr(model.config, "reward_std", 1.0))
        self.model, self.ctx, self.micro = engine.wrap_frozen(model, args, ctx), ctx, micro_batch_size

    @torch.no_grad()
    def __call__(self, prompts, responses, eos, extras=None) -> torch.Tensor:
        seqs = []
        for p, r, e in zip(prompts, responses, eos):
            resp = (data.encode_response(self.tok, r) if e
                    else self.tok(r, add_special_tokens=False)["input_ids"])
            seqs.append(data.encode_prompt(self.tok, p) + resp)
        scores = []
        for chunk in data.micro_batches(seqs, self.micro):
            ids, mask = (t.to(self.ctx.device) for t in data.pad(chunk, self.tok.pad_token_id))
            values = engine.token_scores(self.model, ids, mask)
            scores.append(values.gather(
                1, engine.score_index(ids, mask, self.tok.pad_token_id)[:, None]).squeeze(1))
        return torch.cat(scores).cpu()


def load_function(spec: str):
    """A built-in task's checker by name, or `package.module:function` importable from the working
    directory."""
    if spec in tasks.TASKS:
        return tasks.get(spec).reward
    module, _, name = spec.partition(":")
    if not name or not module:
        raise UserError(f"--reward-fn {spec}: give a built-in task ({sorted(tasks.TASKS)}) "
                        f"or module:function")
    if os.getcwd() not in sys.path:  # `module:function` is looked up from where the user runs the script
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--reward-fn {spec}: cannot import it ({e}); run from the directory that holds the "
                        f"module, or add it to PYTHONPATH") from None
    except Exception as e:  # the module itself fails while it is imported (a SyntaxError, a NameError, ...)
        raise UserError(f"--reward-fn {spec}: importing {module} raised {_exception(e)}; "
                        f"fix the module") from None
    if not callable(fn):
        raise UserError(f"--reward-fn {spec}: {name} is a {type(fn).__name__}, not a function")
    return fn


def _exception(e: BaseException) -> str:
    """`TypeName: first line of the message` (one line, shortened)."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _show(x) -> str:
    if x is None:
        return "None"
    text = repr(x)
    return f"{type(x).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def as_rewards(out, n: int, who: str, verb: str = "returned") -> torch.Tensor:
    """One float per response from what a reward source gave (a list, tuple, tensor or array of numbers);
    anything else raises a UserError that says what `who` {verb} and what is expected."""
    expected = f"expected a list of {n} number{'s' if n != 1 else ''}, one per response"
    values = out
    # a tensor, a numpy array
    if isinstance(out, torch.Tensor) or (hasattr(out, "tolist") and hasattr(out, "ndim")):
        values = out.tolist() if out.ndim == 1 else None
    if not isinstance(values, (list, tuple)):
        raise UserError(f"{who} {verb} {_show(out)}; {expected}")
    if len(values) != n:
        raise UserError(f"{who} {verb} {len(values)} rewards for {n} response{'s' if n != 1 else ''}; "
                        f"{expected}")
    for v in values:
        if isinstance(v, str) or not isinstance(v, numbers.Real):
            raise UserError(f"{who} {verb} {_show(values)}: {_show(v)} is not a number; {expected}")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


class RemoteReward:
    """POST {"prompts": [...], "responses": [...], "extras": {column: [...]}} -> {"rewards": [float, ...]}.
    A connection that fails or times out, and the answers that say "try later" (HTTP 408, 429, 502, 503, 504),
    are retried; any other HTTP error or a malformed answer is reported at once (a UserError naming the
    URL)."""

    RETRY_STATUS = (408, 429, 502, 503, 504)

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 2):
        self.url, self.timeout, self.retries = url, timeout, retries

    def __call__(self, prompts, responses, eos=None, extras=None) -> torch.Tensor:
        body = json.dumps({"prompts": prompts, "responses": responses, "extras": extras or {}}).encode()
        who = f"--reward-url {self.url}"
        for attempt in range(self.retries + 1):
            tries = f"after {attempt + 1} tr{'ies' if attempt else 'y'}"
            try:
                req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as e:  # the server answered, with an error status
                try:
                    text = e.read(200)
                except Exception:
                    text = b""
                if e.code not in self.RETRY_STATUS or attempt == self.retries:
                    raise UserError(f"{who} answered HTTP {e.code} {e.reason}"
                                    f"{' ' + tries if attempt else ''}: "
                                    f"{text[:120]!r}; check the server's log") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:  # no answer (yet)
                if attempt == self.retries:
                    reason = getattr(e, "reason", e)
                    raise UserError(f"{who} did not answer {tries} ({reason}); is the server up? "
                                    f"(--reward-timeout {self.timeout:g} s per try)") from None
            except http.client.HTTPException as e:  # something answered, but not HTTP
                raise UserError(f"{who} answered something that is not HTTP ({_exception(e)}); "
                                f"is it the reward server's address?") from None
            time.sleep(0.5 * 2**attempt)
        try:
            rewards = json.loads(raw)["rewards"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{who} answered {raw[:80]!r}; expected JSON "
                            f'{{"rewards": [{len(responses)} numbers]}}') from None
        return as_rewards(rewards, len(responses), who, 'answered {"rewards": ...} with')


def call_function(fn, prompts, responses, eos, extras, who: str = "the reward function") -> torch.Tensor:
    return as_rewards(fn(prompts=prompts, responses=responses, **(extras or {})), len(responses), who)


PROBE_RESPONSE = "1"  # the response of the trial call `build` makes before training


class Reward:
    """The weighted sum of the reward sources: reward(prompts, responses, eos, extras, step=None) -> (total
    (N,), {source name: (N,) tensor}). A user's source that raises or gives something that is not one number
    per response (a function, a server) stops the run with one line naming it: a UserError (exit 2) during
    `build`'s trial call, before anything is written; `Diverged` (exit 3) once training has started. `step`:
    the training step being scored (the message names it; without it, an evaluation after the last step
    given)."""

    def __init__(self, sources, weights=None):
        self.sources = sources  # (name, who, fn, user code?)
        self.weights = weights or [1.0] * len(sources)
        self.trial, self.step = False, 0

    def describe(self) -> str:
        """What produces the figure, e.g. `1 x --reward-path runs/rm + 0.5 x --reward-fn my_rewards:score`."""
        return " + ".join(f"{w:g} x {who}" for w, (_, who, _, _) in zip(self.weights, self.sources))

    def __call__(self, prompts, responses, eos, extras=None, step=None):
        if step is not None:
            self.step = step
        parts = {}
        for name, who, fn, user in self.sources:
            try:
                parts[name] = fn(prompts, responses, eos, extras).float()
            except (Exception if user else UserError) as e:
                raise self._stop(who, e, step) from None
        return sum(w * p for w, p in zip(self.weights, parts.values())), parts

    def _stop(self, who: str, e: Exception, step):
        problem = str(e) if isinstance(e, UserError) else f"{who} raised {_exception(e)}"
        if self.trial:
            return UserError(f"{problem} (before training: a trial call on one train prompt "
                             f"with the response {PROBE_RESPONSE!r}); fix it and run again")
        when = f"at step {step}" if step is not None else (
            f"in the evaluation after step {self.step}" if self.step else "in the evaluation before training")
        return dist.Diverged(f"{problem} ({when}); stopping (the last checkpoint is intact)")

    def probe(self, example: dict):
        """One call on a tokenized prompt example with a dummy response: every source imported, reached and
        checked before the run writes anything."""
        self.trial = True
        try:
            self([example["prompt"]], [PROBE_RESPONSE], [True],
                 {k: [v] for k, v in example["extras"].items()})
        finally:
            self.trial = False


def _functions(specs: str, flag: str) -> list:
    """Reward sources for comma-separated `module:function` specs or built-in task names (their checkers)."""
    sources = []
    for spec in filter(None, (s.strip() for s in specs.split(","))):
        fn = load_function(spec)
        who = f"the {spec} task's checker" if flag == "--dataset" else f"{flag} {spec}"
        sources.append((spec.split(":")[-1], who,
                        lambda p, r, e, x, fn=fn, who=who: call_function(fn, p, r, e, x, who), True))
    return sources


def task_score(args, probe: dict | None = None, rule_rewards: bool = False) -> Reward | None:
    """The scorer of eval/task_score (a `Reward`; `.describe()` says what it is): --eval-reward-fn; else a
    built-in task's checker; else, in the RL scripts (rule_rewards=True), the --reward-fn rules with their
    --reward-weights; else None. With `probe` (a held-out prompt example), one trial call before anything is
    written."""
    if args.eval_reward_fn:
        reward = Reward(_functions(args.eval_reward_fn, "--eval-reward-fn"), None)
    elif args.dataset in tasks.TASKS:
        reward = Reward(_functions(args.dataset, "--dataset"), None)
    elif rule_rewards and args.reward_fn.strip():
        sources = _functions(args.reward_fn, "--reward-fn")
        weights = [float(w) for w in args.reward_weights.split(",")] if args.reward_weights else None
        # --reward-weights order: reward-path, reward-fn entries, reward-url
        first = 1 if args.reward_path else 0
        reward = Reward(sources, weights[first: first + len(sources)] if weights else None)
    else:
        return None
    if probe is not None:
        reward.probe(probe)
    return reward


def eval_scorers(args, eval_prompts: list[dict], train_reward: Reward | None = None,
                 rule_rewards: bool = False):
    """The held-out greedy evaluation's scorers: {"eval/task_score": `task_score`, "eval/reward": the training
    reward (RL scripts)}, those that exist; says once when there is no task score and how to get one."""
    probe = eval_prompts[0] if eval_prompts else None
    scorers = {"eval/task_score": task_score(args, probe, rule_rewards), "eval/reward": train_reward}
    if scorers["eval/task_score"] is None:
        dist.say("[eval] no task score (eval/task_score): give --eval-reward-fn module:function to score "
                 "greedy responses to the held-out prompts"
                 + (" (or a rule reward with --reward-fn)" if rule_rewards else ""))
    elif not eval_prompts:
        dist.say("[eval] no held-out prompts: no task score; give --eval-dataset")
    return {k: v for k, v in scorers.items() if v is not None}


def sources(scorers: dict, **more) -> dict:
    """summary.json's record of which reward produced each figure."""
    return {name: r.describe() for name, r in {**scorers, **more}.items() if r is not None}


def build(args, ctx, probe: dict | None = None) -> Reward:
    """The weighted sum of every reward source given by the flags (a `Reward`). With `probe` (a tokenized
    prompt example, {prompt, extras}), one trial call on it with a dummy response, so a source that fails or
    answers nonsense is refused (a UserError) before the run writes anything."""
    if args.reward_timeout <= 0:
        raise UserError(f"--reward-timeout must be > 0 seconds, got {args.reward_timeout}")
    try:
        weights = [float(w) for w in args.reward_weights.split(",")] if args.reward_weights else None
    except ValueError:
        raise UserError(f"--reward-weights {args.reward_weights}: "
                        f"give comma-separated numbers, e.g. 1,0.5") from None
    sources = []
    if args.reward_path:
        model = RewardModel(args.reward_path, args, ctx)
        sources.append(("rm", f"--reward-path {args.reward_path}", model, False))
    sources += _functions(args.reward_fn, "--reward-fn")
    if args.reward_url:
        sources.append(("remote", f"--reward-url {args.reward_url}",
                        RemoteReward(args.reward_url, args.reward_timeout), True))
    if not sources:
        if args.dataset not in tasks.TASKS:
            raise UserError("no reward: give --reward-fn, --reward-path or --reward-url")
        sources = _functions(args.dataset, "--dataset")
    weights = weights or [1.0] * len(sources)
    if len(weights) != len(sources):
        raise UserError(f"--reward-weights has {len(weights)} values for {len(sources)} reward sources")
    reward = Reward(sources, weights)
    if probe is not None:
        reward.probe(probe)
    return reward
