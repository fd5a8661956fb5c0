"""The real-model path on a laptop: train.py and eval.py with the stand-in chat model (tiny.py: Qwen2
architecture, byte-level BPE, Qwen2.5's <|im_start|> / <|im_end|> template, generation_config.json
eos ids [<|im_end|>, <|endoftext|>] while the tokenizer's EOS is <|endoftext|>) on the real vLLM
CPU engine, and every check that must stop a real run before its engine starts.

The stop-rule test needs a model that ends its turn and then keeps writing: the fixture teaches the
stand-in (a short supervised pass) to answer "\\boxed{a+b}<|im_end|>" and then invent a next turn
whose box holds a WRONG number. A sampler that stopped only at the tokenizer's EOS would grade that
invented turn (reward 0); stopping at the end of the turn grades the real answer (reward 1). The
prompts are DAPO-style chat messages of ~300 tokens in a parquet file (verl schema), so that 16
samples of them overflow one vLLM engine step (the CPU crash of long prompts) and the "Answer:"
format is detected.

What the slow ones buy (idle 2-core machine): the fixture ~40 s, test_train_and_eval_stop_at_the_end_of_turn
~60 s (two vLLM engines).
"""
import json
import os
import subprocess
import sys
import time

import pytest

import data
import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
PAD = " Check every step twice before you write the final answer, and keep the working short." * 4
PROMPT = ("Solve the following math problem step by step. The last line of your response should be of the form "
          "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{q}" + PAD)


def rows(n=8):
    """DAPO-style rows (verl schema): chat-message prompt, reward_model.ground_truth. Every answer is 7,
    so that the tiny model learns its one completion in a few dozen steps."""
    return [{"prompt": [{"role": "user", "content": PROMPT.format(q=f"What is {a}+{7 - a}?")}],
             "reward_model": {"ground_truth": "7"}} for a in range(n)]


def invented_turn(problem):
    """The right answer, the end of the turn, then an invented next turn with a wrong answer."""
    a = int(problem["answer"])
    return f"\\boxed{{{a}}}<|im_end|>\n<|im_start|>user\nAnd the next one?<|im_end|>\n<|im_start|>assistant\n\\boxed{{{a + 100}}}"


@pytest.fixture(scope="module")
def chatty(tmp_path_factory):
    """(model path, parquet train file): the stand-in taught to overrun its turn (see the docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("chatty")
    train_file = str(root / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows()), train_file)
    path = tiny.build_chat_model(str(root / "model"), "qwen", max_position_embeddings=512)
    problems = data.load_problems(train_file)
    tiny.warm_start(path, problems, invented_turn, steps=200, target=1.0, seed=0, lr=3e-3,
                    style=data.PromptStyle(instruction=""), batch_size=8)
    return path, train_file


def run(args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_the_fixture_model_overruns_its_turn(chatty):
    """The premise of the next test, checked with HF generate: stopping only at the tokenizer's EOS
    leaves the wrong, invented answer last; stopping at the end of the turn, the right one."""
    import rollout
    path, train_file = chatty
    tok = tiny.load_tokenizer(path)
    problem = data.load_problems(train_file)[0]
    sampler = rollout.make_sampler(path, tok, backend="hf", max_model_len=512)
    ids = data.prompt_ids(tok, problem, data.PromptStyle())
    (eos_only,), = sampler.generate([ids], n=1, max_tokens=48, temperature=0, stop_token_ids=[tok.eos_token_id])
    (turn,), = sampler.generate([ids], n=1, max_tokens=48, temperature=0, stop_token_ids=data.stop_token_ids(path, tok))
    assert data.math_reward([eos_only.text], [problem])[0] == [0.0], eos_only.text
    assert data.math_reward([turn.text], [problem])[0] == [1.0] and turn.finish_reason == "stop", turn.text


def test_train_and_eval_stop_at_the_end_of_turn(chatty, tmp_path):
    """train.py (vLLM, T = 0.7, 16 samples of ~300-token prompts per step) rewards the answers of the
    assistant's own turn, with the sampler's and the trainer's log-probs of the tempered distribution
    agreeing; eval.py on the same model stops at <|im_end|> and scores the same answers."""
    path, train_file = chatty
    out = tmp_path / "run"
    proc = run(["train.py", "--model", path, "--train-data", train_file, "--steps", "1", "--prompts-per-step", "4",
                "--group-size", "4", "--mini-batch-size", "16", "--max-prompt-tokens", "400",
                "--max-response-tokens", "48", "--micro-batch-tokens", "4096", "--temperature", "0.7", "--sampler", "vllm",
                "--lr", "1e-5", "--no-grad-checkpointing", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "stop tokens: ['<|endoftext|>', '<|im_end|>']" in log and "Traceback" not in log
    (row,) = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert row["reward"] >= 0.75, row  # the invented turn's wrong answer would give ~0
    assert row["truncated_frac"] == 0.0 and row["logp_gap"] < 1e-3
    assert json.load(open(out / "config.json"))["model"] == path
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows()[:4]))
    proc = run(["eval.py", "--model", path, "--benchmarks", str(bench), "--k", "2", "--temperature", "0", "--max-tokens", "48",
                "--backend", "vllm", "--out", str(tmp_path / "eval")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in open(tmp_path / "eval" / "model" / "bench.jsonl")]
    assert [r["correct"] for r in results] == [2, 2, 2, 2]
    assert all(reason == "stop" for r in results for reason in r["finish_reasons"])
    assert not any("next one" in s for r in results for s in r["samples"])  # nothing after the stop token


def test_checks_before_any_engine_starts(chatty, tmp_path):
    """Each check stops the run with one line (the numbers and the fix), before the model is loaded
    or an engine starts: the context, the share of too-long prompts, a dataset that cannot load."""
    path, train_file = chatty
    base = ["train.py", "--model", path, "--train-data", train_file, "--sampler", "vllm",
            "--prompts-per-step", "8", "--mini-batch-size", "64", "--out"]  # the file holds 8 problems
    cases = [(["--max-prompt-tokens", "400", "--max-response-tokens", "200"],
              "--max-prompt-tokens 400 + --max-response-tokens 200 = 600 > the model's context 512"),
             (["--max-prompt-tokens", "100", "--max-response-tokens", "64"],
              "100.0% of the training prompts are longer than --max-prompt-tokens 100"),
             (["--train-data", "org/no-such-dataset:main:train"], "could not load it from the Hugging Face hub")]
    for i, (flags, message) in enumerate(cases):
        t = time.time()
        proc = run(base + [str(tmp_path / f"o{i}")] + flags, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "sampler backend" not in proc.stdout + proc.stderr
        assert time.time() - t < 60  # a guard: no engine was started
    # below the threshold (10%) the share is reported and the run goes on
    mixed = tmp_path / "mixed.jsonl"
    longer = {"prompt": [{"role": "user", "content": PROMPT.format(q="What is 1+1?") + PAD}],
              "reward_model": {"ground_truth": "2"}}  # ~500 tokens
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows(11) + [longer]))
    proc = run(["train.py", "--model", path, "--train-data", str(mixed), "--max-prompt-tokens", "400", "--steps", "0",
                "--max-response-tokens", "64", "--prompts-per-step", "8", "--mini-batch-size", "64", "--sampler", "hf",
                "--out", str(tmp_path / "ok")], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 (8.3%) longer than --max-prompt-tokens 400 dropped" in proc.stdout + proc.stderr
