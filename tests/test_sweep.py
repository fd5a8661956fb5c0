"""experiments/sweep.py's own logic without training (the sweep itself is minutes of training per
run): the grid and its folders, the resume rule, the choice on validation, the paired column, the
results files, the frozen code, and experiments/chain.py's splits. Run folders are recorded ones:
a metrics.jsonl as train.py writes it, and a test.json as score_test writes it. The one glue test
runs main() with a stand-in for the subprocesses (train.py, eval.py, a warm start) that writes
what they write. Expected numbers are worked out by hand in the comments."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as evaluation  # noqa: E402
from experiments import chain, sweep  # noqa: E402

K = sweep.K


def recorded_run(folder, val_avg, test_avg=None, steps=6, done=True, entropy=0.5):
    """A run folder as train.py leaves it: step 0 validation row, `steps` train rows, the last with
    validation numbers; plus test.json when test_avg is given. Returns the folder."""
    os.makedirs(folder, exist_ok=True)
    rows = [{"step": 0, "acc": 0.1, f"avg_at_{K}": 0.05, f"pass_at_{K}": 0.2}]
    for s in range(1, (steps if done else steps - 2) + 1):
        rows.append({"step": s, "reward": 0.3, "entropy": entropy, "gate_low_frac": 0.01, "ratio_dev_mean": 0.1 * s,
                     "ratio_dev_frac": 0.01 * s})
    if done:
        rows[-1].update({"acc": val_avg + 0.1, f"avg_at_{K}": val_avg, f"pass_at_{K}": min(1.0, 2 * val_avg)})
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if test_avg is not None:
        with open(os.path.join(folder, "test.json"), "w") as f:
            json.dump({"acc": test_avg + 0.1, "avg": test_avg, "pass": min(1.0, 2 * test_avg)}, f)
    return folder


def row_of(table, name):
    return [c.strip() for c in next(l for l in table.splitlines() if l.startswith(f"| {name} |")).split("|")[1:-1]]


def test_grid_flags_and_folders(tmp_path):
    """Bug caught: a folder named by every grid value (defaults included), so `loss=maspo lr=1e-4` of
    one sweep and `loss=maspo lr=1e-4 alpha=-` of the next would train the same run twice."""
    grid = sweep.parse_grid(["loss=maspo,grpo", "lr=3e-5,1e-4", "beta-pos+beta_neg=-,0"])
    assert grid == {"loss": ["maspo", "grpo"], "lr": ["3e-5", "1e-4"], "beta_pos+beta_neg": ["-", "0"]}
    all_cells = sweep.cells(grid)
    assert len(all_cells) == 8 and all_cells[1] == {"loss": "maspo", "lr": "3e-5", "beta_pos+beta_neg": "0"}
    assert sweep.flags_of(all_cells[1]) == ["--beta-pos", "0", "--beta-neg", "0", "--loss", "maspo", "--lr", "3e-5"]
    assert sweep.flags_of(all_cells[0]) == ["--loss", "maspo", "--lr", "3e-5"]  # "-": train.py's default, no flag
    one = sweep.folder_of("R", {"loss": "maspo", "lr": "1e-4"}, 2)
    assert one == os.path.join("R", "loss=maspo__lr=1e-4_s2")
    assert sweep.folder_of("R", {"alpha": "-", "lr": "1e-4", "loss": "maspo"}, 2) == one
    assert sweep.folder_of("R", {"alpha": "0.5", "lr": "1e-4", "loss": "maspo"}, 2) != one
    for bad in (["lr"], ["lr="], ["lr=1e-4,,3e-4"], ["lr=1e-4,1e-4"], ["lr=1", "lr=2"]):
        with pytest.raises(SystemExit, match="--grid"):
            sweep.parse_grid(bad)
    assert sweep.parse_match(["loss=grpo"], grid) == {"loss": "grpo"}
    with pytest.raises(SystemExit, match="not in the grid"):
        sweep.parse_match(["loss=sapo"], grid)


def test_resume_rule(tmp_path):
    """Finished runs are skipped, an interrupted one is continued with --resume, a missing one is
    launched plain, none starts past the deadline, a failed launch stops the sweep.
    Bug caught: relaunching a finished run (its folder then holds a run: train.py refuses)."""
    calls = []

    def launch(args, **kw):
        calls.append(args)
        return SimpleNamespace(returncode=0, stderr="")
    done = recorded_run(str(tmp_path / "done"), 0.3)
    killed = recorded_run(str(tmp_path / "killed"), 0.3, done=False)
    new = str(tmp_path / "new")
    assert [sweep.run_state(f, 6) for f in (done, killed, new)] == ["done", "resume", "new"]
    assert sweep.run_state(done, 7) == "resume"  # asked for more steps than were run
    assert sweep.run_one(done, 6, ["train"], {}, None, launch) == "reused" and calls == []
    assert sweep.run_one(killed, 6, ["train"], {}, None, launch) == "trained"
    assert sweep.run_one(new, 6, ["train"], {}, None, launch) == "trained"
    assert calls == [["train", "--out", killed, "--resume"], ["train", "--out", new]]
    assert sweep.run_one(new, 6, ["train"], {}, deadline=0.0, launch=launch) == "cut" and len(calls) == 2
    assert sweep.run_one(done, 6, ["train"], {}, deadline=0.0, launch=launch) == "reused"
    with pytest.raises(SystemExit, match="boom"):
        sweep.run_one(new, 6, ["train"], {}, None, lambda args, **kw: SimpleNamespace(returncode=1, stderr="boom"))


def test_choice_on_validation_never_on_test(tmp_path):
    """MASPO: lr 1e-4 has the better validation Avg@4 (0.40 vs 0.30 on both seeds) and the worse test
    (0.10 vs 0.50): 1e-4 is chosen. GRPO: 3e-5 (0.20, 0.30: mean 0.25) over 1e-4 (0.20). A cell run on
    fewer seeds (lr 3e-4, seed 0 only) is compared on the seeds the whole group has (seed 0).
    Bug caught: choosing on test (would give MASPO 3e-5)."""
    grid = sweep.parse_grid(["loss=maspo,grpo", "lr=3e-5,1e-4"])
    runs = {("maspo", "3e-5"): ((0.30, 0.50), (0.30, 0.50)), ("maspo", "1e-4"): ((0.40, 0.10), (0.40, 0.10)),
            ("grpo", "3e-5"): ((0.20, 0.20), (0.30, 0.20)), ("grpo", "1e-4"): ((0.20, 0.20), (0.20, 0.20))}
    results = {sweep.label({"loss": loss, "lr": lr}): [
        sweep.summarize(recorded_run(str(tmp_path / f"{loss}{lr}{seed}"), val, test), seed)
        for seed, (val, test) in enumerate(pairs)] for (loss, lr), pairs in runs.items()}
    chosen = sweep.select(results, grid, "lr")
    # GRPO: 3e-5 mean 0.25 > 1e-4 mean 0.20
    assert chosen == {"loss=maspo": "loss=maspo lr=1e-4", "loss=grpo": "loss=grpo lr=3e-5"}
    # a cell with fewer seeds: compared on the seeds the whole group has (seed 0 only)
    grid3 = sweep.parse_grid(["loss=maspo", "lr=3e-5,1e-4,3e-4"])
    results["loss=maspo lr=3e-4"] = [sweep.summarize(recorded_run(str(tmp_path / "m3e-4"), 0.35, 0.0), 0)]
    # seed 0 only: 3e-5 0.30, 1e-4 0.40, 3e-4 0.35 -> 1e-4; over both seeds 3e-4 could not be ranked
    assert sweep.select(results, grid3, "lr") == {"loss=maspo": "loss=maspo lr=1e-4"}
    results["loss=maspo lr=3e-4"] = [sweep.summarize(recorded_run(str(tmp_path / "m3e-4b"), 0.45, 0.0), 0)]
    assert sweep.select(results, grid3, "lr") == {"loss=maspo": "loss=maspo lr=3e-4"}  # 0.45 > 0.40 on seed 0


def test_table_pairs_by_seed(tmp_path):
    """MASPO vs GRPO on test per seed: (0.40 - 0.30, 0.45 - 0.50, 0.20 - 0.20) = (+10, -5, 0) points:
    mean 1.7, sample std sqrt(((10 - 5/3)^2 + (-5 - 5/3)^2 + (5/3)^2) / 2) = 7.6, 2 of 3 seeds >= 0
    (the tie counts). MASPO's runs are listed in another seed order than GRPO's. Bug caught: pairing by
    list position, which gives (0.20 - 0.30, 0.40 - 0.50, 0.45 - 0.20) = (-10, -10, +25): 1.7 +- 20.2 (1/3)."""
    grpo, maspo = {0: 0.30, 1: 0.50, 2: 0.20}, {2: 0.20, 0: 0.40, 1: 0.45}
    results = {f"loss={name} lr=1e-4": [sweep.summarize(recorded_run(str(tmp_path / f"{name}{s}"), 0.25, avg), s)
                                        for s, avg in runs.items()] for name, runs in (("grpo", grpo), ("maspo", maspo))}
    chosen = {"loss=grpo": "loss=grpo lr=1e-4", "loss=maspo": "loss=maspo lr=1e-4"}
    table = sweep.test_table(results, chosen, "lr", base="loss=grpo")
    assert row_of(table, "loss=maspo")[:7] == ["loss=maspo", "1e-4", "25.0 +- 0.0", "45.0 +- 13.2", "35.0 +- 13.2",
                                               "1.7 +- 7.6 (2/3 seeds >= 0)", "70.0 +- 26.5"]
    assert row_of(table, "loss=grpo")[5] == "-"
    # entropy 0.5; gated 1%; |rho - 1| over the second half of 6 steps: 0.4, 0.5, 0.6 -> 0.5; share 5.0%
    assert row_of(table, "loss=grpo")[7:] == ["0.500", "1.00", "0.500", "5.0"]


def test_results_files(tmp_path):
    results = {"loss=grpo": [sweep.summarize(recorded_run(str(tmp_path / "g"), 0.3, 0.2), 0)]}
    before = [{"seed": 0, "test": {"acc": 0.4, "avg": 0.25, "pass": 0.5}}]
    md = sweep.write_results(str(tmp_path / "out"), results, {"loss=grpo": "loss=grpo"}, None, "loss=grpo", before,
                             "2 notes", {"code_commit": "abc"})
    text = (tmp_path / "out" / "results.md").read_text()
    assert text == md and "| loss=grpo | 20.0 |" in text  # per seed: test Avg@4
    assert "Before RL (the warm starts, one per seed): test greedy 40.0 +- 0.0 %, test Avg@4 25.0 +- 0.0 %" in text
    assert "| loss=grpo * | 1 | 40.0 +- 0.0 | 30.0 +- 0.0 | 60.0 +- 0.0 |" in text  # validation table
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["code_commit"] == "abc" and saved["results"]["loss=grpo"][0]["test"]["avg"] == 0.2
    assert saved["chosen"] == {"loss=grpo": "loss=grpo"}


def eval_standin(args, cwd=None, env=None, **kw):
    """Writes what eval.py writes (with eval.py's own write_results), a test Avg@k of 0.1 x (model index
    + 1) and greedy 0.05 x (index + 1); stands in for one engine's worth of sampling."""
    models, out = args[args.index("--model") + 1:args.index("--names")], args[args.index("--out") + 1]
    k, bench = int(args[args.index("--k") + 1]), args[args.index("--benchmarks") + 1]
    scale = 0.05 if k == 1 else 0.1
    rows = [{"name": f"m{i}", "model": m, "benchmarks": {bench: {"avg": scale * (i + 1), "pass": 2 * scale * (i + 1)}},
             "average": {"avg": scale * (i + 1), "pass": 2 * scale * (i + 1)},
             "details": {bench: {"avg": scale * (i + 1), "pass": 2 * scale * (i + 1), "results": []}}}
            for i, m in enumerate(models)]
    evaluation.write_results(out, rows, [bench], {"k": k, "samples": k, "temperature": 1.0, "top_p": 1.0, "max_tokens": 128})
    return SimpleNamespace(returncode=0, stderr="")


def test_sweep_end_to_end_with_standin_for_train_eval_and_warm_start(tmp_path, monkeypatch):
    """main(): 2 objectives x 2 lrs x 2 seeds; the stand-in for train.py writes a finished metrics.jsonl
    whose validation Avg@4 is 0.4 for (maspo, 3e-4) and (grpo, 1e-4), 0.2 otherwise; the warm start
    stand-in writes its marker. Checked: every run launched once from its seed's warm start with the
    frozen train.py, then the chosen cells (one lr each, never the other) and the 2 warm starts scored
    on test, and a second call trains nothing. Bug caught: a run's --model not its seed's warm start."""
    out, calls = str(tmp_path / "sweep"), []
    runs = os.path.join(out, "runs")

    def launch(args, cwd=None, env=None, **kw):
        calls.append(args)
        if args[1].endswith("eval.py"):
            return eval_standin(args)
        if "--warm-start-only" in args:
            folder = sweep.warm_path(runs, int(args[-1]))
            os.makedirs(folder)
            json.dump(sweep.warm_recipe(int(args[-1]), int(args[args.index("--warm-steps") + 1])),
                      open(os.path.join(folder, "warm_start.json"), "w"))
            return SimpleNamespace(returncode=0, stderr="")
        flag = lambda name: args[args.index(name) + 1]  # noqa: E731
        good = (flag("--loss"), flag("--lr")) in (("maspo", "3e-4"), ("grpo", "1e-4"))
        assert flag("--model") == sweep.warm_path(runs, int(flag("--seed")))
        recorded_run(flag("--out"), 0.4 if good else 0.2, steps=int(flag("--steps")))
        return SimpleNamespace(returncode=0, stderr="")
    argv = ["--grid", "loss=maspo,grpo", "lr=1e-4,3e-4", "--seeds", "2", "--steps", "3", "--out", out, "--jobs", "1"]
    sweep.main(argv, launch)
    trains = [c for c in calls if c[1].endswith("train.py")]
    assert len(trains) == 8 and all(c[1] == os.path.join(runs, "code", "train.py") for c in trains)
    assert len([c for c in calls if "--warm-start-only" in c]) == 2
    evals = [c for c in calls if c[1].endswith("eval.py")]
    assert len(evals) == 2  # greedy, sampled: one engine each for all models
    scored = evals[0][evals[0].index("--model") + 1:evals[0].index("--names")]
    assert [os.path.basename(f) for f in scored] == ["loss=maspo__lr=3e-4_s0", "loss=maspo__lr=3e-4_s1",
                                                      "loss=grpo__lr=1e-4_s0", "loss=grpo__lr=1e-4_s1", "warm_s0", "warm_s1"]
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["chosen"] == {"loss=maspo": "loss=maspo lr=3e-4", "loss=grpo": "loss=grpo lr=1e-4"}
    # test Avg@4 = 0.1 x (index + 1): maspo seeds 0.1, 0.2; grpo 0.3, 0.4 -> paired (-20, -20)
    assert [r["test"]["avg"] for r in saved["results"]["loss=maspo lr=3e-4"]] == pytest.approx([0.1, 0.2])
    assert row_of(open(os.path.join(out, "results.md")).read(), "loss=maspo")[5] == "-20.0 +- 0.0 (0/2 seeds >= 0)"
    assert saved["code_commit"] == open(os.path.join(runs, "code", "COMMIT")).read().split()[0]
    calls.clear()
    sweep.main(argv, launch)
    assert calls == []  # everything finished and scored: nothing runs again


def test_frozen_code_is_the_commit(tmp_path):
    """OUT/runs/code/train.py is train.py as committed at --code, not the working tree's: the commit
    before train.py's last change is frozen, and its train.py differs from today's. This driver and
    chain.py sit beside it; a second call keeps it; another commit is refused.
    Bug caught: copying the working tree's train.py (every run would train with today's code)."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)  # noqa: E731
    last = git("rev-list", "-n", "1", "HEAD", "--", "train.py").stdout.strip()
    old = git("rev-parse", f"{last}~1").stdout.strip() if last else ""
    if not old or git("cat-file", "-e", f"{old}:train.py").returncode != 0:
        pytest.skip("needs a git checkout with an earlier train.py")
    code, commit = sweep.snapshot_code(str(tmp_path), old)
    assert commit == old
    committed = subprocess.run(["git", "show", f"{old}:train.py"], cwd=ROOT, capture_output=True, check=True).stdout
    frozen = open(os.path.join(code, "train.py"), "rb").read()
    assert frozen == committed and frozen != open(os.path.join(ROOT, "train.py"), "rb").read()
    assert os.path.isfile(os.path.join(code, "experiments", "sweep.py"))
    assert os.path.isfile(os.path.join(code, "experiments", "chain.py"))
    assert sweep.snapshot_code(str(tmp_path), old) == (code, commit)
    with pytest.raises(SystemExit, match="holds the code of"):
        sweep.snapshot_code(str(tmp_path), last)


def test_chain_task():
    """The solution of "59+5-8 x7": 59 +5 -8 +5 -8 +5 -8 +5 = 55 in 7 lines, boxed; the reward reads the
    last box only; train / validation / test are disjoint and stable, 80 / 10 / 10 percent, and the
    training split is the one of the first hash alone (the warm starts made before the held-out part
    was divided stay valid). Bug caught: the second hash applied before the first (validation then
    takes half of the old training split)."""
    p = {"question": "59+5-8 x7", "answer": "55"}
    solution = chain.demo(p)
    assert solution == "7:59+5=64\n6:64-8=56\n5:56+5=61\n4:61-8=53\n3:53+5=58\n2:58-8=50\n1:50+5=55\n\\boxed{55}"
    assert len(solution) == 10 * 7 + 10  # 1 character = 1 token of the tiny model's tokenizer
    assert chain.reward([solution, solution.replace("{55}", "{56}"), "\\boxed{55} \\boxed{5}", "55"], [p] * 4) == \
        ([1.0, 0.0, 0.0, 0.0], 0)
    splits = {s: chain.load(f"chain:{s}") for s in chain.SPLITS}
    questions = {s: {q["question"] for q in ps} for s, ps in splits.items()}
    total = sum(len(q) for q in questions.values())
    assert not questions["train"] & questions["validation"] and not questions["train"] & questions["test"]
    assert not questions["validation"] & questions["test"]
    first = lambda q: int(chain.hashlib.sha256(q.encode()).hexdigest(), 16) % 100 >= chain.TEST_PERCENT  # noqa: E731
    assert questions["train"] == {q for q, _ in chain.generate() if first(q)}
    assert 0.08 < len(questions["validation"]) / total < 0.12 and 0.08 < len(questions["test"]) / total < 0.12
    assert all(chain.split_of(q["question"]) == "validation" for q in splits["validation"][:50])
    assert all(chain.reward([chain.demo(q)], [q])[0] == [1.0] for q in splits["test"][:200])
    assert {len(chain.demo(q)) for q in splits["train"]} == set(range(60, 101, 10))  # 5 to 9 steps
    assert chain.load("chain:test", limit=3) == splits["test"][:3]
    with pytest.raises(chain.data.DataError, match="validation"):
        chain.load("chain:dev")
