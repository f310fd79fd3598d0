"""Data loading: built-in tasks, local files and directories, HF hub datasets -> validated, tokenized
examples.

Templates. Conversations (lists of {role, content}) go through the tokenizer's chat template. A plain-string
prompt goes through the chat template as one user message when the tokenizer has one; otherwise the PLAIN
TEMPLATE applies: the prompt's tokens (with the tokenizer's BOS, if it adds one) followed directly by the
response's tokens and EOS. A conversation with no chat template is rendered as "role: content" lines followed
by "assistant: ". Every response ends with exactly one EOS token (a trailing EOS in the data is not doubled).
"""
import csv
import json
import math
import random
from pathlib import Path

import torch

from shared import dist, tasks
from shared.dist import UserError

KINDS = {  # kind -> the columns its rows need (besides the prompt)
    "sft": ("response",),
    "pair": ("chosen", "rejected"),
    "unpaired": ("response", "label"),
    "prompt": (),
}
LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class Row(dict):
    """A row that remembers where its file has it: `index` (0-based, in the file's order) and `where` (e.g.
    "data.jsonl line 31"), so an error names the row as the file has it although rows are shuffled before they
    are validated (`train_eval_rows`)."""

    def __init__(self, row: dict, index: int, where: str):
        super().__init__(row)
        self.index, self.where = index, where


def _located(rows: list, name: str, lines: list[int] | None = None) -> list:
    """Rows as `Row`s: index i, and line lines[i] of file `name` when given (jsonl, csv)."""
    return [Row(r, i, f"{name} line {lines[i]}" if lines else name) if isinstance(r, dict) else r
            for i, r in enumerate(rows)]


def _at(row, i: int, col: str | None = None) -> str:
    """"row 30, column 'response' (data.jsonl line 31)": the row as its file has it (i, its position now, for
    rows that do not know their origin: a built-in task's)."""
    text = f"row {getattr(row, 'index', i)}" + (f", column '{col}'" if col else "")
    return text + (f" ({row.where})" if getattr(row, "where", "") else "")


def _columns(row: dict) -> list[str]:
    return sorted(str(k) for k in row)  # (a csv row with more cells than its header has a None key)


def load_table(spec: str, split: str, kind: str) -> list[dict]:
    """Rows (dicts) of a built-in task, a local file or directory, or a hub dataset."""
    if spec in tasks.TASKS:
        return tasks.get(spec).rows(kind, "test" if split in ("test", "validation", "eval") else "train")
    try:
        import datasets
    except ImportError:  # json/jsonl/csv files are read without it (a bare GPU machine may not have it)
        datasets = None

    path = Path(spec).expanduser()
    try:
        if path.is_file():
            if path.suffix not in LOADERS:
                raise UserError(f"dataset file {spec} has an unsupported extension; "
                                f"use one of {sorted(LOADERS)}")
            if path.suffix == ".csv":  # every cell is text: "3" stays a string, as written
                return _read_csv(path)
            if path.suffix in (".json", ".jsonl"):  # read as written: no type coercion across rows
                return _read_json(path)
            ds = datasets.load_dataset(LOADERS[path.suffix], data_files=str(path), split="train")
            where = path.name
        elif path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                ds = datasets.load_from_disk(str(path))
                ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            else:
                ds = datasets.load_dataset(str(path), split=split)
            where = f"{spec} split {split}"
        elif path.suffix in LOADERS or spec.startswith((".", "/", "~")):
            raise UserError(f"dataset file {spec} does not exist; check the path")
        elif "/" not in spec:
            raise UserError(f"unknown built-in task '{spec}' (built-in: {sorted(tasks.TASKS)}); "
                            f"for a hub dataset give its full name, owner/name")
        else:
            ds = datasets.load_dataset(spec, split=split)
            where = f"{spec} split {split}"
    except UserError:
        raise
    except Exception as e:  # a hub name that cannot be reached, a split that does not exist, a malformed file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"could not load dataset '{spec}' (split '{split}'): {msg}. Built-in tasks: "
                        f"{sorted(tasks.TASKS)}; local json/jsonl/parquet/csv files and directories "
                        "also work") from None
    return _located(ds.to_list(), where)


def _read_csv(path: Path) -> list[dict]:
    """The rows of a csv file, each knowing its line (the header is line 1)."""
    rows, lines = [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:  # line_num: the row's last line; a quoted cell may span lines
            rows.append(row)
            lines.append(reader.line_num - sum(v.count("\n") for v in row.values() if isinstance(v, str)))
    return _located(rows, path.name, lines)


def _read_json(path: Path) -> list[dict]:
    text = path.read_text()
    try:
        rows = json.loads(text) if path.suffix == ".json" else None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix the file") from None
    lines = None
    if rows is None:
        rows, lines = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {n} is not valid JSON ({e.msg}); "
                                    "fix or drop that line") from None
                if not isinstance(rows[-1], dict):
                    raise UserError(f"{path} line {n} holds a JSON {type(rows[-1]).__name__}, "
                                    f"not an object; each line of a .jsonl file is one row, "
                                    f"an object {{column: value}}")
                lines.append(n)
    if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
        rows = next(iter(rows.values()))  # {"data": [...]}
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path} must hold a list of objects (one per row), or one object per line in .jsonl")
    return _located(rows, path.name, lines)


def train_eval_rows(args, kind: str) -> tuple[list[dict], list[dict]]:
    """Train rows and held-out rows (the task's test split, --eval-dataset, or --eval-size rows split off)."""
    rows = load_table(args.dataset, args.dataset_split, kind)
    if args.eval_dataset:
        eval_rows = load_table(args.eval_dataset, args.eval_split, kind)
        source = f"--eval-dataset {args.eval_dataset}"
    elif args.dataset in tasks.TASKS:
        eval_rows = load_table(args.dataset, "test", kind)
        source = f"the {args.dataset} task's test split"
    else:  # (each row keeps its place in the file for error messages: `Row`)
        random.Random(0).shuffle(rows)
        n_eval = min(args.eval_size, len(rows) // 10)
        eval_rows, rows = rows[:n_eval], rows[n_eval:]
        source = "split off --dataset (10%, at most --eval-size; give --eval-dataset to choose them)"
    if not rows:
        raise UserError(f"dataset {args.dataset} has no rows; check the file or --dataset-split")
    dist.say(f"[data] {len(rows)} train rows; held-out: {min(len(eval_rows), args.eval_size)} rows, {source}")
    return rows, eval_rows[: args.eval_size]


def eval_prompts(args, eval_rows: list[dict], tok, log=print) -> list[dict]:
    """The held-out prompts of eval/task_score, {prompt_ids, prompt, extras}, each prompt once: the built-in
    task's test problems (with their answers), or the held-out rows of any kind (their extra columns as
    extras)."""
    if args.dataset in tasks.TASKS and not args.eval_dataset:
        eval_rows = tasks.get(args.dataset).rows("prompt", "test")[: args.eval_size]
    if not eval_rows:
        return []
    seen, unique = set(), []
    for ex in tokenize(eval_rows, tok, "prompt", args, "eval", log):
        key = json.dumps(ex["prompt"])
        if key not in seen:
            seen.add(key)
            unique.append(ex)
    return unique


# ---------------------------------------------------------------------------------------------- validation


def _is_messages(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in x)


def _field(row: dict, i: int, col: str, flag: str, allow_messages: bool = True):
    if col not in row:
        raise UserError(f"column '{col}' not found; available columns: {_columns(row)}, in {_at(row, i)}. "
                        f"Set --{flag}")
    value = row[col]
    if isinstance(value, str) and value.strip():
        return value
    if allow_messages and _is_messages(value):
        return value
    what = "a non-empty string" + (" or a list of {role, content} messages" if allow_messages else "")
    raise UserError(f"{_at(row, i, col)}: expected {what}, got {type(value).__name__} {str(value)[:40]!r}; "
                    f"fix or drop that row")


def _split_conversation(conv, i: int, col: str, row=None):
    if not _is_messages(conv) or conv[-1]["role"] != "assistant" or len(conv) < 2:
        raise UserError(f"{_at(row, i, col)}: a conversation must be a list of messages ending with an "
                        f"assistant message")
    return conv[:-1], conv[-1]["content"]


def normalise(rows: list[dict], kind: str, args) -> list[dict]:
    """Map the user's columns to {prompt, response | chosen, rejected | label, extras}; bad rows raise
    UserError."""
    out = []
    first = rows[0] if rows else {}
    use_messages = args.prompt_column not in first and args.messages_column in first
    for i, row in enumerate(rows):
        ex = {}
        if kind in ("pair", "prompt") and args.prompt_column not in row and args.chosen_column in row:
            # two conversations
            p1, chosen = _split_conversation(row[args.chosen_column], i, args.chosen_column, row)
            if kind == "pair":
                p2, ex["rejected"] = _split_conversation(
                    _field(row, i, args.rejected_column, "rejected-column"), i, args.rejected_column, row)
                if p1 != p2:
                    raise UserError(f"{_at(row, i)}: the chosen and rejected conversations differ before "
                                    f"the last message")
                ex["chosen"] = chosen
            ex["prompt"] = p1
        elif use_messages and kind != "pair":
            ex["prompt"], response = _split_conversation(
                _field(row, i, args.messages_column, "messages-column"), i, args.messages_column, row)
            if kind != "prompt":
                ex["response"] = response
        else:
            ex["prompt"] = _field(row, i, args.prompt_column, "prompt-column")
        cols = {"response": args.response_column, "chosen": args.chosen_column,
                "rejected": args.rejected_column}
        for need in KINDS[kind]:
            if need in ex:
                continue
            if need == "label":
                if args.label_column not in row:
                    raise UserError(f"column '{args.label_column}' not found; "
                                    f"available columns: {_columns(row)}, in {_at(row, i)}. "
                                    f"Set --label-column")
                label = row[args.label_column]
                label = {"true": True, "false": False, "1": True, "0": False}.get(str(label).lower(), label)
                if label not in (True, False, 0, 1):
                    raise UserError(f"{_at(row, i, args.label_column)}: expected a bool, got {label!r}")
                ex["label"] = bool(label)
            else:
                ex[need] = _field(row, i, cols[need], f"{need}-column", allow_messages=False)
        used = {args.prompt_column, args.messages_column, *cols.values(), args.label_column}
        ex["extras"] = {k: v for k, v in row.items() if k not in used}
        out.append(ex)
    return out


# ---------------------------------------------------------------------------------------------- tokenization


def encode_prompt(tok, prompt) -> list[int]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if tok.chat_template:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    if isinstance(prompt, str):
        return tok(prompt, add_special_tokens=True)["input_ids"]
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return tok(text, add_special_tokens=True)["input_ids"]


def encode_response(tok, response: str) -> list[int]:
    ids = tok(response, add_special_tokens=False)["input_ids"]
    while ids and ids[-1] == tok.eos_token_id:
        ids = ids[:-1]
    return ids + [tok.eos_token_id]


def encode_conversation(tok, conversation: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of a whole conversation for --assistant-turns all: 1 on every assistant
    message's content and its EOS (the end-of-turn token), 0 on what the template adds (roles, the other
    turns, a newline after an end of turn). Built turn by turn: the template's rendering of the conversation
    before each assistant message (with the generation prompt, as encode_prompt), which must begin with the
    tokens so far, then that message as encode_response makes it (content + one EOS), exactly what a
    single-turn example trains on."""
    ids, mask = [], []
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        prefix = encode_prompt(tok, conversation[:i])
        if prefix[: len(ids)] != ids:
            raise UserError("--assistant-turns all: the tokenizer's chat template (or the plain template, "
                            "when it has none) does not render an earlier assistant turn as its content "
                            f"followed by the EOS {tok.eos_token!r}; use --assistant-turns last")
        response = encode_response(tok, message["content"])
        mask += [0] * (len(prefix) - len(ids)) + [1] * len(response)
        ids = prefix + response
    return ids, mask


def tokenize(rows: list[dict], tok, kind: str, args, what: str = "train", log=print) -> list[dict]:
    """Normalise and tokenize rows. Examples: sft/unpaired {input_ids, prompt_len[, label]} (sft with
    --assistant-turns all on a conversation: also loss_mask, 1 per trained token of input_ids[prompt_len:]);
    pair {chosen_ids, rejected_ids, prompt_len}; prompt {prompt_ids, prompt, extras}."""
    if args.overlong not in ("truncate", "skip"):
        raise UserError(f"--overlong must be 'truncate' or 'skip', got '{args.overlong}'")
    all_turns = kind == "sft" and getattr(args, "assistant_turns", "last") == "all"
    if getattr(args, "assistant_turns", "last") not in ("all", "last"):
        raise UserError(f"--assistant-turns must be all or last, got '{args.assistant_turns}'")
    examples, n_cut, n_skip, unknown = [], 0, 0, []
    # text the tokenizer cannot represent (checked on the ids below; GPT-2's "unknown" token is its EOS: not
    # counted)
    unk = tok.unk_token_id if tok.unk_token_id not in (tok.eos_token_id, tok.pad_token_id) else None
    for i, ex in enumerate(normalise(rows, kind, args)):
        prompt_ids = encode_prompt(tok, ex["prompt"])
        texts = [ex[k] for k in ("prompt", "response", "chosen", "rejected") if isinstance(ex.get(k), str)]
        if unk is not None and unk in prompt_ids:
            unknown.append((i, texts))
        if kind == "prompt":
            # skipped, never cut: either end of a templated prompt is structure
            # (the chat template's head `<|im_start|>system...`, its generation prompt at the end)
            if len(prompt_ids) > args.max_len:
                n_skip += 1
                continue
            examples.append({"prompt_ids": prompt_ids, "prompt": ex["prompt"], "extras": ex["extras"]})
            continue
        seqs = {k: prompt_ids + encode_response(tok, ex[k])
                for k in ("response", "chosen", "rejected") if k in ex}
        if unk is not None and unk not in prompt_ids and any(unk in s for s in seqs.values()):
            unknown.append((i, texts))
        turns = None
        if all_turns and _is_messages(ex["prompt"]):  # the loss on every assistant turn, not only the last
            ids, turns = encode_conversation(
                tok, ex["prompt"] + [{"role": "assistant", "content": ex["response"]}])
            prompt_ids, seqs = ids[: turns.index(1)], {"response": ids}
        if any(len(s) > args.max_len for s in seqs.values()):
            if args.overlong == "skip" or len(prompt_ids) >= args.max_len:
                n_skip += 1
                continue
            seqs, n_cut = {k: s[: args.max_len] for k, s in seqs.items()}, n_cut + 1
        if kind == "pair":
            examples.append({"chosen_ids": seqs["chosen"], "rejected_ids": seqs["rejected"],
                             "prompt_len": len(prompt_ids)})
        else:
            examples.append({"input_ids": seqs["response"], "prompt_len": len(prompt_ids), **(
                {"label": ex["label"]} if kind == "unpaired" else {}), **(
                {"loss_mask": turns[len(prompt_ids): len(seqs["response"])]} if turns else {})})
    if unknown:
        _report_unknown(unknown, rows, tok, what, log)
    if n_cut or n_skip:
        log(f"[data] {what}: {n_cut} examples over --max-len {args.max_len} truncated, {n_skip} skipped")
    if not examples:
        raise UserError(f"no {what} examples left after filtering "
                        f"(all {len(rows)} over --max-len {args.max_len}?); "
                        f"raise --max-len or use --overlong truncate")
    return examples


def _report_unknown(unknown: list, rows: list, tok, what: str, log):
    """Text the tokenizer turns into its unknown token: an error for the embedded demo tokenizer (printable
    ASCII only: `3×4=` would silently train as `3<unk>4=`), a warning with the count and the first example
    otherwise."""
    from shared import engine

    i, texts = unknown[0]
    chars = sorted({c for t in texts for c in t
                    if tok(c, add_special_tokens=False)["input_ids"] == [tok.unk_token_id]})
    first = f"first {_at(rows[i], i)}: characters {''.join(chars)!r}" if chars else f"first {_at(rows[i], i)}"
    problem = f"{len(unknown)} {what} examples hold text the tokenizer turns into {tok.unk_token} ({first})"
    if engine.is_embedded_tokenizer(tok):
        raise UserError(f"{problem}; the embedded demo model's character tokenizer knows printable ASCII "
                        f"only: replace those characters or give your own --model-path")
    log(f"[data] warning: {problem}")


# ---------------------------------------------------------------------------------------------- batching


def pad(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (batch, max_len); right padding unless left=True."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def collate(seqs: list[list[int]], prompt_lens: list[int], pad_id: int) -> dict:
    """Right-padded batch with response_mask = 1 on response tokens (EOS included), 0 on prompt and
    padding."""
    ids, mask = pad(seqs, pad_id)
    pos = torch.arange(ids.shape[1])
    response_mask = (pos[None, :] >= torch.tensor(prompt_lens)[:, None]) & mask.bool()
    return {"input_ids": ids, "attention_mask": mask, "response_mask": response_mask}


def collate_responses(seqs: list[list[int]], prompt_lens: list[int], pad_id: int, device="cpu"):
    """The rollout layout for scored responses (RM, DPO, KTO): (input_ids, attention_mask, response_mask, P)
    with input_ids and attention_mask (N, P + R), prompts LEFT-padded to P and responses RIGHT-padded to R,
    response_mask (N, R) (EOS included). Rows that share a prompt then share its forward
    (shared.engine.response_forward)."""
    prompts, prompt_mask = pad([s[:k] for s, k in zip(seqs, prompt_lens)], pad_id, left=True)
    responses, response_mask = pad([s[k:] for s, k in zip(seqs, prompt_lens)], pad_id)
    return (torch.cat([prompts, responses], 1).to(device),
            torch.cat([prompt_mask, response_mask], 1).to(device),
            response_mask.bool().to(device), prompts.shape[1])


class Sampler:
    """Deterministic stream of example indices: epoch e is a permutation seeded by (seed, e). The global batch
    of step s is positions [s*B, (s+1)*B) of that stream, so the data position of a run is just its step."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def global_batch(self, step: int, size: int) -> list[int]:
        out, pos = [], step * size
        while len(out) < size:
            epoch, offset = divmod(pos + len(out), self.n)
            out.extend(self._perm(epoch)[offset: offset + size - len(out)])
        return out

    def rank_batch(self, step: int, size: int, ctx) -> list[int]:
        """This rank's share of the global batch of `size` examples (size must divide by the world size)."""
        idx = self.global_batch(step, size)
        per = size // ctx.world
        return idx[ctx.rank * per: (ctx.rank + 1) * per]


def check_batch_sizes(batch_size: int, args, world: int, name: str = "--batch-size"):
    """Raise a UserError unless batch = micro * grad_accum * world for a whole grad_accum; return grad_accum.
    A --micro-batch-size (a memory limit) above the per-rank batch is lowered to it, with one line."""
    if world > 0 and 0 < batch_size // world < args.micro_batch_size:
        dist.say(f"[data] --micro-batch-size {args.micro_batch_size} is more than the {batch_size // world} "
                 f"{name.lstrip('-').replace('-', ' ')} per rank: using {batch_size // world}")
        args.micro_batch_size = batch_size // world
    micro_batch_size = args.micro_batch_size
    if micro_batch_size <= 0 or batch_size <= 0 or batch_size % (micro_batch_size * world):
        raise UserError(f"{name} {batch_size} must be a positive multiple of "
                        f"--micro-batch-size {micro_batch_size} x {world} ranks; change one of them")
    return batch_size // (micro_batch_size * world)


def micro_batches(items: list, micro: int):
    return [items[i: i + micro] for i in range(0, len(items), micro)]


def rank_micro_batches(items: list, micro: int, ctx) -> list[list]:
    """This rank's share of `items` (every world-th, from its rank) in micro-batches, padded with empty ones
    to the same count on every rank: ZeRO-3 forwards are collective, so all ranks must make the same calls. A
    caller runs an empty one on a stand-in and drops the result."""
    mine, calls = items[ctx.rank:: ctx.world], math.ceil(math.ceil(len(items) / ctx.world) / micro)
    return [mine[k * micro: (k + 1) * micro] for k in range(calls)]
