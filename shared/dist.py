"""Launch plumbing: works under `python X.py`, `deepspeed X.py` and `deepspeed --num_gpus N X.py`."""
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem the user can fix (a path, a column, a flag); printed as one line, exit code 2."""


class Diverged(RuntimeError):
    """A NaN or inf in a reward, loss or gradient: the run stops (exit code 3); checkpoints already written
    stay."""


def say(*a):
    """print on rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        print(*a, flush=True)


def cli(main, args_cls, embedded: dict | None = None):
    """Parse flags with tyro and run `main(args)`; a UserError becomes a one-line message and exit code 2.
    SIGTERM and SIGINT stop the run at the end of the current step with a checkpoint (`stop_signal`), exit
    code 128 + signal.

    Two columns of defaults: the dataclass holds the values for pretrained models; `embedded` those tuned for
    the 0.8M demo model. `--defaults auto` takes the embedded column when --model-path is the demo model or
    was trained from it. With --lora-rank the learning rates are 10x the column's. Flags given on the command
    line always win (tyro parses them again over the resolved defaults)."""
    import dataclasses

    from shared import args as flags, engine, tasks

    note = ("\n\nDefaults on the embedded demo model (--defaults embedded; auto picks them for it): "
            + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in embedded.items())) if embedded else ""
    description = (sys.modules[main.__module__].__doc__ or "") + note
    args = flags.parse(args_cls, args_cls(), description)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, _on_signal)
    try:
        if args.defaults not in ("auto", "pretrained", "embedded"):
            raise UserError(f"--defaults must be auto, pretrained or embedded, got {args.defaults}")
        column = args.defaults if args.defaults != "auto" else (
            "embedded" if embedded and engine.is_embedded(args.model_path) else "pretrained")
        base = dataclasses.replace(args_cls(), **(embedded if column == "embedded" and embedded else {}))
        if getattr(args, "lora_rank", 0) > 0:  # LoRA learns best at ~10x the full fine-tuning rate
            rates = {k: float(f"{10 * getattr(base, k):.6g}")
                     for k in ("lr", "critic_lr") if hasattr(base, k)}
            base = dataclasses.replace(base, **rates)
        if base != args_cls():
            args = flags.parse(args_cls, base, description)
        args.defaults = column
        if embedded and args.model_path == args_cls().model_path and args.dataset not in tasks.TASKS:
            say(f"[warning] --model-path is the embedded 0.8M demo model ({args.model_path}), trained on the "
                f"built-in task only; on your own data give your model with --model-path")
        main(args)
    except (UserError, Diverged) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"{'error' if isinstance(e, UserError) else 'stopped'}: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, UserError) else 3)
    finish()
    if stopped_by:
        sys.exit(128 + stopped_by)


_received = [0, 0.0]  # the first SIGTERM/SIGINT this process got, and when
stopped_by = 0  # the signal every rank agreed to stop on (`stop_signal`)
ECHO_S = 2.0  # a repeat within this many seconds is the same request arriving twice, not a second one


def _on_signal(signum, frame):
    """SIGTERM (SLURM, Kubernetes, the deepspeed launcher) or SIGINT (Ctrl-C): note it; the loop stops at the
    end of the current step (`stop_signal`). A second one exits at once, without a checkpoint. One arriving
    within ECHO_S of the first is not a second one: under the deepspeed launcher a Ctrl-C reaches each rank
    twice, from the terminal and as the launcher's SIGTERM (and a scheduler may signal both the launcher and
    the ranks)."""
    name, rank0 = signal.Signals(signum).name, os.environ.get("RANK", "0") == "0"
    if not _received[0]:
        _received[:] = signum, time.monotonic()
        if rank0:  # os.write: print() could re-enter a stream the interrupted code is writing to
            os.write(2, (f"\n{name}: stopping after this step with a checkpoint; "
                         f"send it again to exit at once\n").encode())
    elif time.monotonic() - _received[1] > ECHO_S:
        if rank0:
            os.write(2, f"\n{name} again: exiting now, without a checkpoint\n".encode())
        os._exit(128 + signum)


def stop_signal() -> int:
    """At a step boundary, on every rank: the signal (SIGTERM/SIGINT) any rank has received, else 0. All ranks
    get the same answer (a max all-reduce), so all stop after the same step."""
    global stopped_by
    stopped_by = int(all_reduce(torch.tensor([float(_received[0])]), "max").item())
    return stopped_by


_finish_hooks = []


def at_finish(fn):
    """Run fn() in `finish`, after the last barrier and before the process group goes (a vLLM engine shuts
    down there: it destroys its groups and the default one itself)."""
    _finish_hooks.append(fn)


def finish():
    """Leave the process group cleanly (a rank exiting while another is still in gloo aborts it)."""
    if dist.is_initialized():
        barrier()
    while _finish_hooks:
        _finish_hooks.pop()()
    global _control
    _control = None
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Ctx:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_control = None  # the gloo group that carries the scripts' own small collectives (see `init`)


def init(seed: int) -> Ctx:
    """Start torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU) and seed this rank with seed +
    rank.

    The scripts' own collectives (evaluation sums, running moments, token counts, agreement flags, objects)
    are small CPU values. NCCL serves only GPU tensors ("No backend type associated with device type cpu"), so
    they travel on a second process group, gloo over CPU, made here on every rank (vLLM keeps such a CPU group
    beside its NCCL one for the same reason); DeepSpeed's gradient and parameter traffic stays on the default
    group. The helpers below use it; call them, never torch.distributed directly, from scripts and shared/."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(key, value)  # plain `python X.py`: without these DeepSpeed tries MPI discovery
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cuda = torch.cuda.is_available()
    if not cuda:  # the shared-memory all-reduce op only serves AutoTP inference and costs a 2-minute compile
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    global _control
    if dist.get_world_size() > 1 and _control is None:  # a gloo group also on CPU: one code path to test
        _control = dist.new_group(backend="gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    ctx = Ctx(dist.get_rank(), dist.get_world_size(), local_rank, device)
    set_seed(seed + ctx.rank)
    return ctx


def set_seed(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _multi() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (op: sum, min or max) across ranks (a no-op with one rank) of a small tensor on any
    device, carried on the CPU group; returns the tensor. For statistics, not for gradients."""
    if _multi():
        cpu = t.detach().cpu()
        dist.all_reduce(cpu, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                                 "max": dist.ReduceOp.MAX}[op], group=_control)
        if t.device.type != "cpu":  # (on CPU, `cpu` shares t's storage: already in place)
            with torch.no_grad():
                t.copy_(cpu)
    return t


def barrier():
    if _multi():
        dist.barrier(group=_control)


def broadcast_object(obj, src: int = 0):
    if _multi():
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=_control)
        return box[0]
    return obj


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order."""
    if not _multi():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_control)
    return out
