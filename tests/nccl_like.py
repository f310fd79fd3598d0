"""Run a script with NCCL's device rule on CPU: `deepspeed --num_gpus 2 tests/nccl_like.py SCRIPT ARGS...`.

On GPUs the default process group is NCCL, which serves CUDA tensors only: a collective on a CPU tensor there fails
with "No backend type associated with device type cpu". On this CPU machine the default group is gloo and accepts
anything, so such a call would pass every test and crash the first multi-GPU run. This launcher makes the default
group refuse CPU tensors the way NCCL does, for every tensor collective called from outside the installed libraries,
i.e. from the project's code and the tests' scripts (the libraries' collectives -- DeepSpeed's gradients and parameters, transformers' generate flags, torch's object
collectives -- use tensors on the model's device, the GPU there). The project's own collectives must go through a
group that serves CPU (shared.dist's gloo group) or use device tensors.
tests/conftest.py's `run_script` launches every multi-rank run through this file."""
import functools
import os
import runpy
import sys

import torch.distributed as dist

LIBRARIES = tuple({sys.prefix, sys.base_prefix, os.path.dirname(os.__file__)})  # the venv, the stdlib


def nccl_rule(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        group = kwargs.get("group")
        if group is None or group is dist.GroupMember.WORLD:
            caller = sys._getframe(1).f_code.co_filename
            tensors = [a for a in list(args) + list(kwargs.values()) if hasattr(a, "device")]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if hasattr(t, "device")]
            ours = not (os.path.abspath(caller).startswith(LIBRARIES) or f"{os.sep}site-packages{os.sep}" in caller)
            if ours and any(t.device.type == "cpu" for t in tensors):
                raise RuntimeError(f"No backend type associated with device type cpu (a CPU tensor in a collective "
                                   f"on the default NCCL group, from {caller})")
        return fn(*args, **kwargs)

    return call


for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter_tensor",
             "gather", "scatter", "all_to_all_single"):
    setattr(dist, name, nccl_rule(getattr(dist, name)))

if __name__ == "__main__":
    argv = sys.argv[1:]
    launcher_flags = [a for a in argv if a.startswith("--local_rank")]
    script, rest = next((a, argv[i + 1:]) for i, a in enumerate(argv) if not a.startswith("--local_rank"))
    sys.argv = [script, *launcher_flags, *rest]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")
