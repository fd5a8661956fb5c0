"""train.py: the whole RLVR loop with the MASPO objective (arXiv 2602.17550), FSDP2-sharded.

One step = one rollout batch, as numbered stages in `train()`:
  1. pick prompts    this rank's shard of `prompts_per_step` questions
  2. sample          G completions each with the colocated sampler (rollout.py: vLLM, or HF generate)
  3. verify          reward R in {0, 1} per completion (verify.py, in parallel, time-bounded)
  4. advantages      A_i = (R_i - mean R) / (std R + eps) per group (maspo.group_advantages)
  5. old log-probs   log pi_old of every response token, from the training model without grad
  6. update          epochs x shuffled mini-batches of the policy loss (maspo.policy_loss), micro-batch
                     gradient accumulation, grad clipping. Several updates per rollout batch is the
                     default on purpose: with ONE update, rho = pi_theta / pi_old = 1 everywhere and
                     MASPO (like every trust-region method) reduces to plain policy gradient.
  7. sync            push the new weights into the sampler
  8. log             one metrics line (console + OUT/metrics.jsonl), decoded rollouts to OUT/rollouts/
  9. eval / save     held-out accuracy; atomic checkpoints (HF format + optimizer/scheduler/RNG/step)

Run it
  laptop (CPU, the embedded default: a tiny Qwen2 model learns arithmetic; ~2 min on 2 cores)
      python train.py
  2 CPU processes (FSDP over gloo)
      torchrun --nproc_per_node 2 train.py --steps 2
  one GPU (bf16, vLLM colocated)
      python train.py --config configs/r1_distill_1.5b.json --train-data dapo_math_17k.jsonl --eval-data math500.jsonl
  one node of 8 GPUs / several nodes
      torchrun --nproc_per_node 8 train.py --config configs/r1_distill_1.5b.json ...
      torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py ...
`python train.py --help` lists every setting with its paper symbol and default.

Where we deviate from the authors' verl set-up (reasons in the comments at each place):
  1. Old log-probs come from the training model (stage 5), never from the sampler; their gap to the
     sampler's log-probs is logged as `logp_gap` (they drift apart in bf16).
  2. Rewards that time out in the verifier count as 0 and are counted (`verify_timeouts`).
  3. A non-finite loss or gradient norm skips that optimizer update (counted in `skipped_updates`).
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import maspo
import rollout
import tiny
import verify
from maspo import LossConfig

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Config:
    # --- model and data
    model: str = ""  # HF hub name or local path; "" = the embedded tiny model (built and warm-started once, cached)
    train_data: str = ""  # JSONL / JSON / parquet / HF dataset name; "" = synthetic arithmetic (train split)
    eval_data: str = ""  # held-out problems, same formats; "" = synthetic arithmetic test split (embedded default only)
    prompt_key: str = ""  # field holding the question ("" = try problem, question, prompt, ...)
    answer_key: str = ""  # field holding the reference answer ("" = try answer, final_answer, ...)
    instruction: str = "auto"  # appended to each question; auto = the \boxed{} instruction, none for the tiny model
    # --- RL (symbols of PAPER.md)
    steps: int = 150  # RL steps; one rollout batch each
    prompts_per_step: int = 16  # prompts per rollout batch, all ranks together
    group_size: int = 8  # G: samples per prompt
    mini_batch_size: int = 32  # sequences per optimizer update; (prompts_per_step * G) / this = updates per epoch
    micro_batch_size: int = 32  # sequences per forward/backward on one rank (gradient accumulation)
    epochs: int = 1  # passes over each rollout batch (PPO epochs)
    lr: float = 1e-4  # AdamW learning rate (measured for the tiny model; ~1e-6 for 1.5B-7B models)
    lr_schedule: str = "constant"  # constant | cosine (both after warmup_steps of linear warm-up)
    warmup_steps: int = 0  # linear learning-rate warm-up, in optimizer updates
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    max_prompt_tokens: int = 64  # longer prompts are dropped from the data (and counted)
    max_response_tokens: int = 16  # sampling budget per completion
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling
    scale_adv_by_std: bool = True  # A = (R - mean) / (std + eps); off = Dr. GRPO's A = R - mean
    drop_zero_signal: bool = False  # DAPO dynamic sampling: drop all-equal-reward groups before the update
    verify_timeout: float = 1.0  # seconds per verification; a timeout scores 0
    # --- evaluation, checkpoints, logging
    eval_every: int = 25  # held-out evaluation every N steps (0 = only before and after)
    eval_k: int = 8  # samples per held-out problem for Avg@k / Pass@k
    eval_temperature: float = 1.0  # sampling temperature of the held-out Avg@k (greedy accuracy is also logged)
    eval_limit: int = 0  # use at most N held-out problems (0 = all)
    save_every: int = 50  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    rollouts_every: int = 10  # dump a few decoded rollouts every N steps
    out: str = "runs/default"  # output folder: metrics.jsonl, rollouts/, checkpoints/
    resume: bool = False  # continue from the latest complete checkpoint in `out`
    wandb: str = ""  # wandb project name (needs `pip install wandb`); "" = off
    # --- system
    sampler: str = "auto"  # auto (vLLM if importable) | vllm | hf
    precision: str = "auto"  # auto = bf16 on GPU, float32 on CPU | bf16 | fp32
    grad_checkpointing: bool = False  # activation checkpointing (saves GPU memory)
    gpu_memory_utilization: float = 0.3  # share of GPU memory for vLLM (weights + KV cache)
    seed: int = 0  # seeds model building, data order and sampling
    # --- the embedded tiny model's warm start (used only when model is "")
    tiny_dir: str = ".cache/tiny-arith"  # where the embedded tiny model is built and cached (relative: to train.py)
    warm_start_steps: int = 1000  # at most this many supervised steps on arithmetic before RL
    warm_start_lr: float = 1e-3  # supervised learning rate (3e-3 plateaued at 10-20% for some seeds)
    warm_start_target: float = 0.3  # stop once greedy accuracy on 256 train problems reaches this (0 = all steps)
    # --- the policy loss: maspo.LossConfig (loss, sigma_base, alpha, ...), flags of its own
    loss: LossConfig = field(default_factory=LossConfig)


# ----------------------------------------------------------------------------------------------
# Config from command line and --config file
def _field_comments(cls):
    """The one-line comment of each dataclass field, used as its --help text."""
    return dict(re.findall(r"^\s+(\w+):[^\n#]*#\s*(.*)$", inspect.getsource(cls), re.M))


def _parser(suppress_defaults=False):
    parser = argparse.ArgumentParser(description="MASPO RLVR training (train.py)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="JSON file of settings (flat, or with a nested 'loss' object); flags override it")
    for cls in (Config, LossConfig):
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            if f.name == "loss" and cls is Config:
                continue  # the nested LossConfig: its own fields become flags (--loss names the objective)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kwargs = dict(action=argparse.BooleanOptionalAction) if type(default) is bool else dict(type=type(default))
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name,
                                default=argparse.SUPPRESS if suppress_defaults else default,
                                help=comments.get(f.name, "").replace("%", "%%"), **kwargs)
    return parser


def parse_args(argv=None):
    """Config from defaults < --config JSON < command-line flags. LossConfig's fields are flags too."""
    args = vars(_parser().parse_args(argv))
    given = vars(_parser(suppress_defaults=True).parse_args(argv))  # only the flags actually typed
    settings = {k: v for k, v in args.items() if k != "config"}
    if args["config"]:
        with open(args["config"]) as f:
            from_file = json.load(f)
        if isinstance(from_file.get("loss"), dict):
            from_file.update(from_file.pop("loss"))
        settings.update(from_file)
    settings.update({k: v for k, v in given.items() if k != "config"})
    return make_config(settings)


def make_config(settings):
    """Config from a flat dict (unknown names are an error, not ignored)."""
    loss_names = {f.name for f in dataclasses.fields(LossConfig)}
    main_names = {f.name for f in dataclasses.fields(Config)} - {"loss"}
    unknown = set(settings) - loss_names - main_names
    if unknown:
        raise SystemExit(f"config: unknown setting(s) {sorted(unknown)}; see python train.py --help")
    loss = LossConfig(**{k: v for k, v in settings.items() if k in loss_names})
    return Config(loss=loss, **{k: v for k, v in settings.items() if k in main_names})


# ----------------------------------------------------------------------------------------------
# Distributed set-up: one path for 1 process (plain `python`) and N processes (torchrun)
def setup_distributed():
    """Init a process group (a group of one without torchrun), return (rank, world, device)."""
    if "RANK" not in os.environ:  # plain python: a group of one, so FSDP and collectives work unchanged
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def print0(*args):
    if dist.get_rank() == 0:
        tqdm.write(" ".join(str(a) for a in args))


# ----------------------------------------------------------------------------------------------
# The embedded default: a tiny Qwen2 model, warm-started on arithmetic (built once, cached)
def prepare_tiny_model(cfg):
    """Path of the warm-started tiny model; built by rank 0 unless the cache matches these settings."""
    path = os.path.join(HERE, cfg.tiny_dir)  # an absolute tiny_dir stays as it is
    recipe = {"steps": cfg.warm_start_steps, "lr": cfg.warm_start_lr, "target": cfg.warm_start_target,
              "seed": cfg.seed, "version": 2}
    marker = os.path.join(path, "warm_start.json")
    if dist.get_rank() == 0:
        cached = os.path.exists(marker) and json.load(open(marker)) == recipe
        if not cached:
            shutil.rmtree(path, ignore_errors=True)
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tiny.build_tiny_model(tmp, seed=cfg.seed)
            warm_start(tmp, recipe)
            with open(os.path.join(tmp, "warm_start.json"), "w") as f:
                json.dump(recipe, f)
            os.replace(tmp, path)  # atomic: a killed warm start never leaves a model that looks finished
    dist.barrier()  # the other ranks wait for rank 0's model
    return path


def warm_start(path, recipe, batch_size=64, check_every=25):
    """Supervised pass on the arithmetic train split: completion = "\\boxed{answer}" + EOS.

    It stops early once greedy accuracy on 256 training problems reaches recipe["target"]: the model
    then starts RL at a known, modest accuracy with room to improve, whatever the seed or the thread
    count (a fixed step count at a fixed lr landed anywhere from 3% to 95% held-out across seeds,
    because the task is learned in sudden jumps). Greedy accuracy is measured as teacher-forced exact
    match (every answer token is the argmax), which equals greedy decoding's accuracy and costs one
    forward pass. The held-out test split is never looked at."""
    from transformers import AutoModelForCausalLM
    tok = tiny.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"])
    problems = data.arithmetic_problems("train", seed=recipe["seed"])
    rng = random.Random(recipe["seed"])

    def encode(batch):
        prompts = [data.prompt_ids(tok, p["question"], instruction="") for p in batch]
        answers = [tok.encode(data.arithmetic_completion(p["answer"]), add_special_tokens=False) + [tok.eos_token_id]
                   for p in batch]
        return pad_batch(prompts, answers, tok.pad_token_id)  # (B, T), (B, T), (B, T-1)

    probe_ids, probe_attn, probe_mask = encode(problems[:256])

    def train_accuracy():
        with torch.no_grad():
            logits = model(input_ids=probe_ids, attention_mask=probe_attn).logits[:, :-1]
        hit = (logits.argmax(-1) == probe_ids[:, 1:]) | (probe_mask == 0)
        return hit.all(1).float().mean().item()

    bar = tqdm(range(recipe["steps"]), desc="warm start (supervised)", disable=dist.get_rank() != 0)
    for step in bar:
        ids, attn, mask = encode([rng.choice(problems) for _ in range(batch_size)])
        logp = maspo.token_logprobs(model(input_ids=ids, attention_mask=attn).logits[:, :-1], ids[:, 1:])  # (B, T-1)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if recipe["target"] and (step + 1) % check_every == 0:
            acc = train_accuracy()
            bar.set_postfix(train_acc=f"{acc:.2f}")
            if acc >= recipe["target"]:
                break
    bar.close()
    model.save_pretrained(path)
    if recipe["target"]:
        print(f"warm start: {step + 1} steps, greedy accuracy on 256 train problems {train_accuracy():.3f}")


def pad_batch(prompts, completions, pad_id):
    """Right-padded prompt+completion ids (B, T), their attention mask (B, T), and the response mask
    (B, T-1): mask[b, t] = 1 where token t+1 is a completion token (whose log-prob the loss uses)."""
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), length), dtype=torch.long)
    mask = torch.zeros((len(prompts), length - 1))
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, :len(p) + len(c)] = torch.tensor(p + c)
        attn[b, :len(p) + len(c)] = 1
        mask[b, len(p) - 1:len(p) + len(c) - 1] = 1.0
    return ids, attn, mask


# ----------------------------------------------------------------------------------------------
# Model, optimizer, checkpoints
def load_policy(path, cfg, device):
    """HF causal LM in float32 master weights, each decoder layer and the root sharded with FSDP2."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    # bf16 compute, float32 master weights and gradient reductions; log-probs and loss are float32 (maspo.py)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def full_weights(model):
    """(name, full tensor) pairs of the sharded model, one at a time (each .full_tensor() is an
    all-gather: every rank must iterate them in the same order)."""
    for name, tensor in model.state_dict().items():
        yield name, (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor)


def lr_factor(update, cfg, total_updates):
    """Multiplier of cfg.lr at optimizer update `update`: linear warm-up, then constant or cosine."""
    if update < cfg.warmup_steps:
        return (update + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (update - cfg.warmup_steps) / max(1, total_updates - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def latest_checkpoint(out):
    """The newest complete checkpoint folder (a .tmp folder is an interrupted save and never counts)."""
    root = os.path.join(out, "checkpoints")
    done = sorted(d for d in os.listdir(root) if re.fullmatch(r"step_\d+", d)) if os.path.isdir(root) else []
    done = [d for d in done if os.path.exists(os.path.join(root, d, "trainer_state.pt"))]
    return os.path.join(root, done[-1]) if done else None


def save_checkpoint(cfg, step, model, optimizer, scheduler, tokenizer):
    """HF-format model + trainer state, written to a temp folder then renamed (atomic)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)  # collective: gathers the shards on rank 0
    if dist.get_rank() == 0:
        root = os.path.join(cfg.out, "checkpoints")
        final = os.path.join(root, f"step_{step:06d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=model_sd)
        tokenizer.save_pretrained(tmp)
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        torch.save({"step": step, "optimizer": optim_sd, "scheduler": scheduler.state_dict(), "rng": rng,
                    "config": asdict(cfg)}, os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        old = sorted(d for d in os.listdir(root) if re.fullmatch(r"step_\d+", d))[:-cfg.keep_checkpoints]
        for d in old:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    dist.barrier()  # nobody reads or overwrites the checkpoint before it is complete


def load_trainer_state(ckpt, model, optimizer, scheduler):
    """Optimizer, scheduler and RNG state of a checkpoint; returns its step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    return state["step"]


# ----------------------------------------------------------------------------------------------
# Log-probs and the policy update
def micro_slice(batch, idx):
    """Rows `idx` of the rollout batch, trimmed to their longest sequence (less padding to compute)."""
    length = int(batch["attn"][idx].sum(1).max())
    return {k: (v[idx, :length] if k in ("ids", "attn") else v[idx, :length - 1] if v.dim() == 2 else v[idx])
            for k, v in batch.items()}


def forward_logprobs(model, mb, with_entropy=False):
    """log pi(o_t) of each next token (B, T-1) and optionally the policy entropy per position."""
    logits = model(input_ids=mb["ids"], attention_mask=mb["attn"]).logits[:, :-1]  # (B, T-1, V)
    logp = maspo.token_logprobs(logits, mb["ids"][:, 1:])  # (B, T-1), float32
    return logp, (maspo.entropy(logits) if with_entropy else None)


@torch.no_grad()
def old_logprobs(model, batch, micro_batch_size, key="old_logp"):
    """Stage 5: log pi_old from the training model, no grad (plus entropy, for logs and Entropy-Adv)."""
    n, width = batch["mask"].shape
    batch[key] = torch.zeros(n, width)
    batch["entropy"] = batch.get("entropy", torch.zeros(n, width))
    for start in range(0, n, micro_batch_size):
        idx = torch.arange(start, min(n, start + micro_batch_size))
        mb = micro_slice(batch, idx)
        logp, ent = forward_logprobs(model, mb, with_entropy=key == "old_logp")
        batch[key][idx, :logp.shape[1]] = logp.float().cpu()
        if ent is not None:
            batch["entropy"][idx, :ent.shape[1]] = ent.float().cpu()


def all_reduce(values, op=dist.ReduceOp.SUM):
    """Reduce a list of floats over ranks (one collective for the whole list)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def update_policy(model, optimizer, scheduler, batch, cfg, world, generator):
    """Stage 6: epochs x shuffled mini-batches; each mini-batch is one optimizer update, accumulated
    over micro-batches. Returns averaged loss metrics."""
    device = next(model.parameters()).device
    n = batch["ids"].shape[0]  # this rank's sequences
    per_rank = cfg.mini_batch_size // world
    # Every rank must run the same number of forwards (FSDP collectives): agree on the largest count
    n_mini = int(all_reduce([math.ceil(n / per_rank)], dist.ReduceOp.MAX)[0])
    n_micro = math.ceil(per_rank / cfg.micro_batch_size)
    sums, low, high, skipped, norms = {}, [], [], 0, []
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=generator)
        for j in range(n_mini):
            mb_idx = perm[j * per_rank:(j + 1) * per_rank]
            # Global token / sequence counts of this mini-batch, so that token-mean is over all ranks'
            # tokens; divided by world because FSDP averages (not sums) gradients over ranks
            tokens, seqs = all_reduce([float(batch["mask"][mb_idx].sum()), float(len(mb_idx))])
            if tokens == 0:
                continue  # nothing to learn from on any rank (all dropped): no update
            for i in range(n_micro):
                idx = mb_idx[i * cfg.micro_batch_size:(i + 1) * cfg.micro_batch_size]
                if len(idx) == 0:  # this rank ran out: a zero-weight forward keeps FSDP's collectives matched
                    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
                    (model(input_ids=ids).logits.sum() * 0.0).backward()
                    continue
                mb = {k: v.to(device) for k, v in micro_slice(batch, idx).items()}
                logp, _ = forward_logprobs(model, mb)
                loss, metrics = maspo.policy_loss(
                    logp, mb["old_logp"], mb["adv"], mb["mask"], cfg.loss, ref_logp=mb.get("ref_logp"),
                    entropy=mb["entropy"], num_tokens=tokens / world, num_seqs=seqs / world)
                loss.backward()
                weight = float(mb["mask"].sum())
                for k, v in metrics.items():
                    if k.endswith("_min"):
                        low.append((k, v))
                    elif k.endswith("_max"):
                        high.append((k, v))
                    else:
                        sums[k] = (sums.get(k, (0.0, 0.0))[0] + v * weight, sums.get(k, (0.0, 0.0))[1] + weight)
            params = [p for p in model.parameters() if p.grad is not None]
            total = torch.nn.utils.get_total_norm([p.grad for p in params])  # global over shards
            grad_norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
            if math.isfinite(grad_norm):  # the norm is global, so every rank takes the same branch
                # clip only now: scaling NaN gradients in place would poison FSDP's persistent buffers
                torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, total)
                optimizer.step()
                norms.append(grad_norm)
            else:  # a non-finite loss or gradient: skip this update, keep training
                skipped += 1
            model.zero_grad(set_to_none=True)  # not optimizer.zero_grad: with FSDP2 (torch 2.13) only this
            # cleared NaN gradients for the next update (tests/test_train.py::test_nan_loss_skips_the_update)
            scheduler.step()
    keys = sorted(sums)
    totals = all_reduce([sums[k][0] for k in keys] + [sums[k][1] for k in keys])  # token-weighted over ranks
    out = {k: totals[i] / max(totals[len(keys) + i], 1e-9) for i, k in enumerate(keys)}
    for pairs, op, pick in ((low, dist.ReduceOp.MIN, min), (high, dist.ReduceOp.MAX, max)):
        names = sorted({k for k, _ in pairs})
        local = [pick([v for k2, v in pairs if k2 == k]) for k in names]
        out.update(zip(names, all_reduce(local, op) if names else []))
    out.update(grad_norm=sum(norms) / max(len(norms), 1), skipped_updates=skipped, updates=len(norms))
    return out


# ----------------------------------------------------------------------------------------------
# Data and evaluation helpers
def tokenize_problems(problems, cfg, tokenizer, instruction):
    """Training problems with their prompt ids; over-long prompts dropped and counted."""
    for p in problems:
        p["ids"] = data.prompt_ids(tokenizer, p["question"], instruction)
    kept = [p for p in problems if len(p["ids"]) <= cfg.max_prompt_tokens]
    print0(f"train problems: {len(kept)} kept, {len(problems) - len(kept)} dropped as longer than "
           f"--max-prompt-tokens {cfg.max_prompt_tokens}")
    if not kept:
        raise SystemExit(f"no training problem fits in --max-prompt-tokens {cfg.max_prompt_tokens}: raise it")
    return kept


def pick_prompts(problems, step, cfg, rank, world):
    """Stage 1: the prompts of `step` for this rank: a fixed shuffle per epoch over the data, so the
    data position is a function of the step (resume-safe)."""
    per_rank = cfg.prompts_per_step // world
    start = (step - 1) * cfg.prompts_per_step + rank * per_rank
    chosen = []
    for i in range(start, start + per_rank):
        epoch, pos = divmod(i, len(problems))
        order = list(range(len(problems)))
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
        chosen.append(problems[order[pos]])
    return chosen


def held_out(sampler, tokenizer, problems, cfg, instruction, rank, world):
    """Greedy accuracy and Avg@k / Pass@k (at eval_temperature) on the held-out problems, sharded over
    ranks; the per-problem correct counts are gathered so every rank returns the global numbers."""
    from eval import evaluate, pass_at_k
    local = problems[rank::world]
    kw = dict(max_tokens=cfg.max_response_tokens, instruction=instruction, progress=False)
    greedy = evaluate(sampler, tokenizer, local, k=1, temperature=0.0, top_p=1.0, seed=cfg.seed, **kw)
    sampled = evaluate(sampler, tokenizer, local, k=cfg.eval_k, temperature=cfg.eval_temperature, top_p=1.0,
                       seed=cfg.seed + 1, **kw)
    mine = [(r["correct"], s["correct"]) for r, s in zip(greedy["results"], sampled["results"])]
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)  # each rank scored its own shard: collect all counts
    counts = [c for part in everyone for c in part]
    k = cfg.eval_k
    return {"acc": sum(g for g, _ in counts) / len(counts),
            f"avg_at_{k}": sum(s for _, s in counts) / (k * len(counts)),
            f"pass_at_{k}": sum(pass_at_k(k, s, k) for _, s in counts) / len(counts)}


def dump_rollouts(cfg, step, problems, samples, rewards, how_many=4):
    """A few decoded rollouts with their rewards, for reading what the policy does."""
    folder = os.path.join(cfg.out, "rollouts")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"step_{step:06d}.jsonl"), "w") as f:
        for p, group, rs in list(zip(problems, samples, rewards))[:how_many]:
            for s, r in zip(group, rs):
                f.write(json.dumps({"question": p["question"], "answer": p["answer"], "completion": s.text,
                                    "extracted": verify.extract_answer(s.text), "reward": r,
                                    "finish_reason": s.finish_reason}) + "\n")


# ----------------------------------------------------------------------------------------------
# The loop
def train(cfg):
    rank, world, device = setup_distributed()
    for name, value in (("prompts_per_step", cfg.prompts_per_step), ("mini_batch_size", cfg.mini_batch_size)):
        if value % world:
            raise SystemExit(f"--{name.replace('_', '-')} {value} must be divisible by the number of processes ({world})")
    torch.manual_seed(cfg.seed)
    embedded = not cfg.model
    keys = (cfg.prompt_key or None, cfg.answer_key or None)
    try:  # data first: a malformed file stops the run before any model is loaded
        problems = data.load_problems(cfg.train_data, *keys) if cfg.train_data else data.arithmetic_problems("train", seed=cfg.seed)
        eval_problems = (data.load_problems(cfg.eval_data, *keys, limit=cfg.eval_limit or None) if cfg.eval_data
                         else data.arithmetic_problems("test", seed=cfg.seed)[:cfg.eval_limit or None] if embedded else [])
    except data.DataError as e:
        raise SystemExit(f"data error: {e}") from None
    base = prepare_tiny_model(cfg) if embedded else cfg.model
    instruction = "" if embedded and cfg.instruction == "auto" else (
        data.INSTRUCTION if cfg.instruction == "auto" else cfg.instruction)
    tokenizer = tiny.load_tokenizer(base)
    problems = tokenize_problems(problems, cfg, tokenizer, instruction)

    # Resume: weights from the latest complete checkpoint, trainer state below
    ckpt = latest_checkpoint(cfg.out) if cfg.resume else None
    if cfg.resume and ckpt is None:
        print0(f"--resume: no complete checkpoint in {cfg.out}/checkpoints, starting from step 0")
    model = load_policy(ckpt or base, cfg, device)
    ref_model = load_policy(base, cfg, device) if cfg.loss.kl_coef > 0 else None  # frozen pi_ref for the KL term
    updates_per_step = cfg.epochs * math.ceil(cfg.prompts_per_step * cfg.group_size / cfg.mini_batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: lr_factor(u, cfg, cfg.steps * updates_per_step))
    start = load_trainer_state(ckpt, model, optimizer, scheduler) if ckpt else 0

    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        rows = [json.loads(line) for line in open(metrics_path)] if start and os.path.exists(metrics_path) else []
        if not start and os.path.exists(metrics_path):
            print0(f"starting a fresh run in {cfg.out} (its previous metrics are replaced; --resume continues a run)")
            shutil.rmtree(os.path.join(cfg.out, "checkpoints"), ignore_errors=True)
        with open(metrics_path, "w") as f:  # on resume: keep exactly the steps the checkpoint covers
            f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= start)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    wandb_run = None
    if cfg.wandb and rank == 0:
        try:
            import wandb
        except ImportError:
            raise SystemExit("--wandb needs the wandb package: pip install wandb") from None
        wandb_run = wandb.init(project=cfg.wandb, config=asdict(cfg))

    def log(row):
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if wandb_run:
                wandb_run.log(row, step=row["step"])

    sampler = rollout.make_sampler(
        ckpt or base, tokenizer, backend=cfg.sampler, max_model_len=cfg.max_prompt_tokens + cfg.max_response_tokens,
        seed=cfg.seed + rank, dtype="bfloat16" if device.type == "cuda" else "float32",
        gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=device.type == "cuda")
    print0(f"sampler: {sampler.backend} | processes: {world} | device: {device} | loss: {cfg.loss.loss} | "
           f"{updates_per_step} optimizer updates per rollout batch")
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + start)
    results = {}
    if eval_problems and start == 0:
        results["before"] = held_out(sampler, tokenizer, eval_problems, cfg, instruction, rank, world)
        log({"step": 0, **results["before"]})
        print0("held-out before RL:", fmt(results["before"]))

    stage_times = {}
    for step in tqdm(range(start + 1, cfg.steps + 1), desc="RL steps", disable=rank != 0,
                     initial=start, total=cfg.steps):
        t0 = time.time()
        times = {}
        # ---- 1. pick prompts (this rank's shard)
        batch_problems = pick_prompts(problems, step, cfg, rank, world)
        # ---- 2. sample G completions per prompt
        sampler.wake_up()
        samples = sampler.generate([p["ids"] for p in batch_problems], n=cfg.group_size,
                                   max_tokens=cfg.max_response_tokens, temperature=cfg.temperature,
                                   top_p=cfg.top_p, seed=cfg.seed * 100_003 + step * 101 + rank)
        sampler.sleep()  # frees the KV cache (GPU) while the policy trains; no-op on CPU
        times["sample"] = time.time() - t0
        # ---- 3. verify: reward R in {0, 1}
        t = time.time()
        flat = [s for group in samples for s in group]  # G per prompt, in prompt order
        golds = [p["answer"] for p in batch_problems for _ in range(cfg.group_size)]
        rewards, timeouts = verify.reward_batch([s.text for s in flat], golds, timeout=cfg.verify_timeout)
        times["verify"] = time.time() - t
        # ---- 4. group advantages A (Eq. in maspo.group_advantages)
        R = torch.tensor(rewards, dtype=torch.float32)  # (P*G,)
        A = maspo.group_advantages(R, cfg.group_size, scale_by_std=cfg.scale_adv_by_std)  # (P*G,)
        zero_signal = (R.view(-1, cfg.group_size).std(1, unbiased=False) == 0)  # (P,) groups with no signal
        keep = ~zero_signal.repeat_interleave(cfg.group_size) if cfg.drop_zero_signal else torch.ones_like(R, dtype=torch.bool)
        kept = [s for s, k in zip(flat, keep) if k]
        batch = {}
        if kept:
            batch["ids"], batch["attn"], batch["mask"] = pad_batch([s.prompt_ids for s in kept],
                                                                   [s.completion_ids for s in kept], tokenizer.pad_token_id)
        else:  # everything dropped on this rank: an empty batch (update_policy keeps ranks in step)
            batch.update(ids=torch.zeros((0, 2), dtype=torch.long), attn=torch.zeros((0, 2), dtype=torch.long),
                         mask=torch.zeros((0, 1)))
        batch["adv"] = A[keep]
        batch["sampler_logp"] = torch.zeros_like(batch["mask"])
        for b, s in enumerate(kept):
            first = len(s.prompt_ids) - 1
            batch["sampler_logp"][b, first:first + len(s.logprobs)] = torch.tensor(s.logprobs)
        # ---- 5. old log-probs from the training model (no grad), and pi_ref for the KL term
        t = time.time()
        model.eval()
        old_logprobs(model, batch, cfg.micro_batch_size)
        if ref_model is not None:
            old_logprobs(ref_model, batch, cfg.micro_batch_size, key="ref_logp")
        times["old_logp"] = time.time() - t
        # ---- 6. policy update: epochs x mini-batches of maspo.policy_loss
        t = time.time()
        model.train()
        loss_metrics = update_policy(model, optimizer, scheduler, batch, cfg, world, generator)
        times["update"] = time.time() - t
        # ---- 7. push the new weights into the sampler
        t = time.time()
        sampler.wake_up()
        sampler.load_weights(full_weights(model))
        times["sync"] = time.time() - t
        # ---- 8. log: one line per step
        mask = batch["mask"]
        n_tokens = float(mask.sum())
        local = [sum(rewards), len(rewards), float(zero_signal.sum()), len(zero_signal), timeouts,
                 sum(len(s.completion_ids) for s in flat), sum(s.finish_reason == "length" for s in flat),
                 float((batch["entropy"] * mask).sum()), float(((batch["sampler_logp"] - batch["old_logp"]).abs() * mask).sum()),
                 n_tokens, float(batch["adv"].abs().sum()), len(kept)]
        (r_sum, n, z_sum, n_groups, n_timeouts, len_sum, trunc, ent_sum, gap_sum, tok_sum, adv_sum, n_kept) = all_reduce(local)
        times["step"] = time.time() - t0
        row = {"step": step, "reward": r_sum / n, "zero_signal_frac": z_sum / n_groups, "verify_timeouts": int(n_timeouts),
               "response_len": len_sum / n, "truncated_frac": trunc / n, "entropy": ent_sum / max(tok_sum, 1),
               "logp_gap": gap_sum / max(tok_sum, 1), "adv_abs_mean": adv_sum / max(n_kept, 1),
               "dropped_frac": 1 - n_kept / n, **loss_metrics, "lr": scheduler.get_last_lr()[0],
               **{f"t_{k}": v for k, v in times.items()}, "tokens_per_s": len_sum / times["step"]}
        for k, v in times.items():
            stage_times[k] = stage_times.get(k, 0.0) + v
        # ---- 9. evaluate / checkpoint
        if eval_problems and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            row.update(held_out(sampler, tokenizer, eval_problems, cfg, instruction, rank, world))
        if step == cfg.steps and eval_problems:
            results["after"] = held_out(sampler, tokenizer, eval_problems, cfg, instruction, rank, world)
            row.update(results["after"])
        log(row)
        print0(fmt(row))
        if rank == 0 and cfg.rollouts_every and step % cfg.rollouts_every == 0:
            dump_rollouts(cfg, step, batch_problems, samples, [rewards[i:i + cfg.group_size]
                                                              for i in range(0, len(rewards), cfg.group_size)])
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(cfg, step, model, optimizer, scheduler, tokenizer)

    done = cfg.steps - start
    if done > 0:
        print0("time per step by stage (s): " + ", ".join(f"{k} {v / done:.3f}" for k, v in stage_times.items()))
    for when in ("before", "after"):
        if when in results:
            print0(f"held-out {when} RL: {fmt(results[when])}")
    dist.barrier()  # the last collective; then the engine may go (its teardown touches torch.distributed)
    sampler.close()
    return results


def fmt(row):
    """A compact console line of a metrics row."""
    short = {"reward": "R", "zero_signal_frac": "no_signal", "response_len": "len", "entropy": "H",
             "gate_mean": "F", "gate_low_frac": "F<.5", "ratio_dev_mean": "|rho-1|", "grad_norm": "gnorm",
             "acc": "acc", "t_step": "s"}
    parts = [f"step {row['step']}"] if "step" in row else []
    for k, v in row.items():
        if k in short or k.startswith(("avg_at", "pass_at")):
            parts.append(f"{short.get(k, k)} {v:.3g}" if isinstance(v, float) else f"{short.get(k, k)} {v}")
    return " | ".join(parts)


if __name__ == "__main__":
    config = parse_args()
    try:
        train(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
