"""bench/gpu_check.py at toy size on the CPU, so the GPU check cannot rot between GPU sessions: the
3 train.py steps in bf16 complete (every sample at the fixed response length) and the four timed
updates (fused / unfused log-probs, with and without activation checkpointing) run through
train.update_policy, agree on the gradient and carry plan.py's prediction beside their phases.
What it buys (~1 min): the script a GPU session runs as its one shot still works."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_runs_at_toy_size(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--toy", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("JSON "))[5:])
    updates = result["updates"]
    assert sorted((u["path"], u["checkpointing"]) for u in updates) == \
        [("fused", False), ("fused", True), ("unfused", False), ("unfused", True)]
    norms = [u["grad_norm"] for u in updates]
    assert min(norms) > 0 and (max(norms) - min(norms)) / max(norms) < 1e-2  # same loss, same data: same gradient
    assert all(u["tokens"] == 2 * 256 and u["tokens_per_s"] > 0 for u in updates)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["updates"] == 2 for r in rows)
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step_000003")
    # a short response limit that most samples reach (a random model rarely hits a stop token)
    assert all(r["response_len"] <= 64 and r["truncated_frac"] > 0.5 for r in rows)
    for u in updates:  # each phase measured (NaN on CPU), and plan.py's prediction beside the fused path's
        assert set(u["peak_gib"]) == {"old_logp", "update", "sync"}
        assert set(u["plan_gib"]) == ({"update", "sync"} if u["path"] == "fused" else set())
        assert all(v > 0 for v in u["plan_gib"].values())


def test_update_bench_prints_the_plan_beside_the_measurement():
    """bench/update.py at a toy shape: both paths run and agree, and plan.py's training-phase figure is
    printed beside the measured one (the comparison itself is read from the full-size runs, README)."""
    proc = subprocess.run([sys.executable, "bench/update.py", "--vocab", "2048", "--hidden", "128", "--intermediate",
                           "256", "--heads", "2", "--kv-heads", "1", "--B", "2", "--T", "64"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ": same" in proc.stdout and "plan.py, training phase of the fused path" in proc.stdout
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("JSON "))[5:])
    assert result["plan_mib"] > result["plan_above_mib"] > 0 and result["measured_mib"] > 0
