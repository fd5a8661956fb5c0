"""plan.py: will a train.py configuration fit? GPU and host memory per rank, before anything loads.

Reads only the model's config.json (a local folder's, the hub cache's, or the architecture copies in
configs/arch/ for the presets' hub models, so it works offline) and prints, per rank:
  - the training state by FSDP2 sharding: float32 master weights, float32 gradients, AdamW's two moments
  - activations for the micro-batch token budget, with and without activation checkpointing
  - the log-prob path (logprobs.hidden_logprobs: the lm_head applied chunk by chunk, never [B, T, V])
  - vLLM's share (gpu_memory_utilization): its bf16 weights, its KV cache in tokens and in concurrent
    sequences at the response limit, against the sequences each rank samples per step
  - the peak of each phase: sample (vLLM awake, trainer idle), train (vLLM asleep at level 2), sync
  - host RAM at load (rank 0 reads the checkpoint), save and resume (checkpoint.py: each rank its shard)
then whether each phase fits in --gpu-gib and what to change when one does not.

    python train.py --config configs/r1_distill_1.5b.json --plan [--gpu-gib 80]    (train.py's flags apply)
    torchrun --nproc_per_node 8 train.py --config configs/r1_distill_7b.json --plan  (8 processes)
    python plan.py configs/r1_distill_7b.json --world 8 --gpu-gib 80            (this file alone)

The model of memory, per rank (W processes, N parameters, b = bytes of the compute dtype):
  training state   4N/W weights + 4N/W gradients + 8N/W AdamW (all float32, sharded by FSDP2)
  FSDP buffers     two decoder layers unsharded in the compute dtype (the current one, the prefetched
                   one), the root's (embeddings, lm_head, final norm) unsharded from forward to the end
                   of backward, and its gradients unsharded once, in b and in float32, for the reduction
  activations      per token and decoder layer b (8D + 4I + 2 KV hd) bytes, plus 4D for the RMSNorms'
                   float32 copies when b < 4 (measured on transformers 5.19's Qwen2 by counting the
                   tensors autograd saves); with checkpointing b D per layer (its input) plus one
                   layer's full activations, recomputed in its backward
  log-prob path    the last hidden states (b D per token) and three [chunk, V] float32 blocks plus the
                   lm_head's float32 gradient (4 V D) in the backward
  optimizer step   fused AdamW on CUDA (no temporaries); on CPU the single-tensor loop (two
                   temporaries of the largest parameter)
  vLLM             its share of the card = bf16 weights + VLLM_OVERHEAD + KV cache, 2 L KV hd b bytes a
                   token; asleep (level 2) it keeps VLLM_ASLEEP
Figures are estimates of the allocated bytes; bench/update.py prints this file's training-phase figure
beside a measured peak (CPU), bench/gpu_check.py beside the GPU's (torch.cuda.max_memory_allocated).
No paper equation lives here.
"""
import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 2**30
CHUNK = 512  # logprobs.hidden_logprobs' default chunk (tokens per [chunk, V] block)
CUDA_CONTEXT = 0.75 * GIB  # per process: CUDA context, NCCL and cuBLAS workspaces (not torch's allocator)
VLLM_OVERHEAD = 3 * GIB  # vLLM beside weights and KV cache: CUDA graphs, one scheduler step's activations,
#                          the sampler's logits (vLLM logs its own figure at start: "model weights take ...")
VLLM_ASLEEP = 1 * GIB  # what a level-2 sleeping engine keeps (CUDA graph pools, its allocator's slack)
HEADROOM = 0.05  # the share of the card left unplanned (fragmentation)


# ----------------------------------------------------------------------------------------------
# The architecture, from config.json
def find_config(model):
    """The config.json of --model: a local folder's, configs/arch/NAME.json for a hub name org/NAME,
    or the Hugging Face cache's (never downloaded here). OSError, one line, when none is found."""
    if model and os.path.isdir(model):
        path = os.path.join(model, "config.json")
        if os.path.isfile(path):
            return path
        raise OSError(f"{model}: no config.json in this folder")
    local = os.path.join(HERE, "configs", "arch", os.path.basename(model) + ".json")
    if os.path.isfile(local):
        return local
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(model, "config.json")
        if isinstance(cached, str):
            return cached
    except Exception:  # not a hub name, no hub library: say what to do below
        pass
    raise OSError(f"no config.json for {model!r}: pass a local model folder, or copy the model's config.json "
                  f"to configs/arch/{os.path.basename(model) or 'NAME'}.json")


def architecture(config):
    """Sizes of a decoder-only transformer (Qwen2 / Llama family) from its config.json dict."""
    c = config.get("text_config", config)
    D, L, I, V = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    H = c["num_attention_heads"]
    KV = c.get("num_key_value_heads") or H
    hd = c.get("head_dim") or D // H
    tied = bool(c.get("tie_word_embeddings", False))
    bias = c.get("attention_bias", c.get("model_type") == "qwen2")  # Qwen2: q, k, v carry a bias
    attention = D * H * hd + 2 * D * KV * hd + H * hd * D + (H * hd + 2 * KV * hd if bias else 0)
    per_layer = attention + 3 * D * I + 2 * D  # + gate, up, down projections and two RMSNorm weights
    embed = V * D
    params = embed + (0 if tied else V * D) + L * per_layer + D
    return dict(D=D, L=L, I=I, V=V, H=H, KV=KV, hd=hd, tied=tied, per_layer=per_layer, embed=embed,
                root=embed + (0 if tied else V * D) + D, params=params, largest=max(embed, D * I, per_layer // 4))


# ----------------------------------------------------------------------------------------------
# The memory model (bytes)
def activations(a, tokens, b, checkpointing):
    """Bytes autograd keeps for the backward of `tokens` tokens (forward done, backward not begun),
    and the extra of the recomputed layer (checkpointing: one layer's full activations at a time)."""
    layer = tokens * (b * (8 * a["D"] + 4 * a["I"] + 2 * a["KV"] * a["hd"]) + (4 * a["D"] if b < 4 else 0))
    outside = tokens * (b * 2 * a["D"] + (2 * a["D"] if b < 4 else 0))  # embedding output, final norm
    if checkpointing:
        return a["L"] * tokens * b * a["D"] + outside, layer
    return a["L"] * layer + outside, 0


def logprob_path(a, tokens, b, chunk=CHUNK):
    """(saved, backward temporaries) of logprobs.hidden_logprobs on `tokens` tokens."""
    saved = tokens * (b * a["D"] + 8)  # the hidden states it keeps (a copy of the [:, :-1] slice), lse, H
    blocks = min(chunk, tokens) * a["V"] * (8 + b)  # log p and p in float32, dL/dz in b
    grads = 4 * a["V"] * a["D"] + (b * a["V"] * a["D"] if b < 4 else 0) + tokens * b * a["D"]  # lm_head (fp32), hidden
    return saved, blocks + grads


def train_phase(a, tokens, b, checkpointing, world=1, fsdp=True, fused=True, chunk=CHUNK):
    """Bytes of one rank in the update: the resident state and the peak above it, with its parts."""
    N = a["params"]
    state = {"weights": 4 * N / world, "adamw": 8 * N / world}
    grads = 4 * N / world
    act, recompute = activations(a, tokens, b, checkpointing)
    saved, temps = logprob_path(a, tokens, b, chunk)
    buffers = 0
    if fsdp:  # unsharded params: two layers and the root, in b (float32 runs: FSDP2 still all-gathers)
        buffers = b * (2 * a["per_layer"] + a["root"])
    tied_extra = 4 * a["embed"] if a["tied"] else 0  # the embedding's own dense gradient, added to lm_head's
    optimizer = 0 if fused else 2 * 4 * a["largest"] / world
    start = act + recompute + saved + temps  # backward begins: every activation held, the lm_head's blocks
    end = grads + tied_extra + (((b + 4) * a["root"]) if fsdp else 0)  # backward ends: every gradient, the root's reduction
    step = grads + optimizer
    peak = buffers + max(start, end, step)
    parts = {"gradients": grads, "activations": act, "recompute": recompute, "logprob_saved": saved,
             "logprob_backward": temps, "fsdp_buffers": buffers, "optimizer_step": optimizer}
    return {"state": state, "resident": sum(state.values()), "above": peak, "peak": sum(state.values()) + peak,
            "parts": parts}


def vllm_share(a, cfg, gpu, world, b=2):
    """vLLM's share of the card: weights, KV cache (bytes, tokens) and sequences it holds at once."""
    share = cfg["gpu_memory_utilization"] * gpu
    weights = b * a["params"]
    kv = share - weights - VLLM_OVERHEAD
    per_token = 2 * a["L"] * a["KV"] * a["hd"] * b
    seq = cfg["max_prompt_tokens"] + cfg["max_response_tokens"]
    tokens = max(kv, 0) / per_token
    wanted = cfg["prompts_per_step"] * cfg["group_size"] // world
    at_once = int(tokens // seq)
    return dict(share=share, weights=weights, kv=kv, kv_per_token=per_token, kv_tokens=tokens, seq=seq,
                at_once=at_once, wanted=wanted, waves=math.ceil(wanted / at_once) if at_once else math.inf)


def plan(cfg, config, world=1, gpu_gib=80.0, bf16=True, on_gpu=True):
    """The whole plan as a dict (bytes) plus its report text (`text`). cfg: train.py's settings (a dict
    or the Config); config: the model's config.json as a dict."""
    cfg = cfg if isinstance(cfg, dict) else vars(cfg)
    a = architecture(config)
    b = 2 if bf16 else 4
    gpu = gpu_gib * GIB
    tokens = cfg["micro_batch_tokens"]
    train = train_phase(a, tokens, b, cfg["grad_checkpointing"], world, fsdp=True, fused=on_gpu)
    other = train_phase(a, tokens, b, not cfg["grad_checkpointing"], world, fsdp=True, fused=on_gpu)
    v = vllm_share(a, cfg, gpu, world)
    largest = 2 * a["largest"]  # one gathered parameter in bf16 (the sync, the HF export)
    phases = {"sample": CUDA_CONTEXT + train["resident"] + v["share"],
              "train": CUDA_CONTEXT + train["peak"] + VLLM_ASLEEP,
              "sync": CUDA_CONTEXT + train["resident"] + max(v["weights"] + VLLM_OVERHEAD + largest, v["share"])}
    shard = 12 * a["params"] / world  # float32 weights + AdamW moments of one rank: its checkpoint shard
    host = {"load: rank 0 reads the checkpoint": (2 if bf16 else 4) * a["params"],
            "save: at most, per rank": shard + largest, "resume: at most, per rank": shard}
    usable = (1 - HEADROOM) * gpu
    out = dict(arch=a, train=train, other=other, vllm=v, phases=phases, host=host, usable=usable, world=world,
               gpu=gpu, advice=advice(a, cfg, train, v, phases, usable, gpu, world, b, on_gpu))
    out["text"] = report(cfg, out, b)
    return out


def advice(a, cfg, train, v, phases, usable, gpu, world, b, on_gpu):
    """What to change, one line each: phases that do not fit, and sampling in waves."""
    lines = []
    train_fixed = CUDA_CONTEXT + VLLM_ASLEEP
    least = (v["weights"] + VLLM_OVERHEAD + v["kv_per_token"] * v["seq"]) / gpu  # vLLM with room for one sequence

    def fits(w):  # the update fits, and what the trainer keeps while sampling leaves vLLM its least share
        t = train_phase(a, cfg["micro_batch_tokens"], b, cfg["grad_checkpointing"], w, fused=on_gpu)
        return train_fixed + t["peak"] <= usable and (usable - CUDA_CONTEXT - t["resident"]) / gpu >= least

    most = (usable - CUDA_CONTEXT - train["resident"]) / gpu  # the largest share the trainer's resident state leaves
    more = next((w for w in range(world + 1, 4097) if fits(w)), None)
    if phases["train"] > usable:
        per_token = max(train["above"] / cfg["micro_batch_tokens"], 1)
        budget = int((usable - train_fixed - train["resident"]) / per_token) // 1024 * 1024
        if not cfg["grad_checkpointing"]:
            lines.append("train: turn on --grad-checkpointing (activations of each layer recomputed in backward)")
        if budget >= cfg["max_prompt_tokens"] + cfg["max_response_tokens"]:
            lines.append(f"train: lower --micro-batch-tokens to {budget} or less (the loss is the same token-mean)")
    if most < least or (phases["train"] > usable and not lines):
        lines.append(f"more GPUs: {more or 'over 4096'} processes (FSDP shards the training state; each rank then "
                     f"keeps less of it while vLLM samples)")
    elif phases["sample"] > usable or phases["sync"] > usable:
        lines.append(f"sample: lower --gpu-memory-utilization to {most:.2f} (what the trainer's resident state "
                     "leaves of the card)")
    elif v["share"] < least * gpu:
        lines.append(f"vLLM: its share holds no sequence at the response limit: raise --gpu-memory-utilization to "
                     f"{least:.2f}-{most:.2f}")
    elif v["at_once"] < v["wanted"]:
        lines.append(f"vLLM: {v['at_once']} of this rank's {v['wanted']} sequences fit at once at the response limit "
                     f"({v['waves']} waves if all ran that long); --gpu-memory-utilization can go up to {most:.2f}")
    return lines


def report(cfg, p, b):
    a, t, o, v = p["arch"], p["train"], p["other"], p["vllm"]
    g = lambda x: f"{x / GIB:6.1f} GiB"  # noqa: E731
    ck = cfg["grad_checkpointing"]
    lines = [f"memory plan per rank: {a['params'] / 1e9:.2f}B parameters (hidden {a['D']}, {a['L']} layers, "
             f"{a['H']} heads / {a['KV']} KV heads, vocab {a['V']}{', tied' if a['tied'] else ''}), "
             f"{p['world']} process(es), {'bf16' if b == 2 else 'fp32'} compute, {p['gpu'] / GIB:.0f} GiB per GPU",
             "training state (FSDP2 shards, float32)",
             f"  weights {g(t['state']['weights'])} | gradients {g(t['parts']['gradients'])} | AdamW {g(t['state']['adamw'])}",
             f"micro-batch of {cfg['micro_batch_tokens']} tokens",
             f"  activations, checkpointing {'on ' if ck else 'off'} {g(t['parts']['activations'] + t['parts']['recompute'])}"
             f"   ({'off' if ck else 'on '}: {g(o['parts']['activations'] + o['parts']['recompute'])})",
             f"  log-prob path: saved {g(t['parts']['logprob_saved'])}, backward blocks {g(t['parts']['logprob_backward'])}",
             f"  FSDP buffers (unsharded layers, root) {g(t['parts']['fsdp_buffers'])}",
             f"vLLM at --gpu-memory-utilization {cfg['gpu_memory_utilization']}: {g(v['share'])} = weights {g(v['weights'])}"
             f" + overhead {g(VLLM_OVERHEAD)} + KV cache {g(max(v['kv'], 0))}",
             f"  KV cache {v['kv_tokens'] / 1e3:,.0f}k tokens ({v['kv_per_token'] / 1024:.0f} KiB each): {v['at_once']} "
             f"sequences of {v['seq']} at once; this rank samples {v['wanted']} per step",
             "peak per phase (GPU)"]
    for name, what in (("sample", "vLLM awake, trainer idle"), ("train", "update, vLLM asleep (level 2)"),
                       ("sync", "weights woken and pushed, then the KV cache")):
        verdict = "fits" if p["phases"][name] <= p["usable"] else "DOES NOT FIT"
        lines.append(f"  {name:6s} {g(p['phases'][name])}  {verdict:12s} ({what})")
    lines.append("host RAM: " + " | ".join(f"{k} {g(x).strip()}" for k, x in p["host"].items()) +
                 " (checkpoint.py: each rank its own shard, one full parameter at a time)")
    fits = all(x <= p["usable"] for x in p["phases"].values())
    lines.append(f"verdict: {'fits' if fits else 'DOES NOT FIT'} in {p['usable'] / GIB:.0f} GiB per GPU (of "
                 f"{p['gpu'] / GIB:.0f}; {100 * HEADROOM:.0f}% kept free){'; to change:' if not fits else ''}")
    lines += ["  " + x for x in p["advice"]]
    return "\n".join(lines)


def for_train(cfg, world):
    """`train.py --plan`: the report for train.py's settings `cfg` on `world` processes (bf16 unless
    --precision fp32); the model's config.json found by find_config (the embedded model: its cache)."""
    model = cfg.model or os.path.join(HERE, cfg.tiny_dir)
    try:
        with open(find_config(model)) as f:
            config = json.load(f)
    except OSError as e:
        hint = "" if cfg.model else " (run `python train.py` once: it builds the embedded model)"
        raise SystemExit(f"error: --plan: {e}{hint}") from None
    return plan(cfg, config, world, cfg.gpu_gib, bf16=cfg.precision != "fp32")["text"]


def main(argv=None):
    """python plan.py CONFIG.json [--world N] [--gpu-gib G]: the plan of a train.py --config file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a train.py --config JSON file (configs/*.json)")
    parser.add_argument("--world", type=int, default=1, help="processes (GPUs) in all (default 1)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        cfg = json.load(f)
    defaults = dict(grad_checkpointing=True, gpu_memory_utilization=0.4)
    cfg = {**defaults, **cfg}
    try:
        with open(find_config(cfg["model"])) as f:
            config = json.load(f)
    except OSError as e:
        sys.exit(f"error: {e}")
    print(plan(cfg, config, args.world, args.gpu_gib)["text"])


if __name__ == "__main__":
    main()
