"""Tests for rollout.py on the real vLLM CPU build and HF generate, with a tiny local Qwen2.

One vLLM engine serves the whole session. Every log-prob is checked against an independent
reference: a full forward pass of a plain transformers model over prompt + completion.
Tests that push other weights into the engine push the original ones back before they return.
Run: python -m pytest tests/test_rollout.py -q   (about a minute on 2 CPU cores)
"""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import rollout
import tiny

TOL = 1e-3  # float32 log-probs: sampler vs reference forward pass


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny.build_tiny_model(str(tmp_path_factory.mktemp("tiny")), seed=0, **tiny.SIZES["0.5M"])


@pytest.fixture(scope="session")
def tok(tiny_model_dir):
    return tiny.load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def base_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def changed_model(tmp_path_factory):
    """Other weights: a different random init with a 20x sharper lm_head (peaked next-token
    distributions, so tempered and raw log-probs are far apart)."""
    path = tiny.build_tiny_model(str(tmp_path_factory.mktemp("tiny1")), seed=1, **tiny.SIZES["0.5M"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="session")
def vllm_sampler(tiny_model_dir, tok):
    threads = torch.get_num_threads()
    sampler = rollout.make_sampler(tiny_model_dir, tok, backend="vllm", max_model_len=256, seed=0)
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
def reference_logprobs(model, sample, temperature=1.0):
    """log pi(o_t | q, o_<t) of the sample's tokens from one forward pass (teacher forcing)."""
    ids = torch.tensor([sample.prompt_ids + sample.completion_ids])  # (1, P+T)
    logits = model(ids).logits[0, len(sample.prompt_ids) - 1:-1].float()  # (T, V)
    logp = torch.log_softmax(logits / temperature, dim=-1)  # (T, V)
    return logp.gather(1, torch.tensor(sample.completion_ids)[:, None])[:, 0]  # (T,)


def max_logprob_error(model, groups, temperature=1.0):
    return max((torch.tensor(s.logprobs) - reference_logprobs(model, s, temperature)).abs().max().item()
               for group in groups for s in group)


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


def test_load_weights_follows_new_weights_and_restores_old(vllm_sampler, base_model, changed_model,
                                                          prompts):
    kwargs = dict(n=4, max_tokens=24, temperature=0.7, top_p=0.9, seed=11)
    before = vllm_sampler.generate(prompts, **kwargs)
    try:
        vllm_sampler.load_weights(changed_model.state_dict().items())
        after = vllm_sampler.generate(prompts, **kwargs)
        assert token_ids(after) != token_ids(before)
        assert max_logprob_error(changed_model, after) < TOL  # the engine runs the new weights
        assert max_logprob_error(base_model, after) > 0.5  # ... and not stale ones
        # raw log-probs (logprobs_mode="raw_logprobs"), not those of the tempered distribution
        assert max_logprob_error(changed_model, after, temperature=0.7) > 0.1
    finally:
        vllm_sampler.load_weights(base_model.state_dict().items())
    again = vllm_sampler.generate(prompts, **kwargs)
    assert token_ids(again) == token_ids(before)  # same weights + same seed -> same samples
    assert max_logprob_error(base_model, again) < TOL


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
        assert max_logprob_error(base_model, groups) < TOL  # raw log-probs when greedy too


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
    vllm_sampler.wake_up()
    assert len(vllm_sampler.generate(prompts[:1], n=2, max_tokens=4, seed=0)[0]) == 2


# ---------------------------------------------------------------- HF fallback
def test_hf_fallback_logprobs_seeds_and_load_weights(hf_sampler, base_model, changed_model, prompts):
    assert hf_sampler.backend == "hf"
    kwargs = dict(n=3, max_tokens=24, temperature=0.7, top_p=0.9, seed=2)
    before = hf_sampler.generate(prompts, **kwargs)
    check_structure(before, prompts, 3, 24, eos=1)
    assert max_logprob_error(base_model, before) < TOL
    assert token_ids(hf_sampler.generate(prompts, **kwargs)) == token_ids(before)
    assert token_ids(hf_sampler.generate(prompts, **{**kwargs, "seed": 3})) != token_ids(before)
    try:
        hf_sampler.load_weights(changed_model.state_dict().items())
        after = hf_sampler.generate(prompts, **kwargs)
        assert max_logprob_error(changed_model, after) < TOL
        assert max_logprob_error(changed_model, after, temperature=0.7) > 0.1  # raw, not tempered
    finally:
        hf_sampler.load_weights(base_model.state_dict().items())
    with pytest.raises(KeyError, match="model.not_a_layer.weight"):
        hf_sampler.load_weights([("model.not_a_layer.weight", torch.zeros(1))])


# ---------------------------------------------------------------- errors
def test_clear_errors(vllm_sampler, hf_sampler, tiny_model_dir, tok, tmp_path):
    missing = str(tmp_path / "no-such-model")
    for backend in ("vllm", "hf", "auto"):
        with pytest.raises(FileNotFoundError, match="no-such-model.*does not exist"):
            rollout.make_sampler(missing, tok, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        rollout.make_sampler(tiny_model_dir, tok, backend="sglang")
    for sampler in (vllm_sampler, hf_sampler):  # prompt 1: 200 tokens + 100 > 256
        with pytest.raises(ValueError, match=r"prompt 1 has 200 tokens \+ max_tokens 100 > max_model_len 256"):
            sampler.generate([[5] * 10, [5] * 200], n=1, max_tokens=100)
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
    if dist.is_initialized():
        dist.destroy_process_group()
'''


def test_one_engine_per_rank_under_torchrun(tiny_model_dir, tmp_path):
    import subprocess
    import sys
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", str(script), tiny_model_dir, repo, str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # both ranks saw both ranks' checks pass (the all_reduce sums to 2)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["ok 2", "ok 2"]
