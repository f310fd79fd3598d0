"""Launch plumbing: works under `python X.py`, `deepspeed X.py` and `deepspeed --num_gpus N X.py`."""
import os
import random
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem the user can fix (a path, a column, a flag); printed as one line, exit code 2."""


class Diverged(RuntimeError):
    """A NaN or inf in a reward, loss or gradient: the run stops (exit code 3); checkpoints already written stay."""


def cli(main, args_cls):
    """Parse flags with tyro and run `main(args)`; a UserError becomes a one-line message and exit code 2."""
    import tyro

    args = tyro.cli(args_cls)
    try:
        main(args)
    except (UserError, Diverged) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"{'error' if isinstance(e, UserError) else 'stopped'}: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, UserError) else 3)
    finish()


_finish_hooks = []


def at_finish(fn):
    """Run fn() in `finish`, after the last barrier and before the process group goes (a vLLM engine shuts down
    there: it destroys its groups and the default one itself)."""
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
    """Start torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU) and seed this rank with seed + rank.

    The scripts' own collectives (evaluation sums, running moments, token counts, agreement flags, objects) are small
    CPU values. NCCL serves only GPU tensors ("No backend type associated with device type cpu"), so they travel on a
    second process group, gloo over CPU, made here on every rank (vLLM keeps such a CPU group beside its NCCL one for
    the same reason); DeepSpeed's gradient and parameter traffic stays on the default group. The helpers below use
    it; call them, never torch.distributed directly, from scripts and shared/."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
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
        dist.all_reduce(cpu, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op],
                        group=_control)
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
