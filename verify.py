"""verify.py: is a model's final answer mathematically the same as the reference answer?

The verifiable reward r(x, y) of RLVR: 1.0 when the completion's final answer equals the reference
answer, else 0.0 (no paper equation lives here). Here: answer extraction, the worker pool, the
public API; the parser and comparison engine is verify_engine.py (not needed to follow training).

Public API (the contract train.py / eval.py / data.py rely on; all keywords after the first two):
  extract_answer(text, fallback=False, answer_line=False) -> str | None
  verify(gold, pred, timeout=1.0, answer_line=False, backend="ours") -> bool
  verify_batch(golds, preds, timeout, workers=None, answer_line, backend) -> (list[bool], n_lost)
  reward(completion, gold, timeout=1.0, answer_line=False, backend="ours") -> 1.0 | 0.0
  reward_batch(completions, golds, timeout, workers, answer_line, backend) -> (list[float], n_lost)
  readable(gold) -> bool: can the verifier read this reference answer at all? (cheap, no sympy)
No item ever raises; an unknown backend, a missing math-verify package or lists of different
lengths raise at once. n_lost counts the items that got no verdict (scored False / 0.0): their
worker ran past `timeout` or died (killed, crashed). train.py logs it as `verify_timeouts`.

A completion's answer: the last \\boxed{} / \\fbox{} (boxes separated only by ",", "and", "\\quad"
joined); with answer_line=True (DAPO-Math asks for a final line "Answer: X") the last such line
first, as verl's DAPO scorer reads it (case-free, a box in X unwrapped, $ stripped). Only the last
MAX_TEXT_CHARS characters are read; answers over MAX_ANSWER_CHARS are rejected.

How a pair is decided, cheapest first:
  1. Each side is reduced to its answer. A gold: its last box or GSM8K's "#### X" line, else all
     of it, never a part (a sentence is compared as text; readable() is False). A pred: the last
     box, else the math of a math-only string ("$12$ and $13$"), else, in prose (verify only,
     never reward), "the answer is X" / the last $...$ / the last number.
  2. Both are normalised (\\left, spacing, \\dfrac, thousands separators) and compared as strings;
     multiple-choice letters as letters.
  3. Both are parsed into a small tree and compared by structure: tuples in order; sets, lists and
     unions unordered; intervals with their ends; "x = 3" vs "3" by the right side, equations up
     to a constant factor; inequalities likewise and as intervals ("x > 5" vs "(5, \\infty)");
     percent and degrees both ways; a \\pm b as {a+b, a-b}; bases by value (52_8 != 52_9); units
     skipped (5 \\text{cm}^{2}); words (\\text{Evelyn}) as case-free strings. 3+ capitals are one
     name (SRMC; ABC != CBA), \\dot{x} one symbol, xy a product, I(0) a function's value (not 0).
  4. Numbers exactly (fractions.Fraction) when both are rational and no decimal literal is
     involved (1/3 + 10^{-12} != 1/3), else as floats; expressions with variables at 3 random
     points ((x+1)^2 vs x^2+2x+1); with a floor / ceiling at 48 points, where n, k, m, ... run
     through the integers (floor(sqrt(n-1)) vs floor(sqrt(n)) differ at n = 4).
  5. What floats cannot settle (huge or tiny numbers, cancellation, values that agree to only
     1e-6..1e-10, matrices, unknown functions f(x)) goes to sympy in a worker: exact construction,
     then a - b evaluated adaptively to 60 digits at the same points.
Steps 1-4 run in the calling process without sympy (not even imported there): ~100 us a pair.

Tolerance with a decimal literal on either side (0.33, 4.5e33): |a - b| <= REL_TOL * max(|a|, |b|),
REL_TOL = 1e-4 (as Qwen-Math's grader: 0.3333 == 1/3, 0.333 != 1/3); a number-literal gold also
fixes its last written place: an integer needs an exact value (204.0 yes, 204.3 no); 1-2
significant digits also |a - b| below half its last unit (1.6 vs 1.62 no); 3+ any value that
rounds to it (33.3 vs 100/3 yes). Exact forms (radicals, pi): 1e-10 relative in floats, 1e-30 in
sympy.

Safety: model output is untrusted. The engine reads it with its own tokenizer and parser (nothing
reaches eval, exec, sympify or parse_expr; lengths, nesting, integer sizes capped). Step 5 runs in
persistent subprocess workers (fresh interpreters: safe next to vLLM / torch threads, unlike fork)
under a WORKER_MEMORY address-space limit, killed and replaced (one ready spare) past `timeout`; up
to `workers` (default: all cores) busy: n sympy items take ~ceil(n / workers) * timeout at worst.
backend="math_verify" (pip install math-verify) compares the extracted answers with Math-Verify (a
published grader) instead; it parses untrusted text with its own machinery (ANTLR, parse_expr), so
every pair goes to a killable worker of its own pool, with the same timeout.

Run: python verify.py '\\frac12' '0.5'          -> True
     python verify.py -v '(0,1]' '(0,1)'        -> False, with the extracted and parsed forms
"""
import argparse
import atexit
import importlib.util
import os
import select
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import suppress

from verify_engine import (MAX_ANSWER_CHARS, MAX_TEXT_CHARS, NeedSympy, answer_line_text, answer_text, decide,
                           explain, fallback_answer, last_boxed, parses, pred_answer, read_messages, write_job)

STARTUP_TIMEOUT = 60.0    # seconds a fresh worker may take to start (imports sympy)
WORKER_MEMORY = 3 << 30   # address-space limit of a worker (bytes)
BACKENDS = ("ours", "math_verify")
_HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------
# 1. Extraction: a completion's final answer
def extract_answer(text, fallback=False, answer_line=False):
    """A completion's final answer, as the module docstring says: the last box (adjacent ones joined),
    after the last 'Answer: X' line with answer_line=True; with fallback=True and no box, 'the answer
    is X' / the last $...$ / the last number. None when nothing is found."""
    if not isinstance(text, str):
        return None
    text = text[-MAX_TEXT_CHARS:]  # a long completion: its final answer is in its tail
    ans = answer_line_text(text) if answer_line else None
    if ans is None:
        ans = last_boxed(text)
    if ans is None and fallback:
        ans = fallback_answer(text.replace("\\$", " "))
    return ans.strip() if ans and ans.strip() else None


# ----------------------------------------------------------------------------------------------
# 2. Worker processes: sympy (or Math-Verify) with a hard time limit, one pool per backend
_POOL = {"pid": os.getpid(), **{b: [] for b in BACKENDS}, "killed": []}
_LOCK = threading.Lock()


def _reset_after_fork():
    global _LOCK
    _LOCK = threading.Lock()
    _POOL.update(pid=os.getpid(), **{b: [] for b in BACKENDS}, killed=[])


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _spawn(backend="ours"):
    code = (f"import sys; sys.path.insert(0, {_HERE!r}); import verify_engine; "
            f"verify_engine.worker_loop({backend!r}, {WORKER_MEMORY})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
    return {"proc": proc, "buf": b"", "ready": False, "job": None, "deadline": 0.0, "born": time.monotonic()}


def _replace(pool, i, backend):
    """SIGKILL worker i (reaped later: waiting can take a second on a loaded machine); a new one."""
    with suppress(Exception):
        pool[i]["proc"].kill()
    _POOL["killed"] = [p for p in _POOL["killed"] if p.poll() is None] + [pool[i]["proc"]]
    pool[i] = _spawn(backend)


def _shutdown():
    """At exit: close each worker's input (it exits on EOF); after 2 s, kill what is left."""
    procs = [w["proc"] for b in BACKENDS for w in _POOL[b]]
    _POOL.update({b: [] for b in BACKENDS})
    for proc in procs:
        with suppress(Exception):
            proc.stdin.close()
    deadline = time.monotonic() + 2.0
    for proc in procs + _POOL["killed"]:
        try:
            proc.wait(timeout=max(0.01, deadline - time.monotonic()))
        except Exception:
            with suppress(Exception):
                proc.kill()
                proc.wait(timeout=1)


atexit.register(_shutdown)


def _hand_out(pool, todo, jobs, timeout, n_use, backend):
    """Give waiting jobs to ready idle workers, at most n_use busy at once."""
    for i, w in enumerate(pool):
        busy = sum(x["job"] is not None for x in pool)
        if w["ready"] and w["job"] is None and todo and busy < n_use:
            try:
                write_job(w["proc"].stdin.fileno(), todo[0], *jobs[todo[0]])
            except OSError:  # died while idle: replace it, the job waits
                _replace(pool, i, backend)
                continue
            w["job"], w["deadline"] = todo.popleft(), time.monotonic() + timeout


def _wait_and_collect(pool, results, backend):
    """Wait for a message or the next deadline; store verdicts; replace dead and late workers.
    Returns (a worker failed to start, number of jobs lost: past their deadline or worker died)."""
    now, n_lost, failed_start = time.monotonic(), 0, False
    waits = [w["deadline"] if w["job"] is not None else w["born"] + STARTUP_TIMEOUT
             for w in pool if w["job"] is not None or not w["ready"]]
    fds = {w["proc"].stdout.fileno(): i for i, w in enumerate(pool)}
    ready_fds, _, _ = select.select(list(fds), [], [], max(0.0, min(waits) - now) if waits else 0)
    for fd in ready_fds:
        i = fds[fd]
        msgs, pool[i]["buf"] = read_messages(fd, pool[i]["buf"])
        if msgs is None:  # died: on its job (stays False, counted), or at start-up
            n_lost += pool[i]["job"] is not None
            failed_start |= pool[i]["job"] is None and not pool[i]["ready"]
            _replace(pool, i, backend)
            continue
        for msg in msgs:
            if msg == "ready":
                pool[i]["ready"] = True
            elif isinstance(msg, list) and msg[0] == pool[i]["job"]:
                results[msg[0]], pool[i]["job"] = bool(msg[1]), None
    now = time.monotonic()
    for i, w in enumerate(pool):
        if w["job"] is not None and now > w["deadline"]:
            n_lost += 1
            _replace(pool, i, backend)
        elif not w["ready"] and w["job"] is None and now > w["born"] + STARTUP_TIMEOUT:
            failed_start = True
    return failed_start, n_lost


def _run_jobs(jobs, timeout, workers, backend="ours"):
    """Decide (gold_answer, pred_answer) pairs in worker processes, each within `timeout` seconds
    of being handed out; at most `workers` run at once, and one more process is kept as a ready
    spare so that a killed worker is replaced at once (a fresh one needs ~1 s to import sympy).
    Returns (list[bool], number of jobs lost: past `timeout` or their worker died)."""
    results, n_lost = [False] * len(jobs), 0
    with _LOCK:
        if _POOL["pid"] != os.getpid():
            _reset_after_fork()
        pool = _POOL[backend]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n_use = max(1, min(workers or cores, len(jobs)))
        while len(pool) < n_use + 1:
            pool.append(_spawn(backend))
        todo = deque(range(len(jobs)))
        try:
            while todo or any(w["job"] is not None for w in pool):
                _hand_out(pool, todo, jobs, timeout, n_use, backend)
                failed_start, lost = _wait_and_collect(pool, results, backend)
                n_lost += lost
                if failed_start:  # workers cannot start here: what is left stays False
                    break
        finally:  # whatever happened, no worker keeps a job of this call
            for i, w in enumerate(pool):
                if w["job"] is not None:
                    _replace(pool, i, backend)
    return results, n_lost


# ----------------------------------------------------------------------------------------------
# 3. Public API
def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"verify.py: backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "math_verify" and importlib.util.find_spec("math_verify") is None:
        raise ImportError("verify.py: backend='math_verify' needs Math-Verify: pip install math-verify")


def _verify_pairs(pairs, timeout, workers, extract_pred, answer_line=False, backend="ours"):
    """The fast path entry: each pair is decided here, without sympy, when Fractions / floats can
    (steps 1-4); the rest, and with backend="math_verify" every pair, go to the workers."""
    out, jobs, where = [False] * len(pairs), [], []
    for i, (gold, pred) in enumerate(pairs):
        try:
            g_ans, p_ans = answer_text(gold, gold=True), pred
            if extract_pred:  # verify(): the last 'Answer: X' when asked for and present, else its answer
                line = answer_line_text(pred[-MAX_TEXT_CHARS:]) if answer_line and isinstance(pred, str) else None
                p_ans = line or pred_answer(pred, g_ans)
            if g_ans is None or not isinstance(p_ans, str) or len(p_ans) > MAX_ANSWER_CHARS:
                continue
            if backend != "ours":
                raise NeedSympy()  # every pair to a Math-Verify worker
            out[i] = decide(g_ans, p_ans, deep=False)
        except NeedSympy:
            jobs.append((g_ans, p_ans))
            where.append(i)
        except Exception:
            out[i] = False
    n_lost = 0
    if jobs:
        try:
            verdicts, n_lost = _run_jobs(jobs, float(timeout), workers, backend)
        except Exception:
            verdicts = [False] * len(jobs)
        for i, v in zip(where, verdicts):
            out[i] = v
    return out, n_lost


def verify(gold, pred, timeout=1.0, answer_line=False, backend="ours"):
    """Is `pred` mathematically the same answer as `gold`? Both may be raw strings ($...$, \\boxed{},
    \\text{}); a pred in prose is reduced to its answer, a gold never (step 1). False when unsure or
    past `timeout`; never raises for any gold / pred."""
    _check_backend(backend)
    try:
        return _verify_pairs([(gold, pred)], timeout, 1, True, answer_line, backend)[0][0]
    except Exception:
        return False


def _same_length(a, b, names):
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"verify.py: {names[0]} has {len(a)} items but {names[1]} has {len(b)}; "
                         f"pass one {names[1][:-1]} per {names[0][:-1]}")
    return a, b


def verify_batch(golds, preds, timeout=1.0, workers=None, answer_line=False, backend="ours"):
    """verify() over pairs, the worker cases spread over `workers` processes (default: all cores).
    Returns (verdicts, n_lost: pairs past `timeout` or whose worker died, which count as False).
    Raises only for lists of different lengths or a bad backend."""
    _check_backend(backend)
    golds, preds = _same_length(golds, preds, ("golds", "preds"))
    try:
        return _verify_pairs(list(zip(golds, preds)), timeout, workers, True, answer_line, backend)
    except Exception:
        return [False] * len(golds), 0


def reward(completion, gold, timeout=1.0, answer_line=False, backend="ours"):
    """1.0 when the final answer of `completion` (extract_answer) verifies against `gold`, else 0.0."""
    return reward_batch([completion], [gold], timeout, 1, answer_line, backend)[0][0]


def reward_batch(completions, golds, timeout=1.0, workers=None, answer_line=False, backend="ours"):
    """reward() over a batch, in parallel: (rewards, n_lost: items past `timeout` or whose worker
    died, scored 0.0). Raises only for lists of different lengths or a bad backend."""
    _check_backend(backend)
    completions, golds = _same_length(completions, golds, ("completions", "golds"))
    try:
        preds = [extract_answer(c, answer_line=answer_line) for c in completions]
        verdicts, n_lost = _verify_pairs(list(zip(golds, preds)), timeout, workers, False, False, backend)
        return [1.0 if v else 0.0 for v in verdicts], n_lost
    except Exception:
        return [0.0] * len(completions), 0


def readable(gold):
    """Can the verifier read this reference answer at all? True when its answer is extracted and
    parses into a tree (or is a word answer), in this process without sympy. False: no prediction
    is compared with it as math; only a copy of its text (up to spacing and case) can match."""
    try:
        ans = answer_text(gold, gold=True)
        return ans is not None and parses(ans)
    except Exception:
        return False


def main():
    ap = argparse.ArgumentParser(description="Is PRED the same answer as GOLD? Prints True or False.")
    ap.add_argument("gold", help="reference answer, e.g. '\\frac12' (may hold $...$ or \\boxed{})")
    ap.add_argument("pred", help="answer to check, e.g. '0.5'")
    ap.add_argument("-v", "--verbose", action="store_true", help="also print the parsed forms")
    ap.add_argument("--timeout", type=float, default=1.0, help="seconds allowed for sympy (default 1)")
    ap.add_argument("--backend", choices=BACKENDS, default="ours", help="comparison engine (default ours)")
    args = ap.parse_args()
    if args.verbose:
        explain(args.gold, args.pred, args.timeout)
    print(verify(args.gold, args.pred, args.timeout, backend=args.backend))


if __name__ == "__main__":
    main()
