"""The bad-input catalogue: every script, given a bad file, model, reward, output directory or flag combination, exits
with code 2 and ONE line on stderr, `error: ...`, that names the problem (no traceback), and writes nothing: no output
directory (or, for one that existed, the same files as before), nothing in the working directory.

Each case is one process, launched as a user would (`python X.py ...`). The fixture files are written once per module;
reward modules are found through PYTHONPATH, and `--reward-url` servers run in this process (http.server, a thread)."""
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import free_port, run_script

SFT = ["--batch-size", "8", "--micro-batch-size", "4", "--eval-size", "16", "--steps", "3"]  # train_sft, train_rm,
# dpo, kto; the RL scripts run with their defaults (every refusal comes before the first step)


# ---------------------------------------------------------------------------------------------- fixture files


def _jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


REWARDS = '''
def ok(prompts, responses, **extras):
    return [1.0 for _ in responses]

def boom(prompts, responses, **extras):
    raise ValueError("the scorer broke")

def none(prompts, responses, **extras):
    rewards = [float(len(r)) for r in responses]  # forgot to return them

def strings(prompts, responses, **extras):
    return ["good" for _ in responses]

def count(prompts, responses, **extras):
    return [1.0] * (len(responses) + 1)

def late(prompts, responses, **extras):  # passes the trial call and small evaluations, fails on a training batch
    if len(responses) >= 8:
        raise KeyError("answer")
    return [0.0 for _ in responses]

threshold = 0.5
'''


@pytest.fixture(scope="module")
def fx(tmp_path_factory, tiny_model_dir):
    """Every file the cases name, in one directory (also the PYTHONPATH of the runs: the reward modules)."""
    d = tmp_path_factory.mktemp("bad_input")
    sums = [(a, b) for a in range(8) for b in range(5)]  # 40 problems
    _jsonl(d / "prompts.jsonl", [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in sums])
    _jsonl(d / "prompts_no_answer.jsonl", [{"prompt": f"{a}+{b}="} for a, b in sums])
    _jsonl(d / "sft.jsonl", [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a, b in sums])
    typed = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a, b in sums]
    typed[30]["response"] = 4  # file line 31: rows are shuffled before validation, the message must name line 31
    _jsonl(d / "sft_type.jsonl", typed)
    empty = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a, b in sums]
    empty[4]["response"] = "  "
    _jsonl(d / "sft_empty.jsonl", empty)
    _jsonl(d / "conv.jsonl", [{"messages": [{"role": "user", "content": f"{a}+{b}="},
                                            {"role": "assistant", "content": str(a + b)}]} for a, b in sums[:20]]
           + [{"messages": [{"role": "user", "content": "1+1="}]}])
    _jsonl(d / "wrong_columns.jsonl", [{"question": f"{a}+{b}=", "answer": str(a + b)} for a, b in sums])
    (d / "data.txt").write_text("1+1=2\n")
    (d / "broken.json").write_text('[{"prompt": "1+1=", "chosen": "2", "rejected": "3"},\n')
    (d / "broken.jsonl").write_text('{"prompt": "1+1=", "response": "2", "label": true}\n'
                                    '{"prompt": "1+2=", "response": "3", "label": true}\n'
                                    '{"prompt": "1+3=", "response": "4", "label": tru}\n')
    (d / "list_line.jsonl").write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n["1+2=", "3", "4"]\n')
    csv_rows = ["prompt,chosen,rejected"] + [f"{a}+{b}=,{a + b},{a + b + 1}" for a, b in sums]
    csv_rows[6] = "2+3=,5,"  # file line 7 (the header is line 1): an empty rejected response
    (d / "pairs.csv").write_text("\n".join(csv_rows) + "\n")
    labelled = [{"prompt": f"{a}+{b}=", "response": str(a + b), "label": True} for a, b in sums]
    labelled[12]["label"] = "maybe"  # index 12 of the json list
    (d / "unpaired.json").write_text(json.dumps(labelled))
    import datasets

    parquet = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a, b in sums]
    parquet[7]["response"] = ""
    datasets.Dataset.from_list(parquet).to_parquet(str(d / "sft.parquet"))
    # models
    (d / "not_a_model").mkdir()
    (d / "rw.py").write_text(REWARDS)
    (d / "rw_import_fails.py").write_text('raise RuntimeError("REWARD_CONFIG is not set")\n')
    (d / "rw_syntax.py").write_text("def score(prompts, responses, **extras)\n    return [0.0]\n")
    clm = d / "causal_lm"  # a policy-like causal LM with the default tokenizer: no score head
    shutil.copytree(tiny_model_dir, clm)
    truncated = d / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    no_eos = d / "no_eos"
    shutil.copytree(tiny_model_dir, no_eos)
    cfg = json.loads((no_eos / "tokenizer_config.json").read_text())
    cfg["eos_token"] = None
    (no_eos / "tokenizer_config.json").write_text(json.dumps(cfg))
    config_only = d / "config_only"
    config_only.mkdir()
    shutil.copy(tiny_model_dir / "config.json", config_only)
    other_tok = d / "other_tokenizer"  # the default tokenizer plus one token: not the policy's vocabulary
    shutil.copytree(tiny_model_dir, other_tok)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other_tok)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other_tok)
    return d


class Handler(BaseHTTPRequestHandler):
    """POST /ok, /hang, /500, /garbage, /count, /strings, /late500 (500 for 8 or more responses), /503-once (503 on
    the first request, then fine): the answers a broken reward server gives. `hits` counts the requests per path."""

    hits = {}

    def do_POST(self):
        n = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["responses"])
        mode = self.path.strip("/")
        Handler.hits[mode] = Handler.hits.get(mode, 0) + 1
        if mode == "hang":
            threading.Event().wait(3.0)
        status, raw = 200, json.dumps({"rewards": [1.0] * n}).encode()
        if mode == "500" or (mode == "late500" and n >= 8) or (mode == "503-once" and Handler.hits[mode] == 1):
            status, raw = (503 if mode == "503-once" else 500), b"Internal error: KeyError 'answer'"
        elif mode == "garbage":
            raw = b"<html>the reward service moved</html>"
        elif mode == "count":
            raw = json.dumps({"rewards": [1.0] * (n + 2)}).encode()
        elif mode == "strings":
            raw = json.dumps({"rewards": ["high"] * n}).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except OSError:  # the client gave up (a hang)
            pass

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


# ---------------------------------------------------------------------------------------------- the catalogue

# (id, script, arguments ({fx}: the fixture directory, {url}: the reward server, {closed}: a port nobody listens on),
#  a substring of the error line). Output-directory cases say in their id what the directory holds beforehand.
CASES = [
    # --- data
    ("sft-missing-file", "train_sft.py", ["--dataset", "{fx}/missing.jsonl"], "does not exist"),
    ("sft-bad-extension", "train_sft.py", ["--dataset", "{fx}/data.txt"], "unsupported extension"),
    ("dpo-malformed-json", "dpo.py", ["--dataset", "{fx}/broken.json"], "is not valid JSON"),
    ("kto-malformed-jsonl-line", "kto.py", ["--dataset", "{fx}/broken.jsonl"], "broken.jsonl line 3 is not valid JSON"),
    ("rm-jsonl-line-not-an-object", "train_rm.py", ["--dataset", "{fx}/list_line.jsonl"], "list_line.jsonl line 2"),
    ("grpo-wrong-columns", "grpo.py", ["--dataset", "{fx}/wrong_columns.jsonl", "--reward-fn", "rw:ok"],
     "column 'prompt' not found"),
    ("sft-missing-response-column", "train_sft.py", ["--dataset", "{fx}/sft.jsonl", "--response-column", "answer"],
     "column 'answer' not found"),
    ("sft-empty-value", "train_sft.py", ["--dataset", "{fx}/sft_empty.jsonl"],
     "row 4, column 'response' (sft_empty.jsonl line 5): expected a non-empty string"),
    ("sft-wrong-type-names-the-file-line", "train_sft.py", ["--dataset", "{fx}/sft_type.jsonl"],
     "row 30, column 'response' (sft_type.jsonl line 31): expected a non-empty string, got int"),
    ("rm-csv-row-names-the-file-line", "train_rm.py", ["--dataset", "{fx}/pairs.csv"],
     "row 5, column 'rejected' (pairs.csv line 7)"),
    ("kto-json-bad-label-names-the-index", "kto.py", ["--dataset", "{fx}/unpaired.json"],
     "row 12, column 'label' (unpaired.json): expected a bool"),
    ("sft-parquet-empty-names-the-index", "train_sft.py", ["--dataset", "{fx}/sft.parquet"],
     "row 7, column 'response' (sft.parquet)"),
    ("sft-conversation-without-answer", "train_sft.py", ["--dataset", "{fx}/conv.jsonl"],
     "ending with an assistant message"),
    ("rloo-unknown-task", "rloo.py", ["--dataset", "additon"], "unknown built-in task 'additon'"),
    ("reinforce-all-prompts-over-max-len", "reinforce_pp.py", ["--max-len", "3"], "no train examples left"),
    ("rm-missing-margin-column", "train_rm.py", ["--margin-column", "margin"], "--margin-column 'margin' not found"),
    ("dpo-bad-overlong", "dpo.py", ["--overlong", "cut"], "--overlong must be 'truncate' or 'skip'"),
    # --- models and tokenizers
    ("sft-missing-model", "train_sft.py", ["--model-path", "{fx}/missing_model"], "does not exist"),
    ("dpo-not-a-model-dir", "dpo.py", ["--model-path", "{fx}/not_a_model"], "is not a model directory"),
    ("kto-config-without-weights", "kto.py", ["--model-path", "{fx}/config_only"], "could not load --model-path"),
    ("sft-truncated-safetensors", "train_sft.py", ["--model-path", "{fx}/truncated"],
     "a truncated or corrupt .safetensors file"),
    ("rm-tokenizer-without-eos", "train_rm.py", ["--model-path", "{fx}/no_eos"], "has no EOS token"),
    ("ppo-causal-lm-as-reward-model", "ppo_max.py", ["--reward-path", "{fx}/causal_lm"],
     "has no trained score head: it looks like a causal LM"),
    ("reinforce-causal-lm-as-reward-model", "reinforce_pp.py", ["--reward-path", "{fx}/causal_lm"],
     "has no trained score head"),
    ("grpo-truncated-reward-model", "grpo.py", ["--reward-path", "{fx}/truncated"],
     "could not load --reward-path"),
    ("ppo-critic-tokenizer-mismatch", "ppo_max.py", ["--critic-path", "{fx}/other_tokenizer"],
     "whose tokenizer is not the policy's"),
    # --- rewards: functions
    ("grpo-reward-module-missing", "grpo.py", ["--reward-fn", "no_such_module:score"], "cannot import it"),
    ("rloo-reward-function-missing", "rloo.py", ["--reward-fn", "rw:nothere"], "cannot import it"),
    ("reinforce-reward-module-fails-on-import", "reinforce_pp.py", ["--reward-fn", "rw_import_fails:score"],
     "importing rw_import_fails raised RuntimeError: REWARD_CONFIG is not set"),
    ("ppo-reward-module-syntax-error", "ppo_max.py", ["--reward-fn", "rw_syntax:score"], "raised SyntaxError"),
    ("grpo-reward-not-callable", "grpo.py", ["--reward-fn", "rw:threshold"], "not a function"),
    ("grpo-reward-raises", "grpo.py", ["--reward-fn", "rw:boom"],
     "--reward-fn rw:boom raised ValueError: the scorer broke (before training"),
    ("rloo-reward-returns-none", "rloo.py", ["--reward-fn", "rw:none"], "--reward-fn rw:none returned None"),
    ("reinforce-reward-returns-strings", "reinforce_pp.py", ["--reward-fn", "rw:strings"],
     "'good' is not a number"),
    ("ppo-reward-wrong-count", "ppo_max.py", ["--reward-fn", "rw:count", "--reward-path", "", "--critic-init",
                                              "policy"], "--reward-fn rw:count returned 2 rewards for 1 response"),
    ("grpo-task-checker-without-its-column", "grpo.py", ["--dataset", "{fx}/prompts_no_answer.jsonl", "--reward-fn",
                                                        "addition"], "--reward-fn addition raised TypeError"),
    ("grpo-no-reward-for-a-file", "grpo.py", ["--dataset", "{fx}/prompts.jsonl"], "no reward"),
    ("rloo-reward-weights-count", "rloo.py", ["--reward-fn", "rw:ok", "--reward-weights", "1,2"],
     "--reward-weights has 2 values for 1 reward sources"),
    ("reinforce-reward-weights-not-numbers", "reinforce_pp.py", ["--reward-weights", "high"],
     "give comma-separated numbers"),
    # --- rewards: a server
    ("grpo-reward-server-hangs", "grpo.py", ["--reward-url", "{url}/hang", "--reward-timeout", "0.3"],
     "did not answer after 3 tries"),
    ("rloo-reward-server-500", "rloo.py", ["--reward-url", "{url}/500"], "answered HTTP 500 Internal Server Error"),
    ("reinforce-reward-server-garbage", "reinforce_pp.py", ["--reward-url", "{url}/garbage"],
     'expected JSON {"rewards"'),
    ("ppo-reward-server-wrong-count", "ppo_max.py", ["--reward-url", "{url}/count"],
     'answered {"rewards": ...} with 3 rewards for 1 response'),
    ("rloo-reward-server-not-listening", "rloo.py", ["--reward-url", "http://127.0.0.1:{closed}/score",
                                                     "--reward-timeout", "0.3"], "is the server up?"),
    ("ppo-reward-timeout-zero", "ppo_max.py", ["--reward-timeout", "0"], "--reward-timeout must be > 0"),
    # --- output directories
    ("sft-output-dir-holds-a-run", "train_sft.py", [], "already holds files"),
    ("grpo-output-dir-foreign-with-overwrite", "grpo.py", ["--overwrite"], "not a run of this project"),
    ("dpo-output-dir-is-a-file", "dpo.py", [], "is a file"),
    ("kto-resume-without-checkpoint", "kto.py", ["--resume"], "has no checkpoint"),
    # --- flag combinations
    ("sft-bad-micro-batch-size", "train_sft.py", ["--micro-batch-size", "3"], "must be a positive multiple"),
    ("grpo-num-minibatches-not-dividing", "grpo.py", ["--num-minibatches", "3"], "--num-minibatches must divide"),
    ("dpo-bad-loss", "dpo.py", ["--loss-type", "hinj"], "--loss-type must be one of sigmoid, ipo"),
    ("grpo-bad-loss-agg", "grpo.py", ["--loss-agg", "sum"], "--loss-agg must be"),
    ("ppo-bad-preset", "ppo_max.py", ["--preset", "max"], "--preset must be one of"),
    ("grpo-one-sample", "grpo.py", ["--n-samples", "1"], "--n-samples must be >= 2"),
    ("rloo-one-sample", "rloo.py", ["--n-samples", "1"], "--n-samples must be >= 2"),
    ("reinforce-rollout-backend-typo", "reinforce_pp.py", ["--rollout-backend", "vlm"], "--rollout-backend must be"),
    ("rm-dtype-fp16", "train_rm.py", ["--dtype", "fp16"], "--dtype must be auto, bf16 or fp32"),
    ("dpo-beta-zero", "dpo.py", ["--beta", "0"], "--beta must be > 0"),
    ("kto-micro-batch-one", "kto.py", ["--micro-batch-size", "1"], "--micro-batch-size must be >= 2"),
    ("ppo-ptx-without-sft-data", "ppo_max.py", ["--dataset", "{fx}/prompts.jsonl", "--reward-fn", "addition",
                                                "--ptx-coef", "0.05"], "needs --ptx-dataset"),
]


def _snapshot(path: Path) -> dict:
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("script,args,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_one_line_and_nothing_written(script, args, expected, fx, server, tmp_path,
                                                                monkeypatch, request):
    case = request.node.callspec.id
    cwd, out = tmp_path / "cwd", tmp_path / "cwd" / "out"
    cwd.mkdir()
    if "output-dir-holds-a-run" in case:  # what a finished run leaves
        out.mkdir()
        (out / "args.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")
    elif "output-dir-foreign" in case:
        out.mkdir()
        (out / "cat.jpg").write_bytes(b"a photo")
    elif "output-dir-is-a-file" in case:
        out.write_text("notes")
    before = _snapshot(out) if out.exists() else None
    monkeypatch.setenv("PYTHONPATH", str(fx))  # the reward modules
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    fill = {"fx": str(fx), "url": server, "closed": str(free_port())}
    args = [a.format(**fill) for a in args]
    flags = SFT if script in ("train_sft.py", "train_rm.py", "dpo.py", "kto.py") else []
    proc = run_script(script, *flags, "--output-dir", out, *args, check=False, timeout=300, cwd=cwd)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    report = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 2, report
    assert len(errors) == 1, report
    assert expected in errors[0], report
    assert "Traceback" not in proc.stderr, report
    if before is None:
        assert not out.exists(), "a refused run must write nothing"
    else:
        assert _snapshot(out) == before, "a refused run must leave the output directory as it was"
    assert sorted(p.name for p in cwd.iterdir()) == (["out"] if before is not None else []), \
        "a refused run must write nothing in the working directory"


# ---------------------------------------------------------------------------------------------- during training


@pytest.mark.parametrize("source", ["--reward-fn", "--reward-url"])
def test_reward_failing_during_training_stops_with_exit_3_and_one_line(source, fx, server, tmp_path, monkeypatch):
    """A reward that passes the trial call but fails on a training batch: `stopped: ...` naming the source and the
    step, exit 3, no traceback. ppo_max --preset vanilla starts its critic from the policy (a fresh value head):
    transformers' load report about that head is expected, and not shown."""
    monkeypatch.setenv("PYTHONPATH", str(fx))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    spec = "rw:late" if source == "--reward-fn" else f"{server}/late500"
    proc = run_script("ppo_max.py", "--preset", "vanilla", "--reward-path", "", source, spec, "--steps", "2",
                      "--prompts-per-step", "4", "--n-samples", "2", "--micro-batch-size", "4", "--eval-size", "4",
                      "--eval-every", "0", "--output-dir", tmp_path / "out", check=False, timeout=300, cwd=tmp_path)
    report = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    stopped = [line for line in proc.stderr.splitlines() if line.startswith(("stopped:", "error:"))]
    assert proc.returncode == 3 and len(stopped) == 1 and "Traceback" not in proc.stderr, report
    assert stopped[0].startswith(f"stopped: {source} {spec}") and "at step 1" in stopped[0], report
    assert ("raised KeyError: 'answer'" if source == "--reward-fn" else "answered HTTP 500") in stopped[0], report
    assert "LOAD REPORT" not in proc.stderr, report


def test_reward_server_errors_are_retried_only_when_a_retry_may_pass(server):
    from shared.dist import UserError
    from shared.rewards import RemoteReward

    Handler.hits.clear()
    with pytest.raises(UserError, match="answered HTTP 500 Internal Server Error: b\"Internal error"):
        RemoteReward(f"{server}/500", timeout=5)(["1+1="], ["2"])
    assert Handler.hits["500"] == 1  # a server error is the server's answer: asking again gives the same
    assert RemoteReward(f"{server}/503-once", timeout=5)(["1+1="], ["2"]).tolist() == [1.0]  # busy: try again
    assert Handler.hits["503-once"] == 2
