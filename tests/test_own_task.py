"""A user's own task, data files and reward module, through all eight scripts: eval/task_score before and after from
the user's module, honest defaults (nothing of the demo used implicitly), the resolved defaults in args.json, and the
embedded tokenizer's unknown characters refused."""
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_script
from shared import engine

# The task: "a+b=" prompts whose answer is in a column named `target` (not the built-in task's `answer`), scored by
# a module written here with partial credit: 1 - |response - target| / 10, floored at 0 (0 for a non-number)
MODULE = '''
import os


def score(prompts, responses, target, **extras):
    with open(os.environ["TASK_CALLS"], "a") as f:
        f.write(f"{len(responses)}\\n")
    out = []
    for r, t in zip(responses, target):
        try:
            out.append(max(0.0, 1.0 - abs(int(r.strip()) - int(t)) / 10))
        except ValueError:
            out.append(0.0)
    return out
'''


def credit(response: str, target: str) -> float:  # the formula again, for the independent check
    try:
        return max(0.0, 1.0 - abs(int(response.strip()) - int(target)) / 10)
    except ValueError:
        return 0.0


def write_task(d):
    """Train and held-out files of every kind the scripts read, from disjoint problems."""
    rng = random.Random(7)
    problems = rng.sample([(a, b) for a in range(10, 60) for b in range(10, 60)], 400)
    splits = {"train": problems[:360], "eval": problems[360:]}
    for split, probs in splits.items():
        rows = {"prompts": [], "sft": [], "pairs": [], "unpaired": []}
        for i, (a, b) in enumerate(probs):
            p, t = f"{a}+{b}=", str(a + b)
            wrong = str(a + b + rng.choice([-11, -10, -1, 1, 10, 11]))
            rows["prompts"].append({"prompt": p, "target": t})
            rows["sft"].append({"prompt": p, "response": t, "target": t})
            rows["pairs"].append({"prompt": p, "chosen": t, "rejected": wrong, "target": t})
            rows["unpaired"].append({"prompt": p, "response": t if i % 2 else wrong, "label": bool(i % 2),
                                     "target": t})
        for kind, rs in rows.items():
            (d / f"{kind}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    (d / "my_task.py").write_text(MODULE)


KIND = {"train_sft": "sft", "train_rm": "pairs", "dpo": "pairs", "kto": "unpaired", "grpo": "prompts",
        "rloo": "prompts", "reinforce_pp": "prompts", "ppo_max": "prompts"}
STEPS = {"train_sft": ["--steps", "2", "--batch-size", "16", "--micro-batch-size", "16"],
         "train_rm": ["--steps", "2", "--batch-size", "16", "--micro-batch-size", "16"],
         "dpo": ["--steps", "6", "--batch-size", "32", "--micro-batch-size", "32"],
         "kto": ["--steps", "6", "--batch-size", "32", "--micro-batch-size", "32"],
         "grpo": ["--steps", "5"], "rloo": ["--steps", "5"], "reinforce_pp": ["--steps", "5"],
         "ppo_max": ["--steps", "10"]}  # its first 5 steps train only the critic (ppo-max preset)
RL = ("grpo", "rloo", "reinforce_pp", "ppo_max")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("own_task")
    write_task(d)
    return d


@pytest.mark.parametrize("script", list(KIND))
def test_every_script_reports_the_users_task_score(task_dir, tmp_path, script):
    kind, out = KIND[script], tmp_path / script
    args = ["--dataset", task_dir / f"{kind}_train.jsonl", "--eval-dataset", task_dir / f"{kind}_eval.jsonl",
            "--output-dir", out, *STEPS[script]]
    if script in RL:
        args += ["--reward-fn", "my_task:score"]  # the rule reward is also the task score by default
    else:
        args += ["--eval-reward-fn", "my_task:score"]
    if script == "train_rm":
        args += ["--eval-policy-path", engine.DEFAULT_SFT]
    calls = tmp_path / "calls.txt"
    proc = run_script(f"{script}.py", *args, cwd=task_dir, env={"TASK_CALLS": str(calls)})
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["before"]["eval/task_score"], summary["after"]["eval/task_score"]
    assert calls.read_text().strip(), "the user's module was never called"
    assert "my_task:score" in summary["sources"]["eval/task_score"]
    assert "eval/accuracy" not in summary["before"]  # one name per meaning: no pair accuracy under that name
    args_json = json.loads((out / "args.json").read_text())
    assert args_json["defaults"] == "embedded"  # the demo model: its own column, recorded
    if script in RL or script in ("dpo", "kto"):
        assert after > before + 0.01, (before, after, proc.stdout[-2000:])
    if script == "ppo_max":  # own data: no demo reward model, no demo ptx data, the critic from the policy
        assert args_json["reward_path"] == "" and args_json["ptx_coef"] == 0 and args_json["critic_init"] == "policy"
        assert "critic starts from the policy" in proc.stdout and "PPO-ptx off" in proc.stdout
        assert "my_task:score" in summary["sources"]["rollout/reward"] and "reward-path" not in json.dumps(summary)
    if script == "dpo":  # the task score before training, computed independently: greedy decoding in transformers
        tok = AutoTokenizer.from_pretrained(engine.DEFAULT_SFT)
        model = AutoModelForCausalLM.from_pretrained(engine.DEFAULT_SFT).eval()
        rows = [json.loads(line) for line in (task_dir / "pairs_eval.jsonl").read_text().splitlines()]
        total = 0.0
        for r in rows:
            ids = torch.tensor([tok(r["prompt"])["input_ids"]])
            with torch.no_grad():
                gen = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
            total += credit(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True), r["target"])
        assert abs(before - total / len(rows)) < 1e-6, (before, total / len(rows))


def test_pretrained_defaults_resolve_for_a_users_model(family_dir, tmp_path, task_dir):
    """A model that is not the demo's gets the pretrained column (recorded in args.json); flags given still win."""
    out = tmp_path / "run"
    run_script("grpo.py", "--model-path", family_dir, "--dataset", task_dir / "prompts_train.jsonl",
               "--reward-fn", "my_task:score", "--steps", "1", "--prompts-per-step", "8", "--n-samples", "2",
               "--max-new-tokens", "4", "--eval-size", "4", "--output-dir", out, cwd=task_dir,
               env={"TASK_CALLS": str(tmp_path / "calls.txt")})
    a = json.loads((out / "args.json").read_text())
    assert a["defaults"] == "pretrained" and a["lr"] == 1e-6 and a["micro_batch_size"] == 8
    assert a["max_new_tokens"] == 4  # given on the command line


def test_embedded_tokenizer_refuses_characters_it_does_not_know(tmp_path):
    data = tmp_path / "times.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}×{b}=", "response": str(a * b)}) + "\n" for a in range(1, 30)
                            for b in range(1, 4)))
    proc = run_script("train_sft.py", "--dataset", data, "--output-dir", tmp_path / "out", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "'×'" in errors[0] and "ASCII" in errors[0], proc.stderr[-800:]
    assert not (tmp_path / "out").exists()
