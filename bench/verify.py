"""bench/verify.py: verifications per second of verify.py on a realistic mix of answer pairs, and,
when the `math-verify` package is installed, the same pairs through Math-Verify in the same run:
its speed as a library, and as verify.py's backend="math_verify", with the agreement rate between
the two backends, each one's accuracy against the pairs' labels, and the pairs they disagree on.

Target: at least as fast as Math-Verify, and more than 1,000 typical pairs per second
per core.

The mix: answer styles of the five benchmarks (MATH500, AIME, AMC, Minerva, OlympiadBench), each
gold written the way the dataset writes it and the prediction the way models write it, correct
(same answer, another spelling) or wrong (a near miss). `--int-share` sets the share of plain
integer pairs, the bulk of what a training loop scores (AIME / AMC / synthetic tasks). Labels are
the mathematical truth, written by hand with the pairs below, not taken from either verifier.
`--pairs FILE.jsonl` benchmarks labelled pairs of your own instead ({"gold", "pred", "label"}).

Timing, in one process each: verify.verify and Math-Verify as a library (math_verify.parse +
math_verify.verify, default settings) score the same pairs one call at a time, alternating rounds
and keeping each one's best, so that load from other processes hits both alike. The first call of
verify.py that needs sympy starts a worker process; a warm-up call before timing pays for that.
Then verify_batch scores the pairs with each backend across --workers processes (Math-Verify runs
only in workers there, every pair shipped to one; --timeout 5 s a pair, so that the agreement
compares verdicts, not jobs cut on a loaded machine), and reward_batch times the training loop's
call (default timeout, 1 s).
On a shared machine read the ratios, not the absolute numbers.

Run:  python bench/verify.py                 (about 40 s on 2 CPU cores, most of it Math-Verify)
      python bench/verify.py --n 500 --rounds 1
      python bench/verify.py --no-math-verify  (verify.py alone)
"""
import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (gold as the dataset writes it, [predictions that are the same answer], [near misses])
STYLED = [
    (r"\frac{14}{3}", [r"\frac{14}{3}", r"\dfrac{14}{3}", "14/3", r"4\frac{2}{3}"], [r"\frac{13}{3}", "4.67"]),
    (r"\left( 3, \frac{\pi}{2} \right)", [r"(3, \frac{\pi}{2})", r"\left(3,\frac{\pi}{2}\right)"], [r"(3, \pi)", r"(\frac{\pi}{2}, 3)"]),
    ("p - q", ["p-q", "-q+p"], ["q - p", "p + q"]),
    (r"\frac{1}{2 n+2}", [r"\frac{1}{2(n+1)}", r"\frac{1}{2n+2}"], [r"\frac{1}{2n+1}", r"\frac{1}{n+2}"]),
    ("$2^{1009}$", ["2^{1009}", str(2 ** 1009)], ["2^{1008}", "2^{1010}"]),
    ("4.5e33", [r"4.5 \times 10^{33}", "4.5e33"], [r"4.6 \times 10^{33}", "4.5e32"]),
    ("1.6", ["1.6", r"1.6 \mathrm{~cm}", "1.60"], ["1.7", "16"]),
    ("41.8", ["41.8", r"41.8^{\circ}"], ["41.9", "42"]),
    (r"3\sqrt{13}", [r"3\sqrt{13}", r"\sqrt{117}"], [r"3\sqrt{14}", r"13\sqrt{3}"]),
    (r"\frac{\sqrt{3}}{2}", [r"\frac{\sqrt3}{2}", r"\frac{1}{2}\sqrt{3}"], [r"\frac{\sqrt{2}}{2}", r"\frac{\sqrt{3}}{3}"]),
    (r"2\pi", [r"2\pi", r"\pi \cdot 2"], [r"\pi", r"4\pi"]),
    (r"[-2, 7]", ["[-2,7]", r"-2 \le x \le 7", r"x \in [-2, 7]"], ["(-2, 7)", "[-2, 7)"]),
    (r"(-\infty, -3] \cup [2, \infty)", [r"(-\infty,-3]\cup[2,\infty)", r"[2,\infty) \cup (-\infty,-3]"], [r"(-\infty, -3) \cup (2, \infty)", "[-3, 2]"]),
    (r"1 \pm \sqrt{19}", [r"1 \pm \sqrt{19}", r"1+\sqrt{19}, 1-\sqrt{19}"], [r"1 + \sqrt{19}", r"-1 \pm \sqrt{19}"]),
    (r"\{1,2,3\}", [r"\{3,2,1\}", "1, 2, 3"], [r"\{1,2\}", r"\{1,2,4\}"]),
    ("(6,31,-1)", ["(6, 31, -1)", "(6,31,-1)"], ["(6,-1,31)", "(6,31,1)"]),
    (r"\begin{pmatrix} 0 & 3 \\ 0 & -1 \end{pmatrix}", [r"\begin{bmatrix} 0 & 3 \\ 0 & -1 \end{bmatrix}", r"\begin{pmatrix}0&3\\0&-1\end{pmatrix}"], [r"\begin{pmatrix} 0 & 3 \\ 0 & 1 \end{pmatrix}", r"\begin{pmatrix} 3 & 0 \\ 0 & -1 \end{pmatrix}"]),
    (r"20\%", ["20", r"20\%", "0.2"], ["25", r"2\%"]),
    (r"90^\circ", ["90", r"90^{\circ}"], ["45", r"180^\circ"]),
    (r"\text{(C)}", ["C", "(C)", r"\textbf{(C)}"], ["B", "(D)"]),
    (r"\text{Evelyn}", ["Evelyn", r"\text{Evelyn}"], ["Briana", r"\text{Carla}"]),
    ("x = 3", ["3", "x=3"], ["x = -3", "4"]),
    (r"y = -\frac{1}{2}x + \frac{3}{4}", [r"y=-\frac12x+\frac34", "2x+4y-3=0"], [r"y = \frac{1}{2}x + \frac{3}{4}", "2x+4y+3=0"]),
    ("x^2+2x+1", ["(x+1)^2", "1+2x+x^2"], ["(x-1)^2", "x^2+1"]),
    (r"\frac{x+2}{7}", [r"\frac{x}{7}+\frac{2}{7}"], [r"\frac{x+2}{6}"]),
    (r"2 \sin b \cos a", [r"2\cos a\sin b", r"\sin(a+b) - \sin(a-b)"], [r"2 \sin a \cos b", r"\sin b \cos a"]),
    ("52_8", ["52_8", "52"], ["52_9", "42"]),
    (r"\frac{1}{3}", ["0.3333", r"\frac{2}{6}"], ["0.333", "0.3"]),
    ("12000023", ["12,000,023", "12000023"], ["12000003", "1200002"]),
    (r"\$16,\!386.20", ["16386.20", "16,386.2"], ["16386.17", "16386"]),
    (r"-\frac{3}{4}i", [r"-\frac{3i}{4}", "-0.75i"], [r"\frac{3}{4}i", r"-\frac{3}{4}"]),
    (r"\sqrt{2}+\sqrt{5}", [r"\sqrt 2+\sqrt 5", r"\sqrt{5}+\sqrt{2}"], [r"\sqrt{7}", r"\sqrt{2}\sqrt{5}"]),
    (r"\frac{9}{4}\pi", [r"\frac94\pi", r"2.25\pi"], [r"\frac{9}{4}", r"\frac{4}{9}\pi"]),
    ("(2, 2), (1, 3), (3, 3)", ["(1,3),(3,3),(2,2)", "(2, 2), (1, 3), (3, 3)"], ["(2,2),(3,1),(3,3)", "(2, 2), (1, 3)"]),
    ("k = 45, n = 2", ["k=45, n=2", "n = 2, k = 45"], ["k = 2, n = 45", "k=45"]),
    ("5", [r"5\text{ cm}", r"5 \text{ cm}^2", "5.0"], ["6", r"5\text{ cm}, 6"]),
]


def make_pairs(n, int_share, seed=0):
    """n labelled (gold, pred, label) pairs: int_share plain integers, the rest styled pairs."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        if rng.random() < int_share:
            gold = rng.choice([rng.randint(0, 999), rng.randint(0, 99), rng.randint(1000, 10 ** 6)])
            label = rng.random() < 0.5
            pred = gold if label else gold + rng.choice([-10, -1, 1, 2, 100])
            pairs.append((str(gold), str(pred), label))
        else:
            gold, same, wrong = rng.choice(STYLED)
            label = rng.random() < 0.5
            pairs.append((gold, rng.choice(same if label else wrong), label))
    return pairs


def as_math_verify_input(s):
    return s if "$" in s or "\\boxed" in s else f"${s}$"


def time_best(fn, pairs, rounds):
    """(best pairs/s over rounds, verdicts of the last round)."""
    best, verdicts = 0.0, []
    for _ in range(rounds):
        t = time.perf_counter()
        verdicts = [fn(g, p) for g, p, _ in pairs]
        best = max(best, len(pairs) / (time.perf_counter() - t))
    return best, verdicts


def compare_backends(verify, pairs, workers, backends, timeout, acc, show):
    """verify_batch with each backend across `workers` processes: pairs/s, lost items, accuracy;
    then the agreement of the two backends and the distinct pairs they disagree on. `timeout` is
    generous by default (5 s) so that a disagreement is a verdict, not a job cut on a loaded machine."""
    golds, preds = [g for g, _, _ in pairs], [p for _, p, _ in pairs]
    batch = {}
    for backend in backends:
        verify.verify_batch(golds[:8], preds[:8], timeout, workers, backend=backend)  # start the pool
        t = time.perf_counter()
        verdicts, n_lost = verify.verify_batch(golds, preds, timeout, workers, backend=backend)
        batch[backend] = verdicts
        print(f"verify_batch  {len(pairs) / (time.perf_counter() - t):9.0f} pairs/s (workers={workers}, "
              f"backend={backend})   lost {n_lost}   accuracy vs labels {acc(verdicts):.1%}")
    if len(batch) < 2:
        return
    a, b = batch["ours"], batch["math_verify"]
    differ = {}
    for (g, p, lab), x, y in zip(pairs, a, b):
        if x != y:
            differ[(g, p, lab, x, y)] = differ.get((g, p, lab, x, y), 0) + 1
    agree = sum(x == y for x, y in zip(a, b)) / len(pairs)
    print(f"agreement of the two backends {agree:.1%} of {len(pairs)} pairs "
          f"({len(differ)} of {len({(g, p) for g, p, _ in pairs})} distinct pairs differ)")
    for (g, p, lab, x, y), count in sorted(differ.items(), key=lambda kv: -kv[1])[:show]:
        print(f"  disagree x{count}: gold {g!r} pred {p!r} label {lab}: ours {x}, math_verify {y}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=600, help="number of pairs in the mix")
    ap.add_argument("--int-share", type=float, default=0.5, help="share of plain integer pairs")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per verifier (best kept)")
    ap.add_argument("--workers", type=int, default=None, help="processes for the batch calls (default: all cores)")
    ap.add_argument("--pairs", help="JSONL file of {gold, pred, label} to use instead of the mix")
    ap.add_argument("--show", type=int, default=20, help="distinct disagreements to print")
    ap.add_argument("--no-math-verify", action="store_true", help="time verify.py alone")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds per pair in the backend comparison")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    import verify
    if args.pairs:
        with open(args.pairs, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        pairs = [(r["gold"], r["pred"], bool(r["label"])) for r in rows]
    else:
        pairs = make_pairs(args.n, args.int_share)
    print(f"{len(pairs)} pairs ({'from ' + args.pairs if args.pairs else f'mix, {args.int_share:.0%} plain integers'}), "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")

    ours = lambda g, p: verify.verify(g, p)  # noqa: E731
    verify.verify("x", "x + 10^{-30} \\pi")  # warm-up: starts the sympy worker
    theirs = None
    if not args.no_math_verify:
        try:
            import math_verify
            theirs = lambda g, p: bool(math_verify.verify(  # noqa: E731
                math_verify.parse(as_math_verify_input(g)), math_verify.parse(as_math_verify_input(p))))
            theirs(r"\frac12", "0.5")  # warm-up: imports, grammar
        except ImportError:
            print("math-verify not installed: no comparison (pip install math-verify)")

    rate_ours, rate_theirs, v_ours, v_theirs = 0.0, 0.0, [], []
    for _ in range(args.rounds):  # alternate so that machine load hits both alike
        r, v_ours = time_best(ours, pairs, 1)
        rate_ours = max(rate_ours, r)
        if theirs:
            r, v_theirs = time_best(theirs, pairs, 1)
            rate_theirs = max(rate_theirs, r)
    labels = [lab for _, _, lab in pairs]
    acc = lambda v: sum(a == b for a, b in zip(v, labels)) / len(labels)  # noqa: E731
    print(f"verify.py     {rate_ours:9.0f} pairs/s (1 process)   accuracy vs labels {acc(v_ours):.1%}")
    if theirs:
        print(f"math-verify   {rate_theirs:9.0f} pairs/s (1 process, library)   accuracy vs labels {acc(v_theirs):.1%}")
        print(f"speed ratio verify.py / math-verify = {rate_ours / rate_theirs:.1f}x")

    golds, preds = [g for g, _, _ in pairs], [p for _, p, _ in pairs]
    workers = args.workers or os.cpu_count()
    compare_backends(verify, pairs, workers, ("ours", "math_verify") if theirs else ("ours",), args.timeout, acc,
                     args.show)

    completions = [f"... so the answer is \\boxed{{{p}}}." for p in preds]
    verify.reward_batch(completions[:8], golds[:8], workers=args.workers)  # start the pool
    t = time.perf_counter()
    rewards, n_lost = verify.reward_batch(completions, golds, workers=args.workers)
    dt = time.perf_counter() - t
    print(f"reward_batch  {len(pairs) / dt:9.0f} pairs/s (workers={workers})   "
          f"lost {n_lost}   accuracy vs labels {acc([r > 0.5 for r in rewards]):.1%}")


if __name__ == "__main__":
    main()
