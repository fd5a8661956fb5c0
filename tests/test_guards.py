"""Guards against five silent bugs that the rest of the suite let through (each was planted by hand
and every other test still passed): the stop rule's generation_config.json source, BAPO's bounds
summed over ranks, held-out problems kept out of training, gradient clipping, and the learning-rate
scheduler restored on resume. Each test is named for what it protects; the planted bug each one
catches is in its docstring. Run: python -m pytest tests/test_guards.py -q  (~1 min)
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import data
import maspo
import tiny
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import guards_script  # noqa: E402

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(args, timeout=600):
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# 1. The stop rule


def test_stop_ids_include_an_extra_generation_config_end_id(tmp_path):
    """A model whose generation_config.json lists an end id that is neither the tokenizer's EOS nor
    the chat template's end of turn (as Llama 3's <|eom_id|>): the sampler must stop there too.
    Planted bug: data.stop_token_ids ignoring generation_config.json (the other two sources still
    give EOS and <|im_end|>)."""
    tok = tiny.build_bpe_tokenizer("qwen")
    eos, im_end, extra = (tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|im_start|>"))
    path = tiny.build_tiny_model(str(tmp_path / "m"), tokenizer=tok, eos_token_ids=[im_end, eos, extra])
    tok = tiny.load_tokenizer(path)
    assert json.load(open(os.path.join(path, "generation_config.json")))["eos_token_id"] == [im_end, eos, extra]
    assert tok.eos_token_id == eos and data.end_of_turn_token(tok) == "<|im_end|>"  # extra: from the file only
    assert data.stop_token_ids(path, tok) == sorted({eos, im_end, extra})
    config = json.load(open(os.path.join(path, "generation_config.json")))
    config["eos_token_id"] = extra  # a single int is read too
    json.dump(config, open(os.path.join(path, "generation_config.json"), "w"))
    assert data.stop_token_ids(path, tok) == sorted({eos, im_end, extra})

# ----------------------------------------------------------------------------------------------
# 3. Held-out problems never reach training


def test_load_data_keeps_held_out_problems_out_of_training(tmp_path):
    """train.load_data's training and held-out sets are disjoint: the embedded arithmetic task, and
    files of the user's. Planted bug: load_data returning train + held as the training set."""
    cfg = train.parse_args(["--eval-limit", "0"])
    problems, held = train.load_data(cfg, data.get_task(cfg.task), embedded=True)
    questions = {p["question"] for p in problems}
    assert len(held) > 50 and len(problems) > 50
    assert not questions & {p["question"] for p in held}
    assert questions == {p["question"] for p in data.arithmetic_problems("train")}
    rows = [{"problem": f"{a} + {a} = ?", "answer": str(2 * a)} for a in range(20)]
    for name, part in (("train", rows[:15]), ("test", rows[15:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    cfg = train.parse_args(["--model", "org/name", "--train-data", str(tmp_path / "train.jsonl"),
                            "--eval-data", str(tmp_path / "test.jsonl"), "--prompts-per-step", "8",
                            "--mini-batch-size", "16"])
    problems, held = train.load_data(cfg, data.get_task(cfg.task), embedded=False)
    assert [p["answer"] for p in problems] == [str(2 * a) for a in range(15)]
    assert [p["answer"] for p in held] == [str(2 * a) for a in range(15, 20)]

# ----------------------------------------------------------------------------------------------
# 2 and 4. One update on 2 processes (tests/guards_script.py) against a plain transformers model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0)


def torchrun_update(model_dir, out, mode):
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "tests/guards_script.py", model_dir, str(out), mode])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def plain_logp(model_dir):
    """(model, log pi [B, T-1] at the script's temperature with grad, the batch, DELTA)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    b, delta = guards_script.batch()
    logits = model(input_ids=b["ids"], attention_mask=b["attn"]).logits[:, :-1] / guards_script.TEMPERATURE
    return model, torch.log_softmax(logits, -1).gather(-1, b["ids"][:, 1:, None])[..., 0], b, delta


def start_weights(model_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(model_dir, "model.safetensors"))


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in b)


def test_bapo_bounds_are_picked_from_statistics_summed_over_ranks(model_dir, tmp_path):
    """2 processes, rank 0 holding every A > 0 sequence and rank 1 every A < 0 one, off-policy: each
    rank's own pick differs from the pick over the pooled statistics (maspo.bapo_pick of the whole
    batch), which both ranks must use; the update then equals one SGD step on ONE policy_loss call
    over the whole batch with those bounds. Planted bug: train.bapo_bounds without its all_reduce
    (each rank picks from its own tokens)."""
    model, logp, b, delta = plain_logp(model_dir)
    old = logp.detach() + delta                                           # rho = exp(-delta)
    half = guards_script.N // 2
    stats = [maspo.bapo_stats(logp[s], old[s], b["adv"][s], b["mask"][s]) for s in (slice(0, half), slice(half, None))]
    pooled = maspo.bapo_pick(stats[0] + stats[1])
    own = [maspo.bapo_pick(s) for s in stats]
    assert (b["adv"][:half] > 0).all() and (b["adv"][half:] < 0).all()
    assert not torch.equal(own[0], pooled) and not torch.equal(own[1], pooled), (own, pooled)  # the case bites
    loss, _ = maspo.policy_loss(logp, old, b["adv"], b["mask"], maspo.LossConfig(loss="bapo"), bapo_bounds=pooled)
    loss.backward(retain_graph=True)
    start = start_weights(model_dir)
    expected = {k: start[k] - guards_script.LR_SGD * p.grad for k, p in model.named_parameters()}
    got = torchrun_update(model_dir, tmp_path / "bapo.pt", "bapo")
    pooled = pooled.tolist()
    assert (got["metrics"]["bapo_c_low"], got["metrics"]["bapo_c_high"]) == pytest.approx(pooled, abs=1e-6)
    assert max_diff(got["weights"], expected) < 1e-6
    # the bounds matter to the weights here: each rank on its own bounds gives another update
    model.zero_grad()
    mixed = [maspo.policy_loss(logp[s], old[s], b["adv"][s], b["mask"][s], maspo.LossConfig(loss="bapo"),
                               bapo_bounds=bounds, num_tokens=float(b["mask"].sum()))[0]
             for s, bounds in zip((slice(0, half), slice(half, None)), own)]
    sum(mixed).backward()
    wrong = {k: start[k] - guards_script.LR_SGD * p.grad for k, p in model.named_parameters()}
    assert max_diff(wrong, expected) > 1e-4


def test_gradient_clipping_equals_adamw_on_gradients_rescaled_by_hand(model_dir, tmp_path):
    """--grad-clip small enough to bind (1e-5, the gradient norm is ~1): the 2-process update equals
    one torch AdamW step whose gradients were rescaled by hand, g * clip / (||g|| + 1e-6), ||g|| over
    all parameters. The clipped entries (~1e-8) are of the size of Adam's eps, so the step depends on
    the scale (Adam's first step is otherwise scale-free). Planted bug: clipping at 10 x --grad-clip."""
    model, logp, b, _ = plain_logp(model_dir)
    loss, _ = maspo.policy_loss(logp, logp.detach(), b["adv"], b["mask"], maspo.LossConfig())
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    norm = torch.cat([g.flatten() for g in grads.values()]).norm().item()
    assert norm > 100 * guards_script.CLIP                                # the clip binds

    def adamw_step(clip):
        """One AdamW step (lr LR_ADAM, no weight decay) from the start on g * clip / (||g|| + 1e-6)."""
        start = start_weights(model_dir)
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(start[k])
                p.grad = grads[k] * min(1.0, clip / (norm + 1e-6))
        opt = torch.optim.AdamW(model.parameters(), lr=guards_script.LR_ADAM, weight_decay=0.0)
        opt.step()
        return {k: p.detach().clone() for k, p in model.named_parameters()}
    expected = adamw_step(guards_script.CLIP)
    got = torchrun_update(model_dir, tmp_path / "clip.pt", "clip")
    assert got["metrics"]["grad_norm"] == pytest.approx(norm, rel=1e-4)  # logged: the norm before clipping
    assert max_diff(got["weights"], expected) < 1e-6
    for other in (10 * guards_script.CLIP, 1e9):                          # a clip 10x too wide, or none
        assert max_diff(adamw_step(other), expected) > 1e-3

# ----------------------------------------------------------------------------------------------
# 5. Resume with a learning-rate warm-up


def test_resume_restores_the_lr_warm_up(tmp_path_factory, tmp_path):
    """Run A: 2 RL steps, a checkpoint after each. Run B: A's folder as a kill during step 2 leaves
    it (step 2's checkpoint and log line gone), resumed. With a warm-up of 8 updates (2 per step),
    step 2 runs at lr factors 3/8, 4/8; a scheduler started afresh would run it at 1/8, 2/8. Weight
    decay moves every weight by lr * wd whatever the rewards, so the lr shows in the weights, and
    step 2's logged lr and weights must equal A's. Planted bug: checkpoint.load not
    restoring the scheduler."""
    tiny_dir = str(tmp_path_factory.mktemp("cache") / "tiny")
    args = [sys.executable, "train.py", "--tiny-dir", tiny_dir, "--warm-start-steps", "25", "--prompts-per-step", "4",
            "--group-size", "4", "--mini-batch-size", "8", "--eval-limit", "1", "--eval-k", "1", "--sampler", "hf",
            "--steps", "2", "--save-every", "1", "--warmup-steps", "8", "--lr", "1e-2", "--weight-decay", "1.0"]
    a = run(args + ["--out", str(tmp_path / "a")])
    assert a.returncode == 0, a.stderr[-3000:]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_000002")
    b = run(args + ["--out", str(tmp_path / "b"), "--resume"])
    assert b.returncode == 0, b.stderr[-3000:]
    rows = [[json.loads(line) for line in open(tmp_path / r / "metrics.jsonl")] for r in "ab"]
    assert [r["step"] for r in rows[1]] == [0, 1, 2]  # B's log: A's steps 0-1, its own step 2
    from safetensors.torch import load_file
    wa, wb, w1 = (load_file(tmp_path / r / "checkpoints" / f"step_00000{s}" / "model.safetensors")
                  for r, s in (("a", 2), ("b", 2), ("a", 1)))
    assert max_diff(wa, w1) > 1e-5  # step 2 moved the weights (weight decay at the warm-up's lr)
    assert max_diff(wb, wa) < 1e-7
    assert rows[1][2]["lr"] == rows[0][2]["lr"] < 1e-2  # the logged lr too; still warming up at step 2
