"""experiments/chain_probe.py: what the chain regime gives the trust regions to act on, per token.

train.py logs per-step means (ratio_dev_mean, ratio_dev_frac, gate_low_frac, m_mean); this probe
records the per-token values behind them. It runs train.py in-process, with the comparison's exact
settings (experiments/sweep.py: CHAIN at lr 1e-4, seed 0's warm start), for a few RL steps per method,
and wraps maspo.policy_loss so that every call of the update (every micro-batch of every
mini-batch, both epochs) also records, for each response token, p_old = pi_old(token), the ratio
rho = pi_theta / pi_old it is updated at, and the sign of its advantage A. Nothing of train.py changes.

Writes OUT/probe.json (shares: p_old < 0.1, |rho - 1| > 0.2, both; per method) and
OUT/probe_hist.png (histograms of p_old and of |rho - 1|, GRPO vs MASPO, with MASPO's gate
F < 0.5 threshold at p_old = 1 and 0.01 marked). The raw values go to OUT/runs/probe/ (git-ignored).

Run (it builds seed 0's warm start OUT/runs/warm_s0 unless a sweep into OUT has):
    python experiments/chain_probe.py --steps 10
"""
import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import sweep  # noqa: E402

PROBED = ("GRPO", "MASPO")
FLAGS = {"GRPO": ["--loss", "grpo"], "MASPO": ["--loss", "maspo"]}
LR = "1e-4"  # the lr of the probe in the README (MASPO's and GRPO's lr in the sweep's middle column)
LOW_P, FAR = 0.1, 0.2  # thresholds of the report: p_old < 0.1, |rho - 1| > 0.2


def record(out, method, steps):
    """Run train.py in this process with maspo.policy_loss wrapped; save the per-token values."""
    import torch
    import maspo
    import train
    values = {"p_old": [], "rho": [], "A_pos": []}
    inner = maspo.policy_loss

    def recording_loss(logp, old_logp, adv, mask, cfg, **kw):
        with torch.no_grad():  # a copy for the record only: the loss below is the untouched one
            on = mask > 0
            A = (adv[:, None] if adv.dim() == 1 else adv).expand_as(logp)  # (B, T)
            values["p_old"].append(old_logp.exp()[on])
            values["rho"].append((logp - old_logp).clamp(-20, 20).exp()[on])  # as maspo.ratio
            values["A_pos"].append(A[on] > 0)
        return inner(logp, old_logp, adv, mask, cfg, **kw)
    maspo.policy_loss = recording_loss  # train.update_policy calls maspo.policy_loss(...)
    folder = os.path.join(out, "runs", "probe", method)
    files = sweep.data_files(os.path.join(out, "runs"))
    args = ["--model", sweep.warm_path(os.path.join(out, "runs"), 0), *FLAGS[method], *sweep.CHAIN, "--lr", LR, "--train-data", files["train"],
            "--eval-data", files["validation"], "--seed", "0", "--steps", str(steps), "--eval-every", "0",
            "--eval-limit", "8", "--out", folder]
    if os.path.exists(os.path.join(folder, "metrics.jsonl")):
        import shutil
        shutil.rmtree(folder)  # a probe is cheap: always a fresh run
    train.main(args)
    torch.save({k: torch.cat(v) for k, v in values.items()}, os.path.join(out, "runs", "probe", f"{method}.pt"))


def shares(v):
    """The report's numbers from one method's per-token values (tokens counted once per update call)."""
    low, far = v["p_old"] < LOW_P, (v["rho"] - 1).abs() > FAR
    mean = lambda x: float(x.float().mean())  # noqa: E731
    return {"tokens": int(v["p_old"].numel()), "p_old_below_0.1": mean(low), "abs_rho_minus_1_above_0.2": mean(far),
            "far_among_low_p": mean(far[low]) if low.any() else 0.0,
            "far_among_high_p": mean(far[~low]) if (~low).any() else 0.0,
            "mean_abs_rho_minus_1": float((v["rho"] - 1).abs().mean()),
            "low_p_share_of_far_tokens": mean(low[far]) if far.any() else 0.0}


def plot(loaded, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    bins_p = np.logspace(-6, 0, 61)
    bins_r = np.logspace(-4, 1.4, 55)
    for name, v in loaded.items():
        p = v["p_old"].double().numpy()
        dev = np.clip((v["rho"] - 1).abs().double().numpy(), 1.01e-4, None)  # rho = 1 (first update): first bin
        axes[0].hist(p, bins=bins_p, weights=np.full(p.size, 1 / p.size), histtype="step", lw=1.8, label=name)
        axes[1].hist(dev, bins=bins_r, weights=np.full(p.size, 1 / p.size), histtype="step", lw=1.8,
                     label=name)
        low = p < LOW_P
        axes[2].hist(dev[low], bins=bins_r, weights=np.full(low.sum(), 1 / max(low.sum(), 1)),
                     histtype="step", lw=1.8, label=f"{name}, p_old < {LOW_P}")
        axes[2].hist(dev[~low], bins=bins_r, weights=np.full((~low).sum(), 1 / max((~low).sum(), 1)),
                     histtype="step", lw=1.0, ls="--", label=f"{name}, p_old >= {LOW_P}")
    axes[0].axvline(LOW_P, color="k", ls=":", lw=1)
    axes[0].set(xscale="log", yscale="log", xlabel="p_old = pi_old(token)", ylabel="share of response tokens",
                title="p_old of sampled response tokens")
    for ax in axes[1:]:
        ax.axvline(FAR, color="k", ls=":", lw=1, label="GRPO clip: |rho - 1| = 0.2")
        # MASPO's gate F = exp(-(rho-1)^2 / (2 m^2)) falls below 0.5 at |rho - 1| = m sqrt(2 ln 2): m = 1 at p_old = 1
        ax.axvline(math.sqrt(2 * math.log(2)), color="tab:blue", ls="-.", lw=1, label="MASPO F = 0.5 at p_old = 1")
        ax.set(xscale="log", yscale="log", xlabel="|rho - 1| at the update (< 1e-4: first bin)", ylabel="share of tokens")
    axes[1].set(title="|rho - 1| of every token at every update")
    axes[2].set(title="|rho - 1|: low-probability vs other tokens")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "experiments", "chain"), help="the comparison's folder")
    parser.add_argument("--steps", type=int, default=10, help="RL steps per probed method")
    parser.add_argument("--record", default=None, help=argparse.SUPPRESS)  # one method, in this process
    args = parser.parse_args()
    if args.record:
        record(args.out, args.record, args.steps)
        return
    import torch
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    sweep.warm_start(os.path.join(args.out, "runs"), 0, sweep.warm_recipe(0))
    sweep.data_files(os.path.join(args.out, "runs"))  # the data files, written here once before both runs read them
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--out", args.out, "--steps", str(args.steps),
                               "--record", m], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for m in PROBED]  # both at once, one thread each
    for m, p in zip(PROBED, procs):
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"probe {m} failed:\n{err[-3000:]}")
    loaded = {m: torch.load(os.path.join(args.out, "runs", "probe", f"{m}.pt")) for m in PROBED}
    numbers = {m: shares(v) for m, v in loaded.items()}
    logged = {}
    for m in PROBED:  # train.py's own per-step means over the same steps, for comparison
        rows = [json.loads(l) for l in open(os.path.join(args.out, "runs", "probe", m, "metrics.jsonl")) if '"reward"' in l]
        logged[m] = {k: sum(r[k] for r in rows) / len(rows) for k in
                     ("reward", "entropy", "ratio_dev_mean", "ratio_dev_frac", "gate_low_frac", "m_mean")}
    with open(os.path.join(args.out, "probe.json"), "w") as f:
        json.dump({"steps": args.steps, "per_token": numbers, "train_py_step_means": logged}, f, indent=1)
    plot(loaded, os.path.join(args.out, "probe_hist.png"))
    print(json.dumps({"per_token": numbers, "train_py_step_means": logged}, indent=1))


if __name__ == "__main__":
    main()
