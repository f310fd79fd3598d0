"""The reading contract of the scripts (README "Reading the code"): short lines, a main() on one or two screens,
statistics by name, the loss contract with DeepSpeed in one helper, one flag vocabulary."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_sft", "train_rm", "ppo_max", "reinforce_pp", "grpo", "rloo", "dpo", "kto"]
RL = ["ppo_max", "reinforce_pp", "grpo", "rloo"]


def source(name: str) -> str:
    return (ROOT / f"{name}.py").read_text()


def args_fields(name: str) -> set:
    tree = ast.parse(source(name))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    return {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)}


@pytest.mark.parametrize("path", [*(f"{s}.py" for s in SCRIPTS), *(f"shared/{p.name}" for p in
                                                                   sorted((ROOT / "shared").glob("*.py")))])
def test_no_line_over_110_characters(path):
    long = [(i, len(line)) for i, line in enumerate((ROOT / path).read_text().splitlines(), 1) if len(line) > 110]
    assert not long, f"{path}: lines over 110 characters (line, length): {long}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_main_fits_on_two_screens(name):
    tree = ast.parse(source(name))
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 100, f"{name}.main() is {main.end_lineno - main.lineno + 1} lines"


@pytest.mark.parametrize("name", SCRIPTS)
def test_statistics_are_read_by_name_not_by_index(name):
    hits = re.findall(r"\bstats\[\s*\d", source(name))
    assert not hits, f"{name}.py reads statistics by position: {hits}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_loss_contract_with_deepspeed_lives_in_one_helper(name):
    """No script calls backward()/step() itself or scales by the accumulation count: engine.train_micro_batch does."""
    text = source(name)
    assert "engine.train_micro_batch(" in text
    assert not re.search(r"\.backward\(|\.step\(\)|\*\s*grad_accum", text), name


def test_one_vocabulary_for_the_same_concept():
    """The RL scripts name the KL coefficient --kl-coef and the ratio's clip range --eps-low/--eps-high; every script
    with a choice of loss calls it --loss-type (DPO/KTO's --beta is the implicit reward's temperature, not a KL
    coefficient on a sampled policy)."""
    for name in RL:
        fields = args_fields(name)
        assert {"kl_coef", "eps_low", "eps_high"} <= fields, (name, fields)
        assert not {"beta", "eps", "loss", "clip_eps"} & fields, (name, fields)
    for name in ["rloo", "grpo", "dpo"]:
        assert "loss_type" in args_fields(name) and "loss" not in args_fields(name), name


def test_readme_is_a_guide_not_lab_notes():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; lab notes belong in benchmarks/README.md"
