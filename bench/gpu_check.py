"""bench/gpu_check.py: the GPU check, in one go (< 8 minutes on one H100 / H200), with nothing downloaded.

Needs only torch, transformers, tokenizers and tqdm (no vLLM, no network: what a bare GPU image has;
checked against torch 2.11 / transformers 5.17 APIs as well as the pinned versions).
  1. builds random models at the DeepSeek-R1-Distill-Qwen-1.5B / Qwen2.5-1.5B width locally (vocab
     151,936, hidden 1,536, intermediate 8,960, 12 heads, 2 KV heads) with the stand-in chat tokenizer
     of tiny.py: 28 layers for the measurements, 4 for the loop;
  2. runs 3 steps of train.py in bf16 with the HF sampler on the 4-layer model (the whole loop:
     sample, verify, old log-probs, MASPO updates, weight sync, checkpoint). A random model almost
     never draws a stop token (2 of 151,936 ids), so nearly every sample runs to a short
     --max-response-tokens (128): about the same work on every run, and 27 rows per HF generate call
     (its 2 GiB logits budget; 512 tokens allowed 6). The 4-layer model keeps the final checkpoint small (its
     float32 AdamW state: ~6 GB, not the ~20 GB of 28 layers); it is removed with the work folder;
  3. times ONE optimizer update at T = 4096 tokens per sequence through train.update_policy, for the
     fused log-prob path (train.policy_forward: lm_head applied chunk by chunk, logprobs.hidden_logprobs)
     and the unfused one (HF logits [B, T, V] -> logprobs.token_logprobs), each with and without
     activation checkpointing, and prints tokens/s, MFU, and the peak GPU memory of each phase it runs
     (old log-probs, update, the sync's bf16 gather) next to plan.py's prediction for the same shape
     (the update's and the sync's; plan.py models the fused path). An out-of-memory configuration is
     reported, its objects collected (gc + empty_cache), and the next one runs.
The sample phase's vLLM figures (plan.py's "sample") need vLLM, which this image may lack: not measured.

MFU = achieved FLOP/s / peak FLOP/s, with the update's FLOPs counted the usual way (Kaplan et al.;
PaLM appendix B): 6 N per token for the matmuls of forward + backward (N = parameters, the lm_head
included), plus 12 L d T per token for attention scores and values (L layers, d = hidden size,
T = sequence length; causal masking not discounted), plus 2 N per token more with activation
checkpointing (the recomputed forward). The fused path's recomputed lm_head (2 V d per token) is
not counted as useful work. Peak: --peak-tflops (default 989, the H100/H200 dense bf16 figure).

Run:  python bench/gpu_check.py                  (one GPU)
      python bench/gpu_check.py --toy            (toy size, CPU or GPU: seconds; tests/test_bench.py runs it)
"""
import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPE_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
                  vocab_size=151936, max_position_embeddings=8192)
SHAPE_TOY = dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2, num_kv_heads=1,
                 vocab_size=2048, max_position_embeddings=1024)
LOOP_LAYERS = 4  # the loop's model: small enough that its checkpoint is not the 20 GB of 28 layers
RESPONSE_TOKENS = 128  # the loop's response limit (a random model almost never stops by itself)


def unfused_forward(self, input_ids, attention_mask, temperature, with_entropy=False):
    """The path before the fused one: HF logits [B, T, V], then chunked log_softmax + gather. It runs as
    the FSDP root's forward (like train.policy_forward); the HF class's own forward does the model."""
    import logprobs
    out = type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = out.logits[:, :-1]  # (B, T-1, V)
    logp = logprobs.token_logprobs(logits, input_ids[:, 1:], temperature=temperature)
    return logp, (logprobs.entropy(logits, temperature=temperature) if with_entropy else None)


def train_three_steps(model, out, toy):
    """train.py end to end, bf16, HF sampler; returns (seconds, its metrics rows, checkpoint bytes)."""
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--model", model, "--train-data", "arithmetic",
            "--steps", "3", "--prompts-per-step", "8", "--group-size", "4", "--mini-batch-size", "16",
            "--max-prompt-tokens", "128", "--max-response-tokens", str(64 if toy else RESPONSE_TOKENS),
            "--micro-batch-tokens", "8192", "--precision", "bf16", "--sampler", "hf", "--lr", "1e-6",
            "--save-every", "3", "--out", out]
    t = time.time()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed:\n{proc.stderr[-4000:]}")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(out, "checkpoints"))
               for f in files)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return time.time() - t, [json.loads(line) for line in f], size


def peak_gib(torch, device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def time_update(model_dir, fused, checkpointing, B, T):
    """One optimizer update through train.update_policy, with the peak memory of each phase; a result dict."""
    import torch

    import checkpoint
    import maspo
    import policy
    import train
    rank, world, device = train.setup_distributed()
    cfg = train.cli.build(train.Config, dict(
        model=model_dir, prompts_per_step=1, group_size=B, mini_batch_size=B, micro_batch_tokens=B * T,
        max_prompt_tokens=64, max_response_tokens=T - 64, grad_checkpointing=checkpointing, precision="bf16"))
    model = policy.load_policy(model_dir, cfg, device, forward=None if fused else unfused_forward)
    try:
        # fused AdamW on CUDA, as train.py (no foreach temporaries); the single-tensor loop on CPU
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
        g = torch.Generator().manual_seed(0)
        V = model.config.vocab_size
        ids = torch.randint(0, min(V, 1000), (B, T), generator=g)
        mask = torch.zeros(B, T - 1)
        mask[:, 63:] = 1.0  # the response: all but the first 64 tokens
        batch = {"ids": ids, "attn": torch.ones_like(ids), "mask": mask,
                 "adv": maspo.group_advantages(torch.tensor([1.0, 0.0] * (B // 2) + [0.0] * (B % 2)), B)}
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        reset_peak(torch, device)
        train.old_logprobs(model, batch, cfg)
        peaks = {"old_logp": peak_gib(torch, device)}
        reset_peak(torch, device)
        t = time.time()
        metrics = train.update_policy(model, optimizer, scheduler, batch, cfg, world, step=1)
        sync()
        seconds = time.time() - t
        peaks["update"] = peak_gib(torch, device)
        reset_peak(torch, device)
        t = time.time()
        for _, full in checkpoint.gathered(model, torch.bfloat16):  # the sync's gather, one tensor at a time
            del full
        sync()
        peaks["sync"], sync_seconds = peak_gib(torch, device), time.time() - t
        n = sum(p.numel() for p in model.parameters())  # sharded numel = full numel on one process
        L, d = model.config.num_hidden_layers, model.config.hidden_size
        flops_per_token = (8 if checkpointing else 6) * n + 12 * L * d * T  # see the module docstring
        return {"path": "fused" if fused else "unfused", "checkpointing": checkpointing, "tokens": B * T,
                "seconds": seconds, "tokens_per_s": B * T / seconds, "flops": flops_per_token * B * T,
                "peak_gib": peaks, "sync_seconds": sync_seconds, "grad_norm": metrics["grad_norm"],
                "approx_kl": metrics["approx_kl"]}
    finally:
        del model  # (and the optimizer with this frame) collected by the caller: gc + empty_cache


def free(torch):
    """Collect what a finished or failed configuration left (FSDP modules live in reference cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def predicted(model_dir, B, T, checkpointing, on_gpu):
    """plan.py's figures for time_update's shape (one process, bf16): the update's peak and the sync's."""
    import plan
    with open(os.path.join(model_dir, "config.json")) as f:
        a = plan.architecture(json.load(f))
    t = plan.train_phase(a, B * T, 2, checkpointing, world=1, fsdp=True, fused=on_gpu)
    return {"update": t["peak"] / 2**30, "sync": (t["resident"] + 2 * a["largest"]) / 2**30}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", action="store_true", help="toy shapes (seconds, CPU or GPU)")
    p.add_argument("--B", type=int, default=2, help="sequences in the timed update (default 2)")
    p.add_argument("--T", type=int, default=4096, help="tokens per sequence in the timed update (default 4096)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak (H100/H200: 989)")
    p.add_argument("--out", default="", help="work folder, kept (default: a temp folder, removed at the end)")
    args = p.parse_args()
    import torch

    import tiny
    if args.toy:
        args.T = min(args.T, 256)
    work = args.out or tempfile.mkdtemp(prefix="gpu_check_")
    on_gpu = torch.cuda.is_available()
    print(f"torch {torch.__version__} | cuda {on_gpu} {torch.cuda.get_device_name() if on_gpu else ''} | "
          f"work folder {work}", flush=True)
    try:
        shape = SHAPE_TOY if args.toy else SHAPE_1_5B
        t = time.time()
        model = tiny.build_chat_model(os.path.join(work, "model"), "qwen", **shape)
        loop_model = model if args.toy else tiny.build_chat_model(os.path.join(work, "loop_model"), "qwen",
                                                                  **{**shape, "num_layers": LOOP_LAYERS})
        print(f"1. models: {tiny.num_parameters(model) / 1e9:.3f}B parameters (and {tiny.num_parameters(loop_model) / 1e9:.3f}B "
              f"for the loop) built in {time.time() - t:.0f} s", flush=True)
        seconds, rows, size = train_three_steps(loop_model, os.path.join(work, "run"), args.toy)
        last = rows[-1]
        print(f"2. train.py, 3 steps in bf16 (HF sampler): {seconds:.0f} s in all; last step: reward {last['reward']:.3f}, "
              f"len {last['response_len']:.0f}, grad norm {last['grad_norm']:.3g}, logp_gap {last['logp_gap']:.3g}, "
              f"t_sample {last['t_sample']:.1f} s, t_update {last['t_update']:.1f} s; checkpoints {size / 2**30:.2f} GiB",
              flush=True)
        if not args.out:
            shutil.rmtree(os.path.join(work, "run"), ignore_errors=True)  # its checkpoints, now
        print(f"3. one update at T = {args.T}, B = {args.B} (peak GiB per phase: measured / plan.py):")
        results = []
        for fused in (True, False):
            for checkpointing in (True, False):
                try:
                    r = time_update(model, fused, checkpointing, args.B, args.T)
                except torch.OutOfMemoryError as e:
                    print(f"   {'fused' if fused else 'unfused':8s} checkpointing={checkpointing!s:5s} out of memory: "
                          f"{str(e).splitlines()[0]}", flush=True)
                    continue
                finally:
                    free(torch)  # after an out-of-memory too: the failed model goes before the next one
                plan = predicted(model, args.B, args.T, checkpointing, on_gpu)
                r["plan_gib"] = plan if fused else {}
                mfu = r["flops"] / r["seconds"] / (args.peak_tflops * 1e12)
                pk = r["peak_gib"]
                vs = (lambda k: f"{pk[k]:5.1f} / {plan[k]:5.1f}") if fused else (lambda k: f"{pk[k]:5.1f} /   -  ")
                print(f"   {r['path']:8s} checkpointing={checkpointing!s:5s} {r['tokens_per_s']:10.0f} tokens/s  "
                      f"MFU {100 * mfu:5.1f}%  {r['seconds']:.2f} s | old log-probs {pk['old_logp']:5.1f} | "
                      f"update {vs('update')} | sync {vs('sync')} ({r['sync_seconds']:.2f} s) | "
                      f"grad norm {r['grad_norm']:.6g}", flush=True)
                results.append(r)
        norms = [r["grad_norm"] for r in results]
        if norms:
            spread = (max(norms) - min(norms)) / max(abs(max(norms)), 1e-12)
            print(f"   relative spread of the gradient norm across the four: {spread:.2e} (the paths must agree)")
        print("JSON " + json.dumps({"train_seconds": seconds, "checkpoint_bytes": size, "updates": results}))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
