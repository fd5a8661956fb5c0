"""train.py: sharded == single-process updates, NaN skipping, a short real run (vLLM CPU build),
resume after a kill, config/CLI, malformed data. Scripts run in subprocesses: each needs its own
process group (and vLLM its own process)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tiny  # noqa: E402
import train  # noqa: E402

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def run(args, timeout=600, **kw):
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0)


def update(model_dir, out, mode="update", nproc=1):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(nproc)]
    proc = run(launcher + ["tests/train_script.py", model_dir, str(out), mode])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def test_sharded_update_equals_single_process(model_dir, tmp_path):
    one = update(model_dir, tmp_path / "one.pt")
    two = update(model_dir, tmp_path / "two.pt", nproc=2)
    from safetensors.torch import load_file
    start = load_file(os.path.join(model_dir, "model.safetensors"))
    moved = max((one["weights"][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3, "the update did not change the weights: the comparison below would be vacuous"
    diff = max((one["weights"][k] - two["weights"][k]).abs().max().item() for k in start)
    assert diff < 1e-5, f"2-process FSDP update differs from the 1-process one by {diff}"
    # the second of the two updates was off-policy (rho != 1), so MASPO's gate took part
    assert one["metrics"]["updates"] == 2 and one["metrics"]["ratio_dev_mean"] > 0.01
    for k in ("grad_norm", "gate_mean", "ratio_dev_mean", "approx_kl"):
        assert abs(one["metrics"][k] - two["metrics"][k]) < 1e-5 * max(1, abs(one["metrics"][k])), k


def test_nan_loss_skips_the_update(model_dir, tmp_path):
    from safetensors.torch import load_file
    start = load_file(os.path.join(model_dir, "model.safetensors"))
    every = update(model_dir, tmp_path / "all.pt", "nan_all")
    assert every["metrics"]["skipped_updates"] == 2 and every["metrics"]["updates"] == 0
    assert all(torch.equal(every["weights"][k], start[k]) for k in start), "a NaN update touched the weights"
    first = update(model_dir, tmp_path / "first.pt", "nan_first")
    assert first["metrics"]["skipped_updates"] == 1 and first["metrics"]["updates"] == 1
    assert all(torch.isfinite(v).all() for v in first["weights"].values())
    assert max((first["weights"][k] - start[k]).abs().max().item() for k in start) > 1e-3  # training went on


def tiny_run_args(tmp_path, out, *extra):
    """A few-second configuration of the embedded default."""
    return [sys.executable, "train.py", "--tiny-dir", str(tmp_path / "tiny"), "--warm-start-steps", "30",
            "--prompts-per-step", "4", "--group-size", "4", "--mini-batch-size", "8", "--micro-batch-size", "8",
            "--eval-limit", "8", "--eval-k", "2", "--out", str(out), *extra]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_short_real_run_with_vllm(tmp_path):
    out = tmp_path / "run"
    proc = run(tiny_run_args(tmp_path, out, "--steps", "2", "--save-every", "1", "--keep-checkpoints", "1",
                             "--sampler", "vllm"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sampler: vllm" in proc.stdout + proc.stderr
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "acc" in rows[0] and "acc" in rows[2] and 0 <= rows[2]["acc"] <= 1
    for key in ("reward", "zero_signal_frac", "entropy", "gate_mean", "gate_low_frac", "ratio_dev_mean",
                "grad_norm", "response_len", "logp_gap", "t_sample", "t_update"):
        assert key in rows[1], key
    assert rows[1]["updates"] == 2  # 16 samples / mini-batch 8: several updates per rollout batch
    assert rows[1]["logp_gap"] < 1e-3  # vLLM's log-probs agree with the trainer's (float32)
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert ckpts == ["step_000002"], ckpts  # keep_checkpoints 1 removed step 1; no .tmp left over
    from transformers import AutoModelForCausalLM
    ckpt = out / "checkpoints" / "step_000002"
    trained = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny").state_dict()
    moved = max((trained[k] - base[k]).abs().max().item() for k in base)
    if all(r["zero_signal_frac"] == 1.0 for r in rows[1:]):
        assert moved == 0.0  # every group all-equal: A = 0, so no gradient may move the weights
    else:
        assert moved > 0  # RL changed the weights
    assert tiny.load_tokenizer(str(ckpt)).decode(tiny.load_tokenizer(str(ckpt)).encode("Q: 1+2")) == "Q: 1+2"
    assert torch.load(ckpt / "trainer_state.pt", weights_only=False)["step"] == 2


def test_resume_after_kill(tmp_path):
    out = tmp_path / "run"
    args = tiny_run_args(tmp_path, out, "--steps", "8", "--save-every", "2", "--sampler", "hf")
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = out / "checkpoints" / "step_000004" / "trainer_state.pt"
    deadline = time.time() + 400
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_metrics(out)
    assert before[-1]["step"] < 8
    proc = run(args + ["--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = read_metrics(out)
    assert [r["step"] for r in after] == list(range(9))  # every step once: none lost, none repeated
    assert after[:5] == [r for r in before if r["step"] <= 4]  # the checkpointed steps' metrics intact
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000006", "step_000008"]


def test_cli_and_config_file(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"lr": 3e-6, "group_size": 5, "loss": {"loss": "grpo", "alpha": 0.5}}))
    cfg = train.parse_args(["--config", str(cfg_file), "--group-size", "6", "--clip-high", "0.3"])
    assert (cfg.lr, cfg.group_size, cfg.loss.loss, cfg.loss.alpha, cfg.loss.clip_high) == (3e-6, 6, "grpo", 0.5, 0.3)
    assert train.parse_args([]).loss.alpha == 0.3  # the paper's default
    with pytest.raises(SystemExit):
        train.make_config({"alpah": 0.5})  # a typo is an error, never silently ignored
    help_text = run([sys.executable, "train.py", "--help"]).stdout
    for needle in ("--sigma-base", "sigma_base", "--alpha", "--beta-pos", "--group-size", "G: samples per prompt"):
        assert needle in help_text, needle


def test_malformed_row_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n')
    proc = run(tiny_run_args(tmp_path, tmp_path / "run", "--model", "x", "--train-data", str(bad)))
    assert proc.returncode != 0
    assert f"{bad}:2: no answer" in proc.stderr and "--answer-key" in proc.stderr
    assert "Traceback" not in proc.stderr  # one clear line, not a stack


WARM_SCRIPT = '''
import sys
sys.path.insert(0, sys.argv[2])
import torch.distributed as dist
import data, rollout, tiny, train
from eval import evaluate
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}.pg", rank=0, world_size=1)  # warm_start asks the rank
path = tiny.build_tiny_model(sys.argv[1], seed=0)
train.warm_start(path, {"steps": 600, "lr": 1e-3, "target": 0.15, "seed": 0})
tok = tiny.load_tokenizer(path)
probe = data.arithmetic_problems("train", seed=0)[:256]  # the problems the stopping rule measures
sampler = rollout.make_sampler(path, tok, backend="hf", max_model_len=128)
greedy = evaluate(sampler, tok, probe, k=1, temperature=0.0, top_p=1.0, max_tokens=16, instruction="", progress=False)
print("GREEDY", greedy["avg"])
dist.destroy_process_group()
'''


def test_warm_start_stops_at_its_target(tmp_path):
    """The warm start stops early once its teacher-forced exact match reaches the target, and that
    measure is greedy decoding's accuracy: real greedy generation on the same problems agrees."""
    script = tmp_path / "warm.py"
    script.write_text(WARM_SCRIPT)
    proc = run([sys.executable, str(script), str(tmp_path / "m"), ROOT], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("warm start:"))
    steps, measured = int(line.split()[2]), float(line.split()[-1])
    greedy = float(next(l for l in proc.stdout.splitlines() if l.startswith("GREEDY")).split()[1])
    assert steps < 600 and steps % 25 == 0, line  # stopped at a check, before the step budget
    assert measured >= 0.15, line
    assert abs(greedy - measured) <= 2 / 256, (greedy, measured)  # teacher-forced exact match == greedy
