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
  OUT/curves.png     held-out Avg@k, greedy accuracy and entropy vs step, methods overlaid, seed bands
                     (needs matplotlib)

The regime is made off-policy on purpose: with one update per rollout batch rho = 1 and every
method is the same policy gradient. Here each rollout batch of 128 samples feeds 2 epochs x 8
mini-batches = 16 optimizer updates (with 4, mean |rho - 1| stayed at 0.001-0.008 in our measurements).

The helpers (run_state / run_one / run_grid: resumable runs; summarize, paired, table, plot,
write_results) are shared with experiments/chain_compare.py, the same comparison on long solutions.
Resuming: a run whose metrics.jsonl logs the final step is reused, an interrupted one is continued
with train.py --resume, so a killed comparison is simply started again.

Run:  python experiments/compare.py                 (full: 9 settings x 5 seeds)
      python experiments/compare.py --quick         (smoke test: 2 settings x 1 seed, a few steps)
Tests (fake runs, no training): python -m pytest -q tests/test_compare.py
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
SHARED = ["--lr", "5e-5", "--mini-batch-size", "16", "--epochs", "2", "--eval-k", "4", "--save-every", "1000"]


def run_state(folder, steps):
    """"done" when the folder's metrics.jsonl logs the final step, "resume" when it logs a run that
    did not finish (killed: train.py --resume continues from its latest checkpoint, or starts over
    when it saved none), "new" when there is no metrics.jsonl."""
    metrics = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(metrics):
        return "new"
    logged = [json.loads(line)["step"] for line in open(metrics) if line.strip()]
    return "done" if steps in logged else "resume"


def run_folder(out, name, seed):
    """OUT/runs/<method>_s<seed>, the method name made a safe folder name."""
    return os.path.join(out, "runs", f"{name.replace(' ', '_').replace(':', '').replace('+', 'plus')}_s{seed}")


def run_one(folder, steps, command, env, launch=subprocess.run):
    """Train one (method, seed) with `command` (train.py and its flags, without --out) unless `folder`
    already holds the finished run; an interrupted one is resumed. Returns whether it was reused."""
    state = run_state(folder, steps)
    if state == "done":
        return True  # finished by an earlier call: the comparison can be resumed after a kill
    args = [*command, "--out", folder] + (["--resume"] if state == "resume" else [])
    proc = launch(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{folder} failed:\n{proc.stderr[-3000:]}")
    return False


def summarize(folder, k, seed, late=5):
    """Final held-out numbers and late-training diagnostics of one run (its metrics.jsonl). The
    entropy is the mean of the last `late` steps (one step is noisy); the trust-region diagnostics
    (gated / clipped share, |rho - 1|) are means over the second half of training."""
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl")) if line.strip()]
    final, train_rows = rows[-1], [r for r in rows if "reward" in r]
    half = train_rows[len(train_rows) // 2:]
    mean = lambda key, part: statistics.mean(r[key] for r in part)  # noqa: E731
    return {"seed": seed, "acc": final["acc"], "avg": final[f"avg_at_{k}"], "pass": final[f"pass_at_{k}"],
            "avg_start": rows[0][f"avg_at_{k}"],  # step 0: the warm-started model, the same for every method
            "acc_start": rows[0]["acc"],
            "entropy": mean("entropy", train_rows[-late:]),
            "gated": mean("gate_low_frac", half), "ratio_dev": mean("ratio_dev_mean", half),
            "ratio_dev_frac": mean("ratio_dev_frac", half),
            "curve": [(r["step"], r[f"avg_at_{k}"], r["acc"]) for r in rows if f"avg_at_{k}" in r],
            "entropy_curve": [(r["step"], r["entropy"]) for r in train_rows]}


def paired(runs, base_runs, key="avg"):
    """Per-seed differences runs[seed][key] - base_runs[seed][key], in seed order, over the seeds both
    have: each seed is compared with the baseline's run from the same warm start and problems."""
    base = {r["seed"]: r[key] for r in base_runs}
    return [r[key] - base[r["seed"]] for r in sorted(runs, key=lambda r: r["seed"]) if r["seed"] in base]


def pm(xs):
    """'mean +- std' of shares, in percent (std 0 for one value)."""
    return f"{100 * statistics.mean(xs):.1f} +- {100 * (statistics.stdev(xs) if len(xs) > 1 else 0):.1f}"


def table(results, k, base="GRPO", late=5):
    """The paper-shaped table of {method: [summary per seed]}; "vs GRPO, paired" subtracts the
    baseline's Avg@k on the same seed (same warm start, same problems), which removes the spread
    between seeds from the comparison, and counts the seeds where the method is at or above it."""
    lines = [f"| method | greedy acc (%) | Avg@{k} (%) | Avg@{k} vs {base}, paired (%) | Pass@{k} (%) | entropy, last "
             f"{late} steps | gated / clipped (%) | mean abs(rho-1) | share abs(rho-1) > 0.2 (%) |", "|---" * 9 + "|"]
    for name, seeds in results.items():
        col = lambda key: [s[key] for s in seeds]  # noqa: E731
        diffs = paired(seeds, results[base]) if base in results and name != base else []
        vs = f"{pm(diffs)} ({sum(d >= 0 for d in diffs)}/{len(diffs)} seeds >= 0)" if diffs else "-"
        lines.append(f"| {name} | {pm(col('acc'))} | {pm(col('avg'))} | {vs} | {pm(col('pass'))} | "
                     f"{statistics.mean(col('entropy')):.3f} | {100 * statistics.mean(col('gated')):.2f} | "
                     f"{statistics.mean(col('ratio_dev')):.3f} | {100 * statistics.mean(col('ratio_dev_frac')):.1f} |")
    start = next(iter(results.values()))
    lines.append(f"\nBefore RL (the warm-started models, one per seed): greedy acc {pm([s['acc_start'] for s in start])} %, "
                 f"Avg@{k} {pm([s['avg_start'] for s in start])} %")
    return "\n".join(lines)


def per_seed(results, k):
    """Avg@k (greedy accuracy) of every run, a column per seed, in percent: the pairs behind the
    paired column."""
    seeds = sorted({s["seed"] for runs in results.values() for s in runs})
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for name, runs in results.items():
        by_seed = {r["seed"]: r for r in runs}
        cells = [f"{100 * by_seed[s]['avg']:.1f} ({100 * by_seed[s]['acc']:.1f})" if s in by_seed else "-" for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return f"Per seed: held-out Avg@{k} (greedy accuracy), %\n\n" + "\n".join(lines)


def plot(results, k, path):
    """Held-out Avg@k, held-out greedy accuracy and policy entropy vs RL step: methods overlaid, mean
    over seeds with a +- std band (ablations dashed). Needs matplotlib; skipped without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: skipping the curves (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    panels = ((axes[0], "curve", 1), (axes[1], "curve", 2), (axes[2], "entropy_curve", 1))
    for name, seeds in results.items():
        for ax, key, idx in panels:
            steps = [p[0] for p in seeds[0][key]]
            values = [[p[idx] for p in s[key]] for s in seeds]
            mean = [statistics.mean(v) for v in zip(*values)]
            std = [statistics.stdev(v) if len(v) > 1 else 0 for v in zip(*values)]
            line, = ax.plot(steps, mean, label=name, lw=1.5, ls="--" if name.startswith("MASPO:") else "-")
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.12)
    axes[0].set(title=f"held-out Avg@{k} (mean +- std over seeds)", xlabel="RL step")
    axes[1].set(title="held-out greedy accuracy", xlabel="RL step")
    axes[2].set(title="policy entropy (nats / token)", xlabel="RL step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_grid(jobs, out, steps, command_of, env, parallel, first=()):
    """Train every (method, seed) of `jobs`, `parallel` at a time (the jobs in `first` before the
    others); command_of(method, seed) is the train.py command. Returns ({job: folder}, runs reused)."""
    folders, reused = {}, []

    def work(job):
        t = time.time()
        folders[job] = run_folder(out, *job)
        reused.append(run_one(folders[job], steps, command_of(*job), env))
        print(f"{job[0]} seed {job[1]} {'reused' if reused[-1] else 'done'} ({time.time() - t:.0f} s)", flush=True)
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(work, [j for j in jobs if j in first]))
        list(pool.map(work, [j for j in jobs if j not in first]))
    return folders, sum(reused)


def write_results(out, results, k, settings, wall, reused, n_runs, base="GRPO"):
    """OUT/results.md (table + run notes), OUT/results.json (per seed), OUT/curves.png; returns the table."""
    os.makedirs(out, exist_ok=True)
    if "out" in settings:  # recorded relative to the repository, not as this machine's path
        settings = dict(settings, out=os.path.relpath(os.path.abspath(settings["out"]), ROOT))
    md = table(results, k, base)
    note = f" ({reused} of {n_runs} runs reused from an earlier call)" if reused else ""
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md + f"\n\n{settings['seeds']} seed(s) x {settings['steps']} steps per setting; "
                     f"wall time {wall / 60:.1f} min{note}\n\n{per_seed(results, k)}\n\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"settings": settings, "wall_s": wall, "reused_runs": reused, "results": results}, f, indent=1)
    plot(results, k, os.path.join(out, "curves.png"))
    return md


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

    def command_of(name, seed):  # one warm-started model per seed, shared by every method (cached in its folder)
        return [sys.executable, os.path.join(ROOT, "train.py"), *METHODS[name], *SHARED, "--seed", str(seed),
                "--tiny-dir", os.path.join(args.out, f"tiny_s{seed}"), "--steps", str(args.steps),
                "--eval-every", str(args.eval_every)]
    jobs = [(name, seed) for name in args.methods for seed in range(args.seeds)]
    first = [j for j in jobs if j[0] == args.methods[0]]  # these build each seed's warm start, alone
    folders, reused = run_grid(jobs, args.out, args.steps, command_of, env, args.jobs, first)
    results = {name: [summarize(folders[(name, s)], k, s) for s in range(args.seeds)] for name in args.methods}
    wall = time.time() - start
    md = write_results(args.out, results, k, vars(args), wall, reused, len(jobs))
    print(md)
    print(f"wall time {wall / 60:.1f} min; written to {args.out}")


if __name__ == "__main__":
    main()
