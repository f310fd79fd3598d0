"""Data loading: file formats, column flags, templates, the loss mask, truncation, and bad input."""
import json

import pytest
import torch

from shared import data
from shared.dist import UserError
from train_sft import Args

ROWS = [{"prompt": "1+2=", "response": "3", "note": "a"}, {"prompt": "10+5=", "response": "15", "note": "b"}]


def write(path, rows, fmt):
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "csv":
        ds.to_csv(str(path), index=False)
    elif fmt == "dir":
        ds.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "dir"])
def test_every_format_loads_the_same_rows(tmp_path, fmt):
    path = write(tmp_path / f"d.{fmt}" if fmt != "dir" else tmp_path / "d", ROWS, fmt)
    assert data.load_table(str(path), "train", "sft") == ROWS


def test_builtin_task_splits_do_not_overlap():
    train = {r["prompt"] for r in data.load_table("addition", "train", "prompt")}
    test = {r["prompt"] for r in data.load_table("addition", "test", "prompt")}
    assert len(test) == 500 and len(train) == 9500 and not train & test


def test_builtin_pairs_are_correct_vs_wrong():
    for r in data.load_table("addition", "train", "pair")[:200]:
        a, b = map(int, r["prompt"][:-1].split("+"))
        assert int(r["chosen"]) == a + b and int(r["rejected"]) != a + b


def test_column_flags_pick_the_columns(tmp_path, tokenizer):
    path = write(tmp_path / "d.jsonl", [{"question": "1+2=", "answer": "3"}], "jsonl")
    args = Args(dataset=str(path), prompt_column="question", response_column="answer")
    (ex,) = data.tokenize(data.load_table(str(path), "train", "sft"), tokenizer, "sft", args)
    assert tokenizer.decode(ex["input_ids"]) == "1+2=3<eos>"


def test_plain_template_mask_covers_response_and_one_eos(tokenizer):
    args = Args()
    rows = [{"prompt": "12+3=", "response": "15"}, {"prompt": "1+1=", "response": "2<eos>"}]  # EOS in data: not doubled
    exs = data.tokenize(rows, tokenizer, "sft", args)
    batch = data.collate([e["input_ids"] for e in exs], [e["prompt_len"] for e in exs], tokenizer.pad_token_id)
    for i, (prompt, response) in enumerate([("12+3=", "15"), ("1+1=", "2")]):
        expected = [0] * len(prompt) + [1] * (len(response) + 1)  # char tokenizer: one token per character
        width = batch["input_ids"].shape[1]
        assert batch["response_mask"][i].tolist() == expected + [0] * (width - len(expected))
        ids = batch["input_ids"][i][batch["response_mask"][i]].tolist()
        assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1


def test_chat_template_is_used_for_strings_and_conversations(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    args = Args()
    rows = [{"prompt": "hi", "response": "yo"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    (a,) = data.tokenize(rows[:1], tok, "sft", args)
    (b,) = data.tokenize(rows[1:], tok, "sft", args)
    assert tok.decode(a["input_ids"]) == tok.decode(b["input_ids"]) == "[user]hi[assistant]yo<eos>"
    assert a["prompt_len"] == len("[user]hi[assistant]")


def test_conversation_without_chat_template_uses_plain_rendering(tokenizer):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    (ex,) = data.tokenize(rows, tokenizer, "sft", Args())
    assert tokenizer.decode(ex["input_ids"]) == "user: hi\nassistant: yo<eos>"


def test_pairs_from_two_full_conversations(tokenizer):
    conv = lambda reply: [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": reply}]  # noqa: E731
    (ex,) = data.tokenize([{"chosen": conv("4"), "rejected": conv("5")}], tokenizer, "pair", Args())
    assert tokenizer.decode(ex["chosen_ids"]).endswith("assistant: 4<eos>")
    assert tokenizer.decode(ex["rejected_ids"]).endswith("assistant: 5<eos>")


def test_unpaired_labels_and_prompt_extras(tokenizer):
    rows = [{"prompt": "a", "response": "b", "label": True}, {"prompt": "c", "response": "d", "label": 0}]
    exs = data.tokenize(rows, tokenizer, "unpaired", Args())
    assert [e["label"] for e in exs] == [True, False]
    (p,) = data.tokenize([{"prompt": "1+2=", "answer": "3"}], tokenizer, "prompt", Args())
    assert p["extras"] == {"answer": "3"} and tokenizer.decode(p["prompt_ids"]) == "1+2="


def test_truncation_and_skipping_are_counted(tokenizer):
    rows = [{"prompt": "1+2=", "response": "3"}, {"prompt": "123456+1=", "response": "123457"}]
    logs = []
    exs = data.tokenize(rows, tokenizer, "sft", Args(max_len=10), log=logs.append)
    assert len(exs) == 2 and len(exs[1]["input_ids"]) == 10 and "1 examples over --max-len 10 truncated, 0 skipped" in logs[0]
    exs = data.tokenize(rows, tokenizer, "sft", Args(max_len=10, overlong="skip"), log=logs.append)
    assert len(exs) == 1 and "0 examples over --max-len 10 truncated, 1 skipped" in logs[1]


def test_sampler_is_deterministic_and_covers_each_epoch():
    s1, s2 = data.Sampler(10, seed=3), data.Sampler(10, seed=3)
    stream = [i for step in range(5) for i in s1.global_batch(step, 4)]
    assert stream == [i for step in range(5) for i in s2.global_batch(step, 4)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new permutation each epoch


# ------------------------------------------------------------------------------------------------ bad input


def test_unknown_column_lists_the_available_ones(tmp_path, tokenizer):
    path = write(tmp_path / "d.jsonl", ROWS, "jsonl")
    with pytest.raises(UserError, match=r"column 'answer' not found; available columns: \['note', 'prompt', 'response'\]"):
        data.tokenize(data.load_table(str(path), "train", "sft"), tokenizer, "sft", Args(response_column="answer"))


@pytest.mark.parametrize("bad", [None, "", 3, ["x"]])
def test_bad_field_names_the_row(tokenizer, bad):
    rows = [{"prompt": "1+2=", "response": "3"}, {"prompt": "1+3=", "response": bad}]
    with pytest.raises(UserError, match="row 1, column 'response'"):
        data.tokenize(rows, tokenizer, "sft", Args())


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_table(str(tmp_path / "nope.jsonl"), "train", "sft")
    with pytest.raises(UserError, match="unknown built-in task 'additon'"):
        data.load_table("additon", "train", "sft")


def test_empty_after_filtering(tokenizer):
    with pytest.raises(UserError, match="no train examples left"):
        data.tokenize([{"prompt": "1234567+1=", "response": "1"}], tokenizer, "sft", Args(max_len=5))


def test_batch_sizes_that_do_not_divide():
    from types import SimpleNamespace

    assert data.check_batch_sizes(32, SimpleNamespace(micro_batch_size=8), 2) == 2
    with pytest.raises(UserError, match="--batch-size 30 must be a positive multiple"):
        data.check_batch_sizes(30, SimpleNamespace(micro_batch_size=8), 2)
    args = SimpleNamespace(micro_batch_size=64)  # a memory limit above the batch: lowered to it, one micro-batch
    assert data.check_batch_sizes(16, args, 2) == 1 and args.micro_batch_size == 8


def test_left_and_right_padding():
    ids, mask = data.pad([[5, 6, 7], [8]], pad_id=0, left=True)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = data.pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and torch.equal(mask, torch.tensor([[1, 1, 1], [1, 0, 0]]))


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", \n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        data.load_table(str(path), "train", "sft")


def test_over_long_rl_prompts_are_skipped_never_cut():
    """A cut chat prompt loses its template's head (`<|im_start|>system`) or its generation prompt; RL prompts over
    --max-len are skipped (and counted) under either --overlong, and every kept prompt is whole."""
    from families import chatml_tokenizer

    tok = chatml_tokenizer()
    rows = [{"prompt": "1+2="}, {"prompt": "the sum of " * 30 + "1+2="}]
    whole = [data.encode_prompt(tok, r["prompt"]) for r in rows]
    budget = len(whole[0]) + 5
    assert len(whole[1]) > budget
    for overlong in ("truncate", "skip"):
        logs = []
        exs = data.tokenize(rows, tok, "prompt", Args(max_len=budget, overlong=overlong), log=logs.append)
        assert [e["prompt_ids"] for e in exs] == whole[:1] and "0 examples over --max-len" in logs[0] and "1 skipped" in logs[0]
        assert tok.decode(exs[0]["prompt_ids"]).startswith("<|im_start|>user")


@pytest.mark.parametrize("flag,expected", [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_dtype_flag_is_honoured_on_cpu(flag, expected):
    from types import SimpleNamespace

    from shared import engine

    ctx = SimpleNamespace(device=torch.device("cpu"))
    assert engine.dtype(SimpleNamespace(dtype=flag), ctx) == expected
    cfg = engine.ds_config(SimpleNamespace(dtype=flag, zero_stage=0, offload=False, max_grad_norm=1.0),
                           SimpleNamespace(device=torch.device("cpu"), world=1))
    assert cfg["bf16"]["enabled"] == (expected == torch.bfloat16)
    with pytest.raises(UserError, match="--dtype must be auto, bf16 or fp32"):
        engine.dtype(SimpleNamespace(dtype="fp16"), ctx)
