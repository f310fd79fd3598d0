"""The benchmark suite's own pieces (benchmarks/): the GPU benchmark's CPU mode end to end, the memory reading both
frameworks' processes use, the realistic shape and its data, and the results rows. No timings are asserted here."""
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402
import gpu_bench  # noqa: E402
import instrument  # noqa: E402


def _qwen2_layer_params(h, inter, heads, kv_heads, head_dim):
    q = h * heads * head_dim + heads * head_dim  # Qwen2: biases on q, k, v
    kv = 2 * (h * kv_heads * head_dim + kv_heads * head_dim)
    return q + kv + heads * head_dim * h + 3 * h * inter + 2 * h


def test_gpu_sh_cpu_mode_runs_every_script(tmp_path):
    """benchmarks/gpu.sh --tiny: the GPU benchmark's code path on CPU (tiny Qwen2, fp32), all four scripts."""
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--tiny", "--steps", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "gpu_results.json").read_text())
    t = gpu_bench.TINY
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    body = t["num_hidden_layers"] * _qwen2_layer_params(t["hidden_size"], t["intermediate_size"],
                                                         t["num_attention_heads"], t["num_key_value_heads"], head_dim)
    assert r["non_embedding"] == body + t["hidden_size"]  # + the final norm
    assert r["params"] == r["non_embedding"] + t["vocab_size"] * t["hidden_size"]  # tied: one matrix
    assert set(r["scripts"]) == {"train_sft", "dpo", "grpo", "ppo_max"}
    for name, s in r["scripts"].items():
        assert "failed" not in s, (name, s)
        assert s["steps_timed"] == 1 and s["trained_positions"] > 0 and s["update_s"] > 0, (name, s)
        assert abs(s["mfu_update"] - 6 * r["non_embedding"] * s["trained_positions"] / s["update_s"]
                   / (r["peak_tflops"] * 1e12)) < 1e-12
        assert s["peak_gpu_mb"] is None and s["peak_rss_mb"] > 0  # no GPU here: no GPU figure, not a zero
    for name in ("grpo", "ppo_max"):  # 2 prompts x 2 samples x at most 8 new tokens
        assert 0 < r["scripts"][name]["sampled_tokens"] <= 2 * 2 * 8


def test_peak_memory_is_measured_from_the_turn_start():
    """The reading both runners record per step: the peak RSS since reset_peak() sees a transient allocation that is
    already freed by the time memory() is read."""
    go = instrument.reset_peak()
    n_mib = 256
    x = torch.ones(n_mib * 2**20 // 4)  # touched: resident
    del x
    m = instrument.memory()
    assert m["peak_reset"]
    assert m["rss_go_mb"] == go
    assert m["peak_mb"] - go >= 0.95 * n_mib
    assert m["rss_end_mb"] < m["peak_mb"] - 0.9 * n_mib  # freed: a live-memory reading would miss it


def test_realistic_shape_is_smollm2_135m():
    """The realistic config's parameter count from the architecture's arithmetic (Llama: no biases, tied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = bench.REALISTIC
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**c))
    h, d = c["hidden_size"], c["head_dim"]
    layer = (h * c["num_attention_heads"] * d + 2 * h * c["num_key_value_heads"] * d + c["num_attention_heads"] * d * h
             + 3 * h * c["intermediate_size"] + 2 * h)
    expected = c["vocab_size"] * h + c["num_hidden_layers"] * layer + h
    assert sum(p.numel() for p in model.parameters()) == expected == 134_515_008  # SmolLM2-135M's published count
    assert model.config.tie_word_embeddings


def test_realistic_data_lengths(tmp_path, tokenizer):
    bench.write_task_files(tmp_path, bench.PROMPT_LEN, bench.RESPONSE_LEN, n_train=20, n_eval=4)
    from shared import tasks

    src = tasks.get("addition").rows("pair", "train")[:20]
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    prompts = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert len(pairs) == 20 and len((tmp_path / "sft_eval.jsonl").read_text().splitlines()) == 4
    for p, s, q in zip(pairs, src, prompts):
        assert len(tokenizer(p["prompt"])["input_ids"]) == bench.PROMPT_LEN
        for k in ("chosen", "rejected"):
            assert len(tokenizer(p[k])["input_ids"]) == bench.RESPONSE_LEN
            assert p[k].split(" ")[0] == s[k]  # the answer is kept, first
        assert p["prompt"].endswith(" " + s["prompt"]) and q["prompt"] == p["prompt"]


def test_ratio_rows_name_time_and_memory():
    def w(label, s, peak, tokens=0.0, gen=0.0):
        return {"label": label, "median_s": s, "peak_mb": peak, "step_delta_mb": peak / 4, "sampled_seqs": 4,
                "sampled_tokens": tokens, "decode_positions": 0.0 if "vllm" in label else tokens, "optimizer_steps": 1,
                "fwd_grad_rows": 4, "fwd_nograd_rows": 4, "backward_calls": 1,
                "rollout_tokens_per_s": tokens / gen if gen else None}

    r = {"comparisons": [
        {"name": "grpo-x", "size": "x", "load_before": 0.5, "workers": [
            w("ours:grpo.py", 3.0, 1500.0, 512, 2.0), w("ours:grpo.py+vllm", 2.0, 2500.0, 512, 0.5),
            w("trl:GRPOTrainer", 6.0, 2000.0, 512, 4.0)]},
        {"name": "sft-x", "size": "x", "load_before": 0.5,
         "workers": [w("ours:train_sft.py", 1.0, 900.0), {"label": "trl:SFTTrainer", "failed": "boom"}]}]}
    rows = {row["name"]: row for row in bench.ratio_rows(r)}
    assert set(rows) == {"grpo-x", "grpo-x-vllm", "grpo-x-vllm-vs-hf", "sft-x"}
    assert rows["grpo-x"]["time_ratio"] == 0.5 and rows["grpo-x"]["memory_ratio"] == 0.75
    assert rows["grpo-x-vllm"]["time_ratio"] == 2.0 / 6.0 and rows["grpo-x-vllm"]["memory_ratio"] == 1.25
    vs = rows["grpo-x-vllm-vs-hf"]
    assert vs["other"] == "ours:grpo.py" and vs["rollout_tokens_per_s_ratio"] == (512 / 0.5) / (512 / 2.0)
    assert rows["sft-x"]["time_ratio"] is None and rows["sft-x"]["memory_ratio"] is None
    assert all({"name", "time_ratio", "memory_ratio"} <= set(row) for row in rows.values())


def test_json_data_loads_without_the_datasets_package(tmp_path, monkeypatch):
    """A bare GPU machine has no `datasets`: the jsonl files gpu_bench.py writes must load without it."""
    from shared import data

    bench.write_task_files(tmp_path, 16, 16, n_train=3, n_eval=1)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    rows = data.load_table(str(tmp_path / "prompts.jsonl"), "train", "prompt")
    expected = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in ("prompt", "answer")} for r in rows] == expected
