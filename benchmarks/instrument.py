"""Framework-neutral counters and phase timers, installed the same way in our runs and in TRL's, so that "equal work"
is measured rather than assumed. Everything hooks shared lower layers both frameworks go through:

    transformers GenerationMixin.generate   sampled sequences, generated positions, valid sampled tokens (up to and
                                            including the first EOS), decode forwards, wall time
    LlamaModel.forward (the backbone)       forward passes outside generate, with/without grad, rows, token positions
                                            (rows x padded length), wall time of the backbone
    torch.autograd.backward                 backward passes and their wall time
    torch.optim.Optimizer.step (global hook) optimizer steps and their wall time
    reward functions                        calls and wall time (wrapped by the runners: `timed_reward`)
    the process's resident memory (Linux)   `memory()`: RSS when the step's turn began and the peak RSS since then
                                            (the kernel's high-water mark, reset at every turn through
                                            /proc/self/clear_refs), the same reading in both frameworks' processes

`snapshot()` returns the running totals; a runner records one at the end of every training step, and per-step work is
the difference of consecutive snapshots.
"""
import functools
import os
import time
from collections import defaultdict

import torch

COUNTS = defaultdict(float)
_state = {"in_generate": 0, "eos_id": None, "opt_t0": None}


def snapshot() -> dict:
    return {"t": time.perf_counter(), **COUNTS}


def _status_kb(key: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: the peak since the last reset)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak() -> float:
    """Restart the kernel's peak-RSS counter (VmHWM) at the current RSS; returns that RSS in MiB. Writing 5 to
    /proc/self/clear_refs resets the peak (Linux >= 4.0); where that is refused the peak is the process's lifetime
    peak, which `memory()` then says."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _state["peak_reset"] = True
    except OSError:
        _state["peak_reset"] = False
    _state["rss_go_mb"] = _status_kb("VmRSS") / 1024
    if torch.cuda.is_available():  # and the GPU allocator's peak (benchmarks/gpu.sh)
        torch.cuda.reset_peak_memory_stats()
    return _state["rss_go_mb"]


def memory() -> dict:
    """This step's memory: RSS at its turn's start and the peak RSS since then, MiB (call at the step's end)."""
    out = {"rss_go_mb": _state.get("rss_go_mb"), "peak_mb": _status_kb("VmHWM") / 1024,
           "rss_end_mb": _status_kb("VmRSS") / 1024, "peak_reset": _state.get("peak_reset", False)}
    if torch.cuda.is_available():
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _sync():
    """On a GPU, wait for queued kernels so that a phase's wall time is its own (a no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def diff(a: dict, b: dict) -> dict:
    """Work between two snapshots (b after a)."""
    return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in set(a) | set(b)}


def count_rollout(ro, seconds: float):
    """Samples of a rollout made outside HF generate (our vLLM backend): sequences, positions, valid tokens."""
    COUNTS["generate_calls"] += 1
    COUNTS["generate_s"] += seconds
    COUNTS["sampled_seqs"] += ro.response_mask.shape[0]
    COUNTS["generated_positions"] += ro.response_mask.numel()
    COUNTS["sampled_tokens"] += ro.response_mask.sum().item()


def generation(fn):
    """Wrap a framework's own sampling function around HF generate (ours: shared.rollout.generate, which prefills
    each distinct prompt once before calling it): its whole time is generation time, its forwards decode forwards."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t, outer = time.perf_counter(), not _state["in_generate"]
        _state["in_generate"] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _state["in_generate"] -= 1
            if outer:
                COUNTS["generate_s"] += time.perf_counter() - t
    return wrapper


def timed_reward(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            COUNTS["reward_calls"] += 1
            COUNTS["reward_s"] += time.perf_counter() - t
    return wrapper


def install(eos_id: int = 1):
    """Patch the shared layers once per process. eos_id: the tokenizer's EOS (1 for the char tokenizer)."""
    if _state.get("installed"):
        return
    _state["installed"], _state["eos_id"] = True, eos_id
    from transformers import GenerationMixin
    from transformers.models.llama.modeling_llama import LlamaModel
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

    generate = GenerationMixin.generate

    @functools.wraps(generate)
    def counted_generate(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        t, outer = time.perf_counter(), not _state["in_generate"]
        _state["in_generate"] += 1
        try:
            out = generate(self, *args, **kwargs)
        finally:
            _state["in_generate"] -= 1
        if outer:
            COUNTS["generate_s"] += time.perf_counter() - t
        COUNTS["generate_calls"] += 1
        seqs = out if isinstance(out, torch.Tensor) else out.sequences
        if ids is not None:
            new = seqs[:, ids.shape[1]:]
            is_eos = (new == _state["eos_id"]).long()
            valid = ((is_eos.cumsum(1) - is_eos) == 0).sum().item()  # up to and including the first EOS
            COUNTS["sampled_seqs"] += new.shape[0]
            COUNTS["generated_positions"] += new.numel()
            COUNTS["sampled_tokens"] += valid
        return out

    GenerationMixin.generate = counted_generate

    def counted(backbone):  # one hook per backbone class (Llama: the CPU benchmark; Qwen2: benchmarks/gpu.sh)
        @functools.wraps(backbone)
        def counted_backbone(self, input_ids=None, *args, **kwargs):
            _sync()
            t = time.perf_counter()
            out = backbone(self, input_ids, *args, **kwargs)
            _sync()
            return _count_backbone(out, time.perf_counter() - t, input_ids, kwargs)
        return counted_backbone

    def _count_backbone(out, dt, input_ids, kwargs):
        x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if _state["in_generate"]:
            COUNTS["decode_forwards"] += 1
            COUNTS["decode_positions"] += x.shape[0] * x.shape[1]
            COUNTS["decode_forward_s"] += dt
            return out
        kind = "fwd_grad" if torch.is_grad_enabled() else "fwd_nograd"
        # ours with repeated prompts (shared.engine.response_forward): one pass over a batch is two calls, the
        # distinct prompts (use_cache=True) then every row's response on their shared cache (past_key_values):
        # it counts once, with the rows of the second call and the positions of both
        if not (kwargs.get("use_cache") is True and kwargs.get("past_key_values") is None):
            COUNTS[f"{kind}_calls"] += 1
            COUNTS[f"{kind}_rows"] += x.shape[0]
        COUNTS[f"{kind}_positions"] += x.shape[0] * x.shape[1]
        COUNTS[f"{kind}_s"] += dt
        return out

    LlamaModel.forward = counted(LlamaModel.forward)
    Qwen2Model.forward = counted(Qwen2Model.forward)

    autograd_backward = torch.autograd.backward

    @functools.wraps(autograd_backward)
    def counted_backward(*args, **kwargs):
        _sync()
        t = time.perf_counter()
        try:
            return autograd_backward(*args, **kwargs)
        finally:
            _sync()
            COUNTS["backward_calls"] += 1
            COUNTS["backward_s"] += time.perf_counter() - t

    torch.autograd.backward = counted_backward

    def pre(opt, args, kwargs):
        _sync()
        _state["opt_t0"] = time.perf_counter()

    def post(opt, args, kwargs):
        _sync()
        COUNTS["optimizer_steps"] += 1
        COUNTS["optimizer_s"] += time.perf_counter() - (_state["opt_t0"] or time.perf_counter())

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(pre)
    register_optimizer_step_post_hook(post)


# ---------------------------------------------------------------------------------------------- shared evaluator


@torch.no_grad()
def greedy_accuracy(model, tok, rows: list[dict], max_new_tokens: int = 8, batch_size: int = 128) -> float:
    """Held-out greedy exact match with the built-in task's checker, the SAME function for both frameworks: prompts
    left-padded, HF generate (greedy), decoded up to the first EOS. Leaves the counters untouched."""
    from shared import tasks

    saved = dict(COUNTS)
    was_training = model.training
    model.eval()
    correct = 0.0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        enc = [tok(r["prompt"], add_special_tokens=True)["input_ids"] for r in chunk]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, e in enumerate(enc):
            ids[j, width - len(e):], mask[j, width - len(e):] = torch.tensor(e), 1
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
        texts = []
        for row in out[:, width:]:
            row = row.tolist()
            row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
            texts.append(tok.decode(row, skip_special_tokens=True))
        correct += sum(tasks.get("addition").reward([r["prompt"] for r in chunk], texts,
                                                    [r["answer"] for r in chunk]))
    model.train(was_training)
    COUNTS.clear()
    COUNTS.update(saved)
    return correct / len(rows)


# ---------------------------------------------------------------------------------------------- the step gate


class Gate:
    """Step-by-step alternation between the processes of one comparison. The driver (bench.py) passes each worker two
    pipe descriptors in BENCH_GATE="read_fd,write_fd". At the end of every step the worker reports the step and blocks
    until the driver says `go`; the driver lets exactly one worker run at a time, alternating, so both frameworks run
    their timed steps under the same background load. A step's time is from its `go` to its end. Without BENCH_GATE
    (a run by hand) nothing blocks."""

    def __init__(self):
        spec = os.environ.get("BENCH_GATE")
        self.r, self.w = (int(x) for x in spec.split(",")) if spec else (None, None)
        self.free = self.r is None
        self.t_go = time.perf_counter()

    def report(self, what) -> float:
        """Say `what` happened, wait for the turn, return the time the turn started."""
        if not self.free:
            os.write(self.w, f"{what}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                chunk = os.read(self.r, 64)
                if not chunk:
                    break
                line += chunk
            if line.strip() != b"go":
                self.free = True
        reset_peak()  # the step's peak memory is measured from its turn's start (before the clock: not timed)
        self.t_go = time.perf_counter()
        return self.t_go
