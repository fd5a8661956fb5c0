"""experiments/chain_compare.py: the laptop comparison on a task with long solutions (experiments/chain.py),
a regime where MASPO's mechanism has something to act on.

The one-step arithmetic of experiments/compare.py has answers of ~11 tokens: 0.06% of tokens were
gated and mean |rho - 1| was 0.03, so every objective was nearly the same policy gradient. Here a
solution is a chain of 60-100 tokens (one line per step of a running sum), sampled at T = 1 by a
model that gets only some of its steps right, and each rollout batch feeds 8 optimizer updates.
experiments/chain_probe.py measures what that gives the trust regions to act on (the share of
tokens with p_old < 0.1 and with |rho - 1| > 0.2, as histograms).

Steps, seed after seed, each resumable (a finished warm start or run is reused after a kill, an
interrupted run is resumed with train.py --resume):
  1. warm starts  one model per seed (tiny.build_tiny_model, 0.2M parameters, then
                  tiny.warm_start's supervised pass on chain:train until greedy accuracy on 256
                  train problems reaches WARM_TARGET), in OUT/runs/warm_s<seed>
  2. RL           every method x seed with train.py --model OUT/runs/warm_s<seed> and the SHARED
                  settings, in OUT/runs/<method>_s<seed> (OUT/runs/ is git-ignored: models, data files
                  and run folders stay out of the repository). train.py runs from OUT/runs/code/, a
                  copy of the scripts made at the first call, so every run runs the same code.
  3. results      OUT/results.md (table), OUT/results.json (per seed), OUT/curves.png, via the helpers
                  of experiments/compare.py (the paired column: Avg@k minus GRPO's on the same seed)

Run:  python experiments/chain_compare.py                  (7 settings x 5 seeds x 20 steps, 2 runs at a
                                                           time: 60 min of RL on a shared 2-core machine,
                                                           load 5.2, plus 5 warm starts of 3-20 min each)
      python experiments/chain_compare.py --seeds 1 --steps 3 --methods MASPO GRPO --out /tmp/c  (smoke)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import chain, compare  # noqa: E402

# the model: hidden 64, 3 layers, 2 heads of 32 (vLLM's CPU attention needs head_dim >= 32), 1 KV head;
# 0.20M parameters. Measured on 1 thread: it learns the format in ~500 supervised steps and the whole
# chain soon after, where a 0.5M model (hidden 128, 2 layers) was 2x slower per step and still at 86%
# token accuracy after 300 steps.
MODEL = dict(hidden_size=64, num_layers=3, num_heads=2, num_kv_heads=1)
WARM_LR, WARM_STEPS, WARM_TARGET = 3e-3, 3000, 0.25  # lr 1e-3 (tiny.py's default) learned ~3x slower
K = 4  # samples per held-out problem (Avg@4, Pass@4)

# name -> train.py flags of the objective
METHODS = {
    "MASPO": ["--loss", "maspo"],
    "GRPO": ["--loss", "grpo"],
    "Clip-Higher": ["--loss", "clip_higher"],
    "SAPO": ["--loss", "sapo"],
    "MASPO: soft gate only": ["--loss", "maspo", "--alpha", "0", "--beta-pos", "0", "--beta-neg", "0"],
    "MASPO: gate + mass-adaptive limiter": ["--loss", "maspo", "--beta-pos", "0", "--beta-neg", "0"],
    "MASPO: gate + risk controller": ["--loss", "maspo", "--alpha", "0"],
}
# shared by every run: 16 prompts x G 8 = 128 samples per rollout batch, 2 epochs x 4 mini-batches of 32 =
# 8 optimizer updates per batch (off-policy on purpose: with one update rho = 1 and all methods agree).
# lr 1e-4, probed on seed 0's warm start with 8 prompts per batch: 2e-4 took GRPO's training reward from
# 16% to 0% in 6 steps and 5e-4 to 2% in 3 (MASPO's too); 1e-4 moves rho enough (see chain_probe.py)
SHARED = ["--task", "experiments.chain:TASK", "--eval-limit", "200", "--prompts-per-step", "16", "--group-size", "8",
          "--mini-batch-size", "32", "--epochs", "2", "--micro-batch-tokens", "4096", "--lr", "1e-4", "--weight-decay", "0",
          "--max-prompt-tokens", "24", "--max-response-tokens", "128", "--temperature", "1.0",
          "--eval-k", str(K), "--eval-temperature", "1.0", "--save-every", "5",
          "--no-grad-checkpointing", "--sampler", "vllm"]


def data_flags(out):
    """--train-data / --eval-data: the splits as JSONL files in OUT (train.py's setting check accepts
    files, "arithmetic" and hub names only), written once."""
    paths = {split: os.path.join(out, "runs", f"chain_{split}.jsonl") for split in ("train", "test")}
    for split, path in paths.items():
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"  # one per process: two writers never share a file
            chain.write_split(split, tmp)
            os.replace(tmp, path)
    return ["--train-data", paths["train"], "--eval-data", paths["test"]]


def snapshot_code(out):
    """OUT/runs/code/: a copy of the repository's top-level scripts and of experiments/chain.py, made
    once; every run executes train.py from it, so all runs of a comparison (and its resumption) run
    the same code even while the working tree changes. Returns the folder."""
    code = os.path.join(out, "runs", "code")
    if not os.path.isdir(code):
        tmp = f"{code}.{os.getpid()}.tmp"
        os.makedirs(os.path.join(tmp, "experiments"))
        for name in os.listdir(ROOT):
            if name.endswith(".py"):
                shutil.copy2(os.path.join(ROOT, name), tmp)
        shutil.copy2(os.path.join(ROOT, "experiments", "chain.py"), os.path.join(tmp, "experiments"))
        os.replace(tmp, code)
    return code


def warm_path(out, seed):
    return os.path.join(out, "runs", f"warm_s{seed}")


def warm_done(out, seed):
    """Whether OUT/runs/warm_s<seed> holds a finished warm start of this recipe."""
    marker = os.path.join(warm_path(out, seed), "warm_start.json")
    return os.path.exists(marker) and json.load(open(marker)) == warm_recipe(seed)


def warm_recipe(seed):
    return {**MODEL, "lr": WARM_LR, "steps": WARM_STEPS, "target": WARM_TARGET, "seed": seed}


def warm_start(out, seed):
    """OUT/runs/warm_s<seed>: the seed's model, built and warm-started unless a finished one is there."""
    import tiny
    path = warm_path(out, seed)
    if warm_done(out, seed):
        return path
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tiny.build_tiny_model(tmp, seed=seed, **MODEL)
    tiny.warm_start(tmp, chain.chain_problems("train"), chain.demo, WARM_STEPS, WARM_TARGET, seed, lr=WARM_LR)
    with open(os.path.join(tmp, "warm_start.json"), "w") as f:
        json.dump(warm_recipe(seed), f)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # atomic: a killed warm start never leaves a model that looks finished
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "experiments", "chain"), help="output folder")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per setting (one warm start each)")
    parser.add_argument("--steps", type=int, default=20, help="RL steps per run")
    parser.add_argument("--eval-every", type=int, default=5, help="held-out evaluation every N steps")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="subset of: " + ", ".join(METHODS))
    parser.add_argument("--jobs", type=int, default=2, help="processes in parallel (each on one thread)")
    parser.add_argument("--warm-start-only", type=int, default=None, help=argparse.SUPPRESS)  # one seed's warm start
    args = parser.parse_args()
    if args.warm_start_only is not None:
        print(warm_start(args.out, args.warm_start_only))
        return
    unknown = set(args.methods) - set(METHODS)
    if unknown or "GRPO" not in args.methods:
        raise SystemExit(f"methods must include GRPO (the paired baseline) and come from {list(METHODS)}")
    # one thread per process: two torch processes with 2 threads each on 2 cores run 10-30x slower
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    start, loads, stop = time.time(), [], threading.Event()

    def sample_load():  # the machine is shared: the 1-minute load average every minute, for the report
        while not stop.wait(60):
            loads.append(os.getloadavg()[0])
    threading.Thread(target=sample_load, daemon=True).start()
    locks = {seed: threading.Lock() for seed in range(args.seeds)}

    def warm(seed):  # 1. the seed's warm start, in its own process, before the seed's first run needs it
        with locks[seed]:  # the seed's other runs wait for it
            if not warm_done(args.out, seed):
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--out", args.out, "--warm-start-only",
                                       str(seed)], cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"warm start of seed {seed} failed:\n{proc.stderr[-3000:]}")
                print(f"seed {seed}: {[l for l in proc.stdout.splitlines() if 'warm start' in l]}", flush=True)
        return warm_path(args.out, seed)

    flags, code = data_flags(args.out), snapshot_code(args.out)

    def command_of(name, seed):  # 2. RL: every method of a seed starts from that seed's warm start
        return [sys.executable, os.path.join(code, "train.py"), "--model", warm(seed),
                *METHODS[name], *SHARED, *flags, "--seed", str(seed), "--steps", str(args.steps),
                "--eval-every", str(args.eval_every)]
    jobs = [(name, seed) for seed in range(args.seeds) for name in args.methods]
    folders, reused = compare.run_grid(jobs, args.out, args.steps, command_of, env, args.jobs)
    # 3. results
    results = {name: [compare.summarize(folders[(name, s)], K, s) for s in range(args.seeds)] for name in args.methods}
    wall = time.time() - start
    stop.set()
    load = {"samples": len(loads), "min": round(min(loads), 2), "mean": round(sum(loads) / len(loads), 2),
            "max": round(max(loads), 2)} if loads else {"samples": 0}
    settings = {**vars(args), "model": MODEL, "warm_start": {"lr": WARM_LR, "steps": WARM_STEPS, "target": WARM_TARGET},
                "shared": SHARED, "load_1min_during_run": load}
    md = compare.write_results(args.out, results, K, settings, wall, reused, len(jobs))
    with open(os.path.join(args.out, "results.md"), "a") as f:
        f.write(f"Machine load (1-minute load average on 2 cores, sampled every minute): {load}\n")
    print(md)
    print(f"wall time {wall / 60:.1f} min; load {load}; written to {args.out}")


if __name__ == "__main__":
    main()
