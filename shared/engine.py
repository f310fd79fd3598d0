"""Models and DeepSpeed: loading, the ZeRO config, wrapping trainable and frozen models, HF export, resumable
checkpoints and the output directory."""
import functools
import inspect
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from shared import dist, tracking
from shared.dist import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_SFT, DEFAULT_RM, TOKENIZER = str(ASSETS / "sft"), str(ASSETS / "rm"), str(ASSETS / "tokenizer")
# The tiny default policy (`--model-path tiny`): a 4-layer Llama over a character vocabulary (~0.8M
# parameters).
TINY = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)


CHAR_VOCAB = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "\n": 3, **{chr(i): i - 28 for i in range(32, 127)}}


def is_embedded_tokenizer(tok) -> bool:
    """The demo models' character tokenizer (assets/tokenizer): a model that uses it is the embedded demo
    model or was trained from it."""
    return len(tok) == len(CHAR_VOCAB) and tok.get_vocab() == CHAR_VOCAB


def is_embedded(path: str) -> bool:
    """Whether --model-path is the embedded demo model or one trained from it (its tokenizer is the character
    tokenizer): the test of `--defaults auto`. Reads only tokenizer.json; hub names and other models are
    not."""
    if path == "tiny":
        return True
    try:
        vocab = json.loads((Path(path).expanduser() / "tokenizer.json").read_text())["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return vocab == CHAR_VOCAB


def build_char_tokenizer():
    """The committed default tokenizer (assets/tokenizer): one token per printable ASCII character and
    newline, plus <pad>, <eos>, <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(CHAR_VOCAB, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def _check_model_path(path: str, flag: str):
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"{flag} {path} is not a model directory (no config.json); "
                            f"give a directory written by save_pretrained, e.g. a train_sft.py output")
    elif (path.startswith((".", "/", "~")) or path.count("/") > 1
          or path.endswith(("/", ".json", ".safetensors"))):
        raise UserError(f"{flag} {path} does not exist; check the path")


def _hf_load(fn, path, flag, **kw):
    """fn(path, **kw); what a damaged or mismatched model directory raises becomes one line (a UserError)."""
    from safetensors import SafetensorError

    try:
        return fn(path, **kw)
    except Exception as e:
        if isinstance(e, (OSError, ValueError)):
            hint = ""
        elif isinstance(e, SafetensorError):
            hint = "; a truncated or corrupt .safetensors file? copy it again"
        elif isinstance(e, RuntimeError) and "Error(s) in loading state_dict" in str(e):
            hint = "; do its config.json and weights belong together?"  # shapes that do not fit the config
        elif type(e) is Exception:  # the tokenizers library's error for a tokenizer.json it cannot parse
            hint = "; a damaged tokenizer.json?"
        else:
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = " ".join(lines[:2])[:300] if lines else type(e).__name__
        raise UserError(f"could not load {flag} {path}: {reason}{hint}") from None


def load_tokenizer(path: str, args, flag: str = "--model-path"):
    from transformers import AutoTokenizer

    if path == "tiny":
        path = TOKENIZER
    _check_model_path(path, flag) if not Path(path, "tokenizer_config.json").exists() else None
    tok = _hf_load(AutoTokenizer.from_pretrained, path, flag, trust_remote_code=args.trust_remote_code)
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer of {flag} {path} has no EOS token; "
                        f"set eos_token in its tokenizer_config.json")
    # handled everywhere: masks come from lengths and first EOS, never from pad ids
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


_hf_ds_config = None  # transformers holds its ZeRO-3 config weakly: keep it alive while models are built


def _zero3_construction(args, ctx):
    global _hf_ds_config
    if args.zero_stage == 3 and _hf_ds_config is None:
        from transformers.integrations import HfDeepSpeedConfig

        _hf_ds_config = HfDeepSpeedConfig(ds_config(args, ctx))


def dtype(args, ctx) -> torch.dtype:
    """--dtype: auto is bf16 on a GPU that has it and fp32 elsewhere (CPU bf16 matmuls are slow on most
    processors); bf16 and fp32 are taken as asked, also on CPU."""
    if args.dtype not in ("auto", "bf16", "fp32"):
        raise UserError(f"--dtype must be auto, bf16 or fp32, got {args.dtype}")
    if args.dtype == "auto":
        cuda = ctx.device.type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if args.dtype == "bf16" else torch.float32


def disable_dropout(model):
    """Every dropout rate to 0: nn.Dropout modules and the float rates attention modules read in their forward
    (Llama/Qwen `attention_dropout`, GPT-2's sdpa path reads `attn_dropout.p`). RL and preference losses
    compare log-probs of one model in two passes (sampler vs trainer, policy vs reference): with dropout on
    (GPT-2 and OPT ship 0.1) the PPO ratio of an unchanged policy is not 1. The config keeps its rates, so an
    export is unchanged."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for k in [k for k, v in vars(m).items() if "dropout" in k and isinstance(v, float)]:
            setattr(m, k, 0.0)
    model.dropout_off = True  # (LoRA adapters added later switch theirs off too)
    return model


def load_model(path: str, args, ctx, kind: str = "causal", flag: str = "--model-path", seed: int = 0,
               dropout: bool = False, trained_head: bool = False, lora: str = ""):
    """`_load_model`, then with --lora-rank or --lora-path (shared/lora.py): lora="train" for the model a
    script trains (LoRA adapters injected, --lora-path's or new ones; only they, and a score head, train),
    "new" for another trained model (ppo_max's critic: new adapters of --lora-rank, if > 0), "start" for a
    frozen copy of the starting model (--lora-path's adapter applied, frozen). Prints what it loaded:
    parameters, trainable ones."""
    from shared import lora as lora_

    global PROMPT_SHARING
    PROMPT_SHARING = getattr(args, "prompt_sharing", True)
    if lora:
        lora_.check_args(args, ctx)
    on = bool(lora) and (args.lora_rank > 0 if lora == "new" else lora_.enabled(args))
    model = _load_model(path, args, ctx, kind, flag, seed, dropout, trained_head,
                        lora_.quantization(args) if on else {})
    if on:
        model = lora_.apply(model, args, kind, trainable=lora != "start", from_path=lora != "new")
    trainable, total = lora_.count(model)
    if ctx.main:
        what = f"{'causal LM' if kind == 'causal' else 'score model'}, {total:,} parameters"
        if lora in ("train", "new"):
            what += f", {trainable:,} trainable ({100 * trainable / max(total, 1):.2f}%" + (
                ", LoRA adapters)" if lora_.is_lora(model) else ")")
        print(f"[model] loaded {flag} {path}: {what}", flush=True)
    return model


def _load_model(path: str, args, ctx, kind: str = "causal", flag: str = "--model-path", seed: int = 0,
                dropout: bool = False, trained_head: bool = False, quant: dict | None = None):
    """A causal LM (kind='causal') or a scalar-head model (kind='score': reward model or critic). With ZeRO-3
    the parameters are built sharded. `path='tiny'` builds the tiny default policy from its config in code.
    Dropout is switched off unless `dropout` (train_sft.py keeps the model's own).

    A score model started from a causal LM gets a fresh head: expected for a critic or train_rm.py's start
    model (transformers' load report saying so is dropped), refused with `trained_head` (a reward model must
    bring its trained head: a random one would be a random reward)."""
    import logging

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    _zero3_construction(args, ctx)
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    extra = {} if kind == "causal" else {"num_labels": 1}

    def no_head(what: str):
        return UserError(f"{flag} {path} has no trained score head: {what}, so its reward would come from a "
                         f"randomly initialised head; give a reward model from train_rm.py "
                         f"(or any 1-label sequence classifier)")

    if path == "tiny":
        if trained_head:
            raise no_head("it is the untrained tiny default model")
        tok = load_tokenizer("tiny", args)
        config = LlamaConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=None,
                             **TINY, **extra)
        torch.manual_seed(seed)  # the same initial weights on every rank
        model = auto.from_config(config, dtype=dtype(args, ctx))
    else:
        _check_model_path(path, flag)
        config = _hf_load(AutoConfig.from_pretrained, path, flag, trust_remote_code=args.trust_remote_code,
                          **extra)
        config.pad_token_id = None  # ZeRO-3 construction fails on the padding row; padding is masked anyway
        if kind == "causal":
            model = _hf_load(auto.from_pretrained, path, flag, config=config, dtype=dtype(args, ctx),
                             trust_remote_code=args.trust_remote_code, **(quant or {}))
            return model if dropout else disable_dropout(model)
        # transformers' load report (a warning), kept back until we know whether it says anything unexpected
        held = []

        class Hold(logging.Filter):
            def filter(self, record):
                if "LOAD REPORT" in str(record.msg):
                    held.append(record)
                    return False
                return True

        log, hold = logging.getLogger("transformers.modeling_utils"), Hold()
        log.addFilter(hold)
        try:
            model, info = _hf_load(auto.from_pretrained, path, flag, config=config, dtype=dtype(args, ctx),
                                   trust_remote_code=args.trust_remote_code, output_loading_info=True,
                                   **(quant or {}))
        finally:
            log.removeFilter(hold)
        base = model.base_model_prefix + "."
        missing, unexpected = set(info.get("missing_keys", ())), set(info.get("unexpected_keys", ()))
        head = {k for k in missing if not k.startswith(base)}  # e.g. score.weight: not in the checkpoint
        if head and trained_head:
            raise no_head(f"it looks like a causal LM (a policy or SFT model; "
                          f"{', '.join(sorted(head))} is not in its checkpoint)")
        # expected: only the head is new, and only a causal LM head (lm_head.weight) is left over
        if missing - head or info.get("mismatched_keys") or any(k.startswith(base) for k in unexpected):
            for record in held:
                log.handle(record)
    return model if dropout else disable_dropout(model)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded prompt sees the same positions as an unpadded
    one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# --no-prompt-sharing (set by load_model) turns it off: one plain forward, for debugging
PROMPT_SHARING = True


def response_forward(call, input_ids, attention_mask, prompt_len: int, field: str = "logits",
                     to_end: bool = False) -> torch.Tensor:
    """`call(...)`'s output `field` at positions prompt_len - 1 .. L - 2: the ones that predict (or, for a
    critic, value) the response tokens of a rollout laid out as [left-padded prompt | response]; to L - 1 with
    to_end.

    When prompts repeat (n samples per prompt), each distinct prompt is run once and its key/value cache is
    shared by its samples, which then run only their response tokens: the same numbers up to float rounding
    (and the same gradients, through the shared cache), with (n - 1) / n of the prompt tokens not computed,
    forward and backward. Rows may come in any order (e.g. a shuffled PPO minibatch). --no-prompt-sharing:
    always the plain forward."""
    pos = position_ids(attention_mask)
    prompts, inverse = torch.unique(
        torch.cat([input_ids[:, :prompt_len], attention_mask[:, :prompt_len]], 1), dim=0, return_inverse=True)
    module = getattr(call, "module", call)
    end = input_ids.shape[1] - (0 if to_end else 1)
    share = (PROMPT_SHARING and 2 * len(prompts) <= len(input_ids) and end > prompt_len
             # (no cache then)
             and not (module.training and getattr(module, "is_gradient_checkpointing", False)))
    # ZeRO-3: each call gathers parameters, so every rank must make the same calls: all or none share
    if hasattr(next(module.parameters()), "ds_id"):
        share = bool(dist.all_reduce(torch.tensor([float(share)]), "min").item())
    # the LM head (vocabulary-sized, often the largest matrix) runs only on the positions
    # whose logits are used
    trim = field == "logits" and _takes(type(module), "logits_to_keep")
    cache = None
    if share:
        # one row holding each distinct prompt
        first = torch.empty(len(prompts), dtype=torch.long, device=inverse.device).scatter_(
            0, inverse, torch.arange(len(inverse), device=inverse.device))
        head = call(input_ids=input_ids[first, :prompt_len],
                    attention_mask=attention_mask[first, :prompt_len],
                    position_ids=pos[first, :prompt_len], use_cache=True,
                    **({"logits_to_keep": 1} if trim else {}))
        cache = head.past_key_values
    if cache is None:  # nothing to share (or a model that returns no cache): one plain forward
        k = input_ids.shape[1] - prompt_len + 1  # positions prompt_len - 1 .. L - 1
        out = call(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                   **({"logits_to_keep": k} if trim else {}))
        return getattr(out, field)[:, -k:][:, : end - prompt_len + 1]
    cache.reorder_cache(inverse)  # (prompts, ...) -> (rows, ...), differentiable
    tail = call(input_ids=input_ids[:, prompt_len:end], attention_mask=attention_mask[:, :end],
                position_ids=pos[:, prompt_len:end], past_key_values=cache, use_cache=True)
    return torch.cat([getattr(head, field)[inverse, -1:], getattr(tail, field)], 1)


@functools.cache
def _takes(cls, name: str) -> bool:
    """Whether the forward of model class `cls` takes keyword `name` (transformers' own models do; remote code
    may not)."""
    return name in inspect.signature(cls.forward).parameters


def token_scores(model, input_ids, attention_mask, prompt_len: int | None = None, to_end: bool = False):
    """Scalar head of a score model on every position, (batch, seq_len); a reward is read at the last real
    token. With `prompt_len` ([prompt | response] rows): on positions prompt_len - 1 .. L - 2 (those a critic
    uses), or to L - 1 with to_end, with repeated prompts computed once (`response_forward`)."""
    model = getattr(model, "module", model)
    base = getattr(model, model.base_model_prefix)
    if prompt_len is not None:
        hidden = response_forward(base, input_ids, attention_mask, prompt_len, "last_hidden_state", to_end)
    else:
        hidden = base(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids(attention_mask)).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


def score_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Where a reward model's score is read in each row (right or left padding): the last attended token that
    is not the pad token. That is the token transformers' *ForSequenceClassification reads (the last token !=
    config.pad_token_id, and export_hf writes the tokenizer's pad id there), so an exported reward model
    scores the same in the project, in plain transformers and in any trainer built on it. With a distinct pad
    token it is the last real token (the EOS of a finished response); with pad == eos (SmolLM2, the Qwen chat
    models, and every tokenizer given pad := eos) it is the token before the EOS: training and scoring both
    read there."""
    keep = attention_mask.bool() & (input_ids != pad_id) if pad_id is not None else attention_mask.bool()
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (pos * keep.long()).argmax(-1)


# ---------------------------------------------------------------------------------------------- DeepSpeed


def ds_config(args, ctx, micro_batch_size: int = 1, grad_accum: int = 1, lr: float = 0.0) -> dict:
    cuda = ctx.device.type == "cuda"
    zero = {"stage": args.zero_stage}
    if args.offload and args.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu"}
        if args.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * ctx.world,
        "gradient_clipping": args.max_grad_norm,
        "bf16": {"enabled": dtype(args, ctx) == torch.bfloat16},
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        # torch's fused AdamW (transformers' default too): no 2-4 minute compile of DeepSpeed's fused/CPU
        # Adam, and ~3x faster than torch's per-parameter loop on CPU. Offload on GPU uses DeepSpeed's CPU
        # Adam (much faster).
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.0,
                                                  **({"torch_adam": True, "fused": True}
                                                     if not (cuda and args.offload) else {})}},
        "steps_per_print": 10**9,
    }


def wrap_trainable(model, args, ctx, lr: float, micro_batch_size: int, grad_accum: int, total_steps: int):
    """DeepSpeed engine with AdamW and the warmup (+ optional linear decay) schedule; `engine.step()` applies
    it every `grad_accum` micro-batches."""
    import deepspeed

    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        # frozen embeddings: the checkpointed blocks' inputs must carry grad (as peft asks)
        if "lora" in vars(model):
            model.enable_input_require_grads()

    def schedule(step):
        warm = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps > 0 else 1.0
        decay = max(0.0, 1 - step / max(1, total_steps)) if args.lr_decay else 1.0
        return warm * decay

    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config(args, ctx, micro_batch_size, grad_accum, lr),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    # one rank: nothing to average, but DeepSpeed would still flatten, "all-reduce" and copy back every
    # gradient (~10% of a CPU step)
    if ctx.world == 1 and args.zero_stage == 0:
        engine.enable_backward_allreduce = False
    return engine


def train_micro_batch(model, share: torch.Tensor, ctx, step: int, last: bool) -> float | None:
    """Backward and step for one micro-batch: the one place that holds the loss contract with DeepSpeed.

    `share` is this micro-batch's share of the optimizer step's loss: the shares of all micro-batches on all
    ranks sum to the loss the step minimises (e.g. a micro-batch mean x its rows / the rows of the whole
    batch, all ranks). DeepSpeed divides every backward by its accumulation count and averages gradients over
    ranks, so the share is multiplied back by both here. `last`: the script's own count says this micro-batch
    ends the optimizer step; DeepSpeed must agree, else the script's micro-batching and DeepSpeed's
    accumulation count have drifted apart (a changed batch size in a copy) and the gradients would be scaled
    wrong: that stops the run.
    Returns the gradient norm (before clipping) of the step `last` ends, else None; a non-finite one stops
    the run."""
    if not torch.isfinite(share):
        raise dist.Diverged(f"non-finite loss at step {step}; stopping (the last checkpoint is intact)")
    if model.is_gradient_accumulation_boundary() != last:
        raise RuntimeError(f"loss contract broken: the script's micro-batch count per optimizer step "
                           f"disagrees with DeepSpeed's gradient accumulation "
                           f"({model.gradient_accumulation_steps()} micro-batches)")
    model.backward(share * model.gradient_accumulation_steps() * ctx.world)
    norm = None
    # DeepSpeed reports no norm without ZeRO: the reduced grads
    if last and model.zero_optimization_stage() == 0:
        grads = [p.grad.detach().float().norm() for p in model.module.parameters() if p.grad is not None]
        norm = torch.stack(grads).norm().item() if grads else 0.0
    model.step()
    if last:
        norm = norm if norm is not None else model.get_global_grad_norm()
        if norm is not None and not math.isfinite(float(norm)):
            raise dist.Diverged(f"non-finite gradient norm at step {step}; stopping (the last checkpoint is "
                                f"intact)")
    return None if norm is None else float(norm)


def wrap_frozen(model, args, ctx):
    """A frozen model (reference, reward) for inference: sharded like the trainable ones under ZeRO-3."""
    model.requires_grad_(False).eval()
    if args.zero_stage == 3:
        import deepspeed

        cfg = ds_config(args, ctx)
        cfg.pop("optimizer")
        cfg["zero_optimization"].pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=model, config=cfg)
        engine.eval()
        return engine
    return model.to(ctx.device)


def gathered(model):
    """Context manager giving full parameters under ZeRO-3 (for generation and export); a no-op otherwise."""
    import contextlib

    import deepspeed

    params = [p for p in getattr(model, "module", model).parameters() if hasattr(p, "ds_id")]
    return (deepspeed.zero.GatheredParameters(params, modifier_rank=None) if params
            else contextlib.nullcontext())


# ---------------------------------------------------------------------------------------------- saving


# On --resume these flags may differ from the run's args.json: they do not change what it trains
# (RunArgs.resume lists them). --steps only without --lr-decay, whose schedule spans the steps. Any other
# change is refused.
RESUME_MAY_CHANGE = ("steps", "save_every", "stop_after", "eval_every", "log_every", "track", "wandb_project",
                     "output_dir", "resume", "overwrite", "local_rank")
COMPLETE = "COMPLETE"  # written last into checkpoint.tmp: the checkpoint is whole
_faults = {}


def _fault(point: str, on: bool = True):
    """Fault injection for tests/test_recovery.py: RLHF_FAULT=POINT:K kills this process (SIGKILL, like kill
    -9) the K-th time it reaches POINT (export-tmp, export-partial, checkpoint-tmp, checkpoint-marked,
    checkpoint-renamed, checkpoint-replaced, checkpoint-discard)."""
    point_k = os.environ.get("RLHF_FAULT", "").rpartition(":")
    if on and point_k[0] == point:
        _faults[point] = _faults.get(point, 0) + 1
        if _faults[point] == int(point_k[2]):
            os.kill(os.getpid(), signal.SIGKILL)


def _check_writable(out: Path):
    """A file where the output directory (or one of its parents) should be, or a place this process cannot
    write: one line, before anything is written."""
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise UserError(f"--output-dir {out}: {p} is a file, not a directory; choose another path")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {out}: {p} is not writable (read-only, or not yours); "
                        f"choose another path")


def _whole_step(d: Path):
    """The step of checkpoint directory `d` if it is whole, else None. checkpoint/ is whole when it holds
    state.json (it only ever appears by renaming a whole one); checkpoint.tmp and checkpoint.old need the
    COMPLETE marker."""
    if not (d / "state.json").is_file() or (d.name != "checkpoint" and not (d / COMPLETE).is_file()):
        return None
    try:
        return int(json.loads((d / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _newest_checkpoint(out: Path):
    """(directory, step) of the newest whole checkpoint among checkpoint, checkpoint.tmp and checkpoint.old (a
    kill inside save_checkpoint may leave any of them), or (None, None)."""
    found = [(step, d) for d in (out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old")
             if (step := _whole_step(d)) is not None]
    return max(found, key=lambda f: f[0])[::-1] if found else (None, None)  # a tie: checkpoint/ first


def _discard(d: Path, fault: bool = False):
    """Delete a checkpoint directory, its marks of wholeness first: one whose deletion is cut short is never
    taken for whole."""
    if d.exists():
        for name in (COMPLETE, "state.json"):
            (d / name).unlink(missing_ok=True)
        _fault("checkpoint-discard", fault)
        shutil.rmtree(d, ignore_errors=True)


def _commit(out: Path, src: Path, fault: bool = False):
    """Make the whole checkpoint `src` (checkpoint.tmp, or on resume whichever `_newest_checkpoint` found) the
    checkpoint/ directory and delete the other copies. Killed anywhere in here, it leaves the newest whole
    checkpoint for `_newest_checkpoint` to find."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    if src == tmp:
        _discard(old)
        if final.exists():
            os.replace(final, old)
            _fault("checkpoint-renamed", fault)
        os.replace(tmp, final)
        _fault("checkpoint-replaced", fault)
    elif src == old:
        _discard(tmp)
        _discard(final)
        os.replace(old, final)
    _discard(old, fault)
    _discard(tmp)


def _fsync_tree(d: Path):
    """Flush every file and directory under `d` to disk (a marker written after it then means whole, also
    after a power loss)."""
    for root, _, files in os.walk(d):
        for name in [*files, "."]:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _same(a, b) -> bool:
    """Two recorded flag values are the same (a path also when spelled differently)."""
    return a == b or (isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b)
                      and os.path.samefile(a, b))


def _check_resume(args, out: Path, ckpt: Path, step: int, ctx) -> dict:
    """--resume continues the run that args.json records: refuse a flag change that would alter its training
    (any flag not in RESUME_MAY_CHANGE), --steps or --stop-after not past the checkpoint, another number of
    ranks. Returns the changes allowed, {flag: [recorded, now]}."""
    import dataclasses

    name = lambda k: "--" + k.replace("_", "-")  # noqa: E731
    now = json.loads(json.dumps(vars(args), default=str))
    try:
        recorded = json.loads((out / "args.json").read_text())
    except (OSError, ValueError):
        recorded = now  # (a run of this project always has one)
    defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(args)
                                      if f.default is not dataclasses.MISSING}, default=str))
    changed = {}
    for k, v in now.items():
        # a flag newer than the run: its default then
        old = recorded.get(k, defaults.get(k, "(not recorded)"))
        if not _same(old, v):
            changed[k] = [old, v]
    may = [k for k in RESUME_MAY_CHANGE if not (k == "steps" and args.lr_decay)]
    refused = {k: v for k, v in changed.items() if k not in may}
    if refused:
        raise UserError(f"--resume would change how the run in {out} trains: "
                        f"{', '.join(f'{name(k)} {o} -> {n}' for k, (o, n) in refused.items())}"
                        f" (its args.json); resume with the recorded values or start a new run (only "
                        f"{', '.join(name(k) for k in may if k not in ('resume', 'overwrite', 'local_rank'))}"
                        f" may change)")
    if getattr(args, "steps", step) < step:
        raise UserError(f"--resume: --steps {args.steps} is below the checkpoint's step {step}")
    if 0 < args.stop_after <= step:
        raise UserError(f"--resume: --stop-after {args.stop_after} is not after the checkpoint's "
                        f"step {step}; give a later step, or leave it out to run to the end")
    ranks = len(list(ckpt.glob("rng_rank*.pt")))
    if ranks and ranks != ctx.world:
        raise UserError(f"--resume: the checkpoint in {out} was written by {ranks} ranks "
                        f"and this run has {ctx.world}; resume with {ranks} "
                        f"(each rank has its own share of the data and its own random stream)")
    return {k: v for k, v in changed.items() if k not in ("resume", "local_rank")}


def prepare_output_dir(args, ctx, script: str) -> Path:
    """Resolve --output-dir; refuse a file, a place this process cannot write, and one that holds files unless
    --overwrite (only a previous run) or --resume. With --resume: the flags must match args.json
    (`_check_resume`); the newest whole checkpoint becomes checkpoint/, what the interrupted run left behind
    goes (temporary directories, metrics.jsonl rows after the checkpoint's step), and a line with the
    checkpoint's step and the flags that changed is appended to resumes.jsonl. args.json stays the record of
    the run as first started."""
    if not args.output_dir:
        if args.resume:
            raise UserError("--resume needs --output-dir (the run to continue)")
        stamp = dist.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
        args.output_dir = f"runs/{script}__{args.seed}__{stamp}"
    out = Path(args.output_dir)
    _check_writable(out)
    busy = out.exists() and any(out.iterdir())
    if args.resume:
        ckpt, step = _newest_checkpoint(out)
        if ckpt is None:
            raise UserError(f"--resume: {out} has no checkpoint to continue from "
                            f"(runs save one with --save-every, --stop-after, "
                            f"or when stopped by SIGTERM or SIGINT)")
        changed = _check_resume(args, out, ckpt, step, ctx)
    elif busy and not args.overwrite:
        raise UserError(f"--output-dir {out} already holds files; pass --overwrite to replace that run, "
                        f"--resume to continue it, or choose another directory")
    elif busy and not (out / "args.json").exists():
        raise UserError(f"--output-dir {out} holds files that are not a run of this project; "
                        f"refusing to delete them")
    dist.barrier()
    error = None
    if ctx.main:
        try:
            if args.resume:
                _commit(out, ckpt)
                for t in [*out.glob(".*.export.tmp"), *out.glob("*/.*.export.tmp")]:  # exports cut short
                    shutil.rmtree(t, ignore_errors=True)
                tracking.truncate_metrics(out, step)
                with open(out / "resumes.jsonl", "a") as f:
                    f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "step": step,
                                        "world": ctx.world, "changed": changed}) + "\n")
            else:
                if busy and args.overwrite:
                    for f in out.iterdir():
                        shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()
                out.mkdir(parents=True, exist_ok=True)
                (out / "args.json.tmp").write_text(json.dumps(vars(args), indent=1, default=str))
                os.replace(out / "args.json.tmp", out / "args.json")
        except OSError as e:
            error = f"--output-dir {out}: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}"
    error = dist.broadcast_object(error)
    if error:
        raise UserError(error)
    return out


def export_hf(model, tok, path: Path, ctx, config_updates: dict | None = None):
    """Save the full model (gathered under ZeRO-3) and tokenizer in HF format. Into a new directory through a
    temporary name and a rename; into an existing directory file by file, each replaced atomically. The
    temporary directory, .<name>.export.tmp, lies inside the run directory: --resume deletes one a kill left.
    A LoRA model: the merged full model (each weight W + scaling B @ A, computed beside the trained copy) as
    above, and the adapter in peft format in <path>/adapter; with --save-adapter-only the adapter and the
    tokenizer only."""
    from shared import lora

    model = getattr(model, "module", model)
    info = vars(model).get("lora")
    adapter = lora.adapter_weights(model) if info else None  # (gathered under ZeRO-3: every rank takes part)
    state = {}
    if not (info and info.adapter_only):
        for name, tensor in lora.merged_weights(model):
            if ctx.main:
                state[name] = tensor.cpu()
    if ctx.main:
        path = Path(path)
        # inside the run directory
        tmp = (path if path.exists() else path.parent) / f".{path.name}.export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.config.pad_token_id = tok.pad_token_id
        for k, v in (config_updates or {}).items():
            setattr(model.config, k, v)
        if state:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if adapter is not None:
            lora.save_adapter(model, {k: v.cpu() for k, v in adapter.items()}, tmp / "adapter")
        model.config.pad_token_id = None
        tok.save_pretrained(tmp)
        _fault("export-tmp")
        if path.exists():
            for f in list(tmp.iterdir()):
                if f.is_dir() and (path / f.name).is_dir():  # adapter/ of an earlier export
                    shutil.rmtree(path / f.name)
                os.replace(f, path / f.name)
                _fault("export-partial")
            tmp.rmdir()
        else:
            os.replace(tmp, path)
    dist.barrier()


def save_checkpoint(out: Path, engines: dict, state: dict, ctx):
    """Resumable checkpoint: every engine (weights, optimizer, LR schedule), every rank's RNG state and the
    loop state (step, running statistics...). Written to checkpoint.tmp, flushed to disk, marked whole by a
    COMPLETE file written last, then renamed over checkpoint (`_commit`). --resume takes the newest whole one
    it finds."""
    tmp = out / "checkpoint.tmp"
    if ctx.main:
        _discard(tmp)
    dist.barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(tmp), tag=name)
    torch.save(dist.rng_state(), tmp / f"rng_rank{ctx.rank}.pt")
    dist.barrier()
    if ctx.main:
        _fault("checkpoint-tmp")
        (tmp / "state.json").write_text(json.dumps(state))
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text(f"{state['step']}\n")
        _fault("checkpoint-marked")
        _commit(out, tmp, fault=True)
    dist.barrier()


def periodic_save(args, out: Path, step: int, engines: dict, state: dict, tok, ctx) -> bool:
    """Called by every rank at the end of every step. --save-every: an HF export of the first engine to
    step_N, then a resumable checkpoint (in that order: a kill before the checkpoint is replaced redoes the
    step and its export). --stop-after, or a SIGTERM/SIGINT that any rank received during the step
    (`dist.stop_signal`): a checkpoint, then True (the script returns, to be continued with --resume; after a
    signal the exit code is 128 + signal)."""
    due = bool(args.save_every) and step % args.save_every == 0
    sig = dist.stop_signal()  # all ranks agree, so all stop after this same step
    stop = bool(sig) or step == args.stop_after
    if due:
        export_hf(next(iter(engines.values())), tok, out / f"step_{step}", ctx)
    if due or stop:
        save_checkpoint(out, engines, state, ctx)
    if sig and ctx.main:
        print(f"stopped by {signal.Signals(sig).name} at step {step}; "
              f"resume with --resume --output-dir {out}", file=sys.stderr, flush=True)
    elif step == args.stop_after and ctx.main:
        print(f"stopped after step {step}; continue with --resume --output-dir {out}", flush=True)
    return stop


def load_checkpoint(out: Path, engines: dict, ctx) -> dict:
    final = out / "checkpoint"
    for name, engine in engines.items():
        engine.load_checkpoint(str(final), tag=name)
    rng = final / f"rng_rank{ctx.rank}.pt"
    if not rng.exists():
        raise UserError(f"--resume: {final} was written by a run with fewer ranks; "
                        f"resume with the same number")
    dist.set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((final / "state.json").read_text())
