"""Failure and recovery: `kill -9` inside every window of the checkpoint and export writes, then --resume, ending
bit-identical to an uninterrupted run (train_sft.py and grpo.py); SIGTERM mid-run (one rank; two ranks, signalled
on one); what --resume may and may not change; metrics.jsonl across resumes; unusable output directories.

Kills come from shared/engine.py's fault hook: RLHF_FAULT=POINT:K SIGKILLs the process the K-th time it reaches
POINT (`engine._fault`)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, free_port

SFT = ["--steps", "6", "--batch-size", "8", "--micro-batch-size", "4", "--eval-size", "8", "--save-every", "1"]
GRPO = ["--steps", "4", "--prompts-per-step", "4", "--n-samples", "4", "--micro-batch-size", "8", "--eval-size", "8",
        "--save-every", "2"]
NOT_COMPARED = {"elapsed_s", "train/tokens_per_s", "perf/tokens_per_s"}


def command(script, args, ranks=0):
    if ranks:  # as conftest.run_script: through tests/nccl_like.py, whose default group refuses CPU tensors as NCCL
        return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
                str(ROOT / "tests/nccl_like.py"), str(ROOT / script), *map(str, args)]
    return [sys.executable, str(ROOT / script), *map(str, args)]


def env(fault=None):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    e.pop("RLHF_FAULT", None)
    e.pop("MASTER_PORT", None)  # left by a dist.init in this process: a child would try to bind the same port
    return {**e, "RLHF_FAULT": fault} if fault else e


def run(script, *args, fault=None, expect=0, ranks=0, timeout=600):
    proc = subprocess.run(command(script, args, ranks), capture_output=True, text=True, env=env(fault),
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == expect, (f"{script} {fault}: exit {proc.returncode}, expected {expect}\n"
                                       f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in NOT_COMPARED}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def resumed_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "resumes.jsonl").read_text().splitlines()]


def ckpt_step(d: Path) -> int:
    return json.loads((d / "state.json").read_text())["step"]


def leftovers(base: Path) -> list[Path]:
    return [p for p in base.rglob("*") if p.name.endswith(".tmp") or p.name == "checkpoint.old"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run the others must match."""
    out = tmp_path_factory.mktemp("sft") / "straight"
    run("train_sft.py", *SFT, "--output-dir", out)
    return out


@pytest.fixture(scope="module")
def sft_runs(straight):
    """The straight run killed (kill -9) in each window of the writes in turn, each kill followed by --resume, which
    is killed at the next point; the intermediate states are checked on the way."""
    base, out = straight.parent, straight.parent / "killed"
    # step 2's export cut short: its temporary directory is left, the checkpoint is step 1's
    run("train_sft.py", *SFT, "--output-dir", out, fault="export-tmp:2", expect=-9)
    assert (out / ".step_2.export.tmp").is_dir() and not (out / "step_2").exists()
    assert ckpt_step(out / "checkpoint") == 1 and len(metrics(out)) == 2  # step 2 was logged
    # the resume cleans the temporary export and re-makes step_2; killed writing step 2's checkpoint (no marker)
    run("train_sft.py", *SFT, "--output-dir", out, "--resume", fault="checkpoint-tmp:1", expect=-9)
    assert not (out / ".step_2.export.tmp").exists() and (out / "step_2" / "model.safetensors").exists()
    assert (out / "checkpoint.tmp").is_dir() and not (out / "checkpoint.tmp" / "COMPLETE").exists()
    # the unmarked checkpoint.tmp is not taken: from step 1 again; killed right after marking step 2's whole
    run("train_sft.py", *SFT, "--output-dir", out, "--resume", fault="checkpoint-marked:1", expect=-9)
    assert (out / "checkpoint.tmp" / "COMPLETE").exists() and ckpt_step(out / "checkpoint") == 1
    # the marked one is taken (step 2); killed between the two renames of step 3's checkpoint: no checkpoint/ at all
    run("train_sft.py", *SFT, "--output-dir", out, "--resume", fault="checkpoint-renamed:1", expect=-9)
    assert not (out / "checkpoint").exists()
    assert ckpt_step(out / "checkpoint.old") == 2 and ckpt_step(out / "checkpoint.tmp") == 3
    # from step 3; killed after step 4's checkpoint is in place, before the old one is deleted
    run("train_sft.py", *SFT, "--output-dir", out, "--resume", fault="checkpoint-replaced:1", expect=-9)
    assert ckpt_step(out / "checkpoint") == 4 and ckpt_step(out / "checkpoint.old") == 3
    # from step 4; killed while deleting step 4's checkpoint once step 5's is in place
    run("train_sft.py", *SFT, "--output-dir", out, "--resume", fault="checkpoint-discard:1", expect=-9)
    assert ckpt_step(out / "checkpoint") == 5 and (out / "checkpoint.old").is_dir()
    assert not (out / "checkpoint.old" / "state.json").exists()  # unmarked first: never taken for whole
    # from step 5; killed in the final export, after its first file has replaced the old one
    run("train_sft.py", *SFT, "--output-dir", out, "--resume", fault="export-partial:1", expect=-9)
    assert ckpt_step(out / "checkpoint") == 6 and list(out.glob(".*.export.tmp"))
    # from step 6: the final evaluation and export
    run("train_sft.py", *SFT, "--output-dir", out, "--resume")
    assert resumed_steps(out) == [1, 1, 2, 3, 4, 5, 6]
    return base, straight, out


def test_kills_in_every_write_window_then_resume_end_bit_identical(sft_runs):
    base, straight, out = sft_runs
    assert same_weights(straight, out)
    for n in range(1, 7):
        assert same_weights(straight / f"step_{n}", out / f"step_{n}"), n
    assert not leftovers(base), leftovers(base)
    assert ckpt_step(out / "checkpoint") == 6


def test_metrics_have_each_step_once_after_resumes(sft_runs):
    _, straight, out = sft_runs
    assert [m["step"] for m in metrics(out)] == list(range(1, 7))
    assert metrics(out) == metrics(straight)  # and the same values (each re-logged step as first logged)


def test_grpo_killed_in_a_step_export_and_between_checkpoint_renames_resumes_bit_identical(tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "killed"
    run("grpo.py", *GRPO, "--output-dir", straight)
    run("grpo.py", *GRPO, "--output-dir", out, fault="export-tmp:2", expect=-9)  # in step_4's export
    assert (out / ".step_4.export.tmp").is_dir() and ckpt_step(out / "checkpoint") == 2
    run("grpo.py", *GRPO, "--output-dir", out, "--resume", fault="checkpoint-renamed:1", expect=-9)  # step 4's
    assert not (out / "checkpoint").exists() and ckpt_step(out / "checkpoint.tmp") == 4
    run("grpo.py", *GRPO, "--output-dir", out, "--resume")
    assert resumed_steps(out) == [2, 4]
    assert same_weights(straight, out)
    assert same_weights(straight / "step_2", out / "step_2") and same_weights(straight / "step_4", out / "step_4")
    assert not leftovers(tmp_path), leftovers(tmp_path)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


def wait_for_metrics(proc, out: Path, timeout=300):
    """Block until the run has logged a step (metrics.jsonl has a row)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip():
            return
        time.sleep(0.01)
    raise AssertionError(f"no metrics row (exit {proc.poll()}): {proc.communicate()[1][-3000:]}")


def stop_line(stderr: str, name: str, out: Path) -> int:
    lines = [line for line in stderr.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1, stderr[-3000:]
    head, _, tail = lines[0].partition("; ")
    assert head.startswith(f"stopped by {name} at step ") and tail == f"resume with --resume --output-dir {out}", lines
    return int(head.rsplit(" ", 1)[1])


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_at_a_random_moment_then_resume_ends_bit_identical(straight, tmp_path, seed):
    """kill -9 at a moment drawn (from a fixed seed) within the run's training steps, wherever the run then is
    (a forward, an optimizer step, a checkpoint or export write); --resume (repeated if the kill came before the
    first checkpoint) ends bit-identical to the uninterrupted run, with every step_N export and each step logged once."""
    import random

    out = tmp_path / "run"
    proc = subprocess.Popen(command("train_sft.py", [*SFT, "--output-dir", out]), env=env(), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_metrics(proc, out)
        time.sleep(random.Random(seed).uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    if proc.returncode == 0:
        pytest.fail("the run ended before the kill; lengthen SFT's --steps")
    # whole, by the protocol save_checkpoint documents: checkpoint/ only ever appears by renaming a whole one, while
    # checkpoint.tmp and checkpoint.old count once their COMPLETE marker is written (a kill may land between the two)
    has_checkpoint = (out / "checkpoint" / "state.json").exists() or any(
        (out / d / "COMPLETE").exists() for d in ("checkpoint.tmp", "checkpoint.old"))
    run("train_sft.py", *SFT, "--output-dir", out, *(["--resume"] if has_checkpoint else ["--overwrite"]))
    assert same_weights(straight, out)
    assert all(same_weights(straight / f"step_{k}", out / f"step_{k}") for k in range(1, 7))
    assert [m["step"] for m in metrics(out)] == list(range(1, 7))
    assert not leftovers(tmp_path), leftovers(tmp_path)


def test_sigterm_mid_run_stops_with_a_checkpoint_and_resumes_bit_identical(straight, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(command("train_sft.py", [*SFT, "--output-dir", out]), env=env(), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_metrics(proc, out)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 143, f"exit {proc.returncode} (0: the run ended before the signal)\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    step = stop_line(stderr, "SIGTERM", out)
    assert 1 <= step < 6 and ckpt_step(out / "checkpoint") == step
    assert [m["step"] for m in metrics(out)] == list(range(1, step + 1))
    assert not (out / "model.safetensors").exists()
    run("train_sft.py", *SFT, "--output-dir", out, "--resume")
    assert same_weights(straight, out)
    assert [m["step"] for m in metrics(out)] == list(range(1, 7))


def test_two_ranks_stop_at_the_same_step_when_one_gets_sigterm(tmp_path):
    import psutil

    out = tmp_path / "run"
    flags = [*SFT[:-2], "--save-every", "0"]  # only the signal writes a checkpoint
    proc = subprocess.Popen(command("train_sft.py", [*flags, "--output-dir", out], ranks=2), env=env(), cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for_metrics(proc, out)
        (rank1,) = [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if "--local_rank=1" in p.cmdline() and "nccl_like.py" in " ".join(p.cmdline())]
        rank1.send_signal(signal.SIGTERM)  # rank 0 gets no signal: it stops because rank 1 did
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 143, f"exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-3000:]}"
    step = stop_line(stderr, "SIGTERM", out)
    # both ranks wrote their share of the same step's checkpoint (a rank that went on would have hung the other)
    assert ckpt_step(out / "checkpoint") == step and (out / "checkpoint" / "COMPLETE").exists()
    assert {p.name for p in (out / "checkpoint").glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    assert [m["step"] for m in metrics(out)] == list(range(1, step + 1))


def test_resume_refuses_changed_training_flags_and_keeps_args_json(straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    args_json = (out / "args.json").read_text()
    proc = run("train_sft.py", *SFT, "--output-dir", out, "--resume", "--lr", "2e-3", "--zero-stage", "2",
               "--model-path", straight, expect=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume would change"), proc.stderr[-3000:]
    for part in ("--lr 0.001 -> 0.002", "--zero-stage 0 -> 2", f"--model-path tiny -> {straight}"):
        assert part in lines[0], lines[0]
    assert "--steps" not in lines[0].split("(its args.json)")[0]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written
    # changes that leave the trajectory alone are taken; args.json stays the run's record, resumes.jsonl says what
    run("train_sft.py", *SFT[:-2], "--save-every", "3", "--steps", "7", "--eval-every", "7", "--output-dir",
        f"{out}/", "--resume")
    assert (out / "args.json").read_text() == args_json
    (resume,) = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert resume["step"] == 6 and resume["changed"]["steps"] == [6, 7] and resume["changed"]["save_every"] == [1, 3]
    assert [m["step"] for m in metrics(out)] == list(range(1, 8)) and (out / "step_6").is_dir()


def test_resume_checks_against_the_checkpoint(straight):
    """In process: --stop-after or --steps not past the checkpoint, another number of ranks, a path spelled another
    way."""
    import train_sft
    from shared import dist, engine

    recorded = json.loads((straight / "args.json").read_text())
    ckpt = straight / "checkpoint"

    def check(world=1, **changes):
        args = train_sft.Args(**{**{k: v for k, v in recorded.items() if k in train_sft.Args.__dataclass_fields__},
                                 "resume": True, **changes})
        return engine._check_resume(args, straight, ckpt, 6, dist.Ctx(0, world, 0, torch.device("cpu")))

    assert check() == {}
    with pytest.raises(dist.UserError, match="--stop-after 6 is not after the checkpoint's step 6"):
        check(stop_after=6)  # (dpo.py and kto.py crashed on this: no reference log-probs for the steps after it)
    with pytest.raises(dist.UserError, match="--steps 5 is below the checkpoint's step 6"):
        check(steps=5)
    with pytest.raises(dist.UserError, match="written by 1 ranks and this run has 2"):
        check(world=2)
    with pytest.raises(dist.UserError, match="--steps 6 -> 8"):
        check(steps=8, lr_decay=True)  # the decay spans --steps
    assert check(steps=8, output_dir=f"{straight}/.") == {"steps": [6, 8]}  # the same directory


def bad_output_dir(out, *flags) -> str:
    """A script's one error line (exit 2) for --output-dir `out`."""
    proc = run("train_sft.py", *SFT, "--output-dir", out, *flags, expect=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --output-dir"), proc.stderr[-3000:]
    return lines[0]


def refused_in_process(out, **flags) -> str:
    """engine.prepare_output_dir's UserError for --output-dir `out` (one rank, in this process)."""
    import train_sft
    from shared import dist, engine

    with pytest.raises(dist.UserError) as e:
        engine.prepare_output_dir(train_sft.Args(output_dir=str(out), **flags), dist.Ctx(0, 1, 0, torch.device("cpu")),
                                  "train_sft")
    return str(e.value)


def test_output_dir_that_is_a_file_gives_one_line(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert "is a file, not a directory" in bad_output_dir(f)
    assert "is a file, not a directory" in refused_in_process(f / "run")
    assert "is a file, not a directory" in refused_in_process(f, resume=True)
    assert f.read_text() == "mine" and sorted(tmp_path.iterdir()) == [f]


def test_read_only_output_dir_gives_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    made_immutable = subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0 \
        if shutil.which("chattr") else False
    if not made_immutable:
        ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("cannot make a read-only directory here (root, and no chattr)")
        assert "is not writable" in bad_output_dir(ro / "run")
        assert "is not writable" in refused_in_process(ro)
        assert "is not writable" in refused_in_process(ro, overwrite=True)
        assert list(ro.iterdir()) == []
    finally:
        if made_immutable:
            subprocess.run(["chattr", "-i", str(ro)])
        ro.chmod(0o755)
