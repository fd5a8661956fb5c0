"""experiments/sweep.py: the laptop comparison as one command: a grid of train.py settings x seeds,
each objective at its own learning rate chosen on validation problems, reported on test problems.

    python experiments/sweep.py --grid loss=maspo,grpo,clip_higher lr=3e-5,1e-4,3e-4 --seeds 3 --baseline loss=grpo

The task is experiments/chain.py (solutions of 60-100 tokens, the regime where a trust region has
tokens to act on), with the settings of CHAIN below: 16 prompts x G 8 per rollout batch, 2 epochs x
4 mini-batches = 8 optimizer updates per batch, 20 RL steps.
  --grid KEY=V1,V2 ...  any train.py setting (its flag without "--": lr, loss, alpha, beta_pos, ...).
                        Every combination is a cell. "K1+K2=V" sets both flags to V; the value "-"
                        passes no flag (train.py's default), so `alpha=-,0.1` is "the default and 0.1".
                        A cell's run folder is named by the flags it passes, keys sorted: the same
                        training in two sweeps (e.g. `loss=maspo lr=1e-4` and, later,
                        `loss=maspo lr=1e-4 alpha=-,0.5`) is one folder, run once.
  --select lr           per group of cells that differ only in this key, the value with the highest
                        mean final validation Avg@4 over seeds (seeds every cell of the group has) is
                        chosen; only the chosen cells are scored on test. Never chosen on test.
  --baseline KEY=V ...  the group the paired column subtracts, seed by seed (same warm start, same
                        problems), from each group's test Avg@4 at its chosen value.

Steps (each resumable: kill the sweep and start it again with the same command):
  1. code       OUT/runs/code/: train.py and the other top-level scripts as of one commit (--code,
                `git archive`), plus this file and experiments/chain.py. Every run executes that
                copy, so a sweep and its resumption run the same code while the working tree changes.
  2. data       OUT/runs/chain_{train,validation,test}.jsonl (chain.py's splits by hash).
  3. warm start one model per seed (tiny.build_tiny_model, 0.2M parameters, then tiny.warm_start on the
                train split until greedy accuracy reaches WARM_TARGET), OUT/runs/warm_s<seed>; every
                cell of a seed starts from it.
  4. RL         every (cell, seed), two at a time (--jobs, one thread each), seed after seed (a cut
                keeps whole seeds), in OUT/runs/<flags>_s<seed>: skipped when its metrics.jsonl logs
                the last step, continued with train.py --resume when interrupted. train.py evaluates
                the validation split (200 problems) before RL and after the last step (--eval-every N
                adds every N steps; each evaluation costs about as much sampling as 8 RL steps).
                --stop-at HH:MM: no run starts after that time (a later call runs the rest).
  5. test       the chosen cells' final checkpoints and the warm starts, scored by eval.py (the frozen
                copy, one engine for all) on 200 test problems: greedy accuracy, and Avg@4 / Pass@4 at
                T = 1 (RUN/test.json; seed 0 for every model, so all models see the same draws).
  6. results    OUT/results.md (tables), OUT/results.json (per seed, with the code commit), OUT/curves.png.

Run:   python experiments/sweep.py --grid loss=maspo,grpo lr=1e-4,3e-4 --seeds 3 --out experiments/chain_sweep
Smoke: python experiments/sweep.py --quick    (MASPO and GRPO, 1 seed, 2 steps, a 30-step warm start: 12 min
       measured with the 2 cores shared by other jobs, load 13; mostly vLLM engine starts)
Tests (recorded runs, no training): python -m pytest -q tests/test_sweep.py
The short-answer laptop regime of the removed experiments/compare.py is not a preset here (its
arithmetic task has no validation split); `git show c1d5e04:experiments/compare.py` has it.
"""
import argparse
import io
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from experiments import chain  # noqa: E402

TASK = "experiments.chain:TASK"
K = 4  # samples per held-out problem (Avg@4, Pass@4)
DEFAULT = "-"  # a grid value that passes no flag: train.py's default
# the model: hidden 64, 3 layers, 2 heads of 32 (vLLM's CPU attention needs head_dim >= 32), 1 KV head;
# 0.20M parameters. It learns the chain format in ~500 supervised steps, the whole chain soon after.
MODEL = dict(hidden_size=64, num_layers=3, num_heads=2, num_kv_heads=1)
WARM_LR, WARM_STEPS, WARM_TARGET = 3e-3, 3000, 0.25  # lr 1e-3 (tiny.py's default) learned ~3x slower
EVAL_LIMIT = 200  # validation problems scored during training, test problems scored after
# shared by every run: 16 prompts x G 8 = 128 samples per rollout batch, 2 epochs x 4 mini-batches of 32 =
# 8 optimizer updates per batch (off-policy on purpose: with one update rho = 1 and all methods agree).
CHAIN = ["--task", TASK, "--eval-limit", str(EVAL_LIMIT), "--prompts-per-step", "16", "--group-size", "8",
         "--mini-batch-size", "32", "--epochs", "2", "--micro-batch-tokens", "4096", "--weight-decay", "0",
         "--max-prompt-tokens", "24", "--max-response-tokens", "128", "--temperature", "1.0",
         "--eval-k", str(K), "--eval-temperature", "1.0", "--save-every", "5", "--no-grad-checkpointing",
         "--sampler", "vllm"]


# ----------------------------------------------------------------------------------------------
# The grid
def parse_grid(items):
    """["loss=maspo,grpo", "lr=3e-5,1e-4"] -> {"loss": ["maspo", "grpo"], "lr": ["3e-5", "1e-4"]} (keys with
    "_" for "-"), or SystemExit with the item at fault."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        key, values = key.strip().replace("-", "_"), values.split(",")
        if not sep or not key or "" in values:
            raise SystemExit(f"--grid {item!r}: write KEY=V1,V2,... with a train.py setting as KEY (e.g. lr=3e-5,1e-4)")
        if key in grid or len(set(values)) < len(values):
            raise SystemExit(f"--grid {item!r}: {key} given twice, or a value repeated")
        grid[key] = values
    return grid


def cells(grid):
    """Every combination of the grid, as {key: value} dicts, in grid order (first key slowest)."""
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def flags_of(cell):
    """The train.py flags of a cell: "a+b": v gives --a v --b v; the value "-" gives none."""
    return [x for key in sorted(cell) if cell[key] != DEFAULT
            for name in key.split("+") for x in (f"--{name.replace('_', '-')}", cell[key])]


def label(cell):
    return " ".join(f"{k}={v}" for k, v in cell.items())


def folder_of(runs, cell, seed):
    """RUNS/<the flags it passes, keys sorted>_s<seed>: the same training has the same folder."""
    name = "__".join(f"{k}={v}" for k, v in sorted(cell.items()) if v != DEFAULT) or "defaults"
    return os.path.join(runs, f"{name}_s{seed}")


def parse_match(items, grid):
    """--baseline loss=grpo -> {"loss": "grpo"}, each key a grid key and each value one of its values."""
    match = dict(item.partition("=")[::2] for item in items)
    for key, value in match.items():
        if value not in grid.get(key.replace("-", "_"), []):
            raise SystemExit(f"--baseline {key}={value}: not in the grid (keys and values: {grid})")
    return {k.replace("-", "_"): v for k, v in match.items()}


# ----------------------------------------------------------------------------------------------
# Frozen code, data files, warm starts
def snapshot_code(runs, commit):
    """RUNS/code/: the repository's top-level scripts at `commit` (git archive) and this file and
    experiments/chain.py from the working tree, made once; its COMMIT file names the commit. Returns
    (folder, full commit hash); a later call with another commit stops with a message."""
    code = os.path.join(runs, "code")
    if os.path.isdir(code):
        frozen = open(os.path.join(code, "COMMIT")).read().split()[0]
        wanted = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        if wanted and not frozen.startswith(wanted) and commit != "HEAD":
            raise SystemExit(f"{code} holds the code of {frozen[:7]}, not {commit}: use another --runs, or --code {frozen[:7]}")
        return code, frozen
    full = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, capture_output=True, text=True)
    if full.returncode != 0:
        raise SystemExit(f"--code {commit}: not a commit of {ROOT} ({full.stderr.strip()})")
    full = full.stdout.strip()
    names = [n for n in subprocess.run(["git", "ls-tree", "--name-only", full], cwd=ROOT, capture_output=True,
                                       text=True, check=True).stdout.split() if n.endswith(".py")]
    tmp = f"{code}.{os.getpid()}.tmp"
    os.makedirs(os.path.join(tmp, "experiments"))
    archive = subprocess.run(["git", "archive", full, *names], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp, filter="data")
    for name in ("sweep.py", "chain.py"):
        shutil.copy2(os.path.join(ROOT, "experiments", name), os.path.join(tmp, "experiments"))
    with open(os.path.join(tmp, "COMMIT"), "w") as f:
        f.write(f"{full} (top-level scripts; experiments/sweep.py and chain.py from the working tree)\n")
    os.replace(tmp, code)
    return code, full


def data_files(runs):
    """{split: RUNS/chain_<split>.jsonl}, written once (train.py and eval.py read files)."""
    paths = {split: os.path.join(runs, f"chain_{split}.jsonl") for split in chain.SPLITS}
    for split, path in paths.items():
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"  # one per process: two writers never share a file
            chain.write_split(split, tmp)
            os.replace(tmp, path)
    return paths


def warm_path(runs, seed):
    return os.path.join(runs, f"warm_s{seed}")


def warm_recipe(seed, steps=WARM_STEPS, target=WARM_TARGET):
    return {**MODEL, "lr": WARM_LR, "steps": steps, "target": target, "seed": seed}


def warm_done(runs, seed, recipe):
    marker = os.path.join(warm_path(runs, seed), "warm_start.json")
    return os.path.exists(marker) and json.load(open(marker)) == recipe


def warm_start(runs, seed, recipe):
    """RUNS/warm_s<seed>: the seed's model, built and warm-started unless a finished one is there."""
    import tiny
    path = warm_path(runs, seed)
    if warm_done(runs, seed, recipe):
        return path
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tiny.build_tiny_model(tmp, seed=seed, **MODEL)
    tiny.warm_start(tmp, chain.chain_problems("train"), chain.demo, recipe["steps"], recipe["target"], seed, lr=WARM_LR)
    with open(os.path.join(tmp, "warm_start.json"), "w") as f:
        json.dump(recipe, f)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # atomic: a killed warm start never leaves a model that looks finished
    return path


# ----------------------------------------------------------------------------------------------
# Runs
def run_state(folder, steps):
    """"done" when metrics.jsonl logs the final step, "resume" when it logs a run that did not finish
    (train.py --resume continues from its latest checkpoint), "new" when there is none."""
    metrics = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(metrics):
        return "new"
    logged = [json.loads(line)["step"] for line in open(metrics) if line.strip()]
    return "done" if steps in logged else "resume"


def run_one(folder, steps, command, env, deadline=None, launch=subprocess.run):
    """Train one run with `command` (train.py and its flags, without --out) unless `folder` holds it
    finished. Returns "reused", "trained" or "cut" (not started: past the deadline, a Unix time)."""
    state = run_state(folder, steps)
    if state == "done":
        return "reused"
    if deadline is not None and time.time() > deadline:
        return "cut"
    proc = launch([*command, "--out", folder] + (["--resume"] if state == "resume" else []),
                  cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{folder} failed:\n{proc.stderr[-3000:]}")
    return "trained"


def summarize(folder, seed, late=5):
    """One run's numbers from its metrics.jsonl (validation: greedy acc, Avg@k, Pass@k at the last step
    and at step 0) and test.json when scored. Entropy: mean of the last `late` steps; trust-region
    diagnostics (share gated / clipped, |rho - 1|): means over the second half of training."""
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl")) if line.strip()]
    final, train_rows = rows[-1], [r for r in rows if "reward" in r]
    half = train_rows[len(train_rows) // 2:]
    mean = lambda key, part: statistics.mean(r[key] for r in part)  # noqa: E731
    test = os.path.join(folder, "test.json")
    return {"seed": seed, "val_acc": final["acc"], "val_avg": final[f"avg_at_{K}"], "val_pass": final[f"pass_at_{K}"],
            "val_avg_start": rows[0][f"avg_at_{K}"], "val_acc_start": rows[0]["acc"],
            "test": json.load(open(test)) if os.path.exists(test) else None,
            "entropy": mean("entropy", train_rows[-late:]), "gated": mean("gate_low_frac", half),
            "ratio_dev": mean("ratio_dev_mean", half), "ratio_dev_frac": mean("ratio_dev_frac", half),
            "curve": [(r["step"], r[f"avg_at_{K}"], r["acc"]) for r in rows if f"avg_at_{K}" in r],
            "entropy_curve": [(r["step"], r["entropy"]) for r in train_rows]}


def select(results, grid, key):
    """{group: chosen cell label}. A group is the cells that differ only in `key`; the chosen one has
    the highest mean final validation Avg@k over the seeds every cell of the group has (the first in
    grid order on a tie). results: {cell label: [summary per seed]}, only cells with runs."""
    groups = {}
    for cell in cells(grid):
        if label(cell) in results:
            rest = label({k: v for k, v in cell.items() if k != key})
            groups.setdefault(rest, []).append(label(cell))
    chosen = {}
    for rest, members in groups.items():
        common = set.intersection(*({r["seed"] for r in results[m]} for m in members))
        score = lambda m: statistics.mean(r["val_avg"] for r in results[m] if r["seed"] in common)  # noqa: E731
        chosen[rest] = max(members, key=score) if common else members[0]
    return chosen


def score_test(folders, code, test_file, env, limit=EVAL_LIMIT, launch=subprocess.run):
    """FOLDER/test.json {"acc", "avg", "pass"} for each folder (a run: its last checkpoint; a warm
    start) that lacks it: eval.py of the frozen code on the test file, greedy then k samples at T = 1,
    each pass one engine for all models; seed 0 for every model (the same draws for all)."""
    todo = [f for f in folders if not os.path.exists(os.path.join(f, "test.json"))]
    if not todo:
        return
    scored = {}
    for mode, flags in (("greedy", ["--k", "1", "--temperature", "0"]), ("sampled", ["--k", str(K), "--temperature", "1.0"])):
        dest = os.path.join(os.path.dirname(todo[0]), "test_eval", mode)
        proc = launch([sys.executable, os.path.join(code, "eval.py"), "--model", *todo,
                       "--names", *[f"m{i}" for i in range(len(todo))], "--benchmarks", test_file, "--task", TASK,
                       "--limit", str(limit), "--top-p", "1.0", "--max-tokens", "128", "--seed", "0",
                       "--out", dest, *flags], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"test scoring failed:\n{proc.stderr[-3000:]}")
        runs = json.load(open(os.path.join(dest, "results.json")))["runs"]
        scored[mode] = [next(iter(r["benchmarks"].values())) for r in runs]  # one benchmark: the test file
    for i, folder in enumerate(todo):
        with open(os.path.join(folder, "test.json"), "w") as f:
            json.dump({"acc": scored["greedy"][i]["avg"], "avg": scored["sampled"][i]["avg"],
                       "pass": scored["sampled"][i]["pass"]}, f)


# ----------------------------------------------------------------------------------------------
# Tables and curves
def pm(xs):
    """'mean +- std' of shares, in percent (std 0 for one value)."""
    return f"{100 * statistics.mean(xs):.1f} +- {100 * (statistics.stdev(xs) if len(xs) > 1 else 0):.1f}"


def paired(runs, base_runs, key):
    """Per-seed differences key(run) - key(baseline's run of the same seed), over the seeds both have."""
    base = {r["seed"]: key(r) for r in base_runs}
    return [key(r) - base[r["seed"]] for r in sorted(runs, key=lambda r: r["seed"]) if r["seed"] in base]


def test_table(results, chosen, select_key, base, late=5):
    """One row per group at its chosen cell: test numbers, the paired column against the baseline
    group `base` (a group label, or None), validation Avg@k and late-training diagnostics."""
    sel = f"{select_key} (on validation)" if select_key else "chosen"
    lines = [f"| setting | {sel} | validation Avg@{K} (%) | test greedy (%) | test Avg@{K} (%) | test Avg@{K} vs "
             f"baseline, paired (%) | test Pass@{K} (%) | entropy, last {late} steps | gated / clipped (%) | "
             "mean abs(rho-1) | share abs(rho-1) > 0.2 (%) |", "|---" * 11 + "|"]
    for group, cell in chosen.items():
        runs = [r for r in results[cell] if r["test"]]
        if not runs:
            continue
        value = dict(kv.split("=", 1) for kv in cell.split()).get(select_key, "-") if select_key else cell
        test = lambda key: [r["test"][key] for r in runs]  # noqa: E731
        vs = "-"
        if base is not None and group != base and base in chosen:
            diffs = paired(runs, [r for r in results[chosen[base]] if r["test"]], lambda r: r["test"]["avg"])
            vs = f"{pm(diffs)} ({sum(d >= 0 for d in diffs)}/{len(diffs)} seeds >= 0)" if diffs else "-"
        col = lambda key: statistics.mean(r[key] for r in runs)  # noqa: E731
        lines.append(f"| {group or cell} | {value} | {pm([r['val_avg'] for r in runs])} | {pm(test('acc'))} | "
                     f"{pm(test('avg'))} | {vs} | {pm(test('pass'))} | {col('entropy'):.3f} | {100 * col('gated'):.2f} | "
                     f"{col('ratio_dev'):.3f} | {100 * col('ratio_dev_frac'):.1f} |")
    return "\n".join(lines)


def validation_table(results, chosen, late=5):
    """Every cell on validation (what the choice saw): greedy, Avg@k, Pass@k, entropy; * = chosen."""
    picked = set(chosen.values())
    lines = [f"| cell | seeds | validation greedy (%) | validation Avg@{K} (%) | validation Pass@{K} (%) | "
             f"entropy, last {late} steps | mean abs(rho-1) |", "|---" * 7 + "|"]
    for cell, runs in results.items():
        col = lambda key: [r[key] for r in runs]  # noqa: E731
        lines.append(f"| {cell}{' *' if cell in picked else ''} | {len(runs)} | {pm(col('val_acc'))} | "
                     f"{pm(col('val_avg'))} | {pm(col('val_pass'))} | {statistics.mean(col('entropy')):.3f} | "
                     f"{statistics.mean(col('ratio_dev')):.3f} |")
    return "\n".join(lines)


def per_seed(results, chosen):
    """Test Avg@k of each chosen cell, a column per seed: the pairs behind the paired column."""
    seeds = sorted({r["seed"] for cell in chosen.values() for r in results[cell]})
    lines = ["| setting | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for group, cell in chosen.items():
        by_seed = {r["seed"]: r for r in results[cell] if r["test"]}
        lines.append(f"| {group or cell} | " + " | ".join(
            f"{100 * by_seed[s]['test']['avg']:.1f}" if s in by_seed else "-" for s in seeds) + " |")
    return f"Per seed: test Avg@{K} (%) at the chosen cell\n\n" + "\n".join(lines)


def plot(results, chosen, path):
    """Validation Avg@k, validation greedy accuracy and policy entropy vs RL step for the chosen cells,
    mean over seeds with a +- std band. Needs matplotlib; skipped without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: skipping the curves (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for group, cell in chosen.items():
        for ax, key, idx in ((axes[0], "curve", 1), (axes[1], "curve", 2), (axes[2], "entropy_curve", 1)):
            runs = [r for r in results[cell] if len(r[key]) == len(results[cell][0][key])]
            steps = [p[0] for p in runs[0][key]]
            values = list(zip(*[[p[idx] for p in r[key]] for r in runs]))
            mean = [statistics.mean(v) for v in values]
            std = [statistics.stdev(v) if len(v) > 1 else 0 for v in values]
            line, = ax.plot(steps, mean, label=cell, lw=1.5)
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.12)
    axes[0].set(title=f"validation Avg@{K} (mean +- std over seeds)", xlabel="RL step")
    axes[1].set(title="validation greedy accuracy", xlabel="RL step")
    axes[2].set(title="policy entropy (nats / token)", xlabel="RL step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out, results, chosen, select_key, base, before, notes, record):
    """OUT/results.md, OUT/results.json (record + per-seed numbers), OUT/curves.png; returns results.md."""
    os.makedirs(out, exist_ok=True)
    warm = [b for b in before if b.get("test")]
    start = (f"Before RL (the warm starts, one per seed): test greedy {pm([b['test']['acc'] for b in warm])} %, test "
             f"Avg@{K} {pm([b['test']['avg'] for b in warm])} %, test Pass@{K} {pm([b['test']['pass'] for b in warm])} %"
             if warm else "")
    md = (f"Test numbers at each setting's {select_key or 'cell'} chosen on validation; baseline of the paired "
          f"column: {base or 'none'}\n\n{test_table(results, chosen, select_key, base)}\n\n{start}\n\n"
          f"Every cell on validation (* = chosen; the choice never sees test)\n\n{validation_table(results, chosen)}"
          f"\n\n{per_seed(results, chosen)}\n\n{notes}\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**record, "chosen": chosen, "baseline": base, "before_rl": before, "results": results}, f, indent=1)
    plot(results, chosen, os.path.join(out, "curves.png"))
    return md


# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", nargs="+", default=["loss=maspo,grpo,clip_higher", "lr=3e-5,1e-4,3e-4"],
                        help="KEY=V1,V2,... train.py settings; every combination is a cell ('-' = train.py's default)")
    parser.add_argument("--seeds", default="3", help="N (seeds 0..N-1) or a list run in that order (1,2,0; 1, = seed 1); one warm start each")
    parser.add_argument("--select", default="lr", help="grid key chosen per group on validation Avg@4 ('' = none)")
    parser.add_argument("--baseline", nargs="*", default=["loss=grpo"], help="KEY=V of the paired column's group")
    parser.add_argument("--steps", type=int, default=20, help="RL steps per run")
    parser.add_argument("--eval-every", type=int, default=0, help="validation every N steps (0: before RL and at the end)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (each on one thread)")
    parser.add_argument("--out", default=os.path.join(ROOT, "experiments", "chain_sweep"), help="output folder")
    parser.add_argument("--runs", default="", help="run folders, warm starts, frozen code (default OUT/runs; sweeps may share one)")
    parser.add_argument("--code", default="HEAD", help="commit whose train.py (and other scripts) every run executes")
    parser.add_argument("--stop-at", default="", help="HH:MM: start no run after this time today (resume later)")
    parser.add_argument("--train-only", action="store_true", help="warm starts and RL only: no choice, test or tables")
    parser.add_argument("--quick", action="store_true", help="smoke run: MASPO and GRPO, 1 seed, 2 steps, tiny warm start")
    parser.add_argument("--warm-start-only", type=int, default=None, help=argparse.SUPPRESS)  # one seed, in the frozen code
    parser.add_argument("--warm-steps", type=int, default=WARM_STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.grid, args.seeds, args.steps, args.eval_every, args.select = ["loss=maspo,grpo"], "1", 2, 0, ""
        args.warm_steps, args.out = 30, os.path.join(ROOT, "runs", "sweep_quick")
    args.runs = args.runs or os.path.join(args.out, "runs")
    try:
        args.seeds = ([int(x) for x in args.seeds.split(",") if x] if "," in args.seeds  # "1," is seed 1 alone
                      else list(range(int(args.seeds))))
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds}: give a count (3) or a list of seeds (1,2,0)") from None
    return args


def main(argv=None, launch=subprocess.run):
    """The sweep; `launch` runs each subprocess (train.py, eval.py, a warm start), as subprocess.run."""
    args = parse_args(argv)
    recipe = lambda seed: warm_recipe(seed, args.warm_steps, WARM_TARGET if args.warm_steps == WARM_STEPS else 1.1)  # noqa: E731
    if args.warm_start_only is not None:
        print(warm_start(args.runs, args.warm_start_only, recipe(args.warm_start_only)))
        return
    grid = parse_grid(args.grid)
    select_key = args.select.replace("-", "_") if args.select else None
    if select_key and select_key not in grid:
        raise SystemExit(f"--select {args.select}: not a grid key ({list(grid)})")
    match = parse_match(args.baseline, grid)
    deadline = None
    if args.stop_at:
        hour, minute = (int(x) for x in args.stop_at.split(":"))
        deadline = time.mktime(time.localtime()[:3] + (hour, minute, 0, 0, 0, -1))
    # 1-2. the frozen code and the data files
    code, commit = snapshot_code(args.runs, args.code)
    files = data_files(args.runs)
    # one thread per process: two torch processes with 2 threads each on 2 cores run 10-30x slower
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    start, locks = time.time(), {seed: threading.Lock() for seed in args.seeds}

    def warm(seed):  # 3. the seed's warm start, in the frozen code, before its first run needs it
        with locks[seed]:  # the seed's other runs wait for it
            if not warm_done(args.runs, seed, recipe(seed)):
                proc = launch([sys.executable, os.path.join(code, "experiments", "sweep.py"), "--runs", args.runs,
                                       "--warm-steps", str(args.warm_steps), "--warm-start-only", str(seed)],
                                      cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"warm start of seed {seed} failed:\n{proc.stderr[-3000:]}")
        return warm_path(args.runs, seed)

    # 4. RL, seed after seed
    grid_cells, status = cells(grid), {}

    def work(job):  # job = (cell label, seed)
        cell, seed = by_label[job[0]], job[1]
        t = time.time()
        if run_state(folder_of(args.runs, cell, seed), args.steps) != "done" and (deadline is None or time.time() <= deadline):
            warm(seed)
        command = [sys.executable, os.path.join(code, "train.py"), "--model", warm_path(args.runs, seed), *CHAIN,
                   *flags_of(cell), "--train-data", files["train"], "--eval-data", files["validation"],
                   "--seed", str(seed), "--steps", str(args.steps), "--eval-every", str(args.eval_every)]
        status[job] = run_one(folder_of(args.runs, cell, seed), args.steps, command, env, deadline, launch)
        print(f"{label(cell)} seed {seed}: {status[job]} ({time.time() - t:.0f} s)", flush=True)
    jobs = [(label(c), seed) for seed in args.seeds for c in grid_cells]
    by_label = {label(c): c for c in grid_cells}
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(work, jobs))
    t_train = time.time() - start
    if args.train_only:
        print(f"trained in {t_train / 60:.1f} min: {sum(v == 'trained' for v in status.values())} runs")
        return
    results = {}
    for c in grid_cells:
        runs = [summarize(folder_of(args.runs, c, s), s) for s in sorted(args.seeds)
                if run_state(folder_of(args.runs, c, s), args.steps) == "done"]
        if runs:
            results[label(c)] = runs
    # 5. selection on validation, then test for the chosen cells and the warm starts
    chosen = select(results, grid, select_key) if select_key else {c: c for c in results}
    base = next((g for g, c in chosen.items() if all(f"{k}={v}" in c.split() for k, v in match.items())), None)
    seeds_run = sorted({r["seed"] for runs in results.values() for r in runs})
    warms = [warm_path(args.runs, s) for s in seeds_run]
    score_test([folder_of(args.runs, by_label[c], r["seed"]) for c in chosen.values() for r in results[c]] + warms,
               code, files["test"], env, launch=launch)
    results = {c: [summarize(folder_of(args.runs, by_label[c], r["seed"]), r["seed"]) for r in runs]
               for c, runs in results.items()}
    before = [{"seed": s, "test": json.load(open(os.path.join(w, "test.json")))} for s, w in zip(seeds_run, warms)]
    # 6. results
    wall = time.time() - start
    counts = {k: sum(v == k for v in status.values()) for k in ("trained", "reused", "cut")}
    notes = (f"seeds {args.seeds} x {args.steps} RL steps per cell; {counts['trained']} runs trained, "
             f"{counts['reused']} reused from earlier calls, {counts['cut']} not started (--stop-at {args.stop_at or '-'}); "
             f"wall time {wall / 60:.1f} min ({t_train / 60:.1f} min of warm starts and RL); code {commit[:7]}")
    record = {"command": "python experiments/sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "code_commit": commit, "settings": {**vars(args), "out": os.path.relpath(os.path.abspath(args.out), ROOT),
                                                  "runs": os.path.relpath(os.path.abspath(args.runs), ROOT),
                                                  "model": MODEL, "shared": CHAIN, "warm_start": recipe(0)},
              "wall_s": wall, "train_wall_s": t_train, "runs": counts}
    md = write_results(args.out, results, chosen, select_key, base, before, notes, record)
    print(md)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
