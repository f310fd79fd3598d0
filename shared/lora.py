"""LoRA (peft) for every script: --lora-rank puts low-rank adapters on the model a script trains (policy,
critic, reward model), so only the adapters (and a reward model's or critic's score head) are trained and held
in the optimizer.

The adapters are injected into the transformers model itself (peft's `get_peft_model`, then its base model):
every forward, generate, score head and DeepSpeed wrapper of the scripts sees the same class as without LoRA.
The PeftModel is kept beside it (`model.peft_model`) for what needs it: switching the adapters off, saving the
adapter.

    reference(policy)     the policy with its adapters off (peft's `disable_adapter()`): the starting model,
    no copy merged_weights(model) (name, tensor) as the base architecture names them, each LoRA weight W +
    scaling B @ A
                          computed beside the trained copy (never merged in place): HF export and the vLLM
                          push
    adapter_weights(model) the adapter's tensors (peft names), for `<out>/adapter`
"""
import contextlib
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from shared.dist import UserError


def enabled(args) -> bool:
    return getattr(args, "lora_rank", 0) > 0 or bool(getattr(args, "lora_path", ""))


def check_args(args, ctx):
    """The LoRA flags, before anything is loaded or written."""
    if args.lora_rank < 0:
        raise UserError(f"--lora-rank must be >= 0 (0: full fine-tuning), got {args.lora_rank}")
    if args.lora_path and not Path(args.lora_path, "adapter_config.json").is_file():
        raise UserError(f"--lora-path {args.lora_path} is not a peft adapter directory "
                        f"(no adapter_config.json); "
                        f"give the adapter/ directory of an earlier --lora-rank run")
    if (args.save_adapter_only or args.load_in_4bit) and not enabled(args):
        flag = "--save-adapter-only" if args.save_adapter_only else "--load-in-4bit"
        raise UserError(f"{flag} needs LoRA: add --lora-rank (e.g. 16)")
    if args.load_in_4bit and ctx.device.type != "cuda":
        raise UserError("--load-in-4bit (QLoRA, bitsandbytes) needs a CUDA GPU; "
                        "on CPU drop it and use --lora-rank")
    if args.load_in_4bit and args.zero_stage == 3:
        raise UserError("--load-in-4bit cannot be sharded by ZeRO-3; use --zero-stage 0-2")


def quantization(args) -> dict:
    """from_pretrained keywords for QLoRA: 4-bit NF4 base weights, bf16 compute (GPU only; see check_args)."""
    if not args.load_in_4bit:
        return {}
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True,
                                                      bnb_4bit_compute_dtype=torch.bfloat16)}


def apply(model, args, kind: str = "causal", trainable: bool = True, from_path: bool = True):
    """Inject adapters into `model` (in place) and return it: new adapters from the --lora-* flags, or the
    trainable adapter of --lora-path. A score model (reward model, critic) also trains its head
    (`modules_to_save`). Everything else is frozen. Dropout that the script switched off stays off in the
    adapters too. With trainable=False: a frozen copy of the starting model, base + --lora-path's adapter
    (nothing without --lora-path). With from_path=False new adapters even when --lora-path is given (ppo_max's
    critic)."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if not trainable:
        if not args.lora_path:
            return model
        model = PeftModel.from_pretrained(model, args.lora_path).get_base_model()
        return disable_dropout(model) if getattr(model, "dropout_off", False) else model
    if args.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    if args.lora_path and from_path:
        peft_model = PeftModel.from_pretrained(model, args.lora_path, is_trainable=True)
    else:
        names = args.lora_target_modules
        targets = names if names == "all-linear" else [n.strip() for n in names.split(",") if n.strip()]
        config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=targets, modules_to_save=["score"] if kind == "score" else None)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as e:
            raise UserError(f"--lora-target-modules {names}: {str(e).splitlines()[0][:200]}; "
                            f"give module names of this model (e.g. q_proj,v_proj) or all-linear") from None
    model = peft_model.get_base_model()  # the same object, adapters injected
    if getattr(model, "dropout_off", False):
        disable_dropout(model)
    # not a registered submodule (that would make a cycle): a plain attribute
    model.__dict__["lora"] = SimpleNamespace(peft_model=peft_model, adapter_only=args.save_adapter_only)
    return model


def disable_dropout(model):
    from shared.engine import disable_dropout

    return disable_dropout(model)


def is_lora(model) -> bool:
    return "lora" in vars(getattr(model, "module", model))


class Reference:
    """The frozen reference as the policy with its LoRA adapters switched off (peft's `disable_adapter()`):
    the starting model's numbers without a second copy of it. Called like a model; `module` is the policy (for
    engine.response_forward); code that calls the policy's parts itself (rollout.response_logprobs' chunked
    LM head) does so inside `forward_context()`."""

    def __init__(self, policy):
        self.module = getattr(policy, "module", policy)

    def forward_context(self):
        return self.module.lora.peft_model.disable_adapter()

    def __call__(self, **kwargs):
        with self.forward_context():
            return self.module(**kwargs)


def reference(policy, args, explicit: str = ""):
    """A Reference when `policy` is a LoRA model whose reference is its starting model (no --lora-path, which
    would make the start base + that adapter; no `explicit` other reference path), else None (load a frozen
    copy)."""
    if not is_lora(policy) or args.lora_path or explicit:
        return None
    if os.environ.get("RANK", "0") == "0":
        print("[model] reference: the policy with its LoRA adapters off (no copy loaded)", flush=True)
    return Reference(policy)


def _gathered(params):
    import deepspeed

    params = [p for p in params if hasattr(p, "ds_id")]
    return (deepspeed.zero.GatheredParameters(params, modifier_rank=None) if params
            else contextlib.nullcontext())


def _base_weight(layer) -> torch.Tensor:
    base = layer.get_base_layer()
    if type(base.weight).__name__ == "Params4bit":  # QLoRA: the NF4 weight, dequantized
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(base)
    return base.weight


@torch.no_grad()
def merged_weights(model):
    """(name, tensor) for every weight of `model` under its base architecture's names, as a full-model export
    holds them; fresh tensors, gathered under ZeRO-3 (every rank must iterate). A LoRA layer's weight is W +
    scaling B @ A (peft's `get_delta_weight`), a score head's the trained copy; the trained model is not
    touched."""
    from peft.tuners.lora import LoraLayer

    module = getattr(model, "module", model)
    if not is_lora(module):
        for name, p in module.named_parameters():
            with _gathered([p]):
                yield name, p.detach().clone()
        return
    adapter = module.lora.peft_model.active_adapter
    layers = dict(module.named_modules())
    for name, p in module.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if ".lora_" in f".{name}" or ".original_module." in f".{name}":
            continue  # folded into the merged weight / replaced by the trained copy
        if owner.endswith(".base_layer") and isinstance(layers[owner[: -len(".base_layer")]], LoraLayer):
            layer = layers[owner[: -len(".base_layer")]]
            target = f"{owner[: -len('.base_layer')]}.{leaf}"
            if leaf != "weight":
                with _gathered([p]):
                    yield target, p.detach().clone()
                continue
            with _gathered(list(layer.parameters())):
                base = _base_weight(layer)
                yield target, (base.float() + layer.get_delta_weight(adapter).float()).to(base.dtype)
            continue
        yield name.replace(f".modules_to_save.{adapter}.", "."), _clone(p)


def _clone(p):
    with _gathered([p]):
        return p.detach().clone()


def adapter_weights(model) -> dict:
    """The adapter's tensors under peft's names (gathered under ZeRO-3; every rank must call)."""
    peft_model = getattr(model, "module", model).lora.peft_model
    return {n: _clone(p) for n, p in peft_model.named_parameters()
            if ".lora_" in n or ".modules_to_save." in n}


def save_adapter(model, state: dict, path: Path):
    """peft format (adapter_config.json, adapter_model.safetensors):
    `PeftModel.from_pretrained(base, path)`."""
    getattr(model, "module", model).lora.peft_model.save_pretrained(str(path), state_dict=state,
                                                                   safe_serialization=True)


def count(model) -> tuple[int, int]:
    """(trainable, total) parameters, also when ZeRO-3 has sharded them."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, t in sizes if t), sum(n for n, _ in sizes)
