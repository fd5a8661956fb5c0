"""Tests of verify.py: answer extraction, equal / not-equal pairs from every answer style of the
benchmarks, hostile input (no side effect, bounded time), the batch API and the CLI.

The expected verdicts are mathematical facts written by hand, not outputs of verify.py. Run:
python -m pytest tests/test_verify.py -q (about 20 s on 2 cores; the sympy workers start once).
"""
import ast
import os
import subprocess
import sys
import time

import pytest

import verify
from verify import extract_answer, reward, reward_batch, verify as check, verify_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until_ready(n, limit=60.0):
    """Until n worker processes have started (imported sympy)."""
    t = time.monotonic()
    while sum(w["ready"] for w in verify._POOL["workers"]) < n and time.monotonic() - t < limit:
        verify._run_jobs([("1", "1")], limit, 1)  # also reads the 'ready' messages of the others
        time.sleep(0.05)


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    """Start the sympy workers once, so that timing tests measure verification, not start-up."""
    verify._run_jobs([("1", "1"), ("2", "2")], 60.0, 2)  # 2 workers and a spare
    yield


# ---- extraction
@pytest.mark.parametrize("text,expected", [
    (r"so the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{1} first, then \boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}"),        # the last one
    (r"\boxed{\left\{ x \mid x^{2} \in \{1, 4\} \right\}}", r"\left\{ x \mid x^{2} \in \{1, 4\} \right\}"),
    (r"\fbox{42}", "42"),
    (r"thus \boxed 7.", "7."),
    (r"\boxed{\boxed{5}}", r"\boxed{5}"),                                               # outer box
    (r"The integers are \boxed{-2} and \boxed{1}.", "-2, 1"),                          # joined
    ("\\boxed{5}. Wait, that is wrong.\n\nSo \\boxed{6}", "6"),                        # not joined
    ("no box here, the answer is 5", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("Thus, the final answer is $12$. I hope it is correct.", "12"),
    ("Final Answer: The largest $n$ is 34.", "34"),
    (r"the area is $\frac{3}{4}$", r"\frac{3}{4}"),
    ("so there are 17 ways", "17"),
    ("nothing numeric here", None),
])
def test_extract_answer_fallback_only_when_asked(text, expected):
    assert extract_answer(text, fallback=True) == expected
    assert extract_answer(text) is None


# ---- equal pairs, one or more per answer style the benchmarks use
EQUAL = [
    ("0.5", r"\frac12"), ("204", "204"), ("033", "33"), ("7425000", "7,425,000"), ("1000", "1 000"),
    ("1000", "1000.0"), (r"14{,}916", "14916"), (r"\$16,\!386.20", "16386.2"),
    (r"\frac{3}{4}", r"\dfrac{3}{4}"), (r"\frac{3}{4}", r"\tfrac34"), (r"\frac{3}{4}", "3/4"), ("-10/9", r"-\frac{10}{9}"),
    (r"2\frac{1}{2}", "5/2"), (r"\sqrt[3]{8}", "2"), (r"3\sqrt{13}", r"\sqrt{117}"), (r"\sqrt[3]{2}", "2^{1/3}"),
    (r"\frac{9}{4}\pi", r"\frac94\pi"), (r"2\pi", "6.2832"), ("e^2", r"\exp(2)"), ("e", r"\mathrm{e}"),
    ("1+2i", "2i+1"), ("i", r"\sqrt{-1}"), (r"-\frac{3}{4}i", "-0.75i"),
    ("4.5e33", r"4.5\times10^{33}"), (r"3\times10^{8}", "300000000"), (r"3\times 10^8", "3e8"),
    (r"28\%", "28"), (r"28\%", "0.28"), ("28", "28 percent"), ("45", r"45^\circ"), (r"90^{\circ}", r"\frac{\pi}{2}"),
    ("5", r"5\text{ cm}"), ("15", r"15\mbox{ cm}^2"), ("1.6", r"1.6 \mathrm{~cm}"), (r"\text{Evelyn}", "Evelyn"),
    (r"\text{odd}", "odd"), (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)"),
    ("3", "x = 3"), ("x = 3", "3"), ("y = 2x+3", "y=3+2x"), ("2x+4y-3=0", r"y=-\frac{1}{2}x+\frac{3}{4}"),
    ("(p,q)=(3,2)", "(3,2)"), (r"a_3 = 2, a_{37} = 19", r"a_{37} = 19, a_3 = 2"),
    ("p - q", "-q + p"), (r"\frac{1}{2 n+2}", r"\frac{1}{2(n+1)}"), ("x^2+2x+1", "(x+1)^2"),
    (r"\tan^2(y)+1", r"\sec^2(y)"), (r"2\sin b\cos a", r"\sin(a+b)-\sin(a-b)"),
    (r"\{1,2,3\}", r"\{3,2,1\}"), ("1, 2, 3", "3, 1, 2"), ("(2,2),(1,3)", "(1,3),(2,2)"),
    ("(0,1]", "(0, 1]"), (r"(-\infty, 3) \cup (5, \infty)", r"(5,\infty)\cup(-\infty,3)"),
    ("[-2, 7]", r"-2 \le x \le 7"), (r"(5, \infty)", "x > 5"), (r"x \ge 5", r"5 \le x"), ("x<1", "-x>-1"),
    (r"1 \pm \sqrt{19}", r"1+\sqrt{19}, 1-\sqrt{19}"), (r"\pm 3", "3, -3"),
    ("(B)", "B"), ("B", r"\text{(B)}"), ("B", "(B) 5"), ("27", r"\textbf{(B) }27"),
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{bmatrix} 1 & 2 \\ 3 & 4 \end{bmatrix}"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", "(1,2)"),
    ("52_8", "52_8"), ("52_8", "52"), (r"\infty", r"+\infty"), ("2^{1009}", str(2 ** 1009)),
    (r"\frac{1}{3}", "0.3333"), (r"\log_2 8", "3"), ("10!", "3628800"), (r"\binom{5}{2}", "10"),
    ("$p - q$", r"\boxed{p-q}"), ("7:32", "7 : 32"), ("33.3", r"\frac{100}{3}"), ("41.8", "41.81"), ("204", "204.00"),
    (r"\frac{\sqrt{\sqrt{11}+\sqrt{194}}}{15+2\sqrt{33}}", r"\frac{\sqrt{\sqrt{11}+\sqrt{194}}}{2\sqrt{33}+15}"),
]
# the same answers' near misses
NOT_EQUAL = [
    (r"\frac{1}{2}", r"\frac{1}{3}"), ("[0,1)", "[0,1]"), ("(1,2)", "(2,1)"), ("(0,1]", "(0,1)"),
    ("204", "205"), ("12000023", "12000003"), ("12000023", "12000023.4"), (r"\$16,\!386.20", "16386"),
    (r"\$16,\!386.20", "16386.17"), (r"\frac{14}{3}", "4.67"), (r"\frac{1}{3}", "0.333"), (r"\pi", "3.14"),
    (r"3\sqrt{13}", r"\sqrt{118}"), (r"2\frac{1}{2}", "2"), ("1+2i", "1-2i"), ("4.5e33", "4.6e33"),
    (r"28\%", "29"), (r"\text{Evelyn}", "Bob"), ("x=3", "y=3"), ("x = 3", "-3"), ("p - q", "q - p"),
    ("x^2+2x+1", "(x-1)^2"), ("x<1", "x>-1"), (r"x \ge 5", r"x \le 5"), (r"\{1,2\}", r"\{1,2,3\}"),
    ("(1,2,3)", "(1,2,4)"), (r"(-\infty, 3) \cup (5, \infty)", r"(-\infty, 3] \cup (5, \infty)"),
    (r"\pm 2021", "2021"), ("1.6", "1.62"), ("0.1", r"\frac19"), ("204", "204.3"), ("(B)", "(C)"), ("27", "(B) 28"), ("52_8", "52_9"), ("52_8", "42"), (r"-\infty", r"\infty"),
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix} 1 & 2 \\ 3 & 5 \end{pmatrix}"),
    ("2^{1009}", str(2 ** 1009 + 1)), ("(p,q)=(3,2)", "(2,3)"), ("12:00", "1:00"), (r"f(x)", "f(y)"),
    ("7 = 11a+c", "11a+c"), (r"\text{even}", "odd"), ("e", "E"),
]


@pytest.mark.parametrize("gold,pred", EQUAL)
def test_equal(gold, pred):
    assert check(gold, pred) is True


@pytest.mark.parametrize("gold,pred", NOT_EQUAL)
def test_not_equal(gold, pred):
    assert check(gold, pred) is False


def test_lists_labels_and_pm():
    assert check(r"x = \frac{1}{2}, x = 1 \pm \sqrt{2}", r"1-\sqrt2, \frac12, 1+\sqrt2") is True
    assert check(r"x = \frac{1}{2}, x = 1 \pm \sqrt{2}", r"\frac12, 1+\sqrt2") is False
    assert check("x=1, y=2", "y=2, x=1") is True and check("x=1, y=2", "x=2, y=1") is False
    assert check("x=1, y=2", "(1, 2)") is True and check("x=1, y=2", "(2, 1)") is False
    assert check(r"(-\infty,-2) \cup (-2,\infty)", r"x \ne -2") is True


def test_prose_predictions_in_verify_but_not_in_reward():
    text = "Thus, the final answer is $12$. I hope it is correct."
    assert check("$12$", text) is True and check("$13$", text) is False
    assert check("10455", r"so $\boxed{200}$ ... Final Answer: The final answer is $10,455$.") is True
    assert check("$125$", "The distance is $125$ miles") is True
    assert reward(text, "12") == 0.0  # rewards read boxes only
    assert reward(text + r" \boxed{12}", "12") == 1.0


def test_sympy_worker_settles_what_floats_cannot():
    """Cancellation (sqrt(1e20 + 1) - 1e10 is 5e-11 in exact arithmetic, 0 in floats), matrix
    arithmetic and unknown functions are decided by sympy in a worker, correctly both ways."""
    a = r"\sqrt{10^{20}+1}-10^{10}"
    assert check(a, r"\frac{1}{\sqrt{10^{20}+1}+10^{10}}") is True
    assert check(a, r"\frac{2}{\sqrt{10^{20}+1}+10^{10}}") is False
    m = r"\begin{pmatrix}1 & 2 \\ 3 & 4\end{pmatrix} + \begin{pmatrix}5 & 6 \\ 7 & 8\end{pmatrix}"
    assert check(r"\begin{pmatrix}6 & 8 \\ 10 & 12\end{pmatrix}", m) is True
    assert check(r"\begin{pmatrix}6 & 8 \\ 10 & 13\end{pmatrix}", m) is False
    assert check("f(x)+1", "1+f(x)") is True
    assert check("1001!", r"1000! \cdot 1001") is True and check("1001!", r"1000! \cdot 1002") is False


# the "answer" fields of /work/shared/benchmark-samples (AIME24, AMC23, MATH500, Minerva, OlympiadBench)
SAMPLE_ANSWERS = ["204", "113", "371", "27", "36", "45", r"\left( 3, \frac{\pi}{2} \right)", "p - q",
                  r"\frac{14}{3}", "1.6", "4.5e33", "41.8", "2", r"$\frac{1}{2 n+2}$", "$2^{1009}$"]


@pytest.mark.parametrize("gold", SAMPLE_ANSWERS)
def test_benchmark_sample_answers(gold):
    """Each benchmark answer, boxed in a completion, earns reward 1 against itself; a near miss 0."""
    pred = gold.strip("$")
    assert reward(f"Reasoning... so the answer is $\\boxed{{{pred}}}$.", gold) == 1.0
    near_miss = str(int(pred) + 1) if pred.isdigit() else f"2({pred})"
    assert reward(f"\\boxed{{{near_miss}}}", gold) == 0.0


# ---- hostile input
INJECTIONS = [
    "__import__('os').system('touch {marker}')",
    "(lambda: __import__('os').system('touch {marker}'))()",
    "().__class__.__bases__[0].__subclasses__()",
    "x.__globals__['os'].system('touch {marker}')",
    r"\input{/etc/passwd}", r"\include{{marker}}", "eval('3')", "exec('open(\"{marker}\", \"w\")')",
    "open('{marker}', 'w').write('3')", "3; import os", "lambda: 3",
]


def test_injection_returns_false_without_side_effect(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    called = []
    import builtins
    for name in ("eval", "exec", "compile"):
        original = getattr(builtins, name)
        monkeypatch.setattr(builtins, name, lambda *a, _o=original, _n=name, **k: (called.append(_n), _o(*a, **k))[1])
    texts = [t.replace("{marker}", str(marker)) for t in INJECTIONS]
    for text in texts:
        for gold in ("3", "0"):
            assert check(gold, text) is False, text
            assert reward(f"\\boxed{{{text}}}", gold) == 0.0, text
            assert verify._decide(gold, text, deep=True) is False  # the worker's code path, in-process
    assert not marker.exists()
    assert called == []


def test_no_eval_exec_sympify_parse_expr_in_source():
    """Nothing in verify.py calls eval / exec / compile / sympify / parse_expr / __import__."""
    with open(os.path.join(ROOT, "verify.py")) as f:
        tree = ast.parse(f.read())
    banned = {"eval", "exec", "compile", "sympify", "parse_expr", "__import__", "S", "parse_latex", "lambdify"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            owner = getattr(getattr(node.func, "value", None), "id", None)
            assert name not in banned or (name == "compile" and owner == "re"), f"line {node.lineno} calls {name}"


# sympy needs seconds for this (the cube root of 5 to 50,000 digits, every time: nothing cached)
SLOW = r"\lfloor 10^{50000}\sqrt[3]{5} \rfloor"
PATHOLOGICAL = [
    r"9^{9^{9^{9}}}", "(" * 10_000 + "1" + ")" * 10_000, "1" * 1_000_000, r"\frac{1}{0}", "9^9^9^9",
    r"(10^{100})!", "1e999999999", "{" * 5000 + "3" + "}" * 5000, r"\sin(" * 300 + "x" + ")" * 300,
    r"\binom{10^{9}}{10^{5}}", "10!!!!", r"\sin(x)^{100001}", SLOW,
]


@pytest.mark.parametrize("pred", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_input_is_false_within_the_limit(pred):
    gold = r"\sin(x)^{100000}" if "sin(x)" in pred else "3"
    wait_until_ready(2)  # a worker killed by an earlier case may still be starting (not timed)
    t = time.monotonic()
    assert check(gold, pred, timeout=0.5) is False
    assert time.monotonic() - t < 0.5 + 2.0  # the limit, plus killing the worker, on a loaded machine


@pytest.mark.parametrize("bad", [None, 3, b"3", ["3"], float("nan"), object()])
def test_never_raises(bad):
    assert check("3", bad) in (True, False)
    assert reward(bad, "3") in (0.0, 1.0)
    assert check(bad, "3") in (True, False)
    assert extract_answer(bad) is None


def test_stuck_worker_is_killed_and_replaced():
    t = time.monotonic()
    verdicts, n_timeout = verify._run_jobs([("0", SLOW)], 0.3, 1)
    assert verdicts == [False] and n_timeout == 1 and time.monotonic() - t < 0.3 + 2.0
    pids = [w["proc"].pid for w in verify._POOL["workers"]]
    killed = verify._POOL["killed"][-1]
    assert killed.wait(timeout=30) is not None and killed.pid not in pids  # dead, and replaced
    verdicts, n_timeout = verify._run_jobs([("f(x)+1", "1+f(x)")], 30.0, 1)  # the pool still works
    assert verdicts == [True] and n_timeout == 0
    assert [w["proc"].pid for w in verify._POOL["workers"]] == pids  # no timeout: same processes


def test_worker_crash_mid_job_is_false_and_replaced():
    import signal
    import threading
    wait_until_ready(2)
    before = {w["proc"].pid for w in verify._POOL["workers"]}

    def crash_the_busy_worker():
        for _ in range(1000):  # as soon as the job is handed out
            busy = [w for w in verify._POOL["workers"] if w["job"] is not None]
            if busy:
                time.sleep(0.2)
                os.kill(busy[0]["proc"].pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    threading.Thread(target=crash_the_busy_worker).start()
    t = time.monotonic()
    verdicts, n_timeout = verify._run_jobs([("0", SLOW)], 60.0, 1)
    assert verdicts == [False] and n_timeout == 0 and time.monotonic() - t < 60.0  # not the timeout
    assert len(before - {w["proc"].pid for w in verify._POOL["workers"]}) == 1  # one replaced


def test_workers_that_cannot_start_give_false_not_a_hang(monkeypatch):
    saved = verify._POOL["workers"]
    monkeypatch.setitem(verify._POOL, "workers", [])
    broken = lambda: {"proc": subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(1)"],  # noqa: E731
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE),
                      "buf": b"", "ready": False, "job": None, "deadline": 0.0, "born": time.monotonic()}
    monkeypatch.setattr(verify, "_spawn", broken)
    t = time.monotonic()
    assert verify._run_jobs([("f(x)", "f(x)+0")], 1.0, 1) == ([False], 0)
    assert time.monotonic() - t < 10.0
    for w in verify._POOL["workers"]:
        w["proc"].kill()
        w["proc"].wait()
    verify._POOL["workers"] = saved


# ---- batch API
def test_reward_batch_parallel_and_bounded():
    n = 60
    completions = [f"... so \\boxed{{{i}}}" for i in range(n)]
    golds = [str(i if i % 2 else i + 1) for i in range(n)]  # odd i right, even i wrong
    completions += [r"\boxed{\frac{1}{\sqrt{10^{20}+1}+10^{10}}}"] * 2 + [f"\\boxed{{{SLOW}}}"] * 2 + ["no box"]
    golds += [r"\sqrt{10^{20}+1}-10^{10}"] * 2 + ["0"] * 2 + ["1"]
    wait_until_ready(3)  # earlier tests killed workers: let their replacements finish starting
    t = time.monotonic()
    rewards, n_timeout = reward_batch(completions, golds, timeout=1.0, workers=2)
    elapsed = time.monotonic() - t
    assert rewards == [float(i % 2) for i in range(n)] + [1.0, 1.0, 0.0, 0.0, 0.0]
    assert n_timeout == 2
    # ceil(4 sympy items / 2 workers) * timeout, + generous slack for a loaded CI machine; an unbounded
    # call on SLOW would take far longer than this
    assert elapsed < 2 * 1.0 + 4.0


def test_batch_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="completions has 2 items but golds has 1"):
        reward_batch(["a", "b"], ["1"])


def test_verify_batch_matches_verify():
    pairs = EQUAL[:20] + NOT_EQUAL[:20]
    verdicts, n_timeout = verify_batch([g for g, _ in pairs], [p for _, p in pairs], workers=2)
    assert verdicts == [True] * 20 + [False] * 20 and n_timeout == 0


# ---- CLI
def test_cli():
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "verify.py"), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    assert run(r"\frac12", "0.5").stdout.strip() == "True"
    out = run("-v", "(0,1]", "(0,1)").stdout
    assert out.strip().endswith("False") and "tree" in out and "'iv'" in out and "route" in out
