"""Sampling speed: vLLM (CPU build, in-process) vs the HF `generate` fallback, same run.

64 sequences (8 prompts x G = 8) x 128 new tokens each (no early stop: stop_token_ids=[]),
temperature 1, at three sizes of the tiny Qwen2 (tiny.SIZES: ~0.5M, ~5M, ~30M parameters, built
locally). Each size runs in a fresh process holding both samplers (the vLLM engine is in-process;
rollout.py undoes its change to torch's threads); engine start and one warm-up call each are not
timed; then timed calls alternate HF, vLLM, HF, vLLM, ... for --rounds rounds, so both see the
same machine load, and the best round of each is kept. Prints a markdown table of tokens/s and the
vLLM/HF ratio. Timings on a shared machine are noisy: compare the ratios, not the absolutes.

Run: python bench/rollout.py [--sizes 0.5M 5M 30M] [--rounds 3] [--dtype float32|bfloat16]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS, G, NEW_TOKENS = 8, 8, 128


def measure(model_dir, rounds, dtype):
    """Tokens per second of each backend on one model: best of `rounds` alternating timed calls."""
    import rollout
    import tiny
    tok = tiny.load_tokenizer(model_dir)
    prompts = [tok.encode(f"Q: What is {a} + {2 * a + 1}?\nA:") for a in range(PROMPTS)]
    samplers = {backend: rollout.make_sampler(model_dir, tok, backend=backend, max_model_len=256,
                                              seed=0, dtype=dtype) for backend in ("hf", "vllm")}
    for sampler in samplers.values():
        sampler.generate(prompts, n=G, max_tokens=16, seed=0, stop_token_ids=[])  # warm-up
    best = {backend: float("inf") for backend in samplers}
    for r in range(rounds):
        for backend, sampler in samplers.items():
            start = time.perf_counter()
            groups = sampler.generate(prompts, n=G, max_tokens=NEW_TOKENS, seed=r + 1, stop_token_ids=[])
            best[backend] = min(best[backend], time.perf_counter() - start)
            tokens = sum(len(s.completion_ids) for group in groups for s in group)
            assert tokens == PROMPTS * G * NEW_TOKENS, f"{backend}: {tokens} tokens, not {PROMPTS * G * NEW_TOKENS}"
    samplers["vllm"].close()
    return {backend: PROMPTS * G * NEW_TOKENS / seconds for backend, seconds in best.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["0.5M", "5M", "30M"])
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per backend (best kept)")
    parser.add_argument("--dtype", default="float32",
                        help="float32 (the embedded default) or bfloat16 (slower for both on our 2-core CPU)")
    parser.add_argument("--one", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process: measure both backends on one model, print JSON last
        print(json.dumps(measure(args.one, args.rounds, args.dtype)))
        return
    import tiny
    from tqdm import tqdm
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in tqdm(args.sizes, desc="sizes"):
            path = tiny.build_tiny_model(os.path.join(tmp, size), **tiny.SIZES[size])
            out = subprocess.run([sys.executable, __file__, "--one", path, "--rounds",
                                  str(args.rounds), "--dtype", args.dtype], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"bench {size} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((size, tiny.num_parameters(path), result))
    print(f"\n{PROMPTS} prompts x G={G} = {PROMPTS * G} sequences x {NEW_TOKENS} new tokens, "
          f"{args.dtype}, best of {args.rounds} alternating rounds; {os.cpu_count()} CPU cores\n")
    print("| model | parameters | HF generate tokens/s | vLLM tokens/s | vLLM / HF |")
    print("|---|---|---|---|---|")
    for size, params, r in rows:
        hf, vllm = r["hf"], r["vllm"]
        print(f"| {size} | {params / 1e6:.2f}M | {hf:.0f} | {vllm:.0f} | {vllm / hf:.2f}x |")


if __name__ == "__main__":
    main()
