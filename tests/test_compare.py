"""The comparison scripts' own logic, on fake runs (no training): experiments/compare.py's per-run
summary, paired difference column, table and resume rule, and experiments/chain.py's task.
Expected numbers are worked out by hand in the comments."""
import json
import os
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import chain, compare  # noqa: E402

K = 4


def fake_run(folder, avg, acc=0.5, entropy=(0.5, 0.5, 0.5, 0.5, 0.5, 0.5), gated=0.0, steps=6, done=True):
    """A run folder whose metrics.jsonl looks like train.py's: step 0 held-out, `steps` train rows
    (the last with held-out numbers). Returns the folder."""
    os.makedirs(folder, exist_ok=True)
    rows = [{"step": 0, "acc": 0.1, f"avg_at_{K}": 0.05, f"pass_at_{K}": 0.2}]
    for s in range(1, (steps if done else steps - 2) + 1):
        rows.append({"step": s, "reward": 0.3, "entropy": entropy[s - 1], "gate_low_frac": gated,
                     "ratio_dev_mean": 0.1 * s, "ratio_dev_frac": 0.01 * s, "m_mean": 0.0})
    if done:
        rows[-1].update({"acc": acc, f"avg_at_{K}": avg, f"pass_at_{K}": min(1.0, 2 * avg)})
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


def row_of(table, name):
    return [cell.strip() for cell in next(l for l in table.splitlines() if l.startswith(f"| {name} |")).split("|")[1:-1]]


def test_summary_of_one_run(tmp_path):
    folder = fake_run(str(tmp_path / "r"), avg=0.4, acc=0.6, entropy=(9, 9, 1, 2, 3, 4), gated=0.02)
    s = compare.summarize(folder, K, seed=3)
    assert (s["seed"], s["acc"], s["avg"], s["pass"]) == (3, 0.6, 0.4, 0.8)
    assert (s["acc_start"], s["avg_start"]) == (0.1, 0.05)  # step 0: the warm-started model
    assert s["entropy"] == pytest.approx((9 + 1 + 2 + 3 + 4) / 5)  # the last 5 of 6 train steps
    # second half of the 6 train steps = steps 4, 5, 6: ratio_dev_mean 0.4, 0.5, 0.6 -> 0.5
    assert s["ratio_dev"] == pytest.approx(0.5) and s["ratio_dev_frac"] == pytest.approx(0.05)
    assert s["curve"] == [(0, 0.05, 0.1), (6, 0.4, 0.6)]


def test_paired_column_pairs_by_seed(tmp_path):
    """MASPO vs GRPO per seed: (0.40 - 0.30, 0.45 - 0.50, 0.20 - 0.20) = (+10, -5, 0) points:
    mean 1.67, sample std sqrt(((10 - 5/3)^2 + (-5 - 5/3)^2 + (5/3)^2) / 2) = sqrt(58.33) = 7.64,
    and 2 of 3 seeds at or above GRPO (the tie counts). MASPO's runs are listed in another seed order
    than GRPO's: pairing by list position would give (+20, -10, -5), mean 1.7, std 16.1."""
    grpo = {0: 0.30, 1: 0.50, 2: 0.20}
    maspo = {2: 0.20, 0: 0.40, 1: 0.45}
    results = {name: [compare.summarize(fake_run(str(tmp_path / f"{name}{s}"), avg), K, s) for s, avg in runs.items()]
               for name, runs in (("GRPO", grpo), ("MASPO", maspo))}
    assert compare.paired(results["MASPO"], results["GRPO"]) == pytest.approx([0.10, -0.05, 0.0])
    table = compare.table(results, K)
    assert row_of(table, "MASPO")[3] == "1.7 +- 7.6 (2/3 seeds >= 0)"
    assert row_of(table, "GRPO")[3] == "-"
    # Avg@4 column: MASPO (0.20 + 0.40 + 0.45) / 3 = 35.0, std sqrt((15^2 + 5^2 + 10^2) / 2) = 13.2
    assert row_of(table, "MASPO")[2] == "35.0 +- 13.2"
    # Pass@4 = 2 x Avg@4 in the fake runs: (40 + 80 + 90) / 3 = 70.0, std 26.5
    assert row_of(table, "MASPO")[4] == "70.0 +- 26.5"


def test_table_columns(tmp_path):
    """One seed each: entropy = mean of the last 5 steps, gated in percent with 2 decimals, mean
    |rho - 1| over the second half (0.5), share |rho - 1| > 0.2 in percent (5.0), start accuracy."""
    results = {"GRPO": [compare.summarize(fake_run(str(tmp_path / "g"), 0.3, gated=0.0262), K, 0)],
               "SAPO": [compare.summarize(fake_run(str(tmp_path / "s"), 0.3, entropy=(0, 1, 1, 1, 2, 2)), K, 0)]}
    table = compare.table(results, K)
    assert row_of(table, "GRPO") == ["GRPO", "50.0 +- 0.0", "30.0 +- 0.0", "-", "60.0 +- 0.0", "0.500", "2.62",
                                     "0.500", "5.0"]
    assert row_of(table, "SAPO")[5] == "1.400" and row_of(table, "SAPO")[3] == "0.0 +- 0.0 (1/1 seeds >= 0)"
    assert "greedy acc 10.0 +- 0.0 %, Avg@4 5.0 +- 0.0 %" in table


def test_resume_rule(tmp_path):
    """A finished run is reused and never relaunched; an interrupted one is relaunched with --resume;
    a missing one is launched plain; a failed launch stops the comparison."""
    calls = []

    def launch(args, **kw):
        calls.append(args)
        return SimpleNamespace(returncode=0, stderr="")
    done = fake_run(str(tmp_path / "done"), 0.3)
    killed = fake_run(str(tmp_path / "killed"), 0.3, done=False)
    new = str(tmp_path / "new")
    assert [compare.run_state(f, 6) for f in (done, killed, new)] == ["done", "resume", "new"]
    assert compare.run_state(done, 7) == "resume"  # asked for more steps than were run
    assert compare.run_one(done, 6, ["train"], {}, launch) is True and calls == []
    assert compare.run_one(killed, 6, ["train"], {}, launch) is False
    assert compare.run_one(new, 6, ["train"], {}, launch) is False
    assert calls == [["train", "--out", killed, "--resume"], ["train", "--out", new]]
    with pytest.raises(SystemExit, match="boom"):
        compare.run_one(new, 6, ["train"], {}, lambda args, **kw: SimpleNamespace(returncode=1, stderr="boom"))


def test_results_files(tmp_path):
    results = {"GRPO": [compare.summarize(fake_run(str(tmp_path / "g"), 0.3), K, 0)]}
    md = compare.write_results(str(tmp_path / "out"), results, K, {"seeds": 1, "steps": 6}, 120.0, 1, 1)
    assert (tmp_path / "out" / "results.md").read_text().startswith(md)
    assert "1 seed(s) x 6 steps per setting; wall time 2.0 min (1 of 1 runs reused" in (tmp_path / "out" / "results.md").read_text()
    assert "| GRPO | 30.0 (50.0) |" in (tmp_path / "out" / "results.md").read_text()  # per seed: Avg@4 (greedy)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["results"]["GRPO"][0]["avg"] == 0.3 and saved["reused_runs"] == 1


def test_chain_task():
    """The solution of "59+5-8 x7": 59 +5 -8 +5 -8 +5 -8 +5 = 55 in 7 lines, boxed; the reward reads
    the last box only; the split is disjoint, stable and about 20% held out."""
    p = {"question": "59+5-8 x7", "answer": "55"}
    solution = chain.demo(p)
    assert solution == "7:59+5=64\n6:64-8=56\n5:56+5=61\n4:61-8=53\n3:53+5=58\n2:58-8=50\n1:50+5=55\n\\boxed{55}"
    assert len(solution) == 10 * 7 + 10  # 1 character = 1 token of the tiny model's tokenizer
    assert chain.reward([solution, solution.replace("{55}", "{56}"), "\\boxed{55} \\boxed{5}", "55"], [p] * 4) == \
        ([1.0, 0.0, 0.0, 0.0], 0)
    train, test = chain.load("chain:train"), chain.load("chain:test")
    assert not {q["question"] for q in train} & {q["question"] for q in test}
    assert 0.17 < len(test) / (len(train) + len(test)) < 0.23
    assert all(chain.split_of(q["question"]) == "test" for q in test[:50])
    assert all(chain.reward([chain.demo(q)], [q])[0] == [1.0] for q in test[:200])
    assert {len(chain.demo(q)) for q in train} == set(range(60, 101, 10))  # 5 to 9 steps
    assert chain.load("chain:test", limit=3) == test[:3]
