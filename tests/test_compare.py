"""experiments/compare.py --quick: the laptop-scale comparison runs end to end (MASPO and GRPO,
one seed, three off-policy steps) and writes its table, JSON and numbers that make sense."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_quick(tmp_path):
    proc = subprocess.run([sys.executable, "experiments/compare.py", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| MASPO |") == 1 and table.count("\n| GRPO |") == 1
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    for name in ("MASPO", "GRPO"):
        (run,) = results[name]
        assert 0 <= run["acc"] <= 1 and 0 <= run["avg"] <= run["pass"] <= 1
        assert run["ratio_dev"] > 0.005  # the regime is off-policy: rho really moves away from 1
        assert run["ratio_dev_frac"] > 0  # some tokens leave GRPO's clip range [0.8, 1.2]
    # GRPO's hard clip cuts at |rho - 1| > 0.2; MASPO's gate falls below 0.5 only past |rho - 1| > 1.18
    assert results["GRPO"][0]["gated"] >= results["MASPO"][0]["gated"]
    # the paired column is MASPO's Avg@k minus GRPO's on the same seed
    maspo_row = next(l for l in table.splitlines() if l.startswith("| MASPO |")).split("|")
    diff = 100 * (results["MASPO"][0]["avg"] - results["GRPO"][0]["avg"])
    assert maspo_row[4].strip() == f"{diff:.1f} +- 0.0 ({int(diff >= 0)}/1 seeds >= 0)", maspo_row[4]
    assert results["MASPO"][0]["avg_start"] == results["GRPO"][0]["avg_start"]  # one warm start per seed
