"""Flags every script shares. A script's `Args` inherits these and adds its own; tyro turns each field's
docstring into its `--help` line."""
import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated


@dataclass
class RunArgs:
    output_dir: str = ""
    """where the run writes its model, metrics.jsonl, summary.json and checkpoint (default:
    runs/<script>__<seed>__<time>); may be spelled differently on --resume"""
    overwrite: bool = False
    """replace an existing output directory that holds an earlier run (deletes its checkpoints: to continue a
    stopped run, use --resume)"""
    resume: bool = False
    """continue the run in --output-dir from its newest whole checkpoint (exactly: weights, optimizer, RNG and
    data position), with the same number of ranks. Give the run's flags again: only --steps (longer; not with
    --lr-decay), --save-every, --stop-after, --eval-every, --log-every, --track, --wandb-project and the
    spelling of --output-dir may change; any other change (--lr, --batch-size, --model-path, --zero-stage...)
    alters the training and
    is refused. args.json keeps the flags the run started with; each resume appends its step and changed flags
    to resumes.jsonl"""
    stop_after: int = 0
    """stop after this many steps (counted from the start of training) with a checkpoint, to --resume later;
    SIGTERM or SIGINT (Ctrl-C) do the same at the end of the current step and exit with 128 + signal (a second
    one exits at once). May change on --resume"""
    save_every: int = 0
    """every N steps write an HF export to <output-dir>/step_N and a resumable checkpoint (0: only the final
    export). May change on --resume"""
    seed: int = 1
    """random seed (each rank uses seed + rank)"""
    defaults: str = "auto"
    """which defaults apply to the flags you do not give: pretrained (the papers' and peers' values for real
    models, shown in this help), embedded (tuned for the 0.8M demo model; listed at the top of this help), or
    auto: embedded when --model-path is the demo model or was trained from it (its character tokenizer), else
    pretrained. The resolved values are recorded in args.json"""
    log_every: int = 0
    """print a metrics line every N steps (a progress bar runs in between); 0: about 20 lines per run. May
    change on --resume"""
    track: bool = False
    """log to Weights & Biases (offline unless you are logged in; set WANDB_MODE=online to force). May change
    on --resume"""
    wandb_project: str = "onefile-rlhf"
    """wandb project name (may change on --resume)"""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (3 shards parameters; frozen models are sharded the same way)"""
    offload: bool = False
    """offload optimizer state (ZeRO >= 1) and, with ZeRO-3, parameters to CPU memory"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    dtype: str = "auto"
    """model precision: auto (bf16 on a GPU that supports it, else fp32), bf16 or fp32 (taken as asked, also
    on CPU)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clipping (0 disables)"""
    warmup_steps: int = 0
    """linear learning-rate warmup steps; then the rate is constant (see --lr-decay)"""
    lr_decay: bool = False
    """decay the learning rate linearly to 0 at the last step"""
    prompt_sharing: bool = True
    """run each distinct prompt once and share its key/value cache among its samples (same numbers up to float
    rounding); --no-prompt-sharing: one plain forward of every row, e.g. to debug a new architecture"""
    trust_remote_code: bool = False
    """allow model/tokenizer code from the model directory to run (only for sources you trust)"""
    local_rank: int = -1
    """set by the deepspeed launcher; leave it (not compared on --resume)"""


@dataclass
class DataArgs:
    dataset: str = "addition"
    """a built-in task (addition), a local json/jsonl/parquet/csv file, a local dataset directory, or a HF hub
    name"""
    dataset_split: str = "train"
    """split to train on (hub datasets and dataset directories)"""
    eval_dataset: str = ""
    """held-out data (same forms as --dataset); default: the task's held-out split, or --eval-size rows split
    off"""
    eval_split: str = "test"
    """split of --eval-dataset to evaluate on (hub datasets and dataset directories)"""
    eval_size: int = 500
    """held-out rows: how many to split off --dataset when there is no --eval-dataset, and the cap on eval
    rows"""
    eval_reward_fn: str = ""
    """the task score: `module:function` (called like --reward-fn: prompts=, responses= and the held-out rows'
    extra columns as keyword lists; one float per response) applied to greedy responses to the held-out
    prompts before and after training (and every --eval-every steps), logged as eval/task_score. Default: the
    built-in task's checker on a built-in task; in the RL scripts, the --reward-fn rule rewards; otherwise
    none"""
    prompt_column: str = "prompt"
    """column holding the prompt (a string, or a list of chat messages)"""
    response_column: str = "response"
    """column holding the response / completion"""
    chosen_column: str = "chosen"
    """column holding the preferred response (or a full preferred conversation)"""
    rejected_column: str = "rejected"
    """column holding the dispreferred response (or a full dispreferred conversation)"""
    label_column: str = "label"
    """column holding whether a completion is desirable (bool), for unpaired preference data"""
    messages_column: str = "messages"
    """column holding a whole conversation (list of {role, content}); used when --prompt-column is absent"""
    max_len: int = 256
    """maximum tokens of prompt + response"""
    overlong: str = "truncate"
    """what to do with longer examples: truncate (cut the response's end) or skip; the count is reported. RL
    prompts longer than --max-len are always skipped: a cut prompt loses its chat template's head or
    generation prompt"""


@dataclass
class RewardArgs:
    reward_fn: str = ""
    """rule rewards: built-in task checkers or `module:function` (called with prompts=, responses= and the
    dataset's extra columns as keyword lists; returns one float per response), comma-separated. Default: the
    task's checker"""
    reward_path: str = ""
    """a reward model directory (from train_rm.py, or any 1-label sequence classifier); scored at the last
    real token"""
    reward_url: str = ""
    """an HTTP endpoint: POST {"prompts", "responses", "extras"} -> {"rewards": [float, ...]}"""
    reward_weights: str = ""
    """comma-separated weights, in the order reward-path, reward-fn entries, reward-url (default: all 1)"""
    reward_timeout: float = 30.0
    """seconds to wait for --reward-url before a retry (2 retries)"""


@dataclass
class RolloutArgs:
    rollout_backend: str = "auto"
    """who samples rollouts: hf (transformers generate on the policy itself) or vllm (a vLLM engine inside
    each rank, sharing its process and process group; the policy's weights are pushed into it after every
    update). auto: vllm on GPU when it is importable, hf on CPU, where vLLM's import and start-up add 10-15 s
    to a run and the tiny default policy generates no faster with it (grpo.py with no arguments: ~26 s hf, ~38
    s vllm); at ~20M parameters vllm generates 1.3-2.8x faster on CPU, so pass --rollout-backend vllm there
    (README, `Rollout backends`)"""
    vllm_gpu_memory_utilization: float = 0.3
    """GPU: fraction of GPU memory vLLM may hold for weights and KV cache (the trainer shares the GPU)"""
    vllm_kv_cache_gb: float = 0.25
    """CPU: vLLM's KV-cache size per rank in GiB (the VLLM_CPU_KVCACHE_SPACE variable, if set, overrides
    it)"""
    vllm_tp_size: int = 1
    """tensor-parallel size of each vLLM engine; must divide the number of ranks, whose prompts are then
    generated together by each group of vllm-tp-size ranks"""
    tis_cap: float = 0.0
    """truncated importance sampling: weight each token's policy loss by min(pi_old / pi_sampler, cap),
    correcting for a sampler (vLLM) whose log-probs differ from the trainer's; 0 turns it off
    (policy/logprob_diff_* shows the gap)"""
    max_logprob_gap: float = 0.5
    """stop the run when the sampler's log-probs differ from the trainer's by more than this many nats per
    token on average (measured before each step's first update; fp32 ~1e-7 with hf, <= 1e-4 with vllm on CPU,
    ~1e-2 in bf16; a stale or broken engine gives whole nats); 0 turns the check off"""
    vllm_sleep: bool = False
    """GPU: put vLLM to sleep (level 2: weights and KV cache freed) after each rollout while the policy
    trains; the weight push wakes it. Ignored on CPU, where vLLM has no sleep mode"""


@dataclass
class LoraArgs:
    lora_rank: int = 0
    """LoRA (peft): rank of the adapters put on the trained model (policy, critic, reward model); only the
    adapters (and a score head) are trained. 0: full fine-tuning. The reference is then the policy with its
    adapters off"""
    lora_alpha: int = 16
    """LoRA scaling: the adapter adds (lora_alpha / lora_rank) B @ A to each weight"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input (the RL and preference scripts switch all dropout off)"""
    lora_target_modules: str = "all-linear"
    """modules that get adapters: all-linear (every linear layer but the LM head and score head: the attention
    and MLP projections of any architecture, GPT-2's Conv1D included) or comma-separated names, e.g.
    q_proj,v_proj"""
    lora_path: str = ""
    """start from this adapter (peft directory, e.g. <output-dir>/adapter of an earlier run; its rank, alpha
    and targets apply) on top of --model-path; the reference is then base + this adapter, loaded as a frozen
    copy"""
    save_adapter_only: bool = False
    """with LoRA, export only the adapter (<output-dir>/adapter) and the tokenizer, not the merged full
    model"""
    load_in_4bit: bool = False
    """QLoRA: the base weights in 4-bit NF4 (bitsandbytes; CUDA GPU only, ZeRO 0-2), the adapters in bf16"""


# ---------------------------------------------------------------------------------------------- the command
# line

GROUPS = (("run", RunArgs), ("data", DataArgs), ("rewards", RewardArgs),
          ("rollout", RolloutArgs), ("lora", LoraArgs))


@functools.cache
def docstrings(cls) -> dict:
    """{field: its docstring on one line} for a dataclass and its bases (the string under each field)."""
    out = {}
    for klass in reversed(cls.__mro__):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError, IndexError, AttributeError):
            continue
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                out[a.target.id] = " ".join(str(b.value.value).split())
    return out


def parse(args_cls, default, description: str):
    """tyro over `args_cls` with the defaults of the instance `default`, its --help in the order a user reads
    it: the script's own flags first, then the shared groups (run, data, rewards, rollout, lora), each titled,
    each help text one paragraph. Flags stay flat (--lr, --seed); returns an `args_cls`."""
    import tyro

    docs, own = docstrings(args_cls), list(args_cls.__dict__.get("__annotations__", {}))
    all_fields, by_name = dataclasses.fields(args_cls), {f.name: f for f in dataclasses.fields(args_cls)}
    script = Path(getattr(sys.modules[args_cls.__module__], "__file__", "script")).stem
    groups = [(script, [by_name[n] for n in own])]
    for name, base in GROUPS:
        if issubclass(args_cls, base):
            names = {f.name for f in dataclasses.fields(base)} - set(own)
            groups.append((name, [f for f in all_fields if f.name in names]))
    outer = []
    for title, fs in groups:
        values = {f.name: getattr(default, f.name) for f in fs}
        inner = dataclasses.make_dataclass(title, [
            (f.name, Annotated[f.type, tyro.conf.arg(help=docs.get(f.name, ""))],
             dataclasses.field(default=values[f.name]))
            for f in fs
        ])
        outer.append((title, Annotated[inner, tyro.conf.OmitArgPrefixes],
                      dataclasses.field(default_factory=functools.partial(inner, **values))))
    parsed = tyro.cli(dataclasses.make_dataclass(args_cls.__name__, outer), description=description)
    return args_cls(**{k: v for title, _, _ in outer for k, v in vars(getattr(parsed, title)).items()})
