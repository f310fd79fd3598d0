"""Shared test helpers: 1 torch thread, a tiny model on disk, and a runner for the scripts as users launch them."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: str, *args, ranks: int = 0, check: bool = True, timeout: int = 600, cwd=ROOT,
               env: dict | None = None):
    """Run a script as a user would: `python X.py ...` (ranks=0) or `deepspeed --num_gpus N X.py ...`. Multi-rank
    runs go through tests/nccl_like.py: the default process group refuses CPU tensors from our code, as NCCL does."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("MASTER_PORT", None)  # left by a dist.init in this process: a child would try to bind the same port
    if ranks:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), str(ROOT / "tests/nccl_like.py"),
               str(ROOT / script)]
    else:
        cmd = [sys.executable, str(ROOT / script)]
    proc = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def tokenizer():
    from shared.engine import TOKENIZER
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64, eos_token_id: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      eos_token_id=eos_token_id, bos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A small random causal LM saved with the default tokenizer, as a user's --model-path would be."""
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=["llama", "qwen2", "gpt2"])
def family_dir(request, tmp_path_factory):
    """The model-family matrix (tests/families.py): one saved tiny model per architecture, each with a BPE tokenizer,
    a ChatML template and pad == eos. A test that takes this fixture runs once per family."""
    from families import save_family

    return save_family(request.param, tmp_path_factory.mktemp(f"family_{request.param}"))
