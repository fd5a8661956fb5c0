"""plot.py: training curves of one or more runs, overlaid, as one PNG.

Reads RUN/metrics.jsonl (one JSON object per step, written by train.py) and RUN/config.json (for
the objective's name in the legend) of each run, and draws, against the RL step, whichever of
these were logged: train reward, held-out accuracy, policy entropy, response length, mean gate F,
the share of tokens with F < 0.5 (for hard clipping: the clipped fraction) and mean |rho - 1|,
each noisy per-step curve with its moving average on top.
Missing keys are skipped; a panel no run has data for is left out. No paper equation lives here.

Run:  python plot.py runs/maspo runs/grpo --out curves.png     (or: python eval.py --plot ...)
Needs matplotlib (pip install matplotlib).
"""
import argparse
import json
import os

# (panel title, [(metrics key, legend suffix, line style)]): what diagnoses MASPO vs GRPO
PANELS = [
    ("train reward (mean over rollouts)", [("reward", "", "-")]),
    ("held-out accuracy", [("acc", "greedy", "-"), ("avg_at_*", "Avg@k", "--")]),
    ("policy entropy (nats / token)", [("entropy", "", "-")]),
    ("response length (tokens)", [("response_len", "", "-")]),
    ("mean gate F", [("gate_mean", "", "-")]),
    ("share of tokens gated / clipped (F < 0.5)", [("gate_low_frac", "", "-")]),
    ("mean |rho - 1|", [("ratio_dev_mean", "", "-")]),
]


def read_metrics(run):
    """Rows of RUN/metrics.jsonl (or of the file itself); a broken line is named, not skipped."""
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise SystemExit(f"plot: {path} not found; give a run folder written by train.py (holding metrics.jsonl)")
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"plot: {path}:{line_no}: not valid JSON ({e.msg})") from None
    return rows


def run_label(run):
    """Legend label: the run folder's name, plus the objective from its config.json when known."""
    name = os.path.basename(os.path.normpath(run if os.path.isdir(run) else os.path.dirname(run) or "."))
    try:
        with open(os.path.join(run if os.path.isdir(run) else os.path.dirname(run), "config.json")) as f:
            loss = json.load(f).get("loss")
    except (OSError, ValueError, AttributeError):
        return name
    loss = loss.get("loss") if isinstance(loss, dict) else loss
    return f"{name} ({loss})" if isinstance(loss, str) and loss not in name else name


def series(rows, key):
    """(steps, values) of the rows that logged `key` as a finite number; "avg_at_*" takes the first
    logged key with that prefix (train.py names it after its k)."""
    if key.endswith("*"):
        key = next((k for r in rows for k in r if k.startswith(key[:-1])), key)
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r
              and r[key] == r[key] and abs(r[key]) != float("inf")]
    return [p[0] for p in points], [p[1] for p in points]


def moving_average(values, window):
    """Trailing mean over the last `window` points (the first points average what there is)."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def plot_runs(runs, out, smooth=5):
    """Draw the curves of `runs` into the PNG file `out`; returns its path. Per-step series longer
    than 2 * smooth are drawn faint, with their `smooth`-step moving average on top."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot: drawing needs matplotlib: pip install matplotlib") from None
    logs = [(run_label(run), read_metrics(run)) for run in runs]
    panels = [(title, lines) for title, lines in PANELS
              if any(series(rows, key)[0] for _, rows in logs for key, _, _ in lines)]
    if not panels:
        raise SystemExit(f"plot: no known metric in {', '.join(runs)} "
                         f"(looked for {', '.join(k for _, lines in PANELS for k, _, _ in lines)})")
    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, lines) in zip(axes.flat, panels):
        for i, (label, rows) in enumerate(logs):
            for key, suffix, style in lines:
                steps, values = series(rows, key)
                if not steps:
                    continue
                color, name = colors[i % len(colors)], f"{label} {suffix}".strip()
                if smooth > 1 and len(steps) > 2 * smooth:
                    ax.plot(steps, values, style, color=color, alpha=0.25, linewidth=0.8)
                    ax.plot(steps, moving_average(values, smooth), style, color=color, label=name)
                else:
                    ax.plot(steps, values, style, color=color, marker="o" if len(steps) < 12 else None,
                            markersize=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    parser.add_argument("--out", default="curves.png", help="PNG file to write")
    parser.add_argument("--smooth", type=int, default=5, help="moving-average window in steps (1 = raw only)")
    args = parser.parse_args()
    print(f"wrote {plot_runs(args.runs, args.out, args.smooth)}")
