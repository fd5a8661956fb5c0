"""bench/logprobs.py: time and peak memory of logprobs.token_logprobs against the naive
log_softmax + gather, at B x T x V = 4 x 2048 x 32000 float32 on the CPU, in one run.

Target: the chunked forward needs <= 0.3x the naive peak memory at <= 1.2x its time.
Forward + backward is measured too (the training forward differentiates through token_logprobs).

Memory: each (method, pass) runs once in a fresh child process, so that its high-water mark
(ru_maxrss) is its own; peak = high-water mark after the call minus the one once the inputs exist,
i.e. what the method needs on top of the logits. For forward + backward that includes the [B, T, V]
gradient of the logits, which both methods must produce.
Time: one child process alternates the two methods for --repeats rounds and keeps each one's best,
so that load from other processes hits both alike. On a shared machine read the ratios, not the
absolute seconds.

Run:  python bench/logprobs.py                      (about a minute on 2 CPU cores)
      python bench/logprobs.py --B 2 --T 512        (smaller, quicker)
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def high_water_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: KiB -> MiB


def setup(args):
    """Inputs and the two methods; returns {name: call(pass_name)}."""
    sys.path.insert(0, ROOT)
    import torch
    import logprobs
    torch.manual_seed(0)
    logits = torch.randn(args.B, args.T, args.V)                          # [B, T, V] float32
    ids = torch.randint(0, args.V, (args.B, args.T))                      # [B, T]
    w = torch.randn(args.B, args.T)                                       # [B, T] upstream gradient
    methods = {
        "naive": lambda x: torch.log_softmax(x, dim=-1).gather(-1, ids[..., None]).squeeze(-1),
        "chunked": lambda x: logprobs.token_logprobs(x, ids, chunk_size=args.chunk_size),
    }

    def caller(fn):
        def call(pass_name):
            if pass_name == "forward":
                with torch.no_grad():
                    fn(logits)
            else:
                x = logits.detach().requires_grad_(True)
                (fn(x) * w).sum().backward()
        return call
    return {name: caller(fn) for name, fn in methods.items()}


def child_memory(args):
    calls = setup(args)
    base = high_water_mib()
    calls[args.method](args.pass_name)
    print(json.dumps({"peak_mib": high_water_mib() - base}))


def child_time(args):
    calls = setup(args)
    best = {}
    for pass_name in ("forward", "backward"):
        for name, call in calls.items():                                  # warm-up, untimed
            call(pass_name)
        for _ in range(args.repeats):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call(pass_name)
                dt = time.perf_counter() - t0
                best[f"{pass_name}/{name}"] = min(best.get(f"{pass_name}/{name}", dt), dt)
    print(json.dumps(best))


def run_child(args, *extra):
    cmd = [sys.executable, os.path.abspath(__file__), *extra, "--B", str(args.B), "--T", str(args.T),
           "--V", str(args.V), "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(extra)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=4, help="sequences (default 4)")
    p.add_argument("--T", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--V", type=int, default=32000, help="vocabulary (default 32000)")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--child", choices=["memory", "time"], help=argparse.SUPPRESS)
    p.add_argument("--method", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--pass-name", choices=["forward", "backward"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "memory":
        return child_memory(args)
    if args.child == "time":
        return child_time(args)

    from tqdm import tqdm
    size_mib = args.B * args.T * args.V * 4 / 2 ** 20
    print(f"B x T x V = {args.B} x {args.T} x {args.V} float32 (logits {size_mib:.0f} MiB), "
          f"chunk_size {args.chunk_size}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    jobs = [(pn, m) for pn in ("forward", "backward") for m in ("naive", "chunked")] + [("time", None)]
    peak, times = {}, {}
    for pass_name, method in tqdm(jobs, desc="measuring", leave=False):
        if method is None:
            times = run_child(args, "--child", "time")
        else:
            peak[f"{pass_name}/{method}"] = run_child(args, "--child", "memory", "--method", method,
                                                      "--pass-name", pass_name)["peak_mib"]
    print(f"{'':24} {'naive':>12} {'token_logprobs':>15} {'ratio':>8}")
    for pass_name, label in (("forward", "forward"), ("backward", "forward+backward")):
        tn, tc = times[f"{pass_name}/naive"], times[f"{pass_name}/chunked"]
        mn, mc = peak[f"{pass_name}/naive"], peak[f"{pass_name}/chunked"]
        print(f"{label + ' time':24} {tn:>11.3f}s {tc:>14.3f}s {tc / tn:>7.2f}x")
        print(f"{label + ' peak':24} {mn:>8.0f} MiB {mc:>11.0f} MiB {mc / max(mn, 1):>7.2f}x")
    speed = times["forward/chunked"] / times["forward/naive"]
    mem = peak["forward/chunked"] / max(peak["forward/naive"], 1)
    verdict = "met" if mem <= 0.3 and speed <= 1.2 else "NOT met"
    print(f"target (forward peak <= 0.3x, time <= 1.2x): {verdict} ({mem:.2f}x memory, {speed:.2f}x time)")


if __name__ == "__main__":
    main()
