"""bench/update.py: peak memory and time of ONE optimizer update (forward + backward + AdamW step) of
a Qwen2ForCausalLM at the DeepSeek-R1-Distill-Qwen-1.5B / Qwen2.5-1.5B shape (vocab 151,936, hidden
1,536, intermediate 8,960, 12 heads, 2 KV heads, tied embeddings as Qwen2.5-1.5B) but with --layers
decoder layers (default 2, so it fits 2 CPU cores and 24 GB), built locally from a config (no hub),
on --B sequences of --T tokens, computing log pi two ways:

  today   HF forward -> logits [B, T, V] -> logprobs.token_logprobs          (the unfused path)
  fused   model.model (the body) -> last hidden states [B, T, D] ->
          logprobs.hidden_logprobs(hidden, lm_head.weight, ids)               (never holds [B, T, V])

Both paths see the same initial weights, the same fixed data and the same loss: maspo.policy_loss
(MASPO) on fixed old log-probs, advantages and a ragged response mask. The run checks that they
give the same loss and the same gradient norm.

Memory: each path runs in a fresh child process. The child builds the model and the AdamW state
(one step on zero gradients); building leaves a high-water mark well above what stays resident
(transient copies), which would hide a smaller update's peak, so the child then resets its
high-water mark to the resident size (Linux: `echo 5 > /proc/self/clear_refs`), takes that as the
baseline, runs the update, and reports the peak above the baseline (what the update itself needs:
activations, gradients, the log-prob path, AdamW's temporaries), the same peak measured right after
backward (before the optimizer step, whose temporaries are the same for both paths), and ru_maxrss
over the child's whole life. Time: the
update's wall time and CPU time (all threads; less sensitive to other processes) in that child,
after a small warm-up forward. On a shared machine read the ratios (fused / today), not the seconds.

Target: the fused update needs <= 0.3x today's peak above the baseline at <= 1.1x its time. The
fused backward recomputes the logits, one extra [tokens, D] x [D, V] matmul per update: with 2
layers the lm_head is most of the compute, so the time ratio is at its worst here; with all 28
layers of the real model the same extra matmul is about 1/20 of the update.

Run:  python bench/update.py                    (a few minutes on 2 CPU cores, peak ~14 GB)
      python bench/update.py --grad-checkpointing   (as train.py runs real models)
      python bench/update.py --B 2 --T 512      (smaller, quicker)
      python bench/update.py --vocab 32000 --hidden 512 --intermediate 2048 --heads 8   (another shape)
It ends with plan.py's training-phase figure (weights + AdamW + the update's peak) beside the fused
path's measured one (resident size above the bare runtime + the peak above that).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
             num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True)


def high_water_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: KiB -> MiB


def reset_high_water():
    """Reset this process's high-water mark to its resident size (Linux >= 4.0); return the latter."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return high_water_mib()


def shape(args):
    """SHAPE with the flags' overrides (smaller widths for quick runs)."""
    out = dict(SHAPE)
    for flag, key in (("vocab", "vocab_size"), ("hidden", "hidden_size"), ("intermediate", "intermediate_size"),
                      ("heads", "num_attention_heads"), ("kv_heads", "num_key_value_heads")):
        if getattr(args, flag):
            out[key] = getattr(args, flag)
    return out


def planned(result, args):
    """plan.py's training-phase figure for this child's run (one process, no FSDP, float32, CPU AdamW):
    (weights + AdamW state, the peak above them), in MiB."""
    sys.path.insert(0, ROOT)
    import plan
    a = plan.architecture(result["config"])
    t = plan.train_phase(a, args.B * args.T, 4, args.grad_checkpointing, world=1, fsdp=False, fused=False,
                         chunk=args.chunk_size)
    return t["resident"] / 2**20, t["above"] / 2**20


def child(args):
    """Build model, optimizer state and data; run one update the `args.path` way; print JSON."""
    sys.path.insert(0, ROOT)
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import logprobs
    import maspo

    runtime = high_water_mib()  # the process before the model: interpreter, torch, transformers
    torch.manual_seed(0)
    config = Qwen2Config(num_hidden_layers=args.layers, max_position_embeddings=max(args.T, 2048), **shape(args))
    model = Qwen2ForCausalLM(config)                                      # float32, tied lm_head
    assert model.lm_head.weight is model.model.embed_tokens.weight
    if args.grad_checkpointing:  # train.py's default for real models: layer activations recomputed in backward
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    # Fixed data: token ids [B, T], a ragged response mask over the T-1 next-token positions, old
    # log-probs near this random model's (about -log V) so that rho spreads around 1, advantages.
    g = torch.Generator().manual_seed(1)
    V, B, T = config.vocab_size, args.B, args.T
    ids = torch.randint(0, V, (B, T), generator=g)                        # [B, T]
    pos = torch.arange(T - 1)
    prompt = T // 4
    ends = torch.randint(T // 2, T, (B,), generator=g)                    # response lengths differ
    mask = ((pos >= prompt) & (pos < ends[:, None])).float()              # [B, T-1]
    old_logp = -11.93 + 0.3 * torch.randn(B, T - 1, generator=g)          # [B, T-1]
    adv = torch.randn(B, generator=g)                                     # [B]
    cfg = maspo.LossConfig(loss="maspo")

    def logp_today():
        logits = model(input_ids=ids).logits[:, :-1]                      # [B, T-1, V]
        return logprobs.token_logprobs(logits, ids[:, 1:])

    def logp_fused():
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]     # [B, T-1, D]
        return logprobs.hidden_logprobs(hidden, model.lm_head.weight, ids[:, 1:], chunk_size=args.chunk_size)[0]

    logp_fn = {"today": logp_today, "fused": logp_fused}[args.path]

    with torch.no_grad():                                                 # warm-up (threads, kernels)
        model(input_ids=ids[:1, :16])
    for p in model.parameters():                                          # AdamW state now, not in the update
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    built_high_water = high_water_mib()
    baseline = reset_high_water()                                         # resident: model + AdamW state

    t0, c0 = time.perf_counter(), time.process_time()
    loss, _ = maspo.policy_loss(logp_fn(), old_logp, adv, mask, cfg)
    loss.backward()
    forward_backward_peak = high_water_mib() - baseline                   # the log-prob path shows here
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    opt.step()                                                            # AdamW's temporaries: same for both
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"loss": loss.item(), "grad_norm": grad_norm.item(),
                      "seconds": seconds, "cpu_seconds": cpu_seconds,
                      "baseline_mib": baseline, "built_high_water_mib": built_high_water,
                      "ru_maxrss_mib": max(built_high_water, high_water_mib()),
                      "peak_above_mib": high_water_mib() - baseline, "fb_peak_above_mib": forward_backward_peak,
                      "params": sum(p.numel() for p in model.parameters()), "runtime_mib": runtime,
                      "config": config.to_dict()}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2; the real model has 28)")
    p.add_argument("--B", type=int, default=4, help="sequences (default 4)")
    p.add_argument("--T", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--chunk-size", type=int, default=512, help="tokens per chunk of hidden_logprobs (default 512)")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in both paths")
    p.add_argument("--vocab", type=int, help="vocabulary size (default 151,936)")
    p.add_argument("--hidden", type=int, help="hidden size (default 1,536)")
    p.add_argument("--intermediate", type=int, help="MLP width (default 8,960)")
    p.add_argument("--heads", type=int, help="attention heads (default 12)")
    p.add_argument("--kv-heads", type=int, help="KV heads (default 2)")
    p.add_argument("--path", choices=["today", "fused"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.path:
        return child(args)

    load_before = os.getloadavg()
    dims = shape(args)
    print(f"Qwen2 {args.layers} layers, hidden {dims['hidden_size']}, MLP {dims['intermediate_size']}, B x T = "
          f"{args.B} x {args.T}, V = {dims['vocab_size']}, "
          f"chunk_size {args.chunk_size}, activation checkpointing {args.grad_checkpointing}, {os.cpu_count()} CPUs, "
          f"load average before {load_before[0]:.2f}")
    results = {}
    for path in ("today", "fused"):
        cmd = [sys.executable, os.path.abspath(__file__), "--path", path, "--layers", str(args.layers),
               "--B", str(args.B), "--T", str(args.T), "--chunk-size", str(args.chunk_size)] + \
            (["--grad-checkpointing"] if args.grad_checkpointing else []) + \
            [x for flag in ("vocab", "hidden", "intermediate", "heads", "kv_heads") if getattr(args, flag)
             for x in (f"--{flag.replace('_', '-')}", str(getattr(args, flag)))]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{path} failed:\n{out.stderr}")
        results[path] = json.loads(out.stdout.strip().splitlines()[-1])
    load_after = os.getloadavg()
    today, fused = results["today"], results["fused"]
    print(f"model {today['params'] / 1e6:.0f}M parameters; baseline (model + AdamW state) "
          f"{today['baseline_mib']:.0f} MiB resident (building it peaked at {today['built_high_water_mib']:.0f} MiB)")
    print(f"{'':28} {'today':>12} {'fused':>12} {'ratio':>8}")
    rows = (("update time (s)", "seconds"), ("update CPU time (s)", "cpu_seconds"),
            ("peak above baseline (MiB)", "peak_above_mib"),
            ("  peak after fwd + bwd (MiB)", "fb_peak_above_mib"), ("ru_maxrss, whole child (MiB)", "ru_maxrss_mib"))
    for label, key in rows:
        print(f"{label:28} {today[key]:>12.1f} {fused[key]:>12.1f} {fused[key] / today[key]:>7.2f}x")
    same_loss = abs(fused["loss"] - today["loss"]) <= 1e-5 * abs(today["loss"]) + 1e-7
    same_norm = abs(fused["grad_norm"] - today["grad_norm"]) <= 1e-4 * today["grad_norm"]
    print(f"loss {today['loss']:.8g} vs {fused['loss']:.8g}, grad norm {today['grad_norm']:.8g} vs "
          f"{fused['grad_norm']:.8g}: {'same' if same_loss and same_norm else 'DIFFERENT'}")
    mem = fused["peak_above_mib"] / today["peak_above_mib"]
    speed = fused["seconds"] / today["seconds"]
    verdict = "met" if mem <= 0.3 and speed <= 1.1 else "NOT met"
    print(f"target (peak above baseline <= 0.3x at time <= 1.1x): {verdict} ({mem:.2f}x memory, {speed:.2f}x time; "
          f"forward + backward alone {fused['fb_peak_above_mib'] / today['fb_peak_above_mib']:.2f}x memory)")
    resident, above = planned(fused, args)
    measured = fused["baseline_mib"] - fused["runtime_mib"] + fused["peak_above_mib"]
    print(f"plan.py, training phase of the fused path: {resident + above:.0f} MiB (weights + AdamW {resident:.0f}, "
          f"peak above them {above:.0f}); measured {measured:.0f} MiB (resident {fused['baseline_mib'] - fused['runtime_mib']:.0f}"
          f" above the {fused['runtime_mib']:.0f} MiB runtime, peak above it {fused['peak_above_mib']:.0f}): "
          f"plan / measured {(resident + above) / measured:.2f} (above the state alone: {above / fused['peak_above_mib']:.2f})")
    print("JSON " + json.dumps({"plan_mib": resident + above, "measured_mib": measured, "plan_above_mib": above,
                                "measured_above_mib": fused["peak_above_mib"]}))
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")


if __name__ == "__main__":
    main()
