"""Tests of eval.py (and plot.py): Pass@k against brute-force enumeration, Avg@k on hand-made
results, loading of each benchmark format (through data.py), named errors for malformed rows,
the embedded default and an end-to-end `python eval.py` with the real vLLM sampler on tiny models.
Expected numbers are computed here by hand or by brute force, never read back from eval.py.
Run: python -m pytest tests/test_eval.py -q
"""
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import pytest

import data
import eval as ev
import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One row of each benchmark as it ships (fields as in the public releases; long problems kept whole).
SAMPLES = {
    "aime24": {"problem": "Let $ABC$ be a triangle inscribed in circle $\\omega$. Let the tangents to $\\omega$ at $B$ "
               "and $C$ intersect at point $D$, and let $\\overline{AD}$ intersect $\\omega$ at $P$. If $AB=5$, $BC=9$, "
               "and $AC=10$, $AP$ can be written as the form $\\frac{m}{n}$, where $m$ and $n$ are relatively prime "
               "integers. Find $m + n$.", "answer": "113", "id": 61,
               "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_10"},
    "amc23": {"problem": "Positive real numbers $x$ and $y$ satisfy $y^3=x^2$ and $(y-x)^2=4y^2$. What is $x+y$?",
              "answer": "36", "answer_raw": 36.0, "id": 1,
              "url": "https://artofproblemsolving.com/wiki/index.php/2023_AMC_12A_Problems/Problem_10"},
    "math500": {"problem": "Define\n\\[p = \\sum_{k = 1}^\\infty \\frac{1}{k^2} \\quad \\text{and} \\quad q = \\sum_{k = 1}^"
                "\\infty \\frac{1}{k^3}.\\]Find a way to write\n\\[\\sum_{j = 1}^\\infty \\sum_{k = 1}^\\infty \\frac{1}"
                "{(j + k)^3}\\]in terms of $p$ and $q.$", "answer": "p - q",
                "unique_id": "test/intermediate_algebra/1994.json", "subject": "Intermediate Algebra", "level": 5},
    # Minerva ships the reference only inside a worked solution: its last \boxed{} is the answer
    "minerva_math": {"problem": "Each of the two Magellan telescopes has a diameter of $6.5 \\mathrm{~m}$. Find the "
                     "diameter of the image of a planet (in $\\mathrm{cm}$ ) at this focus.",
                     "solution": "Start with $d = f\\theta$ ... so the diameter is $\\boxed{1.6}$ cm.", "idx": 0,
                     "type": "Introduction to Astronomy (8.282J Spring 2006)"},
    # OlympiadBench: `final_answer` is a list of $-delimited answers (the `answer` field is absent here)
    "olympiadbench": {"problem": "Given a positive integer $n$, determine the largest real number $\\mu$ satisfying "
                      "the following condition: ...", "final_answer": ["$\\frac{1}{2 n+2}$"], "id": 1610,
                      "unit": None, "answer_type": "Expression", "is_multiple_answer": False, "subfield": "Algebra"},
}


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


# ----------------------------------------------------------------------------------------------
# Metrics
def brute_pass_at_k(n, c, k):
    """Share of the k-subsets of n samples (the first c correct) holding at least one correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_equals_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert ev.pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(n, c, k)), abs=1e-15), (n, c, k)


def test_pass_at_k_exact_for_large_n():
    # C(n-c, k) / C(n, k) = prod_{i<c} (n-k-i) / (n-i): an independent exact formula
    for n, c, k in [(1024, 1, 1), (1024, 1, 512), (1024, 3, 500), (1024, 700, 32), (1024, 1000, 32), (4096, 2, 1)]:
        miss = math.prod(Fraction(n - k - i, n - i) for i in range(c)) if n - c >= k else Fraction(0)
        assert ev.pass_at_k(n, c, k) == pytest.approx(float(1 - miss), rel=1e-14, abs=0)
    assert ev.pass_at_k(1024, 1, 512) == 0.5 and ev.pass_at_k(1024, 0, 1024) == 0.0
    assert ev.pass_at_k(32, 1, 32) == 1.0  # with n = k, Pass@k is "any of the k correct"
    for bad in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError):
            ev.pass_at_k(*bad)


def test_avg_and_pass_on_hand_made_counts():
    # 4 problems, n = 4 samples, correct counts 0, 1, 4, 2
    s = ev.scores([0, 1, 4, 2], n=4, k=2)
    assert s["avg"] == pytest.approx((0 + 1 / 4 + 1 + 2 / 4) / 4)  # 0.4375
    # pass@2: c=0 -> 0; c=1 -> 1 - C(3,2)/C(4,2) = 1/2; c=4 -> 1; c=2 -> 1 - C(2,2)/C(4,2) = 5/6
    assert s["pass"] == pytest.approx((0 + 1 / 2 + 1 + 5 / 6) / 4)
    assert ev.macro_average({"a": {"avg": 0.2, "pass": 0.5}, "b": {"avg": 0.6, "pass": 1.0}}) == \
        pytest.approx({"avg": 0.4, "pass": 0.75})


class ScriptedSampler:
    """Returns fixed completions, and records how it was called (no model)."""
    backend = "scripted"

    def __init__(self, texts):
        self.texts, self.calls = texts, []

    def generate(self, prompts, n, max_tokens, temperature=1.0, top_p=1.0, seed=None, stop_token_ids=None,
                 progress=False):
        from rollout import Sample
        self.calls.append(dict(prompts=prompts, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                               seed=seed))
        return [[Sample(p, [5] * len(t), t, "length" if t.endswith("...") else "stop", [0.0] * len(t))
                 for t in group] for p, group in zip(prompts, self.texts)]


def test_evaluate_scores_sampled_texts_with_the_verifier():
    import tiny
    tokenizer = tiny.build_char_tokenizer()
    problems = [{"question": "2+2", "answer": "4"}, {"question": "half of 1", "answer": "\\frac{1}{2}"},
                {"question": "3+4", "answer": "7"}]
    texts = [["\\boxed{4}", "\\boxed{5}", "so it is \\boxed{4}", "no idea..."],  # 2 correct
             ["\\boxed{\\frac{1}{2}}", "\\boxed{2}", "\\boxed{3}", "\\boxed{-1}"],  # 1 correct
             ["\\boxed{8}", "\\boxed{6}", "7", "\\boxed{1}"]]  # 0 correct (an unboxed 7 does not count)
    sampler = ScriptedSampler(texts)
    res = ev.evaluate(sampler, tokenizer, problems, k=2, n=4, temperature=0.6, top_p=0.95, max_tokens=9,
                      style=data.PromptStyle(instruction=""), seed=3, progress=False)
    assert [r["correct"] for r in res["results"]] == [2, 1, 0]
    assert res["avg"] == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    assert res["pass"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6) + 0) / 3)  # pass@2 from n = 4
    assert (res["n"], res["k"], res["samples"]) == (3, 2, 4)
    assert res["truncated"] == pytest.approx(1 / 12) and res["no_answer"] == pytest.approx(2 / 12)
    assert res["results"][0]["extracted"][:2] == ["4", "5"] and res["results"][0]["extracted"][3] is None
    assert res["results"][0]["rewards"] == [1.0, 0.0, 1.0, 0.0]
    call = sampler.calls[0]
    assert (call["n"], call["max_tokens"], call["temperature"], call["top_p"], call["seed"]) == (4, 9, 0.6, 0.95, 3)
    assert call["prompts"][0] == tokenizer.encode("Q: 2+2\nA: ", add_special_tokens=False)  # the training prompt


def test_markdown_table_has_one_row_per_model_and_a_column_per_benchmark():
    rows = [{"name": "maspo", "benchmarks": {"aime24": {"avg": 0.532, "pass": 0.824}, "math500": {"avg": 0.86, "pass": 0.947}},
             "average": {"avg": 0.696, "pass": 0.886}},
            {"name": "grpo", "benchmarks": {"aime24": {"avg": 0.5, "pass": 0.8}, "math500": {"avg": 0.8, "pass": 0.9}},
             "average": {"avg": 0.65, "pass": 0.85}}]
    lines = ev.markdown_table(rows, ["aime24", "math500"], k=32).splitlines()
    assert len(lines) == 4 and all(line.count("|") == 5 for line in lines)
    assert "Avg@32 / Pass@32" in lines[0] and "aime24" in lines[0] and "average" in lines[0]
    assert lines[2] == "| maspo | 53.2 / 82.4 | 86.0 / 94.7 | 69.6 / 88.6 |"


# ----------------------------------------------------------------------------------------------
# Benchmarks: each shipped format, overrides, named errors
def test_loading_each_benchmark_format(tmp_path):
    expected = {"aime24": "113", "amc23": "36", "math500": "p - q", "minerva_math": "1.6",
                "olympiadbench": "\\frac{1}{2 n+2}"}
    files = [write_jsonl(tmp_path / f"{name}.jsonl", [row, row]) for name, row in SAMPLES.items()]
    suites = ev.load_benchmarks(ev.EvalConfig(benchmarks=files, limit=1), data.TASKS["math"])
    assert list(suites) == list(SAMPLES)  # table columns named after the file stems
    for name, problems in suites.items():
        assert len(problems) == 1  # --limit
        assert problems[0]["question"] == SAMPLES[name]["problem"]
        assert problems[0]["answer"] == expected[name], name
        assert problems[0]["where"].endswith(f"{name}.jsonl:1")


def test_loaded_golds_verify_against_a_correct_boxed_answer(tmp_path):
    import verify
    olympiad = {**SAMPLES["olympiadbench"], "answer": "$\\frac{1}{2 n+2}$"}  # the shipped row has both fields
    for row, right, wrong in [(olympiad, "\\frac{1}{2n+2}", "\\frac{1}{2n+1}"),
                              (SAMPLES["olympiadbench"], "\\frac{1}{2n+2}", "\\frac{1}{n+2}"),
                              (SAMPLES["minerva_math"], "1.6", "16"), (SAMPLES["math500"], "p - q", "q - p")]:
        gold = data.load_problems(write_jsonl(tmp_path / "b.jsonl", [row]))[0]["answer"]
        assert verify.reward(f"The answer is \\boxed{{{right}}}.", gold) == 1.0, (gold, right)
        assert verify.reward(f"The answer is \\boxed{{{wrong}}}.", gold) == 0.0, (gold, wrong)


def test_json_list_multi_answer_and_key_overrides(tmp_path):
    path = tmp_path / "olymp.json"
    path.write_text(json.dumps({"data": [{"problem": "Find all x.", "final_answer": ["$1$", "$-2$"]}]}))
    assert data.load_problems(str(path))[0]["answer"] == "1, -2"
    custom = write_jsonl(tmp_path / "custom.jsonl", [{"q": "What is 6*7?", "gold": 42, "answer": "wrong field"}])
    cfg = ev.EvalConfig(benchmarks=[custom], prompt_key="q", answer_key="gold")
    assert ev.load_benchmarks(cfg, data.TASKS["math"])["custom"] == \
        [{"question": "What is 6*7?", "answer": "42", "where": f"{custom}:1", "answer_line": False}]
    chat = write_jsonl(tmp_path / "verl.jsonl", [{"prompt": [{"role": "system", "content": "be brief"},
                                                             {"role": "user", "content": "1+1?"}],
                                                  "reward_model": {"ground_truth": "2"}}])
    assert data.load_problems(chat)[0]["messages"][-1] == {"role": "user", "content": "1+1?"}
    assert data.load_problems(chat)[0]["answer"] == "2"


def test_parquet_benchmark(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = str(tmp_path / "math500.parquet")
    pq.write_table(pa.Table.from_pylist([SAMPLES["math500"], SAMPLES["amc23"]]), path)
    assert [p["answer"] for p in data.load_problems(path)] == ["p - q", "36"]


def test_malformed_row_is_named_by_file_and_line(tmp_path):
    bad_json = tmp_path / "aime25.jsonl"
    bad_json.write_text(json.dumps(SAMPLES["aime24"]) + "\n{\"problem\": \"x\", \"answer\": \n")
    import tiny
    model = tiny.build_tiny_model(str(tmp_path / "model"))
    with pytest.raises(SystemExit, match=f"{bad_json}:2: not valid JSON"):  # through the CLI: fails before any model
        ev.main(["--model", model, "--benchmarks", str(bad_json), "--backend", "hf"])
    no_answer = write_jsonl(tmp_path / "amc.jsonl", [SAMPLES["amc23"], SAMPLES["amc23"], {"problem": "2+2?"}])
    with pytest.raises(data.DataError, match=f"{no_answer}:3: no answer"):
        ev.load_benchmarks(ev.EvalConfig(benchmarks=[no_answer]), data.TASKS["math"])


# ----------------------------------------------------------------------------------------------
# Runs, checkpoints and the embedded default (HF sampler: cheap)
def make_run(root, tiny, run_config=None, steps=(1, 2), seed=5):
    """A fake train.py run folder: config.json and HF-format checkpoints step_000001, step_000002."""
    os.makedirs(root, exist_ok=True)
    if run_config is not None:
        with open(os.path.join(root, "config.json"), "w") as f:
            json.dump(run_config, f)
    for i, step in enumerate(steps):
        path = tiny.build_tiny_model(os.path.join(root, "checkpoints", f"step_{step:06d}"), seed=seed + i)
        tiny.load_tokenizer(path).save_pretrained(path)  # as train.py saves it (tokenizer_config.json gains keys)
    return root


def test_embedded_default_says_what_to_run_when_nothing_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "HERE", str(tmp_path))
    with pytest.raises(SystemExit, match="python train.py"):
        ev.main([])


def test_embedded_default_evaluates_before_and_after(tmp_path, monkeypatch, capsys):
    import rollout
    import tiny
    monkeypatch.setattr(ev, "HERE", str(tmp_path))
    tiny.build_tiny_model(str(tmp_path / ".cache" / "tiny-arith"), seed=0)
    run = make_run(str(tmp_path / "runs" / "default"), tiny,
                   {"model": "", "instruction": "auto", "max_response_tokens": 5, "loss": {"loss": "maspo"}})
    out = str(tmp_path / "out")
    rows = ev.run(ev.EvalConfig(backend="hf", k=2, temperature=0.0, limit=6, out=out))
    assert [r["name"] for r in rows] == ["tiny (before RL)", "tiny (after RL)"]
    assert rows[1]["model"].endswith("step_000002")  # a run folder means its latest checkpoint
    assert all(r["instruction"] == "" and r["max_tokens"] == 5 for r in rows)  # as train.py samples the tiny model
    assert capsys.readouterr().out.count("[rollout] sampler backend") == 1  # one sampler for both
    # "after" reused the "before" sampler (same architecture) by pushing the checkpoint's weights:
    # its greedy samples must equal those of a fresh sampler made from that checkpoint
    after = os.path.join(run, "checkpoints", "step_000002")
    tokenizer = tiny.load_tokenizer(after)
    fresh = rollout.make_sampler(after, tokenizer, backend="hf", max_model_len=64)
    problems = data.arithmetic_problems("test")[:6]
    want = ev.evaluate(fresh, tokenizer, problems, k=1, temperature=0.0, max_tokens=5, progress=False,
                       style=data.PromptStyle(instruction=""), stop_token_ids=[tokenizer.eos_token_id])
    got = [json.loads(line) for line in open(os.path.join(out, "tiny_after_RL", "arith-test.jsonl"))]
    assert [g["samples"][0] for g in got] == [w["samples"][0] for w in want["results"]]
    assert [g["samples"] for g in got] != [json.loads(line)["samples"] for line in
                                           open(os.path.join(out, "tiny_before_RL", "arith-test.jsonl"))]
    # the instruction follows training: none for the tiny model (a run's config.json, or the warm-start
    # cache's marker), the \boxed{} instruction for a model of unknown origin, a given one verbatim
    (tmp_path / ".cache" / "tiny-arith" / "warm_start.json").write_text("{}")
    math = data.TASKS["math"]
    for path, want in [(after, ""), (str(tmp_path / ".cache" / "tiny-arith"), ""), (str(tmp_path), data.INSTRUCTION)]:
        assert ev.style_for(ev.EvalConfig(), ev.run_config(path), math).instruction == want, path
    assert ev.style_for(ev.EvalConfig(instruction="Solve."), ev.run_config(after), math).instruction == "Solve."
    assert ev.style_for(ev.EvalConfig(instruction=""), ev.run_config(after), math).instruction == ""
    table = open(os.path.join(out, "results.md")).read()
    assert "| tiny (before RL) |" in table and "| tiny (after RL) |" in table and "arith-test" in table


# ----------------------------------------------------------------------------------------------
# End to end: `python eval.py` with the real vLLM sampler on tiny models
def test_eval_cli_end_to_end_with_vllm(tmp_path):
    pytest.importorskip("vllm")
    import rollout
    import tiny
    a = tiny.build_tiny_model(str(tmp_path / "a"), max_position_embeddings=1024, seed=0)
    c = tiny.build_tiny_model(str(tmp_path / "c"), max_position_embeddings=1024, seed=1)  # same shape as a
    b = tiny.build_tiny_model(str(tmp_path / "b"), hidden_size=256, num_heads=4, num_kv_heads=2,
                              max_position_embeddings=1024, seed=2)  # another architecture
    math500 = write_jsonl(tmp_path / "math500.jsonl", [SAMPLES["math500"], SAMPLES["amc23"], SAMPLES["aime24"]])
    arith = write_jsonl(tmp_path / "arith.jsonl", [{"question": f"{i}+{i}", "answer": str(2 * i)} for i in range(4)])
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--model", a, c, b, "--names", "A", "C", "B",
           "--benchmarks", math500, arith, "--k", "2", "--n", "3", "--temperature", "0", "--max-tokens", "6",
           "--backend", "vllm", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("[rollout] sampler backend: vllm") == 2  # A: new engine, C: reused (weights pushed), B: new
    lines = (out / "results.md").read_text().strip().splitlines()
    assert lines[2].startswith("| model (Avg@2 / Pass@2, %) | math500 | arith | average |")
    assert [line.split("|")[1].strip() for line in lines[4:]] == ["A", "C", "B"]
    assert all(line.count("|") == 5 for line in lines[2:])
    summary = json.loads((out / "results.json").read_text())
    assert summary["settings"]["backend"] == "vllm" and len(summary["runs"]) == 3
    assert summary["runs"][0]["benchmarks"]["math500"]["n"] == 3
    per_problem = {name: [json.loads(x) for x in (out / name / "arith.jsonl").read_text().splitlines()]
                   for name in ("A", "C", "B")}
    assert all(len(rows) == 4 and all(len(r["samples"]) == 3 for r in rows) for rows in per_problem.values())
    # C ran in A's engine with C's weights pushed in: its greedy samples are C's own (HF generate agrees)
    tokenizer = tiny.load_tokenizer(c)
    hf = rollout.make_sampler(c, tokenizer, backend="hf", max_model_len=128)
    want = ev.evaluate(hf, tokenizer, data.load_problems(arith), k=1, temperature=0.0, max_tokens=6, progress=False,
                       style=data.PromptStyle(), stop_token_ids=data.stop_token_ids(c, tokenizer))
    got = [r["samples"][0] for r in per_problem["C"]]
    assert got == [w["samples"][0] for w in want["results"]]
    assert got != [r["samples"][0] for r in per_problem["A"]]


# ----------------------------------------------------------------------------------------------
# N processes (torchrun, one vLLM CPU engine per rank), resume, and settings that must not mix
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def final_files(out):
    """{relative path: bytes} of what an evaluation leaves in `out`, its resume log aside."""
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(out) for f in files if f != "progress.jsonl"}


@pytest.fixture(scope="module")
def sharded_setup(tmp_path_factory):
    """Two models of different architectures (so N processes also make a second engine), two small
    benchmarks (3 + 4 problems), sampled at temperature 0.6; and one uninterrupted 1-process run."""
    pytest.importorskip("vllm")
    import tiny
    root = tmp_path_factory.mktemp("sharded")
    a = tiny.build_tiny_model(str(root / "a"), max_position_embeddings=256, seed=0)
    b = tiny.build_tiny_model(str(root / "b"), hidden_size=256, num_heads=4, num_kv_heads=2,
                              max_position_embeddings=256, seed=2)
    suite1 = write_jsonl(root / "suite1.jsonl", [{"question": f"{i}*{i}", "answer": str(i * i)} for i in range(3)])
    suite2 = write_jsonl(root / "suite2.jsonl", [{"question": f"{i}+{i}", "answer": str(2 * i)} for i in range(4)])
    args = [os.path.join(ROOT, "eval.py"), "--model", a, b, "--names", "A", "B", "--benchmarks", suite1, suite2,
            "--k", "3", "--temperature", "0.6", "--max-tokens", "6", "--backend", "vllm"]  # no --n: torchrun reads it as its own
    proc = subprocess.run([sys.executable] + args + ["--out", str(root / "one")], env=ENV, cwd=str(root),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, args, final_files(str(root / "one"))


def test_two_processes_give_the_one_process_results_sample_for_sample(sharded_setup):
    """torchrun, 2 ranks, one problem per rank per round: every file equals the 1-process run's
    (seeds by (benchmark, index), not by a problem's place in a rank's shard or call)."""
    root, args, want = sharded_setup
    proc = subprocess.run(TORCHRUN + args + ["--chunk", "1", "--out", str(root / "two")], env=ENV, cwd=str(root),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("resuming") == 0 and proc.stdout.count("| A | ") == 1  # rank 0 alone prints the table
    got = final_files(str(root / "two"))
    assert sorted(got) == sorted(want) == ["A/suite1.jsonl", "A/suite2.jsonl", "B/suite1.jsonl", "B/suite2.jsonl",
                                           "results.json", "results.md"]
    rows = {name: [json.loads(x) for x in got[name].decode().splitlines()] for name in got if name.endswith(".jsonl")}
    assert [len(rows[f"A/suite{i}.jsonl"]) for i in (1, 2)] == [3, 4]
    for name in want:
        assert got[name] == want[name], name  # samples, rewards, the table: byte for byte
    samples = [s for r in rows["A/suite2.jsonl"] for s in r["samples"]]
    assert len(set(samples)) > 6  # sampled, not greedy, each problem its own seed: a seed that moved would show


def test_a_killed_run_resumes_to_the_files_of_an_uninterrupted_run(sharded_setup):
    """2 ranks killed (SIGKILL mid-write, test hook) after 5 saved rounds: model A done (4 rounds),
    B 1 round (2 problems); the re-run (1 process) skips those 9 of 14, says so, and leaves the
    uninterrupted run's files; a third run has nothing left to sample."""
    root, args, want = sharded_setup
    out = str(root / "killed")
    proc = subprocess.run(TORCHRUN + args + ["--chunk", "1", "--out", out], env={**ENV, ev.KILL_AFTER_ROUNDS: "5"},
                          cwd=str(root), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert not os.path.exists(os.path.join(out, "results.md"))
    log = open(os.path.join(out, "B", "progress.jsonl")).read()
    assert log.count("\n") == 2 and not log.endswith("\n")  # settings, one round, half a line
    proc = subprocess.run([sys.executable] + args + ["--out", out], env=ENV, cwd=str(root), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming: 9 of 14 problem evaluations (27 samples) are already in" in proc.stdout
    assert final_files(out) == want
    saved = [json.loads(x) for x in open(os.path.join(out, "B", "progress.jsonl"))]
    assert sum(len(line["results"]) for line in saved[1:]) == 7  # each problem once: nothing sampled twice
    proc = subprocess.run([sys.executable] + args + ["--out", out], env=ENV, cwd=str(root), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "resuming: 14 of 14" in proc.stdout
    assert "sampler backend" not in proc.stdout + proc.stderr  # all done: no engine started
    assert final_files(out) == want


def test_other_settings_into_the_same_out_are_refused(sharded_setup):
    """A re-run into an --out holding results of other settings stops with one line naming each of
    them, before any engine, and changes nothing there (one run, several settings changed)."""
    root, args, want = sharded_setup
    flags = ["--temperature", "0.7", "--n", "4", "--max-tokens", "5", "--seed", "1"]
    proc = subprocess.run([sys.executable] + args + flags + ["--out", str(root / "one")], env=ENV, cwd=str(root),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and "A/progress.jsonl holds results of other settings" in error[0], proc.stderr[-2000:]
    for words in ("temperature 0.6 there, 0.7 here", "samples 3 there, 4 here", "max_tokens 6 there, 5 here",
                  "seed 0 there, 1 here", "use another --out"):
        assert words in error[0], words
    assert "k 3 there" not in error[0]  # only what differs
    assert "sampler backend" not in proc.stdout and final_files(str(root / "one")) == want


# ----------------------------------------------------------------------------------------------
# Plots
def write_metrics(run, loss, steps=6, with_gate=True):
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"loss": {"loss": loss}, "instruction": "auto"}, f)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        for step in range(steps + 1):
            row = {"step": step, "acc": 0.5 + 0.05 * step} if step % 3 == 0 else {"step": step}
            if step:
                row.update(reward=0.4 + 0.05 * step, entropy=1.0 - 0.1 * step, response_len=12 - step)
                if with_gate:
                    row.update(gate_mean=0.99, gate_low_frac=0.01 * step)
            f.write(json.dumps(row) + "\n")


def test_plot_command_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_metrics(str(tmp_path / "maspo"), "maspo")
    write_metrics(str(tmp_path / "grpo"), "grpo", with_gate=False)
    out = tmp_path / "figs" / "curves.png"
    ev.main(["--plot", str(tmp_path / "maspo"), str(tmp_path / "grpo"), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    height, width = matplotlib.image.imread(str(out)).shape[:2]
    assert width > 1.5 * height  # 6 panels with data: a 4 x 2 grid
    assert plot.run_label(str(tmp_path / "grpo")) == "grpo"  # the objective is not repeated in its own name
    assert plot.series(plot.read_metrics(str(tmp_path / "maspo")), "acc") == ([0, 3, 6], [0.5, 0.65, 0.8])
    assert plot.moving_average([1.0, 2.0, 3.0, 6.0], 2) == [1.0, 1.5, 2.5, 4.5]


def test_plot_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="metrics.jsonl"):
        plot.read_metrics(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2,\n')
    with pytest.raises(SystemExit, match="metrics.jsonl:2"):
        plot.read_metrics(str(tmp_path))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        plot.plot_runs([str(tmp_path)], str(tmp_path / "x.png"))


# ----------------------------------------------------------------------------------------------
# The paper's six benchmarks by name, and settings checked before anything loads
def test_benchmark_names_resolve_to_the_built_files(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "HERE", str(tmp_path))
    (tmp_path / "benchmarks").mkdir()
    aime = write_jsonl(tmp_path / "benchmarks" / "aime24.jsonl", [SAMPLES["aime24"]])
    math500 = write_jsonl(tmp_path / "benchmarks" / "math500.jsonl", [SAMPLES["math500"], SAMPLES["amc23"]])
    other = write_jsonl(tmp_path / "mine.jsonl", [SAMPLES["amc23"]])
    suites = ev.load_benchmarks(ev.EvalConfig(model=["m"], benchmarks=["aime24", "math500", other]), data.TASKS["math"])
    assert list(suites) == ["aime24", "math500", "mine"] and [len(p) for p in suites.values()] == [1, 2, 1]
    assert suites["aime24"][0]["where"] == f"{aime}:1" and suites["math500"][1]["where"] == f"{math500}:2"
    # with --model and no --benchmarks: all six, in the paper's order; a missing one says how to build it
    with pytest.raises(SystemExit, match="benchmark 'aime25' is not built yet.*python benchmarks/build.py"):
        ev.load_benchmarks(ev.EvalConfig(model=["m"]), data.TASKS["math"])
    for name in ev.BENCHMARKS[2:]:
        write_jsonl(tmp_path / "benchmarks" / f"{name}.jsonl", [SAMPLES["amc23"]])
    write_jsonl(tmp_path / "benchmarks" / "aime25.jsonl", [SAMPLES["aime24"]])
    assert list(ev.load_benchmarks(ev.EvalConfig(model=["m"]), data.TASKS["math"])) == list(ev.BENCHMARKS)


@pytest.mark.parametrize("flags,words", [
    (["--k", "0"], "--k 0"), (["--k", "4", "--n", "2"], "--n 2"), (["--temperature", "-1"], "--temperature -1.0"),
    (["--top-p", "0"], "--top-p 0.0"), (["--backend", "sglang"], "--backend 'sglang'"),
    (["--model", "a", "b", "--names", "x"], "--names ['x']"), (["--task", "chess"], "--task 'chess'"),
    (["--benchmarks", "aime23"], "--benchmarks 'aime23'"), (["--model", "/nonexistent"], "--model '/nonexistent'"),
])
def test_each_bad_setting_is_one_clear_line(flags, words, tmp_path):
    import cli
    if "--model" in flags and "a" in flags:  # two existing model folders, so that only --names is wrong
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "config.json").write_text("{}")
        flags = ["--model", str(tmp_path / "a"), str(tmp_path / "b"), "--names", "x"]
    with pytest.raises(cli.SettingError) as err:
        ev.parse_args(flags)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_embedded_default_response_budget_matches_train():
    import train  # eval.py cannot import train.py (train.py imports it); the constant must agree by hand
    assert ev.TINY_RESPONSE_TOKENS == train.TINY_PRESET["max_response_tokens"]


def test_a_task_of_your_own_is_scored_by_its_reward(tmp_path, monkeypatch):
    """--task module:NAME: eval.py loads the task's problems and calls its reward with the task
    contract's three arguments (completions, problems, timeout), --workers or not."""
    import tiny
    (tmp_path / "evtask.py").write_text(
        "import data\n"
        "def load(source, prompt_key=None, answer_key=None, limit=None):\n"
        "    return [{'question': f'Say {i}', 'answer': str(i), 'where': f'say:{i}'} for i in range(3)]\n"
        "def every_answer_right(completions, problems, timeout):\n"
        "    return [1.0] * len(completions), 0\n"
        "TASK = data.Task(load=load, instruction='', reward=every_answer_right)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = tiny.build_tiny_model(str(tmp_path / "model"), seed=0)
    for workers in (0, 2):
        rows = ev.run(ev.EvalConfig(model=[model], task="evtask:TASK", benchmarks=["say"], backend="hf", k=2,
                                    max_tokens=3, workers=workers, out=str(tmp_path / f"out{workers}")))
        assert rows[0]["benchmarks"] == {"say": {"avg": 1.0, "pass": 1.0}}
