"""experiments/compare.py: the paper's comparison at laptop scale, as one command.

Trains the embedded default (tiny Qwen2 on synthetic arithmetic, train.py) with each objective
(MASPO, GRPO, Clip-Higher, DAC, SAPO, BAPO, Entropy-Adv) and the MASPO ablations (soft gate only:
alpha = 0, beta = 0; + mass-adaptive limiter: beta = 0; full MASPO = + risk controller), over
several seeds, with identical data, budget and sampler settings, then writes:
  OUT/results.md     a table in the paper's shape: held-out greedy accuracy, Avg@k and Pass@k (mean +- std
                     over seeds), Avg@k minus GRPO's on the same seed, policy entropy (mean of the last 5
                     steps), share of tokens gated / clipped, mean |rho - 1| and the share with
                     |rho - 1| > 0.2 (how off-policy the regime really was)
  OUT/results.json   the per-seed numbers
  OUT/curves.png     held-out Avg@k and entropy vs step, methods overlaid, seed bands (needs matplotlib)

The regime is made off-policy on purpose: with one update per rollout batch rho = 1 and every
method is the same policy gradient. Here each rollout batch of 128 samples feeds 2 epochs x 8
mini-batches = 16 optimizer updates (DESIGN.md measured mean |rho - 1| of only 0.001-0.008 with 4).

Run:  python experiments/compare.py                 (full: 9 settings x 5 seeds)
      python experiments/compare.py --quick         (smoke test: 2 settings x 1 seed, a few steps)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> train.py flags of the objective (all other settings shared)
METHODS = {
    "MASPO": ["--loss", "maspo"],
    "GRPO": ["--loss", "grpo"],
    "Clip-Higher": ["--loss", "clip_higher"],
    "DAC": ["--loss", "dac"],
    "SAPO": ["--loss", "sapo"],
    "BAPO": ["--loss", "bapo"],
    "Entropy-Adv": ["--loss", "entropy_adv"],
    "MASPO: soft gate only": ["--loss", "maspo", "--alpha", "0", "--beta-pos", "0", "--beta-neg", "0"],
    "MASPO: + mass-adaptive limiter": ["--loss", "maspo", "--beta-pos", "0", "--beta-neg", "0"],
}
# the shared, off-policy budget: 16 prompts x G 8, 2 epochs x 8 mini-batches of 16 = 16 updates per batch,
# lr 5e-5 (probed on an earlier warm start: 1e-4 with 16 updates degraded the model, 29% -> 19% greedy;
# 3e-5 and 5e-5 improved it)
SHARED = ["--lr", "5e-5", "--mini-batch-size", "16", "--micro-batch-size", "16", "--epochs", "2", "--eval-k", "4",
          "--save-every", "1000", "--rollouts-every", "0"]


def run_one(name, seed, out, steps, eval_every, env):
    """Train one (method, seed); returns the path of its run folder and whether it was reused (a
    finished run from an earlier call)."""
    folder = os.path.join(out, "runs", f"{name.replace(' ', '_').replace(':', '').replace('+', 'plus')}_s{seed}")
    metrics = os.path.join(folder, "metrics.jsonl")
    if os.path.exists(metrics) and any(json.loads(l)["step"] == steps for l in open(metrics)):
        return folder, True  # done earlier (the comparison can be resumed after a kill)
    # one warm-started model per seed, shared by every method (cached in its own folder)
    args = [sys.executable, os.path.join(ROOT, "train.py"), *METHODS[name], *SHARED, "--seed", str(seed),
            "--tiny-dir", os.path.join(out, f"tiny_s{seed}"), "--steps", str(steps),
            "--eval-every", str(eval_every), "--out", folder]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return folder, False


def summarize(folder, k):
    """Final held-out numbers and late-training diagnostics of one run."""
    rows = [json.loads(l) for l in open(os.path.join(folder, "metrics.jsonl"))]
    final = rows[-1]
    train_rows = [r for r in rows if "reward" in r]
    late = train_rows[len(train_rows) // 2:]  # second half of training
    mean = lambda key: statistics.mean(r[key] for r in late)  # noqa: E731
    return {"acc": final["acc"], "avg": final[f"avg_at_{k}"], "pass": final[f"pass_at_{k}"],
            "avg_start": rows[0][f"avg_at_{k}"],  # step 0: the warm-started model, the same for every method
            "entropy": statistics.mean(r["entropy"] for r in train_rows[-5:]),  # last 5 steps: one step is noisy
            "gated": mean("gate_low_frac"), "ratio_dev": mean("ratio_dev_mean"),
            "ratio_dev_frac": mean("ratio_dev_frac"),
            "curve": [(r["step"], r[f"avg_at_{k}"], r.get("entropy")) for r in rows if f"avg_at_{k}" in r],
            "entropy_curve": [(r["step"], r["entropy"]) for r in train_rows]}


def table(results, k):
    """The paper-shaped table; "vs GRPO" pairs each seed with GRPO's run of the same seed (same
    warm start, same problems), which removes the spread between seeds from the comparison."""
    pm = lambda xs: f"{100 * statistics.mean(xs):.1f} +- {100 * (statistics.stdev(xs) if len(xs) > 1 else 0):.1f}"  # noqa: E731
    lines = [f"| method | greedy acc (%) | Avg@{k} (%) | Avg@{k} vs GRPO, paired (%) | Pass@{k} (%) | entropy, last 5 steps "
             "| gated / clipped (%) | mean abs(rho-1) | share abs(rho-1) > 0.2 (%) |", "|---" * 9 + "|"]
    for name, seeds in results.items():
        col = lambda key: [s[key] for s in seeds]  # noqa: E731
        paired = "-"
        if "GRPO" in results and name != "GRPO":
            diffs = [s["avg"] - g["avg"] for s, g in zip(seeds, results["GRPO"])]
            paired = f"{pm(diffs)} ({sum(d >= 0 for d in diffs)}/{len(diffs)} seeds >= 0)"
        lines.append(f"| {name} | {pm(col('acc'))} | {pm(col('avg'))} | {paired} | {pm(col('pass'))} | "
                     f"{statistics.mean(col('entropy')):.3f} | {100 * statistics.mean(col('gated')):.2f} | "
                     f"{statistics.mean(col('ratio_dev')):.3f} | {100 * statistics.mean(col('ratio_dev_frac')):.1f} |")
    start = next(iter(results.values()))
    lines.append(f"\nBefore RL (the warm-started models, one per seed): Avg@{k} {pm([s['avg_start'] for s in start])} %")
    return "\n".join(lines)


def plot(results, k, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: skipping curves.png (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, seeds in results.items():
        for ax, key, idx in ((axes[0], "curve", 1), (axes[1], "entropy_curve", 1)):
            steps = [p[0] for p in seeds[0][key]]
            values = [[p[idx] for p in s[key]] for s in seeds]
            mean = [statistics.mean(v) for v in zip(*values)]
            std = [statistics.stdev(v) if len(v) > 1 else 0 for v in zip(*values)]
            line, = ax.plot(steps, mean, label=name, lw=1.5, ls="--" if name.startswith("MASPO:") else "-")
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.12)
    axes[0].set(title=f"held-out Avg@{k} (mean +- std over seeds)", xlabel="RL step")
    axes[1].set(title="policy entropy (nats / token)", xlabel="RL step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "experiments", "laptop"), help="output folder")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per setting")
    parser.add_argument("--steps", type=int, default=40, help="RL steps per run")
    parser.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every N steps")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="subset of: " + ", ".join(METHODS))
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (each on one thread)")
    parser.add_argument("--quick", action="store_true", help="smoke test: MASPO and GRPO, 1 seed, 3 steps")
    args = parser.parse_args()
    if args.quick:
        args.methods, args.seeds, args.steps, args.eval_every = ["MASPO", "GRPO"], 1, 3, 3
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {list(METHODS)}")
    # --jobs runs in parallel, one thread each (2 cores: oversubscribed threads slow torch down 10x)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {})}
    k, start = 4, time.time()
    jobs = [(name, seed) for name in args.methods for seed in range(args.seeds)]
    first = [j for j in jobs if j[0] == args.methods[0]]  # these build each seed's warm start, alone
    folders, reused = {}, []

    def work(job):
        t = time.time()
        folders[job], was_reused = run_one(job[0], job[1], args.out, args.steps, args.eval_every, env)
        reused.append(was_reused)
        print(f"{job[0]} seed {job[1]} {'reused' if was_reused else 'done'} ({time.time() - t:.0f} s)", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(work, first))
        list(pool.map(work, [j for j in jobs if j not in first]))
    results = {name: [summarize(folders[(name, s)], k) for s in range(args.seeds)] for name in args.methods}
    os.makedirs(args.out, exist_ok=True)
    md = table(results, k)
    wall = time.time() - start
    with open(os.path.join(args.out, "results.md"), "w") as f:
        note = f" ({sum(reused)} of {len(jobs)} runs reused from an earlier call)" if any(reused) else ""
        f.write(md + f"\n\n{args.seeds} seed(s) x {args.steps} steps per setting; wall time {wall / 60:.1f} min{note}\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "wall_s": wall, "reused_runs": sum(reused), "results": results}, f, indent=1)
    plot(results, k, os.path.join(args.out, "curves.png"))
    print(md)
    print(f"wall time {wall / 60:.1f} min; written to {args.out}")


if __name__ == "__main__":
    main()
