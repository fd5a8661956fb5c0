"""train.py: the whole RLVR loop with the MASPO objective (arXiv 2602.17550), FSDP2-sharded.

One step = one rollout batch, as numbered stages in `train()`:
  1. pick prompts    this rank's shard of `prompts_per_step` problems (one shuffle per epoch of the data)
  2. sample          G completions each with the colocated sampler (rollout.py: vLLM, or HF generate),
                     stopping at the end of the assistant's turn (data.stop_token_ids)
  3. verify          reward R in {0, 1} per completion (the task's reward, data.py: verify.py, in parallel)
                     --drop-zero-signal (DAPO's dynamic sampling, verl's filter_groups): stages 1-3 run
                     again on other prompts until the step holds prompts_per_step groups whose rewards
                     differ (at most --max-sampling-rounds rounds), so the number of updates is fixed
  4. advantages      A_i = (R_i - mean R) / (std R + eps) per group (maspo.group_advantages)
  5. old log-probs   log pi_old of every response token at the sampling temperature, from the training
                     model without grad (logprobs.hidden_logprobs: no [B, T, V] logits are ever held);
                     skipped with one epoch of one mini-batch, where the update's own forward, detached,
                     is pi_old (rho = 1 exactly), as in verl and TRL
  6. update          epochs x shuffled mini-batches of the policy loss (maspo.policy_loss), each one
                     optimizer update, accumulated over micro-batches of at most `micro_batch_tokens`
                     tokens. Several updates per rollout batch is the default on purpose: with ONE,
                     rho = pi_theta / pi_old = 1 everywhere and MASPO (like every trust-region method)
                     is plain policy gradient.
  7. sync            push the new weights into the sampler (rollout.py's sync: bf16 tensors gathered one at a
                     time; on GPUs the engine slept through stages 3-6 and wakes weights first, KV cache last)
  8. log             one line per step (console + OUT/metrics.jsonl), decoded rollouts to OUT/rollouts/
  9. eval / save     held-out accuracy; atomic checkpoints (checkpoint.py: the sharded trainer state + an
                     HF-format export in the compute dtype, which eval.py and vLLM load)

Run it
  laptop (CPU, the embedded default: a tiny Qwen2 model learns arithmetic; ~2 min on 2 cores)
      python train.py
  a real chat model on a laptop (the stand-in built by tiny.py; README "Real models")
      python train.py --config configs/standin_chat.json
  2 CPU processes (FSDP over gloo)
      torchrun --nproc_per_node 2 train.py --steps 2
  one GPU / one node of 8 GPUs / several nodes (bf16, vLLM colocated)
      python train.py --config configs/r1_distill_1.5b.json --train-data dapo_math_17k.parquet
      torchrun --nproc_per_node 8 train.py --config configs/r1_distill_7b.json ...
      torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py ...
  will it fit? the memory per rank of a config, from the model's config.json alone (plan.py), nothing loaded
      python train.py --config configs/r1_distill_1.5b.json --plan [--gpu-gib 80]
`python train.py --help` lists every setting with its paper symbol and default. With no --model the
embedded default's settings (TINY_PRESET) apply; with --model, the defaults below, meant for 1.5B-7B
models. Either way the effective settings are printed at start and saved to OUT/config.json.

A run folder is never overwritten: a run into a folder that holds a run stops with a message unless
--resume is given. --resume continues from the latest complete checkpoint and reproduces the
uninterrupted run (same weights, optimizer state and metrics, to float tolerance): every random
choice of a step (prompts, sampling seeds, mini-batch shuffles) is a function of (seed, step, rank).
SIGINT (Ctrl-C) and SIGTERM finish the current step, save a checkpoint and exit (status 130 / 143).

Where the loop deviates from the authors' verl set-up (reasons at each place):
  1. Old log-probs come from the training model (stage 5), never from the sampler; their gap to the
     sampler's log-probs is logged as `logp_gap` (the two drift apart in bf16).
  2. The token-mean of the loss runs over the whole mini-batch across ranks (the normaliser is the
     global token count), so micro-batching and sharding change nothing; verl averages per micro-batch
     token-means, which weighs tokens of short micro-batches more.
  3. Rewards whose check times out (or whose verifier worker dies) count as 0 and are counted
     (`verify_timeouts`).
  4. A non-finite loss or gradient norm skips that optimizer update (counted in `skipped_updates`).
  5. AdamW with weight decay 0.01 and no warm-up, constant lr: verl's actor defaults.
"""
import datetime
import gc
import math
import os
import random
import signal
import sys
import textwrap
import time
import traceback
from contextlib import contextmanager
import dataclasses
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import cli
import data
import maspo
import plan
import rollout
import tiny
from checkpoint import StopRequest, all_reduce
from cli import check
from eval import context_of, evaluate, scores
from maspo import LossConfig
from policy import compute_dtype, dummy_forward, load_policy, load_reference


@dataclass
class Config:
    # --- model and data
    model: str = ""  # HF hub name or local path; "" = the embedded tiny model (built and warm-started once, cached)
    task: str = "math"  # problems + instruction + reward: a data.TASKS name, or module:NAME of a file of yours
    train_data: str = ""  # JSONL / JSON / parquet file, hub name org/name[:config][:split], or "arithmetic"
    eval_data: str = ""  # held-out problems, same forms ("" = arithmetic:test for the embedded default, none otherwise)
    prompt_key: str = ""  # field holding the question ("" = try problem, question, prompt, ...)
    answer_key: str = ""  # field holding the reference answer ("" = try answer, final_answer, ...)
    instruction: str = "auto"  # appended to each question; auto = the task's (none for the tiny model); "" = none
    system_prompt: str = ""  # a system turn before the question ("" = the chat template's own default)
    chat_template: bool = True  # use the tokenizer's chat template (--no-chat-template: plain "Q: ...\nA: ")
    # --- RL (paper symbols)
    steps: int = 500  # RL steps; one rollout batch each (0 = evaluate only)
    prompts_per_step: int = 128  # prompts per rollout batch, all ranks together
    group_size: int = 8  # G: samples per prompt
    mini_batch_size: int = 256  # sequences per optimizer update; rollout batch / this = updates per epoch
    epochs: int = 1  # passes over each rollout batch (PPO epochs)
    micro_batch_tokens: int = 32768  # tokens (padded prompt + response) per forward/backward on one rank
    lr: float = 1e-6  # AdamW learning rate
    warmup_steps: int = 0  # linear learning-rate warm-up, in optimizer updates (then constant, as verl)
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    max_prompt_tokens: int = 1024  # longer prompts are dropped from the training data (and counted)
    max_response_tokens: int = 4096  # sampling budget per completion
    temperature: float = 1.0  # T: sampling temperature; log-probs are of softmax(logits / T)
    drop_zero_signal: bool = False  # DAPO dynamic sampling: sample more rounds until the step holds prompts_per_step groups with signal (all-equal-reward groups dropped)
    max_sampling_rounds: int = 10  # cap on those rounds per step (then the step trains on the groups it has, logged)
    entropy_source: str = "old"  # H of Entropy-Adv: old = pi_old's (stage 5) | current = the updating policy's
    # --- evaluation, checkpoints, logging
    eval_every: int = 50  # held-out evaluation every N steps (0 = only before and after)
    eval_k: int = 4  # samples per held-out problem for Avg@k / Pass@k
    eval_temperature: float = 0.6  # sampling temperature of the held-out Avg@k (greedy accuracy is also logged)
    eval_top_p: float = 0.95  # nucleus sampling of the held-out Avg@k (eval.py's default)
    eval_limit: int = 0  # use at most N held-out problems (0 = all)
    save_every: int = 50  # checkpoint every N steps (and at the end)
    out: str = "runs/default"  # output folder: config.json, metrics.jsonl, rollouts/, checkpoints/
    resume: bool = False  # continue the run in `out` from its latest complete checkpoint
    wandb: str = ""  # wandb project name (needs `pip install wandb`); "" = off
    # --- system
    sampler: str = "auto"  # auto (vLLM if importable) | vllm | hf
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU | bf16 | fp32 (master weights stay fp32)
    grad_checkpointing: bool = True  # activation checkpointing (saves GPU memory)
    gpu_memory_utilization: float = 0.4  # share of GPU memory for vLLM (weights + KV cache)
    seed: int = 0  # seeds model building, data order and sampling
    dist_timeout_min: int = 120  # collective timeout (NCCL and gloo), minutes: ranks wait at barriers while local rank 0 downloads the model (~15 GB for 7B), while a checkpoint is written and held-out results are gathered; NCCL's own 10 would end the run
    plan: bool = False  # print the memory plan per rank (plan.py, from the model's config.json alone) and exit
    gpu_gib: float = 80.0  # GPU memory in GiB that --plan plans for
    # --- the embedded tiny model (used only when model is "")
    tiny_dir: str = ".cache/tiny-arith"  # where it is built and cached (relative: to train.py)
    warm_start_steps: int = 1000  # at most this many supervised steps on arithmetic before RL
    # --- the policy loss: maspo.LossConfig (loss, sigma_base, alpha, ...), flags of its own
    loss: LossConfig = field(default_factory=LossConfig)


# The embedded default (no --model): measured on a 2-core CPU (README). Flags and --config override it.
TINY_PRESET = dict(train_data="arithmetic", steps=150, prompts_per_step=16, mini_batch_size=32, micro_batch_tokens=4096,
                   lr=1e-4, weight_decay=0.0, max_prompt_tokens=64, max_response_tokens=16, eval_every=25, eval_k=8,
                   eval_temperature=1.0, grad_checkpointing=False)
ROLLOUTS_EVERY = 10  # dump a few decoded rollouts every N steps
MAX_DROPPED = 0.1  # stop when a larger share of the training prompts is longer than --max-prompt-tokens
VERIFY_TIMEOUT = 1.0  # seconds per answer check; a timeout scores 0 (and is counted)


def parse_args(argv=None):
    """Config from defaults < TINY_PRESET (no --model) < --config JSON < flags, validated."""
    settings, given = cli.parse(Config, argv, "MASPO RLVR training (train.py)")
    if not settings["model"]:  # the embedded default: its preset where neither --config nor a flag set a value
        settings.update({k: v for k, v in TINY_PRESET.items() if k not in given})
    cfg = cli.build(Config, settings)
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    cfg.loss = maspo.resolve(cfg.loss)  # the objective's own defaults made explicit: the logged config is what runs
    return cfg


def validate(cfg, world):
    """Every setting that can be checked without loading anything; one line per error (cli.check)."""
    L = cfg.loss
    check(L.loss in maspo.LOSSES, "loss", L.loss, f"choose one of {sorted(maspo.LOSSES)}")
    check(L.agg is None or L.agg in maspo.AGG_MODES, "agg", L.agg, f"choose one of {maspo.AGG_MODES}")
    check(L.alpha >= 0, "alpha", L.alpha, "the mass-adaptive exponent must be >= 0 (paper: 0.3-0.5)")
    check(L.sigma_base > 0, "sigma_base", L.sigma_base, "must be > 0 (paper: 1, 2 or 3)")
    check(L.sigma_high >= L.sigma_base, "sigma_high", L.sigma_high, f"must be >= --sigma-base {L.sigma_base}")
    for name in ("beta_pos", "beta_neg", "kl_coef"):
        check(getattr(L, name) >= 0, name, getattr(L, name), "must be >= 0")
    check(0 < L.adv_low <= L.adv_high, "adv_low", L.adv_low, f"need 0 < --adv-low <= --adv-high ({L.adv_high})")
    check(L.clip_low is None or 0 < L.clip_low < 1, "clip_low", L.clip_low, "must be in (0, 1)")
    check(L.clip_high is None or L.clip_high > 0, "clip_high", L.clip_high, "must be > 0")
    check(L.clip_c > 1, "clip_c", L.clip_c, "the dual clip c must be > 1")
    check(L.ent_adv_kappa > 1, "ent_adv_kappa", L.ent_adv_kappa, "kappa must be > 1 (else the bonus can flip A)")
    try:
        data.get_task(cfg.task)
    except data.DataError as e:
        check(False, "task", cfg.task, str(e).split(": ", 1)[-1])
    check(cfg.steps >= 0, "steps", cfg.steps, "must be >= 0")
    check(cfg.group_size >= 2, "group_size", cfg.group_size, "G must be >= 2: a group of one has no baseline")
    check(cfg.prompts_per_step >= world and cfg.prompts_per_step % world == 0, "prompts_per_step",
          cfg.prompts_per_step, f"must be a multiple of the number of processes ({world})")
    rollout_batch = cfg.prompts_per_step * cfg.group_size
    check(cfg.mini_batch_size >= world and cfg.mini_batch_size % world == 0, "mini_batch_size", cfg.mini_batch_size,
          f"must be a multiple of the number of processes ({world})")
    check(rollout_batch % cfg.mini_batch_size == 0, "mini_batch_size", cfg.mini_batch_size,
          f"must divide the rollout batch ({cfg.prompts_per_step} prompts x G {cfg.group_size} = {rollout_batch})")
    for name in ("epochs", "max_prompt_tokens", "max_response_tokens", "save_every", "eval_k", "warm_start_steps",
                 "max_sampling_rounds", "dist_timeout_min"):
        check(getattr(cfg, name) >= 1, name, getattr(cfg, name), "must be >= 1")
    for name in ("warmup_steps", "eval_every", "eval_limit", "weight_decay", "eval_temperature"):
        check(getattr(cfg, name) >= 0, name, getattr(cfg, name), "must be >= 0")
    check(cfg.micro_batch_tokens >= cfg.max_prompt_tokens + cfg.max_response_tokens, "micro_batch_tokens",
          cfg.micro_batch_tokens, f"must hold one whole sequence: >= --max-prompt-tokens + --max-response-tokens "
          f"= {cfg.max_prompt_tokens + cfg.max_response_tokens}")
    check(cfg.lr > 0, "lr", cfg.lr, "must be > 0")
    check(0 < cfg.eval_top_p <= 1, "eval_top_p", cfg.eval_top_p, "must be in (0, 1]")
    check(cfg.grad_clip > 0, "grad_clip", cfg.grad_clip, "must be > 0")
    check(cfg.temperature > 0, "temperature", cfg.temperature, "training samples at T > 0 (T = 0 would be greedy)")
    check(cfg.entropy_source in ("old", "current"), "entropy_source", cfg.entropy_source, "choose old or current")
    check(cfg.sampler in ("auto", "vllm", "hf"), "sampler", cfg.sampler, "choose auto, vllm or hf")
    check(cfg.sampler != "vllm" or rollout.vllm_available(), "sampler", cfg.sampler,
          "vllm is not installed (README: install) — or use --sampler hf")
    check(cfg.precision in ("auto", "bf16", "fp32"), "precision", cfg.precision, "choose auto, bf16 or fp32")
    check(0 < cfg.gpu_memory_utilization <= 1, "gpu_memory_utilization", cfg.gpu_memory_utilization, "must be in (0, 1]")
    check(cfg.gpu_gib > 0, "gpu_gib", cfg.gpu_gib, "must be > 0")
    cli.check_model("model", cfg.model)
    for name in ("train_data", "eval_data"):  # a task of your own (--task file:NAME) judges its own sources
        source = getattr(cfg, name)
        check(not source or cfg.task != "math" or cli.source_exists(source), name, source,
              "no such file, and not a hub dataset name org/name[:config][:split]")


# ----------------------------------------------------------------------------------------------
# Distributed set-up: one path for 1 process (plain `python`) and N processes (torchrun)
def setup_distributed(timeout_min=Config.dist_timeout_min):
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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=timeout_min))
    return dist.get_rank(), dist.get_world_size(), device


def print0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        tqdm.write(" ".join(str(a) for a in args))


def reduce_sums(sums):
    """{name: (sum, count)} summed over ranks -> {name: sum / count}, or the total itself where the
    count is None; names sorted, so every rank sends its values in the same order (one collective)."""
    names = sorted(sums)
    totals = all_reduce([sums[k][0] for k in names] + [sums[k][1] or 0 for k in names])
    return {k: totals[i] if sums[k][1] is None else totals[i] / max(totals[len(names) + i], 1e-12)
            for i, k in enumerate(names)}


# ----------------------------------------------------------------------------------------------
# Data and model
def load_data(cfg, task, embedded):
    """Training and held-out problems, loaded before any model (a bad file fails in seconds)."""
    keys = (cfg.prompt_key or None, cfg.answer_key or None)
    try:
        train = task.load(cfg.train_data or "arithmetic", *keys)
        source = cfg.eval_data or ("arithmetic:test" if embedded else "")
        held = task.load(source, *keys, limit=cfg.eval_limit or None) if source else []
    except data.DataError as e:
        raise SystemExit(f"data error: {e}") from None
    train, duplicates = data.dedupe(train)
    check_enough_problems(train, cfg)
    unreadable = data.unreadable_answers(train)
    print0(f"train problems: {len(train)} ({duplicates} duplicate rows dropped, {unreadable} answers the verifier "
           f"cannot read: always rewarded 0); held-out problems: {len(held)}")
    return train, held


def resolve_model(name):
    """A local folder for --model: downloaded once per node (local rank 0) when it is a hub name."""
    try:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            tiny.local_model(name)
        dist.barrier()  # the other ranks of this node read the files rank 0 downloaded
        return tiny.local_model(name)
    except OSError as e:
        raise SystemExit(f"error: --model: {e}") from None


def prepare_prompts(problems, tokenizer, style, cfg):
    """Prompt ids of the training problems; too-long prompts dropped, and the run stopped when more
    than MAX_DROPPED of them are (most likely a limit set for another model or dataset)."""
    t0 = time.time()
    for p, ids in zip(problems, data.tokenize_prompts(tokenizer, problems, style)):
        p["ids"] = ids
    kept = [p for p in problems if len(p["ids"]) <= cfg.max_prompt_tokens]
    share = 1 - len(kept) / len(problems)
    longest = max(len(p["ids"]) for p in problems)
    print0(f"prompts: {len(problems)} tokenized in {time.time() - t0:.1f} s; {len(problems) - len(kept)} "
           f"({100 * share:.1f}%) longer than --max-prompt-tokens {cfg.max_prompt_tokens} dropped (longest {longest})")
    if share > MAX_DROPPED or not kept:
        raise SystemExit(f"error: {100 * share:.1f}% of the training prompts are longer than --max-prompt-tokens "
                         f"{cfg.max_prompt_tokens} (at most {100 * MAX_DROPPED:.0f}% may be dropped); raise the limit "
                         f"(longest prompt: {longest} tokens) or filter the data")
    return kept


def check_context(path, cfg):
    """prompt + response tokens must fit in the model's context (max_position_embeddings)."""
    context = context_of(path)
    need = cfg.max_prompt_tokens + cfg.max_response_tokens
    if context and need > context:
        raise SystemExit(f"error: --max-prompt-tokens {cfg.max_prompt_tokens} + --max-response-tokens "
                         f"{cfg.max_response_tokens} = {need} > the model's context {context} "
                         f"(max_position_embeddings in {path}/config.json): lower one of them")




def lr_factor(update, cfg):
    """Multiplier of cfg.lr at optimizer update `update`: linear warm-up, then constant (verl's default)."""
    return min(1.0, (update + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0


# ----------------------------------------------------------------------------------------------
# Stages 1-5: prompts, samples, rewards, the batch, old log-probs
def step_seed(cfg, step, rank=0, stage=0, rnd=0):
    """The seed of one random choice of one step: a function of (seed, step, rank, sampling round),
    so that a resumed run makes exactly the choices of an uninterrupted one."""
    return (cfg.seed * 1_000_003 + step * 7919 + rank * 101 + stage + rnd * 104_729) % 2**31


def check_enough_problems(problems, cfg):
    """A step draws prompts_per_step distinct problems: the data must hold that many."""
    if len(problems) < cfg.prompts_per_step:
        raise cli.SettingError(f"error: --prompts-per-step {cfg.prompts_per_step} > the {len(problems)} usable "
                               "training problems: lower it, or give more problems (--train-data)")


def pick_prompts(problems, step, cfg, rank, world, rnd=0):
    """Stage 1: this rank's prompts of `step`, a function of (seed, step, rank, round) (resume-safe).
    Round 0: the step's slice of its epoch's shuffle; an epoch is len // prompts_per_step steps (the
    remainder is dropped), so a step never straddles two shuffles and never holds a prompt twice.
    Later rounds (dynamic sampling) draw from the problems outside that slice, shuffled per step,
    each round the next prompts_per_step of them: still no prompt twice in a step (fewer, then none,
    once they run out)."""
    P, per_rank = cfg.prompts_per_step, cfg.prompts_per_step // world
    epoch, slot = divmod(step - 1, len(problems) // P)
    order = list(range(len(problems)))
    random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
    if rnd == 0:
        chosen = order[slot * P + rank * per_rank:slot * P + (rank + 1) * per_rank]
    else:
        rest = order[:slot * P] + order[(slot + 1) * P:]  # the problems round 0 did not draw
        random.Random(step_seed(cfg, step, stage=1)).shuffle(rest)
        start = ((rnd - 1) * world + rank) * per_rank
        chosen = rest[start:start + per_rank]
    return [problems[i] for i in chosen]


def has_signal(rewards):
    """A group's rewards differ (else every A of the group is 0: a zero-signal group)."""
    return max(rewards) > min(rewards)


def build_batch(groups, cfg, pad_id):
    """Stage 4: the groups (problem, G samples, G rewards) to train on as tensors: ids / attn (B, T),
    mask (B, T-1) of response tokens, the advantage A (B,) of each sequence, the sampler's log-probs
    (B, T-1). B may be 0 on a rank (dynamic sampling that hit its cap with no group kept)."""
    R = torch.tensor([r for _, _, rewards in groups for r in rewards], dtype=torch.float32)  # (P*G,)
    A = maspo.group_advantages(R, cfg.group_size) if groups else R  # (P*G,)  Eq. A_i
    kept = [s for _, samples, _ in groups for s in samples]
    if kept:
        ids, attn, mask = data.pad_batch([s.prompt_ids for s in kept], [s.completion_ids for s in kept], pad_id)
    else:  # nothing kept on this rank: an empty batch (update_policy keeps the ranks in step)
        ids, attn, mask = torch.zeros((0, 2), dtype=torch.long), torch.zeros((0, 2), dtype=torch.long), torch.zeros((0, 1))
    sampler_logp = torch.zeros_like(mask)
    for b, s in enumerate(kept):
        first = len(s.prompt_ids) - 1
        sampler_logp[b, first:first + len(s.logprobs)] = torch.tensor(s.logprobs)
    return {"ids": ids, "attn": attn, "mask": mask, "adv": A, "sampler_logp": sampler_logp}


def micro_batches(batch, rows, budget):
    """Split sequence indices `rows` into micro-batches of at most `budget` padded tokens (longest
    first, so that similar lengths share a micro-batch and little is padding). A sequence longer than
    the budget still gets a micro-batch of its own (validate() forbids budgets below one sequence)."""
    lengths = batch["attn"][rows].sum(1)
    by_length = torch.argsort(lengths, descending=True, stable=True)
    out, current, width = [], [], 0
    for i, n in zip(rows[by_length].tolist(), lengths[by_length].tolist()):
        if current and (len(current) + 1) * max(width, n) > budget:
            out.append(torch.tensor(current))
            current, width = [], 0
        current.append(i)
        width = max(width, n)
    return out + ([torch.tensor(current)] if current else [])


def micro_slice(batch, idx, device):
    """Rows `idx` of the rollout batch, trimmed to their longest sequence, on the device."""
    length = int(batch["attn"][idx].sum(1).max())
    return {k: (v[idx, :length] if k in ("ids", "attn") else v[idx, :length - 1] if v.dim() == 2 else v[idx]).to(device)
            for k, v in batch.items() if torch.is_tensor(v) and v.shape[:1] == batch["ids"].shape[:1]}


def free_old_logprobs(cfg):
    """Whether pi_old comes free: with one epoch of one mini-batch (the whole rollout batch) the update's
    forward runs on the weights that sampled, so pi_old is its own log-probs, detached (rho = 1
    exactly, as verl and TRL do), and stage 5 is skipped. Not for BAPO: its bound search needs pi_old
    before the update's forward."""
    return cfg.epochs == 1 and cfg.mini_batch_size == cfg.prompts_per_step * cfg.group_size and cfg.loss.loss != "bapo"


@torch.no_grad()
def old_logprobs(model, batch, cfg, key="old_logp"):
    """Stage 5: log pi_old of the response tokens at temperature T from the training model, no grad
    (plus the entropy H, for the logs and Entropy-Adv). Micro-batches of at most micro_batch_tokens
    over the whole rollout batch: not the update's (B, T) shapes, so in bf16 rho = 1 + noise before
    the first update."""
    n, width = batch["mask"].shape
    device = next(model.parameters()).device
    batch[key] = torch.zeros(n, width)
    batch.setdefault("entropy", torch.zeros(n, width))
    chunks = micro_batches(batch, torch.arange(n), cfg.micro_batch_tokens)
    n_micro = int(all_reduce([len(chunks)], dist.ReduceOp.MAX)[0])  # FSDP: every rank runs as many forwards
    for i in range(n_micro):
        if i >= len(chunks):
            dummy_forward(model, cfg, device)
            continue
        idx = chunks[i]
        mb = micro_slice(batch, idx, device)
        logp, H = model(mb["ids"], mb["attn"], cfg.temperature, with_entropy=key == "old_logp")
        batch[key][idx, :logp.shape[1]] = logp.float().cpu()
        if H is not None:
            batch["entropy"][idx, :H.shape[1]] = H.float().cpu()
    # FSDP2 keeps the root's parameters (embeddings, lm_head) gathered after a forward, for the
    # backward that usually follows; with no backward here, free them (they are the largest)
    model.reshard()


# ----------------------------------------------------------------------------------------------
# Stage 6: the policy update
def update_policy(model, optimizer, scheduler, batch, cfg, world, step):
    """Stage 6: epochs x shuffled mini-batches; each mini-batch is one optimizer update, its gradient
    accumulated over micro-batches. The loss is ONE token-mean over the whole mini-batch across all
    ranks: each micro-batch's loss is normalised by the global token count (and FSDP averages
    gradients over ranks, hence / world). When pi_old is free (free_old_logprobs) it is this forward's
    log-probs, detached, written into batch["old_logp"] (and H into batch["entropy"]) for the logs.
    Returns the loss metrics, token-weighted over ranks, and the lr the last update used."""
    device = next(model.parameters()).device
    free = free_old_logprobs(cfg)
    current = cfg.loss.loss == "entropy_adv" and (cfg.entropy_source == "current" or free)  # H: this forward's
    n = batch["ids"].shape[0]  # this rank's sequences
    if free:
        batch["old_logp"], batch["entropy"] = torch.zeros_like(batch["mask"]), torch.zeros_like(batch["mask"])
    per_rank = cfg.mini_batch_size // world
    n_mini = int(all_reduce([math.ceil(n / per_rank)], dist.ReduceOp.MAX)[0])  # the same count on every rank
    generator = torch.Generator().manual_seed(step_seed(cfg, step, dist.get_rank(), stage=6))
    sums, extremes, skipped, norms, lr = {}, {}, 0, [], scheduler.get_last_lr()[0]
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=generator)
        for j in range(n_mini):
            rows = perm[j * per_rank:(j + 1) * per_rank]
            tokens, seqs = all_reduce([float(batch["mask"][rows].sum()), float(len(rows))])  # global counts
            if tokens == 0:
                continue  # nothing to learn from on any rank (all dropped): no update
            chunks = micro_batches(batch, rows, cfg.micro_batch_tokens)
            n_micro = int(all_reduce([len(chunks)], dist.ReduceOp.MAX)[0])  # FSDP: as many forwards everywhere
            bounds = bapo_bounds(model, batch, chunks, n_micro, cfg, device) if cfg.loss.loss == "bapo" else None
            for i in range(n_micro):
                if i >= len(chunks):
                    dummy_forward(model, cfg, device, backward=True)
                    continue
                idx = chunks[i]
                mb = micro_slice(batch, idx, device)
                logp, H = model(mb["ids"], mb["attn"], cfg.temperature, with_entropy=current or free)
                if free:  # pi_old = these very log-probs; sg: pi_old is data (rho = 1 exactly)
                    mb["old_logp"], mb["entropy"] = logp.detach(), H.detach()
                    batch["old_logp"][idx, :logp.shape[1]] = logp.detach().float().cpu()
                    batch["entropy"][idx, :H.shape[1]] = H.detach().float().cpu()
                A = mb["adv"][:, None].expand_as(logp)  # (B, T-1)
                if cfg.loss.loss == "entropy_adv":  # Entropy-Adv: A' = A + min(a sg(H), |A| / kappa)
                    A = maspo.entropy_advantage(A, (H if current else mb["entropy"]).detach(), cfg.loss)
                loss, metrics = maspo.policy_loss(logp, mb["old_logp"], A, mb["mask"], cfg.loss,
                                                  ref_logp=mb.get("ref_logp"), bapo_bounds=bounds,
                                                  num_tokens=tokens / world, num_seqs=seqs / world,
                                                  norm_len=cfg.max_response_tokens)  # Dr. GRPO's L: the budget
                loss.backward()
                signal = mb["mask"] * (mb["adv"] != 0)[:, None]  # (B, T-1): response tokens with A != 0
                accumulate(sums, extremes, metrics, float(mb["mask"].sum()))
                accumulate(sums, extremes, signal_metrics(logp, mb["old_logp"], A, signal, cfg.loss, bounds),
                           float(signal.sum()))
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
            lr = scheduler.get_last_lr()[0]  # the lr this update used, read before the scheduler moves on
            scheduler.step()
    return {**finish_update_metrics(sums, extremes, norms, skipped), "lr": lr}


def accumulate(sums, extremes, metrics, weight):
    """Add one micro-batch's metrics: (sum, weight) pairs for means, running min / max for extremes."""
    for k, v in metrics.items():
        if k.endswith(("_min", "_max")):
            extremes[k] = (min if k.endswith("_min") else max)(extremes.get(k, v), v)
        else:
            s = sums.get(k, (0.0, 0.0))
            sums[k] = (s[0] + v * weight, s[1] + weight)


SIGNAL_METRICS = ("gate_mean", "gate_low_frac", "ratio_dev_mean", "ratio_dev_frac", "approx_kl")


@torch.no_grad()
def signal_metrics(logp, old_logp, A, signal, loss_cfg, bounds=None):
    """The trust-region metrics over the response tokens with A != 0 only (`signal`, (B, T-1)), named
    <metric>_signal. Tokens of zero-signal groups have F = 1 and rho-independent loss by construction:
    counted in, they dilute gate_mean / gate_low_frac by the share of such groups, which differs per
    objective and step. One more evaluation of the objective on detached tensors (no gradient), so
    the loss math itself gathers nothing."""
    _, metrics = maspo.policy_loss(logp.detach(), old_logp, A, signal, dataclasses.replace(loss_cfg, kl_coef=0.0),
                                   bapo_bounds=bounds)
    return {f"{k}_signal": metrics[k] for k in SIGNAL_METRICS}


@torch.no_grad()
def bapo_bounds(model, batch, chunks, n_micro, cfg, device):
    """BAPO's (c_low, c_high) for one mini-batch: its search statistics summed over the mini-batch's
    micro-batches and over all ranks, with the policy before this update (maspo.bapo_stats / bapo_pick:
    one pair of bounds for the whole optimizer step). Costs one no-grad forward of the mini-batch."""
    stats = torch.zeros(len(maspo.bapo_path()), 2, dtype=torch.float64)  # [K, 2]
    for i in range(n_micro):
        if i >= len(chunks):
            dummy_forward(model, cfg, device)
            continue
        mb = micro_slice(batch, chunks[i], device)
        logp, _ = model(mb["ids"], mb["attn"], cfg.temperature)
        stats += maspo.bapo_stats(logp, mb["old_logp"], mb["adv"], mb["mask"]).cpu()
    model.reshard()  # no backward follows this forward (see old_logprobs)
    stats = torch.tensor(all_reduce(stats.flatten().tolist()), dtype=torch.float64).view_as(stats)  # every rank: same bounds
    return maspo.bapo_pick(stats).to(device)


def finish_update_metrics(sums, extremes, norms, skipped):
    """The update's metrics over all ranks: token-weighted means, global min / max, counts."""
    names = sorted(set().union(*dist_gather_names(list(sums) + list(extremes))))
    local_sums = {k: sums.get(k, (0.0, 0.0)) for k in names if not k.endswith(("_min", "_max"))}
    out = reduce_sums(local_sums)
    for suffix, op, neutral in (("_min", dist.ReduceOp.MIN, math.inf), ("_max", dist.ReduceOp.MAX, -math.inf)):
        keys = [k for k in names if k.endswith(suffix)]
        out.update(zip(keys, all_reduce([extremes.get(k, neutral) for k in keys], op)) if keys else [])
    out.update(grad_norm=sum(norms) / max(len(norms), 1), skipped_updates=skipped, updates=len(norms))
    return out


def dist_gather_names(names):
    """Every rank's metric names (a rank with no tokens may have none): one small object gather."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(names))
    return [set(n) for n in everyone]


# ----------------------------------------------------------------------------------------------
# Stages 8-9: logs and evaluation
def step_metrics(step, batch, groups, kept, timeouts, rounds, loss_metrics, times):
    """Stage 8: one row of metrics, summed over ranks by name. Over every sampled group (all rounds):
    reward, zero_signal_frac, response_len, truncated_frac. Over the kept groups only (the batch the
    update saw; the same groups unless --drop-zero-signal): entropy, logp_gap, adv_abs_mean and the
    update's metrics; *_signal: over its tokens with A != 0 only."""
    flat = [s for _, samples, _ in groups for s in samples]
    rewards = [r for _, _, group_rewards in groups for r in group_rewards]
    mask = batch["mask"]
    n_tokens = float(mask.sum())
    n_generated = sum(len(s.completion_ids) for s in flat)
    sums = {"reward": (sum(rewards), len(rewards)),
            "zero_signal_frac": (sum(not has_signal(r) for _, _, r in groups), len(groups)),
            "response_len": (n_generated, len(flat)),
            "truncated_frac": (sum(s.finish_reason == "length" for s in flat), len(flat)),
            "entropy": (float((batch["entropy"] * mask).sum()), n_tokens),
            "logp_gap": (float(((batch["sampler_logp"] - batch["old_logp"]).abs() * mask).sum()), n_tokens),
            "adv_abs_mean": (float(batch["adv"].abs().sum()), len(batch["adv"])),
            "groups_sampled": (len(groups), None), "groups_kept": (len(kept), None),
            "verify_timeouts": (timeouts, None), "tokens": (n_generated, None)}  # None: totals over ranks, not means
    row = {"step": step, **reduce_sums(sums), "sampling_rounds": rounds}
    for k in ("verify_timeouts", "groups_sampled", "groups_kept"):
        row[k] = int(row[k])
    row["tokens_per_s"] = row.pop("tokens") / times["step"]
    return {**row, **loss_metrics, **{f"t_{k}": v for k, v in times.items()}}


def held_out(sampler, tokenizer, problems, cfg, style, stop_ids, task, rank, world):
    """Greedy accuracy and Avg@k / Pass@k (at eval_temperature, eval_top_p) on the held-out problems,
    sharded over ranks, each problem seeded by its global index (eval.problem_seed), so 1 and N
    processes draw the same samples; the per-problem correct counts and the verifier's timeouts are
    gathered so every rank returns the global numbers."""
    local, keys = problems[rank::world], list(range(rank, len(problems), world))  # global indices
    kw = dict(max_tokens=cfg.max_response_tokens, style=style, stop_token_ids=stop_ids, reward=task.reward,
              progress=False, keys=keys)
    greedy = evaluate(sampler, tokenizer, local, k=1, temperature=0.0, top_p=1.0, seed=cfg.seed, **kw)
    sampled = evaluate(sampler, tokenizer, local, k=cfg.eval_k, temperature=cfg.eval_temperature,
                       top_p=cfg.eval_top_p, seed=cfg.seed + 1, **kw)
    mine = [(i, r["correct"], s["correct"]) for i, r, s in zip(keys, greedy["results"], sampled["results"])]
    everyone = [None] * world
    dist.all_gather_object(everyone, (mine, greedy["verify_timeouts"] + sampled["verify_timeouts"]))  # each rank scored its own shard: collect all
    counts = sorted(c for part, _ in everyone for c in part)  # in problem order
    k = cfg.eval_k
    greedy, sampled = scores([g for _, g, _ in counts], 1, 1), scores([s for _, _, s in counts], k, k)
    return {"acc": greedy["avg"], f"avg_at_{k}": sampled["avg"], f"pass_at_{k}": sampled["pass"],
            "eval_verify_timeouts": sum(t for _, t in everyone)}


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


@contextmanager
def timed(times, name):
    """Add the time spent in the block to times[name] (summed over dynamic sampling's rounds)."""
    t = time.time()
    yield
    times[name] = times.get(name, 0.0) + time.time() - t


# ----------------------------------------------------------------------------------------------
# The loop
def train(cfg, run):
    """Set up (settings were validated by parse_args), then the loop; `run` collects the objects that
    the caller shuts down (sampler), so that every exit path closes them once."""
    rank, world, device = setup_distributed(cfg.dist_timeout_min)
    ckpt = checkpoint.prepare_run_folder(cfg.out, cfg.resume, rank)
    task, embedded = data.get_task(cfg.task), not cfg.model
    problems, eval_problems = load_data(cfg, task, embedded)
    base = (tiny.prepare_tiny_model(cfg.tiny_dir, cfg.warm_start_steps, cfg.seed)
            if embedded else resolve_model(cfg.model))
    tokenizer = tiny.load_tokenizer(base)
    style = data.PromptStyle(instruction=("" if embedded else task.instruction) if cfg.instruction == "auto"
                             else cfg.instruction, system_prompt=cfg.system_prompt, chat_template=cfg.chat_template)
    stop_ids = data.stop_token_ids(base, tokenizer)
    check_context(base, cfg)
    problems = prepare_prompts(problems, tokenizer, style, cfg)
    check_enough_problems(problems, cfg)
    print0("settings:", textwrap.fill(" ".join(cli.describe(cfg)), 118, subsequent_indent="  "))
    print0(f"stop tokens: {tokenizer.convert_ids_to_tokens(stop_ids)} | processes: {world} | device: {device}")
    model = load_policy(ckpt or base, cfg, device, weights=not ckpt)  # a resume: checkpoint.load fills the weights
    ref_model = load_reference(base, cfg, device) if cfg.loss.kl_coef > 0 else None  # frozen pi_ref for the KL term
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")  # fused on GPUs: one kernel, no foreach temporaries
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: lr_factor(u, cfg))
    start = checkpoint.load(ckpt, model, optimizer, scheduler) if ckpt else 0  # float32 weights, AdamW, schedule, RNG
    log = checkpoint.open_log(cfg.out, asdict(cfg), start, rank, fmt, cfg.wandb)
    run["sampler"] = sampler = rollout.make_sampler(
        checkpoint.hf_folder(ckpt) if ckpt else base, tokenizer, backend=cfg.sampler, max_model_len=cfg.max_prompt_tokens + cfg.max_response_tokens,
        seed=cfg.seed + rank, dtype="bfloat16" if device.type == "cuda" else "float32",
        gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=device.type == "cuda")
    evaluate_now = lambda: held_out(sampler, tokenizer, eval_problems, cfg, style, stop_ids, task, rank, world)  # noqa: E731
    results = {}
    if eval_problems and start == 0:
        results["before"] = evaluate_now()
        log({"step": 0, **results["before"]}, "held-out before RL: ")
    stop = StopRequest()
    per_rank, free = cfg.prompts_per_step // world, free_old_logprobs(cfg)
    if free:
        print0("old log-probs: one epoch of one mini-batch, so pi_old is the update's own forward, detached "
               "(rho = 1 exactly): stage 5 skipped")
    for step in tqdm(range(start + 1, cfg.steps + 1), desc="RL steps", disable=rank != 0, initial=start, total=cfg.steps):
        times, t0 = {}, time.time()
        groups, timeouts, rounds = [], 0, 0  # groups: (problem, G samples, G rewards) of every round
        while True:  # stages 1-3, once; with --drop-zero-signal, until this rank holds per_rank groups with signal
            rounds += 1
            # ---- 1. pick prompts (this rank's shard; a later round: problems this step has not drawn)
            short = sum(has_signal(r) for _, _, r in groups) < per_rank
            batch_problems = pick_prompts(problems, step, cfg, rank, world, rounds - 1) if rounds == 1 or short else []
            # ---- 2. sample G completions per prompt, stopping at the end of the turn
            with timed(times, "sample"):
                samples = sampler.generate([p["ids"] for p in batch_problems], n=cfg.group_size,
                                           max_tokens=cfg.max_response_tokens, temperature=cfg.temperature,
                                           seed=step_seed(cfg, step, rank, stage=2, rnd=rounds - 1),
                                           stop_token_ids=stop_ids) if batch_problems else []
            # ---- 3. verify: reward R in {0, 1}
            with timed(times, "verify"):
                texts = [s.text for group in samples for s in group]
                rewards, lost = task.reward(texts, [p for p in batch_problems for _ in range(cfg.group_size)],
                                            VERIFY_TIMEOUT) if texts else ([], 0)
            timeouts += lost
            G = cfg.group_size
            groups += [(p, group, rewards[i * G:(i + 1) * G]) for i, (p, group) in enumerate(zip(batch_problems, samples))]
            short = cfg.drop_zero_signal and sum(has_signal(r) for _, _, r in groups) < per_rank
            # collective: every rank runs as many rounds (a later round's collectives stay matched);
            # a rank that holds its share samples nothing more
            more, capped = all_reduce([float(short and rounds < cfg.max_sampling_rounds), float(short)],
                                      dist.ReduceOp.MAX)
            if not more:
                break
        sampler.sleep()  # GPU: its weights and KV cache freed while the policy trains (stage 7 wakes it); CPU: no-op
        kept = [g for g in groups if has_signal(g[2])][:per_rank] if cfg.drop_zero_signal else groups  # surplus dropped
        if capped:
            print0(f"step {step}: --max-sampling-rounds {cfg.max_sampling_rounds} reached with fewer than "
                   f"{cfg.prompts_per_step} groups with signal: this step trains on the groups it has")
        # ---- 4. group advantages A (maspo.group_advantages), as a padded batch
        batch = build_batch(kept, cfg, data.pad_id(tokenizer))
        # ---- 5. old log-probs from the training model (no grad; free when one epoch of one mini-batch:
        # update_policy takes them from its own forward), and pi_ref for the KL term
        with timed(times, "old_logp"):
            model.eval()
            if not free:
                old_logprobs(model, batch, cfg)
            if ref_model is not None:
                old_logprobs(ref_model, batch, cfg, key="ref_logp")
        # ---- 6. policy update: epochs x mini-batches of maspo.policy_loss
        with timed(times, "update"):
            model.train()
            loss_metrics = update_policy(model, optimizer, scheduler, batch, cfg, world, step)
        # ---- 7. push the new weights into the sampler, gathered one tensor at a time in its dtype (TRL's order)
        with timed(times, "sync"):
            sampler.sync(checkpoint.gathered(model, sampler.dtype))
        # ---- 8. log: one line per step
        times["step"] = time.time() - t0
        row = step_metrics(step, batch, groups, kept, timeouts, rounds, loss_metrics, times)
        if rank == 0 and step % ROLLOUTS_EVERY == 0:
            checkpoint.dump_rollouts(cfg.out, step, groups)
        # ---- 9. evaluate / checkpoint
        if eval_problems and (step == cfg.steps or cfg.eval_every and step % cfg.eval_every == 0):
            held = evaluate_now()
            row.update(held)
            if step == cfg.steps:
                results["after"] = held
        log(row)
        stopping = stop.agreed()
        if step % cfg.save_every == 0 or step == cfg.steps or stopping:
            saved = checkpoint.save(cfg.out, step, model, optimizer, scheduler, tokenizer,
                                    dtype=compute_dtype(cfg, device), extra=asdict(cfg))
            if step == cfg.steps and not saved:
                raise SystemExit(f"error: the final checkpoint (step {step}) could not be written to {cfg.out}")
        if stopping:
            print0(f"stopped at step {step} ({signal.Signals(int(stopping)).name}); continue with --resume")
            raise SystemExit(128 + int(stopping))
    if "after" in results:  # the summary, when RL ran
        for when, held in results.items():
            print0(f"held-out {when} RL: {fmt(held)}")
    dist.barrier()  # the last collective; then the engine may go (its teardown touches torch.distributed)
    return results


def main(argv=None):
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars at every load and save
    run = {}
    try:
        cfg = parse_args(argv)  # every setting checked before anything loads
        if cfg.plan:  # nothing loads: the model's config.json only
            print(plan.for_train(cfg, int(os.environ.get("WORLD_SIZE", "1"))))
        else:
            train(cfg, run)
    except cli.SettingError as e:
        cli.exit_with(e)
    except BaseException:
        traceback.clear_frames(sys.exc_info()[2])  # the loop's locals (the FSDP model) go now: see shutdown()
        raise
    finally:
        shutdown(run)


def shutdown(run):
    """Once, in order, on every exit path: the engine first (vLLM's teardown uses the process group),
    then the FSDP model, then the process group. The FSDP2 model and its optimizer live in reference
    cycles: left to the interpreter's exit, they are destroyed during finalization, after the process
    group, with gloo's pending work objects still holding tensors, which can abort the process
    ("terminate called without an active exception"); collecting them first makes teardown ordered."""
    if run.get("sampler") is not None:
        run.pop("sampler").close()
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
