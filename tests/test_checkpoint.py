"""checkpoint.py on the real FSDP2 policy (policy.load_policy) over gloo, with tests/checkpoint_script.py:
a sharded checkpoint resumes exactly on 2 processes and on 1; each rank reads only its own shard of
the trainer state and wrote only its own; the HF export loads in transformers and in the vLLM CPU
engine (same weights, greedy output and log-probs); a save killed half-way, or one that fails on
one rank, leaves the previous checkpoint usable and training going.

What they buy (~2.5 min on 2 idle cores): five torchrun / python runs of a tiny model and one vLLM
engine start. Structural checks only (which rank read which stored piece, which chunks were written),
no memory thresholds."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def script(*args, nproc=2):
    launcher = TORCHRUN if nproc == 2 else [sys.executable]
    proc = subprocess.run(launcher + ["tests/checkpoint_script.py", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: 2 processes, 4 steps, checkpoints at step 2 (float32 export) and 3 (bf16 export). B / C: A's
    run folder cut back to its step-2 checkpoint, resumed to step 4 on 2 processes / 1 process."""
    root = tmp_path_factory.mktemp("ckpt")
    model = tiny.build_tiny_model(str(root / "model"), seed=0)
    script("train", model, root / "a", root / "a", 4, "2,3b")
    for name, nproc in (("b", 2), ("c", 1)):
        shutil.copytree(root / "a", root / name)
        shutil.rmtree(root / name / "checkpoints" / "step_000003")
        script("resume", model, root / name, root / name, 4, nproc=nproc)
    dumps = {n: torch.load(root / f"{n}.pt", weights_only=False) for n in "abc"}
    return root, model, dumps


def max_diff(x, y):
    """Largest difference between two full states (weights and every AdamW tensor)."""
    w = max((x["weights"][k] - y["weights"][k]).abs().max().item() for k in x["weights"])
    o = max((torch.as_tensor(x["optim"][k][s]) - torch.as_tensor(y["optim"][k][s])).abs().max().item()
            for k in x["optim"] for s in x["optim"][k])
    return max(w, o)


def test_sharded_checkpoint_resumes_exactly_on_2_and_on_1_process(runs):
    """The state right after checkpoint.load equals the saved one (weights, both AdamW moments, step
    counts, schedule), and the updates after it equal the uninterrupted run's, on 2 processes and on 1."""
    _, _, dumps = runs
    a = dumps["a"]["states"]
    assert max_diff(a[2], a[4]) > 1e-3  # the two updates after the checkpoint move the weights and moments
    assert all(st["exp_avg_sq"].abs().max() > 0 for st in a[2]["optim"].values())  # AdamW state is not empty
    for name, world in (("b", 2), ("c", 1)):
        got = dumps[name]
        assert got["world"] == world and sorted(got["states"]) == [2, 3, 4]
        for step in (2, 3, 4):
            assert max_diff(a[step], got["states"][step]) < 1e-6, (name, step)
            assert got["states"][step]["scheduler"] == a[step]["scheduler"], (name, step)


def test_each_rank_writes_and_reads_only_its_own_shard(runs):
    """Saving, each rank wrote its own shard of every weight and AdamW moment (DCP's metadata lists two
    chunks per tensor, one per rank, never a whole gathered tensor). Resuming on 2 processes, each rank
    read its own file: nothing of another rank's weights or moments, only replicated entries that DCP
    stores once (AdamW's one-number step counters, the param-group hyper-parameters); recorded by
    wrapping FileSystemReader.read_data."""
    root, _, _ = runs
    for rank in (0, 1):
        reads = json.load(open(root / f"b.reads_rank{rank}.json"))
        own = [r for r in reads if r["file"] == f"__{rank}_0.distcp"]
        other = [r for r in reads if r["file"] != f"__{rank}_0.distcp"]
        assert len(own) > 20 and any(".exp_avg_sq" in r["fqn"] for r in own)
        replicated = [r for r in other if (r["numel"] == 1 and r["fqn"].endswith(".step"))
                      or r["fqn"].startswith("optim.param_groups.")]
        assert replicated == other, [r for r in other if r not in replicated][:3]
        # what a rank reads from its own file is its whole file's worth: it holds its shard, no more
        size = os.path.getsize(root / "b" / "checkpoints" / "step_000002" / "trainer" / f"__{rank}_0.distcp")
        assert 0.9 * size < sum(r["bytes"] for r in own) <= size
    from torch.distributed.checkpoint import FileSystemReader
    meta = FileSystemReader(root / "b" / "checkpoints" / "step_000002" / "trainer").read_metadata()
    sharded = {fqn: md for fqn, md in meta.state_dict_metadata.items() if hasattr(md, "chunks") and md.size.numel() > 1}
    assert len(sharded) > 20 and any(".exp_avg_sq" in fqn for fqn in sharded)
    for fqn, md in sharded.items():
        assert len(md.chunks) == 2 and all(c.sizes[0] < md.size[0] for c in md.chunks), fqn


def test_hf_export_loads_in_transformers_and_vllm(runs):
    """The step-2 export (float32) holds exactly the trained weights; the step-3 export is bf16 (the
    compute dtype asked for) and holds them rounded to bf16; the vLLM CPU engine serves the float32
    export: greedy completions equal transformers' and its log-probs equal a forward pass's."""
    from transformers import AutoModelForCausalLM
    import rollout
    root, model_dir, dumps = runs
    a = dumps["a"]["states"]
    ckpt = checkpoint.latest(str(root / "a"))
    assert ckpt.endswith("step_000003") and checkpoint.hf_folder(ckpt) == ckpt
    bf16 = AutoModelForCausalLM.from_pretrained(ckpt)
    assert json.load(open(os.path.join(ckpt, "config.json")))["dtype"] == "bfloat16"
    sd = bf16.state_dict()
    assert all(sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], v.to(torch.bfloat16))
               for k, v in a[3]["weights"].items())
    step2 = os.path.join(root, "a", "checkpoints", "step_000002")
    hf = AutoModelForCausalLM.from_pretrained(step2, dtype=torch.float32).eval()
    assert all(torch.equal(hf.state_dict()[k], v) for k, v in a[2]["weights"].items())
    assert max((a[2]["weights"][k] - v).abs().max().item() for k, v in
               AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()) > 1e-3  # trained weights
    tok = tiny.load_tokenizer(step2)
    prompts = [tok.encode(q) for q in ["Q: 3 + 4 = ?\nA:", "Q: 12 * 7?\nA: "]]
    sampler = rollout.make_sampler(step2, tok, backend="vllm", max_model_len=128, seed=0)
    try:
        groups = sampler.generate(prompts, n=1, max_tokens=12, temperature=0.0, stop_token_ids=[])
    finally:
        sampler.close()
    for prompt, group in zip(prompts, groups):
        ids = torch.tensor([prompt + group[0].completion_ids])
        with torch.no_grad():
            logits = hf(ids).logits[0, len(prompt) - 1:-1]  # (T, V)
        assert group[0].completion_ids == logits.argmax(-1).tolist()  # greedy: transformers' choices
        ref = torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None])[:, 0]
        assert (ref - torch.tensor(group[0].logprobs)).abs().max() < 1e-3


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_usable(runs, tmp_path):
    """SIGKILL in the middle of step 2's save (trainer state written, export half-way): only a .tmp
    folder exists, latest() is step 1, and a run resumed from it reproduces the uninterrupted run; its
    next save removes the leftover."""
    root, model_dir, dumps = runs
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "tests/checkpoint_script.py", "hang", model_dir, str(out),
                             str(tmp_path / "hang"), "3", "1,2"], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # a hang guard, not a timer
    while not (out / "half_written").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert ckpts == ["step_000001", "step_000002.tmp"], ckpts
    assert os.listdir(out / "checkpoints" / "step_000002.tmp" / "trainer")  # the kill came mid-save
    assert checkpoint.latest(str(out)).endswith("step_000001")
    script("resume", model_dir, out, tmp_path / "resumed", 3, "3", nproc=1)
    got = torch.load(tmp_path / "resumed.pt", weights_only=False)["states"]
    for step in (2, 3):
        assert max_diff(dumps["a"]["states"][step], got[step]) < 1e-6, step
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000001", "step_000003"]


def test_a_failed_save_is_reported_and_training_goes_on(runs, tmp_path):
    """Rank 1's write of step 2's trainer state fails (a planted full disk, inside DCP), then at step 3
    rank 1's own RNG file (a failure only rank 1 sees): each time save returns False on BOTH ranks
    (they must agree: a failed final save is an error), the message names the step, nothing of the
    step remains, and step 1 stays the latest until step 4 saves normally."""
    _, model_dir, _ = runs
    proc = script("fail", model_dir, tmp_path / "run", tmp_path / "fail", 4, "1,2,3,4")
    oks = [json.load(open(tmp_path / f"fail.oks_rank{r}.json")) for r in (0, 1)]
    assert oks[0] == oks[1] == {"1": True, "2": False, "3": False, "4": True}
    console = proc.stdout + proc.stderr
    assert "checkpoint step 2 NOT saved" in console and "checkpoint step 3 NOT saved (rank 1)" in console
    assert "No space left" in console
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step_000001", "step_000004"]
