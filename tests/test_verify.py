"""Tests of verify.py and verify_engine.py: answer extraction (boxes, DAPO "Answer:" lines),
equal / not-equal pairs from every answer style of the benchmarks, exact rational arithmetic,
readable golds, hostile input (no side effect), the worker pool (parallel, killed, late, broken),
the batch API, the Math-Verify backend and the CLI.

The expected verdicts are mathematical facts written by hand, not outputs of verify.py. Tests of
the pool watch events that workers write to a log file (a worker started or ended a job), never
durations: wall-clock bounds here are hang guards only. Run:
python -m pytest tests/test_verify.py -q (about 30 s on 2 cores; the sympy workers start once).
"""
import ast
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import verify
import verify_engine
from verify import extract_answer, readable, reward, reward_batch, verify as check, verify_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_GUARD = 60.0  # seconds: far above any correct run, only there so that a hang fails instead of blocking


def wait_until_ready(n, limit=60.0):
    """Until n worker processes have started (imported sympy)."""
    t = time.monotonic()
    while sum(w["ready"] for w in verify._POOL["ours"]) < n and time.monotonic() - t < limit:
        verify._run_jobs([("1", "1")], limit, 1)  # also reads the 'ready' messages of the others
        time.sleep(0.05)


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    """Start the sympy workers once, so that tests measure verification, not start-up."""
    verify._run_jobs([("1", "1"), ("2", "2")], 60.0, 2)  # 2 workers and a spare
    yield


# A worker that logs ["start" | "end", pid, time.monotonic(), pred] around each decision. The
# monotonic clock is one clock for all processes on Linux, so intervals of two workers compare.
TRACED_WORKER = """
import json, os, sys, time
sys.path.insert(0, {root!r})
import verify_engine
inner = verify_engine.decide

def log(event, pred):
    with open({log!r}, "a") as f:
        f.write(json.dumps([event, os.getpid(), time.monotonic(), pred]) + "\\n")

def traced(g_ans, p_ans, deep):
    log("start", p_ans)
    try:
        return inner(g_ans, p_ans, deep)
    finally:
        log("end", p_ans)

verify_engine.decide = traced
verify_engine.worker_loop("ours", {memory})
"""


def read_events(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


@pytest.fixture
def traced_pool(tmp_path, monkeypatch):
    """A fresh pool (2 workers and a spare, all ready) of traced workers; yields the log's path.
    Costs a few seconds: three fresh interpreters import sympy."""
    log = str(tmp_path / "events.jsonl")
    code = TRACED_WORKER.format(root=ROOT, log=log, memory=verify.WORKER_MEMORY)

    def spawn(backend="ours"):
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, bufsize=0)
        return {"proc": proc, "buf": b"", "ready": False, "job": None, "deadline": 0.0, "born": time.monotonic()}

    monkeypatch.setitem(verify._POOL, "ours", [])
    monkeypatch.setattr(verify, "_spawn", spawn)
    verify._run_jobs([("1", "1"), ("2", "2")], 60.0, 2)
    wait_until_ready(3)  # both jobs of a batch go out in the same round
    yield log
    for w in verify._POOL["ours"]:
        w["proc"].kill()
        w["proc"].wait()


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


# ---- DAPO-Math "Answer: X" lines
def test_answer_line_is_read_only_when_asked():
    text = "2 + 3 = 5.\nAnswer: 5"
    assert extract_answer(text, answer_line=True) == "5"
    assert extract_answer(text) is None and reward(text, "5") == 0.0  # default: boxes only, as before
    assert reward(text, "5", answer_line=True) == 1.0 and reward(text, "6", answer_line=True) == 0.0


@pytest.mark.parametrize("text,expected", [
    ("so x = 12.\n\nAnswer: $12$", "12"),
    ("ANSWER: 7", "7"),                                                    # case-insensitive
    ("**Answer:** 8", "8"),                                                # markdown bold
    ("Final answer: $\\boxed{\\frac{1}{2}}$.", r"\frac{1}{2}"),            # a box inside is unwrapped
    ("Answer: 5\nHmm, wait: 2 + 3 = 6?\nAnswer: 6", "6"),                  # the last line wins
    ("\\boxed{4} was a slip.\nAnswer: 5", "5"),                            # the line beats an earlier box
    ("I think the answer is 7. So $\\boxed{9}$", "9"),                    # no line: the last box
    ("I think the answer is 7, the answer is 7.", None),                   # prose is not an Answer line
])
def test_answer_line_extraction(text, expected):
    assert extract_answer(text, answer_line=True) == expected


def test_wrong_answer_line_after_a_right_one_scores_zero():
    """Bug caught: reading the first 'Answer:' match instead of the last (verl reads the last)."""
    text = "Answer: 5\nWait, I dropped a sign.\nAnswer: -5"
    assert reward(text, "-5", answer_line=True) == 1.0
    assert reward(text, "5", answer_line=True) == 0.0


def test_answer_line_in_batches_and_verify():
    completions = ["The answer is 3, I believe.\nAnswer: 4", r"So $\boxed{3}$.", "The answer is 3."]
    rewards, n_lost = reward_batch(completions, ["3", "3", "3"], answer_line=True)
    assert rewards == [0.0, 1.0, 0.0] and n_lost == 0   # the line says 4; box only; prose only
    assert check("4", completions[0], answer_line=True) is True
    assert check("3", completions[0], answer_line=True) is False
    assert verify_batch(["4", "3"], completions[:2], answer_line=True) == ([True, True], 0)


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


# ---- golds of the benchmarks that were misread (found by tests/test_benchmarks.py's self-check)
PROSE_GOLD = ("f(x)=a x+b, where b is an arbitrary integer, and a is an arbitrary positive integer "
              "with \\mho(a)=0")  # OlympiadBench 1965


def test_prose_gold_is_never_cut_down_to_a_number():
    """Bug caught: a gold sentence read as its last number (OlympiadBench 1965 -> "0"), so that
    \\boxed{0} earned reward 1. A gold is read by its box or GSM8K's '#### X' line, else whole:
    a sentence is then compared as text (unreadable as math), so only a copy of it matches."""
    for pred in ("0", "1", "ax+b", "f(x)=ax+b", r"\mho(a)=0"):
        assert reward(f"\\boxed{{{pred}}}", PROSE_GOLD) == 0.0, pred
        assert check(PROSE_GOLD, pred) is False, pred
    assert reward(f"so $\\boxed{{{PROSE_GOLD}}}$", PROSE_GOLD) == 1.0
    assert check(PROSE_GOLD, PROSE_GOLD) is True and check(PROSE_GOLD, f"${PROSE_GOLD}$") is True
    for sentence in (PROSE_GOLD, "x = 5 for every real number a", "1 and 2 are both solutions"):
        assert readable(sentence) is False, sentence  # not read as math (units skipped, xy products)
    for gold, fragment in [("The distance is $125$ miles, so 3 hours", "3"), ("n = 2 when k is even, else 7", "7"),
                           ("the answer is 5 or 6 depending on the parity of n", "6")]:
        assert reward(f"\\boxed{{{fragment}}}", gold) == 0.0 and check(gold, fragment) is False, gold
    gsm8k = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"  # an explicit mark is still read
    assert check(gsm8k, "72") is True and reward(r"\boxed{72}", gsm8k) == 1.0 and reward(r"\boxed{24}", gsm8k) == 0.0
    assert check("$12$", "Thus, the final answer is $12$.") is True  # a prediction's prose is still read


def test_gold_function_value_or_equation_is_not_its_number():
    """Bugs caught (every number of every benchmark gold tried as a boxed prediction): Minerva 61
    'I(0)' read as I * 0, so \\boxed{0} earned reward 1 (also 86, 'I(0) e^{-t/(RC)}'); Minerva 62
    "y' + r y - r x(t) = 0" taking the sum on the left for a name, like x in 'x = 3', so that 0
    matched (also 89). A prediction may still name its value with a sum: m + n = 23 vs 23."""
    for gold in ("I(0)", r"I(0) e^{-\frac{t}{R C}}", r"y^{\prime}+r y-r x(t)=0", r"x^{\prime}+\frac{r}{V} x-r c=0",
                 "x + y = 1"):
        assert reward(r"\boxed{0}", gold) == 0.0 and reward(r"\boxed{1}", gold) == 0.0, gold
        assert reward(f"\\boxed{{{gold}}}", gold) == 1.0, gold
    assert check(r"y^{\prime}+r y-r x(t)=0", r"y^{\prime} = r x(t) - r y") is True
    assert check(r"y^{\prime}+r y-r x(t)=0", r"y^{\prime} = r x(t) + r y") is False
    assert check(r"I(0) e^{-\frac{t}{R C}}", r"I(0)e^{-t/(RC)}") is True
    assert check("23", "m+n=23") is True and check("x=5", "5") is True and check("f(x)=1", "1") is True


# floor / ceiling: step functions; n (and j, k, l, m, N) are integers in them, other names reals
FLOOR_EQUAL = [
    (r"\lfloor\sqrt{n-1}\rfloor", r"\lfloor (n-1)^{1/2}\rfloor"),        # OlympiadBench 1974
    (r"\lfloor\sqrt{n-1}\rfloor", r"\lceil\sqrt{n}\rceil - 1"),
    (r"\left\lfloor\log _{2} n\right\rfloor+1", r"\lceil \log_2 (n+1) \rceil"),
    (r"\lfloor n/2 \rfloor", r"\lceil (n-1)/2 \rceil"),
    (r"\lfloor \frac{n^2}{4} \rfloor", r"\lfloor \frac{n}{2} \rfloor \lceil \frac{n}{2} \rceil"),
    (r"\lfloor 2x \rfloor", r"\lfloor x \rfloor + \lfloor x + \frac12 \rfloor"),  # Hermite, x real
    (r"\lfloor \sqrt{n-2} \rfloor + 1", r"1 + \lfloor (n-2)^{1/2} \rfloor"),  # undefined at n = 1
    ("0", r"\lfloor \sin(\pi n) \rfloor"),  # floats give sin(pi n) = -2e-16 at n = 2, floor -1: sympy
]
FLOOR_NOT_EQUAL = [
    (r"\lfloor\sqrt{n-1}\rfloor", r"\lfloor\sqrt{n}\rfloor"),    # differ at n = 4, 9, 16, ...
    (r"\lfloor\sqrt{n-1}\rfloor", r"\lceil\sqrt{n-1}\rceil"),
    (r"\lfloor\sqrt{n-1}\rfloor", r"\sqrt{n-1}"),
    (r"\left\lfloor\log _{2} n\right\rfloor+1", r"\lceil \log_2 n \rceil"),  # differ at n = 1, 2, 4, 8, ...
    (r"\lfloor n/2 \rfloor", r"\lceil n/2 \rceil"),
    (r"\lfloor 2x \rfloor", r"2\lfloor x \rfloor"),
    (r"\lfloor \frac{3n}{2} \rfloor", r"n + \lceil \frac{n}{2} \rceil"),
]


@pytest.mark.parametrize("gold,pred", FLOOR_EQUAL)
def test_floor_equal(gold, pred):
    """Bug caught: floors compared at 3 random reals in (0.5, 2.5), where sqrt(n - 1) is complex
    (the pair was False), and where step functions that differ at integers look alike."""
    assert check(gold, pred) is True


@pytest.mark.parametrize("gold,pred", FLOOR_NOT_EQUAL)
def test_floor_not_equal(gold, pred):
    assert check(gold, pred) is False


MISREAD_EQUAL = [
    ("166", r"166 \text{cm}^{2}"), ("166", r"166 \mathrm{~cm}^{2}"), ("9.8", r"9.8 \mathrm{~m} \mathrm{~s}^{-2}"),
    (r"\dot{x}+1", r"1+\dot{x}"), (r"\hat{\theta}", r"\hat\theta"),
    (r"x_{0} \cos (\omega t)+ \dot{x}_{0} \sin (\omega t) / \omega",                       # Minerva 72
     r"x_0\cos(\omega t)+\frac{\dot{x}_0}{\omega}\sin(\omega t)"),
    (r"m l \ddot{\theta}(t)-m g \sin \theta(t)=f(t) \cos \theta(t)",                       # Minerva 132
     r"ml\ddot{\theta}(t) - f(t)\cos\theta(t) = mg\sin\theta(t)"),
    ("MR=SRMC", "SRMC=MR"), ("MR=SRMC", "MR = SRMC"),                                           # Minerva 245
    (r"\arcsin(10/13)", r"\arcsin\left(\frac{10}{13}\right)"), ("(0,4]", r"0 < t \le 4"),    # corrected golds
]
MISREAD_NOT_EQUAL = [
    ("167", r"166 \text{cm}^{2}"), (r"\dot{x}+1", r"\ddot{x}+1"), (r"\dot{x}+1", "x+1"),
    (r"x_{0} \cos (\omega t)+ \dot{x}_{0} \sin (\omega t) / \omega", r"x_0\cos(\omega t)+\frac{x_0}{\omega}\sin(\omega t)"),
    (r"m l \ddot{\theta}(t)-m g \sin \theta(t)=f(t) \cos \theta(t)",
     r"m l \ddot{\theta}(t)+m g \sin \theta(t)=f(t) \cos \theta(t)"),
    ("MR=SRMC", "MR=LRMC"), ("SRAC=LRAC", "SRMC=LRMC"),                                       # Minerva 250, 251
    ("ABC", "CBA"),  # a word of 3+ capitals is one name (economics: SRMC); as names these differ
]


@pytest.mark.parametrize("gold,pred", MISREAD_EQUAL)
def test_units_accents_and_names_equal(gold, pred):
    """Bugs caught: a unit with a braced exponent (cm^{2}) not skipped; \\dot{x} / \\ddot{x} not
    parsed; names of 3+ capitals (SRMC) not parsed. Each pair was compared as text, so False."""
    assert check(gold, pred) is True


@pytest.mark.parametrize("gold,pred", MISREAD_NOT_EQUAL)
def test_units_accents_and_names_not_equal(gold, pred):
    assert check(gold, pred) is False


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


# ---- exact rational arithmetic: Fractions on the fast path, no float rounding
EXACT_EQUAL = [
    (r"\frac13+\frac23", "1"), (r"\frac1{10}+\frac2{10}", r"\frac3{10}"), (r"\frac{1}{3^{30}}\cdot 3^{30}", "1"),
    (r"\frac{1}{7}+\frac{1}{11}", r"\frac{18}{77}"), ("2^{60}+1", "1152921504606846977"),
    ("0.1+0.2", "0.3"), ("0.3", "0.1+0.2"), ("0.3", "0.1+0.2+10^{-5}"),  # decimals: REL_TOL = 1e-4 applies
]
# each pair differs by less than EXACT_TOL = 1e-10 relative (or not at all in doubles): only exact
# arithmetic tells them apart
EXACT_NOT_EQUAL = [
    (r"\frac13", r"\frac{1}{3}+10^{-12}"), (r"\frac{3^{40}+1}{3^{40}}", "1"), (r"\frac{10^{15}+1}{10^{15}}", "1"),
    ("1152921504606846976", "2^{60}+1"), (r"\frac{1}{3^{30}}", r"\frac{1}{3^{30}+1}"),
    ("0.1+0.2", "0.3001"), ("0.3", "0.1+0.2+10^{-3}"),  # decimals, but beyond the tolerance
]


@pytest.mark.parametrize("gold,pred", EXACT_EQUAL)
def test_exact_rational_arithmetic_equal(gold, pred):
    assert check(gold, pred) is True


@pytest.mark.parametrize("gold,pred", EXACT_NOT_EQUAL)
def test_rationals_rounded_through_float_would_call_these_equal(gold, pred):
    """Bug caught: the fast path comparing exact rationals as floats within EXACT_TOL."""
    assert check(gold, pred) is False
    assert verify_engine.decide(gold, pred, deep=False) is False  # settled in-process, not by sympy


# ---- readable golds
@pytest.mark.parametrize("gold", [
    "204", r"\frac{14}{3}", r"\left( 3, \frac{\pi}{2} \right)", r"\text{Evelyn}", "(B)", "$2^{1009}$",
    r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", "x = 3", "[-2, 7]", r"\boxed{12}", 17,
])
def test_readable_golds(gold):
    assert readable(gold) is True


@pytest.mark.parametrize("gold", [
    "", "   ", None, r"\boxed{}", r"\mathbb{Z}", r"\begin{cases} x & y \end{cases}", r"\frac{1}{",
    r"\overline{AB}", "3 +", ")(", "1" * 2000, "@@",
])
def test_unreadable_golds(gold):
    """Golds no prediction is compared with as math (wrong kind of set, unknown environment,
    unbalanced, too long, empty): the ones a data loader should count."""
    assert readable(gold) is False


def test_readable_needs_no_sympy():
    code = ("import sys, verify; ok = [verify.readable(g) for g in ('\\\\frac12', 'x^2+1', '\\\\mathbb{Z}')]; "
            "print(ok, 'sympy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[True, True, False] False"


# the "answer" fields of benchmark samples (AIME24, AMC23, MATH500, Minerva, OlympiadBench)
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
            assert verify_engine.decide(gold, text, deep=True) is False  # the worker's code path, in-process
    assert not marker.exists()
    assert called == []


def test_no_eval_exec_sympify_parse_expr_in_source():
    """Nothing in verify.py or verify_engine.py calls eval / exec / compile / sympify / parse_expr /
    __import__ (Math-Verify's own parser is reached only through math_verify.parse, in workers)."""
    banned = {"eval", "exec", "compile", "sympify", "parse_expr", "__import__", "S", "parse_latex", "lambdify"}
    for name in ("verify.py", "verify_engine.py"):
        with open(os.path.join(ROOT, name)) as f:
            tree = ast.parse(f.read())
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
        assert len(calls) > 100, name  # the file was really read
        for node in calls:
            called = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            owner = getattr(getattr(node.func, "value", None), "id", None)
            assert called not in banned or (called == "compile" and owner == "re"), f"{name}:{node.lineno} calls {called}"


# sympy needs seconds for this (the cube root of 5 to 50,000 digits, every time: nothing cached)
SLOW = r"\lfloor 10^{50000}\sqrt[3]{5} \rfloor"
PATHOLOGICAL = [
    r"9^{9^{9^{9}}}", "(" * 10_000 + "1" + ")" * 10_000, "1" * 1_000_000, r"\frac{1}{0}", "9^9^9^9",
    r"(10^{100})!", "1e999999999", "{" * 5000 + "3" + "}" * 5000, r"\sin(" * 300 + "x" + ")" * 300,
    r"\binom{10^{9}}{10^{5}}", "10!!!!", r"\sin(x)^{100001}", SLOW,
]


@pytest.mark.parametrize("pred", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_input_is_false_and_bounded(pred):
    """Each is rejected in-process by a cap, or cut at the timeout in a worker (SLOW needs seconds
    of sympy: with 0.5 s it can only end by the kill, so it must be counted as lost)."""
    gold = r"\sin(x)^{100000}" if "sin(x)" in pred else "3"
    wait_until_ready(2)  # a worker killed by an earlier case may still be starting
    t = time.monotonic()
    verdicts, n_lost = verify_batch([gold], [pred], timeout=0.5)
    assert verdicts == [False]
    if pred == SLOW:
        assert n_lost == 1
    assert time.monotonic() - t < HANG_GUARD


@pytest.mark.parametrize("bad,as_gold", [(None, False), (3, True), (b"3", False), (["3"], False),
                                         (float("nan"), False), (object(), False)])
def test_never_raises(bad, as_gold):
    """Non-strings are False / 0.0 without raising, except numbers, which are read as answers."""
    assert check("3", bad) is as_gold
    assert check(bad, "3") is as_gold
    assert reward(bad, "3") == 0.0  # a completion must be text
    assert extract_answer(bad) is None


def test_stuck_worker_is_killed_and_replaced():
    verdicts, n_timeout = verify._run_jobs([("0", SLOW)], 0.3, 1)
    assert verdicts == [False] and n_timeout == 1  # SLOW needs seconds: only the kill ends it by 0.3 s
    pids = [w["proc"].pid for w in verify._POOL["ours"]]
    killed = verify._POOL["killed"][-1]
    assert killed.wait(timeout=30) is not None and killed.pid not in pids  # dead, and replaced
    verdicts, n_timeout = verify._run_jobs([("f(x)+1", "1+f(x)")], 30.0, 1)  # the pool still works
    assert verdicts == [True] and n_timeout == 0
    assert [w["proc"].pid for w in verify._POOL["ours"]] == pids  # no timeout: same processes


def test_worker_killed_mid_job_scores_false_and_is_counted(traced_pool):
    """Bug caught: a worker that dies holding a job (OOM killer, segfault, an operator's kill -9)
    going uncounted, taking other items down, or hanging the batch. SIGKILL comes from outside as
    soon as the worker logs that it started the SLOW job; the timeout (120 s) is never reached."""
    killed, done = [], threading.Event()

    def kill_when_started():
        while not done.is_set():
            started = [pid for ev, pid, _, pred in read_events(traced_pool) if ev == "start" and pred == SLOW]
            if started:
                os.kill(started[0], signal.SIGKILL)
                killed.append(started[0])
                return
            done.wait(0.01)  # poll the log

    completions = [f"\\boxed{{{SLOW}}}", r"\boxed{3}", r"\boxed{4}", r"\boxed{1+f(x)}",
                   r"\boxed{\frac{2}{\sqrt{10^{20}+1}+10^{10}}}"]
    golds = ["0", "3", "3", "f(x)+1", r"\sqrt{10^{20}+1}-10^{10}"]
    killer = threading.Thread(target=kill_when_started)
    killer.start()
    t = time.monotonic()
    try:
        rewards, n_lost = reward_batch(completions, golds, timeout=120.0, workers=2)
    finally:
        done.set()
        killer.join()
    assert killed, "the SLOW job never started"
    assert rewards == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert n_lost == 1  # the killed item is counted with the timeouts: no verdict
    assert killed[0] not in [w["proc"].pid for w in verify._POOL["ours"]]  # replaced
    assert time.monotonic() - t < HANG_GUARD


def test_workers_that_cannot_start_give_false_not_a_hang(monkeypatch):
    saved = verify._POOL["ours"]
    monkeypatch.setitem(verify._POOL, "ours", [])
    broken = lambda backend="ours": {"proc": subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(1)"],  # noqa: E731
                                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE),
                                     "buf": b"", "ready": False, "job": None, "deadline": 0.0, "born": time.monotonic()}
    monkeypatch.setattr(verify, "_spawn", broken)
    t = time.monotonic()
    assert verify._run_jobs([("f(x)", "f(x)+0")], 1.0, 1) == ([False], 0)
    assert time.monotonic() - t < verify.STARTUP_TIMEOUT / 2  # noticed the exit; did not wait out start-up
    for w in verify._POOL["ours"]:
        w["proc"].kill()
        w["proc"].wait()
    verify._POOL["ours"] = saved


# ---- batch API
def heavy(k, plus=""):
    """A pair sympy must settle (2 sin(t) cos(t) vs sin(2t) at t = 10^k: 60 digits of a huge angle),
    about 0.3 s of one core for k = 20000; equal unless `plus` shifts the angle."""
    return rf"2\sin(10^{{{k}}})\cos(10^{{{k}}})", rf"\sin(2\cdot 10^{{{k}}}{plus})"


def test_workers_2_runs_two_sympy_jobs_at_the_same_time(traced_pool):
    """Bug caught: a batch whose sympy jobs run one after another (workers ignored or forced to 1).
    Each traced worker logs when it starts and ends a job; two workers' jobs must overlap in time.
    No duration is measured: under any load, sequential jobs cannot overlap."""
    (g1, p1), (g2, p2), (_, p3) = heavy(20000), heavy(20001), heavy(20000, "+1")
    completions = [f"\\boxed{{{p}}}" for p in (p1, p2, p3)] + [r"\boxed{7}"]
    rewards, n_lost = reward_batch(completions, [g1, g2, g1, "7"], timeout=120.0, workers=2)
    assert rewards == [1.0, 1.0, 0.0, 1.0] and n_lost == 0
    events = [e for e in read_events(traced_pool) if e[3] in (p1, p2, p3)]
    spans = {}  # (pid, pred) -> [start, end]
    for ev, pid, at, pred in events:
        spans.setdefault((pid, pred), [None, None])[ev == "end"] = at
    assert len(spans) == 3 and all(None not in s for s in spans.values())
    assert len({pid for pid, _ in spans}) == 2  # two workers took part
    overlaps = [(a, b) for a in spans for b in spans
                if a[0] < b[0] and spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]]
    assert overlaps, spans


def test_reward_batch_scores_a_mixed_batch_and_cuts_slow_items():
    """Plain items decided in-process, two sympy items, two items too slow for the timeout (counted
    as lost, scored 0) and one without a box, all in one call on 2 workers."""
    n = 60
    completions = [f"... so \\boxed{{{i}}}" for i in range(n)]
    golds = [str(i if i % 2 else i + 1) for i in range(n)]  # odd i right, even i wrong
    completions += [r"\boxed{\frac{1}{\sqrt{10^{20}+1}+10^{10}}}"] * 2 + [f"\\boxed{{{SLOW}}}"] * 2 + ["no box"]
    golds += [r"\sqrt{10^{20}+1}-10^{10}"] * 2 + ["0"] * 2 + ["1"]
    wait_until_ready(3)  # earlier tests killed workers: let their replacements finish starting
    t = time.monotonic()
    rewards, n_timeout = reward_batch(completions, golds, timeout=1.0, workers=2)
    assert rewards == [float(i % 2) for i in range(n)] + [1.0, 1.0, 0.0, 0.0, 0.0]
    assert n_timeout == 2  # SLOW needs seconds: both were cut at 1 s, not waited for
    assert time.monotonic() - t < HANG_GUARD


def test_batch_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="completions has 2 items but golds has 1"):
        reward_batch(["a", "b"], ["1"])


def test_verify_batch_matches_verify():
    pairs = EQUAL[:20] + NOT_EQUAL[:20]
    verdicts, n_timeout = verify_batch([g for g, _ in pairs], [p for _, p in pairs], workers=2)
    assert verdicts == [True] * 20 + [False] * 20 and n_timeout == 0


# ---- Math-Verify backend
def test_unknown_or_missing_backend_is_a_clear_error(monkeypatch):
    """Bug caught: a missing math-verify package failing silently (every pair False) instead of
    saying what to install."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    with pytest.raises(ImportError, match="pip install math-verify"):
        reward_batch([r"\boxed{1}"], ["1"], backend="math_verify")
    with pytest.raises(ImportError, match="pip install math-verify"):
        check("1", "1", backend="math_verify")
    with pytest.raises(ValueError, match="backend"):
        verify_batch(["1"], ["1"], backend="sympy")


def test_math_verify_backend_gives_its_verdicts_in_killable_workers():
    """With math-verify installed: pairs where Math-Verify and ours differ
    show which one decided (e vs E: Math-Verify reads E as Euler's number; 0.333 vs 1/3: we accept
    a 3-digit gold rounded), and a Math-Verify hang on a power tower is killed at the timeout and
    counted; about 8 s (its workers import Math-Verify, one is killed). Without it: the error."""
    if importlib.util.find_spec("math_verify") is None:
        with pytest.raises(ImportError, match="pip install math-verify"):
            verify_batch(["1"], ["1"], backend="math_verify")
        return
    golds, preds = ["e", "0.333", r"\frac12", "3", "3"], ["E", r"\frac13", "0.5", "4", r"9^{9^{9^{9}}}"]
    ours, _ = verify_batch(golds, preds[:4] + ["4"], workers=2)
    assert ours == [False, True, True, False, False]
    theirs, n_lost = verify_batch(golds, preds, timeout=2.0, workers=1, backend="math_verify")
    assert theirs == [True, False, True, False, False] and n_lost == 1
    assert verify._POOL["math_verify"] and "math_verify" not in sys.modules  # only workers import it
    assert reward(r"so \boxed{E}", "e", backend="math_verify") == 1.0


# ---- CLI
def test_cli():
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "verify.py"), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    assert run(r"\frac12", "0.5").stdout.strip() == "True"
    out = run("-v", "(0,1]", "(0,1)").stdout
    assert out.strip().endswith("False") and "tree" in out and "'iv'" in out and "route" in out
