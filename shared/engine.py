"""Models and DeepSpeed: loading, the ZeRO config, wrapping trainable and frozen models, HF export, resumable
checkpoints and the output directory."""
import functools
import inspect
import json
import os
import shutil
import time
from pathlib import Path

import torch

from shared import dist
from shared.dist import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_SFT, DEFAULT_RM, TOKENIZER = str(ASSETS / "sft"), str(ASSETS / "rm"), str(ASSETS / "tokenizer")
# The tiny default policy (`--model-path tiny`): a 4-layer Llama over a character vocabulary (~0.8M parameters).
TINY = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)


def build_char_tokenizer():
    """The committed default tokenizer (assets/tokenizer): one token per printable ASCII character and newline,
    plus <pad>, <eos>, <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "\n": 3, **{chr(i): i - 28 for i in range(32, 127)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _check_model_path(path: str, flag: str):
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"{flag} {path} is not a model directory (no config.json); give a directory written by "
                            f"save_pretrained, e.g. a train_sft.py output")
    elif path.startswith((".", "/", "~")) or path.count("/") > 1 or path.endswith(("/", ".json", ".safetensors")):
        raise UserError(f"{flag} {path} does not exist; check the path")


def _hf_load(fn, path, flag, **kw):
    try:
        return fn(path, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load {flag} {path}: {str(e).splitlines()[0]}") from None


def load_tokenizer(path: str, args, flag: str = "--model-path"):
    from transformers import AutoTokenizer

    if path == "tiny":
        path = TOKENIZER
    _check_model_path(path, flag) if not Path(path, "tokenizer_config.json").exists() else None
    tok = _hf_load(AutoTokenizer.from_pretrained, path, flag, trust_remote_code=args.trust_remote_code)
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer of {flag} {path} has no EOS token; set eos_token in its tokenizer_config.json")
    if tok.pad_token_id is None:  # handled everywhere: masks come from lengths and first EOS, never from pad ids
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
    (Llama/Qwen `attention_dropout`, GPT-2's sdpa path reads `attn_dropout.p`). RL and preference losses compare
    log-probs of one model in two passes (sampler vs trainer, policy vs reference): with dropout on (GPT-2 and OPT
    ship 0.1) the PPO ratio of an unchanged policy is not 1. The config keeps its rates, so an export is unchanged."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for k in [k for k, v in vars(m).items() if "dropout" in k and isinstance(v, float)]:
            setattr(m, k, 0.0)
    return model


def load_model(path: str, args, ctx, kind: str = "causal", flag: str = "--model-path", seed: int = 0,
               dropout: bool = False):
    """A causal LM (kind='causal') or a scalar-head model (kind='score': reward model or critic). With ZeRO-3 the
    parameters are built sharded. `path='tiny'` builds the tiny default policy from its config in code. Dropout is
    switched off unless `dropout` (train_sft.py keeps the model's own)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    _zero3_construction(args, ctx)
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    extra = {} if kind == "causal" else {"num_labels": 1}
    if path == "tiny":
        tok = load_tokenizer("tiny", args)
        config = LlamaConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=None, **TINY, **extra)
        torch.manual_seed(seed)  # the same initial weights on every rank
        model = auto.from_config(config, dtype=dtype(args, ctx))
    else:
        _check_model_path(path, flag)
        config = _hf_load(AutoConfig.from_pretrained, path, flag, trust_remote_code=args.trust_remote_code, **extra)
        config.pad_token_id = None  # ZeRO-3 construction fails on the padding row; padding is masked anyway
        model = _hf_load(auto.from_pretrained, path, flag, config=config, dtype=dtype(args, ctx),
                         trust_remote_code=args.trust_remote_code)
    return model if dropout else disable_dropout(model)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded prompt sees the same positions as an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_forward(call, input_ids, attention_mask, prompt_len: int, field: str = "logits",
                     to_end: bool = False) -> torch.Tensor:
    """`call(...)`'s output `field` at positions prompt_len - 1 .. L - 2: the ones that predict (or, for a critic,
    value) the response tokens of a rollout laid out as [left-padded prompt | response]; to L - 1 with to_end.

    When prompts repeat (n samples per prompt), each distinct prompt is run once and its key/value cache is shared by
    its samples, which then run only their response tokens: the same numbers up to float rounding (and the same
    gradients, through the shared cache), with (n - 1) / n of the prompt tokens not computed, forward and backward.
    Rows may come in any order (e.g. a shuffled PPO minibatch)."""
    pos = position_ids(attention_mask)
    prompts, inverse = torch.unique(torch.cat([input_ids[:, :prompt_len], attention_mask[:, :prompt_len]], 1), dim=0,
                                    return_inverse=True)
    module = getattr(call, "module", call)
    end = input_ids.shape[1] - (0 if to_end else 1)
    share = (2 * len(prompts) <= len(input_ids) and end > prompt_len
             and not (module.training and getattr(module, "is_gradient_checkpointing", False)))  # (no cache then)
    if hasattr(next(module.parameters()), "ds_id"):  # ZeRO-3: each call gathers parameters, so every rank must make
        share = bool(dist.all_reduce(torch.tensor([float(share)]), "min").item())  # the same calls: all or none share
    trim = field == "logits" and _takes(type(module), "logits_to_keep")  # the LM head (vocabulary-sized, often the
    cache = None  # largest matrix) runs only on the positions whose logits are used
    if share:
        first = torch.empty(len(prompts), dtype=torch.long, device=inverse.device).scatter_(
            0, inverse, torch.arange(len(inverse), device=inverse.device))  # one row holding each distinct prompt
        head = call(input_ids=input_ids[first, :prompt_len], attention_mask=attention_mask[first, :prompt_len],
                    position_ids=pos[first, :prompt_len], use_cache=True, **({"logits_to_keep": 1} if trim else {}))
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
    """Whether the forward of model class `cls` takes keyword `name` (transformers' own models do; remote code may
    not)."""
    return name in inspect.signature(cls.forward).parameters


def token_scores(model, input_ids, attention_mask, prompt_len: int | None = None, to_end: bool = False):
    """Scalar head of a score model on every position, (batch, seq_len); a reward is read at the last real token.
    With `prompt_len` ([prompt | response] rows): on positions prompt_len - 1 .. L - 2 (those a critic uses), or to
    L - 1 with to_end, with repeated prompts computed once (`response_forward`)."""
    model = getattr(model, "module", model)
    base = getattr(model, model.base_model_prefix)
    if prompt_len is not None:
        hidden = response_forward(base, input_ids, attention_mask, prompt_len, "last_hidden_state", to_end)
    else:
        hidden = base(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids(attention_mask)).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


def score_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Where a reward model's score is read in each row (right or left padding): the last attended token that is not
    the pad token. That is the token transformers' *ForSequenceClassification reads (the last token !=
    config.pad_token_id, and export_hf writes the tokenizer's pad id there), so an exported reward model scores the
    same in the project, in plain transformers and in any trainer built on it. With a distinct pad token it is the
    last real token (the EOS of a finished response); with pad == eos (SmolLM2, the Qwen chat models, and every
    tokenizer given pad := eos) it is the token before the EOS: training and scoring both read there."""
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
        # torch's fused AdamW (transformers' default too): no 2-4 minute compile of DeepSpeed's fused/CPU Adam, and
        # ~3x faster than torch's per-parameter loop on CPU. Offload on GPU uses DeepSpeed's CPU Adam (much faster).
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0,
                                                  **({"torch_adam": True, "fused": True}
                                                     if not (cuda and args.offload) else {})}},
        "steps_per_print": 10**9,
    }


def wrap_trainable(model, args, ctx, lr: float, micro_batch_size: int, grad_accum: int, total_steps: int):
    """DeepSpeed engine with AdamW and the warmup (+ optional linear decay) schedule; `engine.step()` applies it
    every `grad_accum` micro-batches."""
    import deepspeed

    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    def schedule(step):
        warm = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps > 0 else 1.0
        decay = max(0.0, 1 - step / max(1, total_steps)) if args.lr_decay else 1.0
        return warm * decay

    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config(args, ctx, micro_batch_size, grad_accum, lr),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    if ctx.world == 1 and args.zero_stage == 0:  # one rank: nothing to average, but DeepSpeed would still flatten,
        engine.enable_backward_allreduce = False  # "all-reduce" and copy back every gradient (~10% of a CPU step)
    return engine


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
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None) if params else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- saving


def prepare_output_dir(args, ctx, script: str) -> Path:
    """Resolve --output-dir; refuse one that holds files unless --overwrite (only a previous run) or --resume."""
    if not args.output_dir:
        if args.resume:
            raise UserError("--resume needs --output-dir (the run to continue)")
        stamp = dist.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
        args.output_dir = f"runs/{script}__{args.seed}__{stamp}"
    out = Path(args.output_dir)
    busy = out.exists() and any(out.iterdir())
    if args.resume:
        if not (out / "checkpoint" / "state.json").exists():
            raise UserError(f"--resume: {out} has no checkpoint to continue from (runs save one with --save-every)")
    elif busy and not args.overwrite:
        raise UserError(f"--output-dir {out} already holds files; pass --overwrite to replace that run, --resume to "
                        f"continue it, or choose another directory")
    elif busy and not (out / "args.json").exists():
        raise UserError(f"--output-dir {out} holds files that are not a run of this project; refusing to delete them")
    dist.barrier()
    if ctx.main:
        if busy and args.overwrite and not args.resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1, default=str))
    dist.barrier()
    return out


def export_hf(model, tok, path: Path, ctx, config_updates: dict | None = None):
    """Save the full model (gathered under ZeRO-3) and tokenizer in HF format. Into a new directory through a
    temporary name and a rename; into an existing run directory file by file, each replaced atomically."""
    import deepspeed

    model = getattr(model, "module", model)
    state = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            if ctx.main:
                state[name] = p.detach().cpu().clone()
    if ctx.main:
        path = Path(path)
        tmp = path.parent / f".{path.name}.export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.config.pad_token_id = tok.pad_token_id
        for k, v in (config_updates or {}).items():
            setattr(model.config, k, v)
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        model.config.pad_token_id = None
        tok.save_pretrained(tmp)
        if path.exists():
            for f in tmp.iterdir():
                os.replace(f, path / f.name)
            tmp.rmdir()
        else:
            os.replace(tmp, path)
    dist.barrier()


def save_checkpoint(out: Path, engines: dict, state: dict, ctx):
    """Resumable checkpoint: every engine (weights, optimizer, LR schedule), every rank's RNG state and the loop
    state (step, running statistics...). Written to checkpoint.tmp, then renamed over checkpoint."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    if ctx.main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(tmp), tag=name)
    torch.save(dist.rng_state(), tmp / f"rng_rank{ctx.rank}.pt")
    dist.barrier()
    if ctx.main:
        (tmp / "state.json").write_text(json.dumps(state))
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def periodic_save(args, out: Path, step: int, engines: dict, state: dict, tok, ctx) -> bool:
    """--save-every: a resumable checkpoint plus an HF export of the first engine to step_N; --stop-after: a checkpoint,
    then True (the script returns, to be continued with --resume)."""
    due = bool(args.save_every) and step % args.save_every == 0
    if due or step == args.stop_after:
        save_checkpoint(out, engines, state, ctx)
    if due:
        export_hf(next(iter(engines.values())), tok, out / f"step_{step}", ctx)
    if step == args.stop_after and ctx.main:
        print(f"stopped after step {step}; continue with --resume --output-dir {out}", flush=True)
    return step == args.stop_after


def load_checkpoint(out: Path, engines: dict, ctx) -> dict:
    final = out / "checkpoint"
    for name, engine in engines.items():
        engine.load_checkpoint(str(final), tag=name)
    rng = final / f"rng_rank{ctx.rank}.pt"
    if not rng.exists():
        raise UserError(f"--resume: {final} was written by a run with fewer ranks; resume with the same number")
    dist.set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((final / "state.json").read_text())
