"""LoRA (--lora-rank, shared/lora.py) on the model-family matrix: only the adapters train, the reference is the policy
with its adapters off, exports (merged full model and peft adapter) reload with the adapted model's numbers, resume is
exact, the vLLM push sends merged weights, and bad LoRA flags are refused with one line."""
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script
from shared import dist, engine, lora, rollout
from shared.args import LoraArgs, RunArgs

RANK, ALPHA = 4, 8
TARGETS = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
           "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
           "gpt2": ("c_attn", "c_proj", "c_fc")}  # the attention and MLP projections; never the LM head


@dataclass
class Args(RunArgs, LoraArgs):
    pass


@pytest.fixture(scope="module")
def ctx():
    """A one-rank process group in this process; the MASTER_PORT dist.init sets is taken back, so the scripts this
    module launches do not inherit (and clash with) this group's port."""
    import os

    had = "MASTER_PORT" in os.environ
    ctx = dist.init(0)
    if not had:
        os.environ.pop("MASTER_PORT")
    return ctx


def family_of(path) -> str:
    return json.loads((Path(path) / "config.json").read_text())["model_type"]


def lora_model(path, ctx, kind="causal", **flags):
    """A LoRA model as the scripts load it, with its B matrices made non-zero (fresh adapters add nothing)."""
    args = Args(lora_rank=RANK, lora_alpha=ALPHA, **flags)
    model = engine.load_model(str(path), args, ctx, kind=kind, lora="train")
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0, 0.05)
    return model.eval(), args


def base_model(path, kind="causal"):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "causal":
        return AutoModelForCausalLM.from_pretrained(path).eval()
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()


def expected_adapter_size(path, kind) -> tuple[set, int]:
    """(names of the modules that must carry adapters, rank x (in + out) summed over them), read off a plain copy."""
    names, size = set(), 0
    for name, m in base_model(path, kind).named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS[family_of(path)] and hasattr(m, "weight"):
            names.add(name)
            size += RANK * sum(m.weight.shape)
    return names, size


def hand_merged(base: dict, adapter_dir: Path) -> dict:
    """W + (alpha / r) B @ A for every adapted weight of `base`, from the adapter's files (transposed for GPT-2's
    Conv1D, whose weights are stored (in, out): the config's fan_in_fan_out)."""
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    merged = dict(base)
    for key in [k for k in adapter if ".lora_A." in k]:
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        a, b = adapter[key], adapter[key.replace(".lora_A.", ".lora_B.")]
        delta = scaling * (b @ a)
        w = base[f"{module}.weight"]
        merged[f"{module}.weight"] = w + (delta.T if config["fan_in_fan_out"] else delta)
    return merged


# ---------------------------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("kind", ["causal", "score"])
def test_trainable_parameters_are_exactly_the_adapters(family_dir, ctx, kind):
    model, args = lora_model(family_dir, ctx, kind)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if ".modules_to_save." in n}
    assert all(".lora_A." in n or ".lora_B." in n for n in set(trainable) - head), sorted(trainable)
    assert head == ({"score.modules_to_save.default.weight"} if kind == "score" else set())
    modules, size = expected_adapter_size(family_dir, kind)
    adapted = {n.split(".lora_A.")[0] for n in trainable if ".lora_A." in n}
    assert adapted == modules
    assert sum(p.numel() for n, p in trainable.items() if n not in head) == size
    # the DeepSpeed optimizer holds exactly those (ZeRO-0: its param groups; ZeRO-2: its flat fp32 partition)
    for stage in (0, 2):
        args.zero_stage = stage
        wrapped = engine.wrap_trainable(model, args, ctx, 1e-3, 1, 1, 10)
        if stage == 0:
            held = {id(p) for g in wrapped.optimizer.param_groups for p in g["params"]}
            assert held == {id(p) for p in trainable.values()}
        else:
            flat = sum(t.numel() for t in wrapped.optimizer.single_partition_of_fp32_groups)
            assert flat == sum(p.numel() for p in trainable.values())


def test_reference_is_the_base_model_with_adapters_off(family_dir, ctx):
    model, args = lora_model(family_dir, ctx)
    base = engine.disable_dropout(base_model(family_dir))
    ref = lora.reference(model, args)
    torch.manual_seed(0)
    prompts = torch.randint(5, 300, (2, 6))
    ids = torch.cat([prompts.repeat_interleave(3, 0), torch.randint(5, 300, (6, 5))], 1)  # repeated prompts: shared
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    with torch.no_grad():
        want = rollout.response_logprobs(base, ids, mask, 6)
        got = rollout.response_logprobs(ref, ids, mask, 6)
        adapted = rollout.response_logprobs(model, ids, mask, 6)
    assert (got - want).abs().max() <= 1e-6
    assert (adapted - want).abs().max() > 1e-3  # the adapters were on before, and are on again after
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())


def test_exports_merged_model_and_adapter_that_reload_with_the_adapted_numbers(family_dir, ctx, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, args = lora_model(family_dir, ctx)
    tok = engine.load_tokenizer(str(family_dir), args)
    out = tmp_path / "out"
    engine.export_hf(model, tok, out, ctx)
    # the merged weights are W + (alpha / r) B @ A of the saved adapter on the saved base, every other weight the base's
    want = hand_merged(load_file(Path(family_dir) / "model.safetensors"), out / "adapter")
    got = load_file(out / "model.safetensors")
    assert set(got) == set(want)
    for k in got:
        assert torch.allclose(got[k], want[k], atol=1e-6, rtol=0), k
    x = torch.randint(5, 300, (2, 9))
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=x).logits
        peft = PeftModel.from_pretrained(base_model(family_dir), out / "adapter").eval()(input_ids=x).logits
    assert (merged - adapted).abs().max() <= 1e-5
    assert (peft - adapted).abs().max() <= 1e-5
    # --save-adapter-only: the adapter and the tokenizer, no full model
    only, _ = lora_model(family_dir, ctx, save_adapter_only=True)
    engine.export_hf(only, tok, tmp_path / "only", ctx)
    files = {p.name for p in (tmp_path / "only").iterdir()}
    assert "adapter" in files and "tokenizer.json" in files and not any(f.endswith(".safetensors") for f in files)


# ---------------------------------------------------------------------------------------------- scripts

DPO = ["--batch-size", "8", "--micro-batch-size", "4", "--eval-size", "16", "--steps", "3", "--lr", "1e-3",
       "--max-new-tokens", "8", "--lora-rank", "8", "--ref-on-the-fly"]
COUNTING = '''import atexit, os, runpy, sys
import transformers
made = []
init = transformers.PreTrainedModel.__init__
def counting(self, *a, **k):
    if type(self).__name__.endswith("ForCausalLM"):
        made.append(type(self).__name__)
    init(self, *a, **k)
transformers.PreTrainedModel.__init__ = counting
atexit.register(lambda: open(os.environ["MODELS_FILE"], "w").write(str(len(made))))
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory):
    """dpo.py with LoRA: the reference from the policy with adapters off, or from an explicit frozen copy of the base
    (--ref-model-path); and a run stopped after step 2 and resumed. Each run counts the causal LMs it built."""
    from families import save_family

    base = tmp_path_factory.mktemp("dpo_lora")
    model = save_family("qwen2", base / "qwen2")
    counter = base / "count.py"
    counter.write_text(COUNTING)
    runs, models = {}, {}
    for name, extra in [("shared", []), ("copy", ["--ref-model-path", model]), ("resumed", ["--stop-after", "2"]),
                        ("resumed", ["--resume"])]:
        import os

        os.environ["MODELS_FILE"] = str(base / f"{name}.models")
        run_script(str(counter), ROOT / "dpo.py", "--model-path", model, *DPO, "--output-dir", base / name, *extra)
        runs[name], models[name] = base / name, int((base / f"{name}.models").read_text())
    return runs, models


def test_dpo_with_lora_loads_no_reference_and_matches_a_frozen_copy(dpo_runs):
    runs, models = dpo_runs
    assert models["shared"] == 1 and models["copy"] == 2
    shared, copy = _rows(runs["shared"]), _rows(runs["copy"])
    assert len(shared) == len(copy) == 3
    # the reference runs in every step (--ref-on-the-fly): from step 2 the adapters are non-zero, and switched off
    assert shared[1]["train/rewards/margin"] != 0
    for a, b in zip(shared, copy):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-5, (a["train/loss"], b["train/loss"])


def test_resume_with_lora_is_bit_identical(dpo_runs):
    runs, _ = dpo_runs
    for f in ("model.safetensors", "adapter/adapter_model.safetensors"):
        assert (runs["resumed"] / f).read_bytes() == (runs["shared"] / f).read_bytes(), f


@pytest.fixture
def length_reward(tmp_path, monkeypatch):
    """--reward-fn lengths:score, the response's length in characters: a random model's samples differ in it (an
    exact-match reward is 0 for all of them, and GRPO's advantages with it)."""
    (tmp_path / "lengths.py").write_text("def score(prompts, responses, **extras):\n"
                                         "    return [float(len(r)) for r in responses]\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return ["--reward-fn", "lengths:score"]


def test_zero3_two_ranks_with_gradient_checkpointing_trains_only_the_adapters(tmp_path, length_reward):
    """grpo.py --lora-rank under ZeRO-3 on 2 ranks with gradient checkpointing (llama family): the export's
    non-adapted weights are the base's bit for bit, its adapted ones base + scaling B @ A of its adapter, which
    trained (B moved from 0)."""
    from families import save_family

    model = save_family("llama", tmp_path / "llama")
    out = tmp_path / "run"
    run_script("grpo.py", "--model-path", model, "--steps", "2", "--prompts-per-step", "4", "--n-samples", "4",
               "--micro-batch-size", "8", "--eval-size", "8", "--max-new-tokens", "6", "--lr", "1e-2",
               "--lora-rank", "4", "--lora-alpha", "8", "--zero-stage", "3", "--gradient-checkpointing",
               "--output-dir", out, *length_reward, ranks=2)
    base, adapter = load_file(model / "model.safetensors"), load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(v.abs().max() > 0 for k, v in adapter.items() if ".lora_B." in k)
    want, got = hand_merged(base, out / "adapter"), load_file(out / "model.safetensors")
    assert set(got) == set(want)
    for k in got:
        if torch.equal(want[k], base[k]):
            assert torch.equal(got[k], base[k]), k
        else:
            assert torch.allclose(got[k], want[k], atol=1e-6, rtol=0), k


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_grpo_with_lora_pushes_merged_weights_to_vllm(tmp_path, length_reward):
    """On the tied qwen2 family: after every push the engine's log-probs are the trainer's (LoRA policy) to 1e-4."""
    from families import save_family

    out = tmp_path / "run"
    model = save_family("qwen2", tmp_path / "qwen2")
    run_script("grpo.py", "--rollout-backend", "vllm", "--model-path", model, "--steps", "3", "--prompts-per-step", "4",
               "--n-samples", "4", "--micro-batch-size", "8", "--eval-size", "8", "--max-new-tokens", "8",
               "--lr", "1e-2", "--lora-rank", "8", "--output-dir", out, *length_reward)
    rows = _rows(out)
    assert len(rows) == 3 and rows[-1]["policy/kl_ref"] > 1e-4  # the adapters moved the policy off the base
    assert all(r["policy/logprob_diff_max"] <= 1e-4 for r in rows), [r["policy/logprob_diff_max"] for r in rows]


@pytest.mark.parametrize("flags,expected", [
    (["--lora-rank", "8", "--lora-path", "no/such/adapter"], "--lora-path no/such/adapter is not a peft adapter"),
    (["--lora-rank", "8", "--lora-target-modules", "nothing_here"], "--lora-target-modules nothing_here"),
    pytest.param(["--lora-rank", "8", "--load-in-4bit"], "--load-in-4bit (QLoRA, bitsandbytes) needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")),
], ids=["lora-path-missing", "targets-match-nothing", "4bit-on-cpu"])
def test_bad_lora_flags_are_refused_with_one_line_and_nothing_written(tmp_path, flags, expected):
    out = tmp_path / "out"
    proc = run_script("dpo.py", "--model-path", "tiny", *flags, "--output-dir", out, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
                    reason="QLoRA (--load-in-4bit) needs a CUDA GPU and bitsandbytes")
def test_qlora_trains_only_the_adapters_and_exports_a_merged_model(family_dir, ctx, tmp_path):
    from transformers import AutoModelForCausalLM

    model, args = lora_model(family_dir, ctx, load_in_4bit=True, dtype="bf16")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    tok = engine.load_tokenizer(str(family_dir), args)
    engine.export_hf(model, tok, tmp_path / "out", ctx)
    x = torch.randint(5, 300, (2, 9), device=ctx.device)
    with torch.no_grad():
        adapted = model(input_ids=x).logits.float()
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).to(ctx.device).eval()
        # the 4-bit base is dequantized for the merge: bf16 rounding, not 1e-5
        assert (merged(input_ids=x).logits.float() - adapted).abs().max() < 0.1
