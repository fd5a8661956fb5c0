"""checkpoint.py: checkpoints that scale with the model: a sharded trainer state plus an HF-format export.

A checkpoint is one folder, OUT/checkpoints/step_NNNNNN/:

    config.json, generation_config.json, tokenizer files,
    model.safetensors (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
        the weights in the compute dtype (bf16 for bf16 runs, float32 on CPU): what eval.py,
        transformers (from_pretrained) and vLLM load as they are (`hf_folder(ckpt)`)
    trainer/      the trainer state, sharded with torch.distributed.checkpoint (DCP): float32 master
                  weights and AdamW moments; each rank writes its own file (__R_0.distcp) and, at
                  resume, reads the parts of the files it needs (on the same number of processes:
                  its own file; on another number, DCP reshards: a 2-process checkpoint resumes in 1)
    rng/rank_R.pt each rank's torch RNG state
    trainer_state.json  step, learning-rate schedule, the run's settings; written last

Memory: no rank ever holds the full optimizer state or the full model. Saving, each rank writes its
own shard; the HF export gathers the weights ONE PARAMETER AT A TIME (`gathered`: an all-gather per
tensor, in the export dtype) and rank 0 streams each one into its safetensors file, whose header is
written first from the known shapes (so rank 0 holds one full parameter, never a whole file).
Resuming, DCP reads each stored shard piece by piece into the rank's own tensors. Host RAM per rank,
at save and at resume: its own shard, plus one full parameter on rank 0 at save.

Atomic: everything is written into step_NNNNNN.tmp, renamed to step_NNNNNN once every rank has
written its part; `latest(out)` lists only renamed folders, so a save killed half-way leaves the
previous checkpoint usable (and its .tmp folder is removed by the next save). The KEEP newest are
kept. A failed save (disk full, ...) is reported and returns False on every rank: training goes on.

    ok = checkpoint.save(out, step, model, optimizer, scheduler, tokenizer, dtype=torch.bfloat16, extra=cfg_dict)
    ckpt = checkpoint.latest(out)                      # newest complete checkpoint, or None
    step = checkpoint.load(ckpt, model, optimizer, scheduler)   # weights + AdamW + schedule + RNG
    checkpoint.hf_folder(ckpt)                         # the folder vLLM / eval.py / transformers load

Also the rest of a run's folder and its collectives: prepare_run_folder (never overwrite a run),
open_log (metrics.jsonl, config.json), dump_rollouts, StopRequest (Ctrl-C: save, then stop) and
all_reduce (the one float all-reduce train.py and this file use).

`model` is policy.load_policy's FSDP2 model (or any module whose state_dict holds DTensors or plain
tensors); every function here that takes it is a collective: all ranks call it, in the same order.
No paper equation lives here.
"""
import copy
import glob
import json
import os
import re
import shutil
import signal
import struct

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from tqdm import tqdm

import cli
import data

KEEP = 2  # the most recent checkpoints kept
SHARD_BYTES = 4 * 2**30  # the HF export's safetensors files hold at most this much (one bigger tensor alone)
MARKER = "trainer_state.json"  # written last into the .tmp folder; a checkpoint folder without it is not one
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def step_folders(root):
    """The step_NNNNNN folders in `root`, oldest first (a .tmp folder is an interrupted save: never listed)."""
    return sorted(d for d in os.listdir(root) if re.fullmatch(r"step_\d+", d)) if os.path.isdir(root) else []


def latest(out):
    """The newest complete checkpoint folder of the run in `out`, or None."""
    root = os.path.join(out, "checkpoints")
    done = [d for d in step_folders(root) if os.path.exists(os.path.join(root, d, MARKER))]
    return os.path.join(root, done[-1]) if done else None


def hf_folder(ckpt):
    """The HF-format model of a checkpoint (config, tokenizer, safetensors): the checkpoint folder itself."""
    return ckpt


@torch.no_grad()
def gathered(model, dtype=None, skip=()):
    """(name, full tensor) of every state-dict entry, ONE AT A TIME, in `dtype` (None: as stored), without
    autograd. A sharded entry (DTensor) is cast on its shard first, so the all-gather moves `dtype`'s
    bytes (bf16: half of the float32 master weights'). A collective: every rank must iterate all of it,
    in the same order (the state dict's); the caller drops each tensor before asking for the next."""
    for name, tensor in model.state_dict().items():
        if name in skip:
            continue
        if dtype is not None:
            tensor = tensor.to(dtype)
        yield name, (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor)


# ----------------------------------------------------------------------------------------------
# Save
def save(out, step, model, optimizer, scheduler, tokenizer, dtype=torch.float32, extra=None):
    """Write checkpoint `step` of the run in `out` (collective); returns whether it was saved, the same
    on every rank. `dtype`: the HF export's (the compute dtype). `extra`: JSON-able, kept in
    trainer_state.json (train.py: the run's settings)."""
    rank = dist.get_rank()
    root = os.path.join(out, "checkpoints")
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    errors = []

    def attempt(what, fn, *args):
        if errors:
            return
        try:
            fn(*args)
        except (Exception, CheckpointException) as e:  # OSError, a writer's own error on a full disk; DCP's
            # CheckpointException (a BaseException) carries every failed rank's error, on every rank
            errors.append(f"{what}: {type(e).__name__}: {first_error(e)}")

    if rank == 0:
        attempt("folder", fresh_folder, root, tmp)
    if agree(not errors):  # collective: every rank writes into the folder rank 0 made
        # collective (DCP): each rank writes its own shard of the weights and AdamW state; DCP raises
        # on every rank when any rank failed, so all ranks take the same branch below
        attempt("trainer state", save_trainer_state, os.path.join(tmp, "trainer"), model, optimizer)
        attempt("rng", torch.save, rng_state(), os.path.join(tmp, "rng", f"rank_{rank}.pt"))
        # collective (one all-gather per tensor, on every rank even after rank 0 failed to write)
        write_hf_export(tmp, model, dtype, tokenizer, errors if rank == 0 else None)
        if rank == 0:
            state = {"step": step, "scheduler": scheduler.state_dict(), "world_size": dist.get_world_size(),
                     "extra": extra or {}}
            attempt("trainer_state.json", write_json, os.path.join(tmp, MARKER), state)
    if agree(not errors) and rank == 0:  # collective: every rank's files are written
        attempt("rename", publish, tmp, final, root)
    saved = agree(not errors)  # collective: nobody goes on while rank 0 still renames
    if errors and (rank == 0 or "CheckpointException" not in errors[0]):  # DCP's error: every rank has it
        tqdm.write(f"checkpoint step {step} NOT saved (rank {rank}): {errors[0]} ({root}); training goes on, "
                   "the previous checkpoint is intact")
    if not saved and rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return saved


def first_error(e):
    """One line: a DCP CheckpointException's first failed rank's error, else the message's first line."""
    failures = getattr(e, "failures", None)
    if failures:
        rank, (error, _) = next(iter(failures.items()))
        return f"rank {rank}: {type(error).__name__}: {data.first_line(error)}"
    return data.first_line(e)


def all_reduce(values, op=dist.ReduceOp.SUM):
    """Reduce a list of floats over ranks (one collective for the whole list; on the GPU under NCCL)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def agree(ok):
    """True on every rank if `ok` holds on every rank (collective: the ranks agree on success)."""
    return all_reduce([1.0 if ok else 0.0], dist.ReduceOp.MIN)[0] > 0


def fresh_folder(root, tmp):
    """An empty tmp folder; leftovers of interrupted saves (*.tmp) removed first."""
    for leftover in glob.glob(os.path.join(root, "step_*.tmp")):
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "rng"))


def publish(tmp, final, root):
    """Rename tmp -> final (atomic), then keep only the KEEP newest checkpoints."""
    shutil.rmtree(final, ignore_errors=True)  # a checkpoint of the same step from before a resume
    os.replace(tmp, final)
    for old in step_folders(root)[:-KEEP]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_trainer_state(folder, model, optimizer):
    """float32 weights and AdamW state, sharded: get_state_dict's default is each rank's own shards
    (DTensors), never gathered; dcp.save writes them, one file per rank."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)


def write_hf_export(folder, model, dtype, tokenizer, errors):
    """The weights in `dtype` as HF safetensors + config + generation config + tokenizer. Every rank
    iterates the gathered tensors (collectives); rank 0 (errors is its error list, None elsewhere)
    writes them, each into its place in a file whose header was written first."""
    config = model.config
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    skip = {"lm_head.weight"} if tied else set()  # tied: saved once, as the embedding (as save_pretrained)
    specs = [(name, tuple(t.shape)) for name, t in model.state_dict().items() if name not in skip]
    files = plan_files(specs, dtype)
    writer = None
    for name, full in gathered(model, dtype, skip):
        if errors is None or errors:
            continue  # not rank 0, or rank 0 after a failed write: keep joining the all-gathers
        try:
            writer = writer or SafetensorsWriter(folder, files)
            writer.write(name, full)
        except Exception as e:
            errors.append(f"HF export: {type(e).__name__}: {data.first_line(e)}")
        del full  # one full tensor at a time
    if errors is None or errors:
        return
    try:
        writer.close()
        config = copy.deepcopy(config)
        config.dtype = dtype
        config.save_pretrained(folder)
        base_generation = os.path.join(config.name_or_path or "", "generation_config.json")
        if os.path.isfile(base_generation):  # the base model's (its eos list), not one rebuilt from config.json
            shutil.copy(base_generation, folder)
        elif getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    except Exception as e:
        errors.append(f"HF export: {type(e).__name__}: {data.first_line(e)}")


def plan_files(specs, dtype):
    """Split (name, shape) entries, in order, into safetensors files of at most SHARD_BYTES: a list of
    (file name, [(name, shape, start, end)]) with byte offsets inside each file's data section."""
    size = torch.tensor([], dtype=dtype).element_size()
    groups, current, used = [], [], 0
    for name, shape in specs:
        n = size * int(torch.Size(shape).numel())
        if current and used + n > SHARD_BYTES:
            groups.append(current)
            current, used = [], 0
        current.append((name, shape, used, used + n))
        used += n
    groups.append(current)
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    return [(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups)]


class SafetensorsWriter:
    """Writes tensors, in the planned order, into safetensors files (the format: an 8-byte little-endian
    header length, a JSON header of dtype / shape / data_offsets per tensor, then the raw bytes). The
    headers come from the plan, so each tensor goes to disk as it arrives: one tensor in memory."""

    def __init__(self, folder, files):
        self.folder, self.files = folder, files
        self.order = [(file, name) for file, entries in files for name, *_ in entries]
        self.next, self.handle, self.file = 0, None, None
        if len(files) > 1:
            weight_map = {name: file for file, name in self.order}
            total = sum(end for _, entries in files for *_, end in entries[-1:])
            write_json(os.path.join(folder, "model.safetensors.index.json"),
                       {"metadata": {"total_size": total}, "weight_map": weight_map})

    def write(self, name, tensor):
        file, expected = self.order[self.next]
        assert name == expected, f"export: got {name}, expected {expected} (every rank must gather in the same order)"
        if file != self.file:
            self.open(file, tensor.dtype)
        self.handle.write(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        self.next += 1

    def open(self, file, dtype):
        if self.handle:
            self.handle.close()
        entries = dict(self.files)[file]
        header = {name: {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [start, end]}
                  for name, shape, start, end in entries}
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.handle, self.file = open(os.path.join(self.folder, file), "wb"), file
        self.handle.write(struct.pack("<Q", len(raw)) + raw)

    def close(self):
        assert self.next == len(self.order), f"export: {len(self.order) - self.next} tensors missing"
        self.handle.close()


# ----------------------------------------------------------------------------------------------
# Load
def load(ckpt, model, optimizer, scheduler):
    """Restore the float32 weights, the AdamW state, the schedule and this rank's RNG from checkpoint
    folder `ckpt` into a model / optimizer built as for a fresh run (collective); returns the step.
    On another number of processes than the save's, DCP reshards (RNG: rank R takes rank R mod the
    saved count's state)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)  # this rank's shards: DCP loads into them in place
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(ckpt, "trainer"))  # collective: each rank reads what it holds
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(os.path.join(ckpt, MARKER)) as f:
        meta = json.load(f)
    scheduler.load_state_dict(meta["scheduler"])
    saved = len(glob.glob(os.path.join(ckpt, "rng", "rank_*.pt")))
    rng = torch.load(os.path.join(ckpt, "rng", f"rank_{dist.get_rank() % max(saved, 1)}.pt"), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta["step"]


# ----------------------------------------------------------------------------------------------
# The run folder: never overwritten, resumed from its newest checkpoint, saved before a signal stops it
def prepare_run_folder(out, resume, rank):
    """Check OUT before anything loads: writable, and holding no run unless `resume` continues it.
    Returns the checkpoint to resume from (None: a new run)."""
    ckpt = latest(out)
    has_metrics = os.path.exists(os.path.join(out, "metrics.jsonl"))
    if not resume and (ckpt or has_metrics):
        held = f"checkpoints up to {os.path.basename(ckpt)}" if ckpt else "metrics.jsonl"
        raise cli.SettingError(f"error: --out {out!r} already holds a run ({held}): add --resume to continue it, "
                               "or choose another --out (nothing was changed)")
    if rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
            probe = os.path.join(out, ".write_test")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise cli.SettingError(f"error: --out {out!r}: cannot write there ({e.strerror})") from None
    return ckpt if resume else None


class StopRequest:
    """SIGINT / SIGTERM: finish the current step, save, exit. A second signal stops at once."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signum:  # the second one: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum
        if dist.get_rank() == 0:
            tqdm.write(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                       "(signal again to stop at once)")

    def agreed(self):
        """The signal any rank received, 0 if none (a collective: all ranks stop at the same step)."""
        # collective: one rank's Ctrl-C stops them all after this step
        return int(all_reduce([float(self.signum)], dist.ReduceOp.MAX)[0])


def open_log(out, settings, start, rank, fmt, wandb_project=""):
    """The metrics log: OUT/metrics.jsonl (on resume: exactly the steps the checkpoint covers), the
    console (fmt(row): one line) and wandb if asked; writes OUT/config.json (`settings`, the effective
    ones). Returns log(row, prefix)."""
    path = os.path.join(out, "metrics.jsonl")
    wandb_run = None
    if rank == 0:
        rows = [json.loads(line) for line in open(path)] if start and os.path.exists(path) else []
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= start)
        write_json(os.path.join(out, "config.json"), settings)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise SystemExit("--wandb needs the wandb package: pip install wandb") from None
            wandb_run = wandb.init(project=wandb_project, config=settings, resume="allow")

    def log(row, prefix=""):
        if rank == 0:
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if wandb_run:
                wandb_run.log(row, step=row["step"])
            tqdm.write(prefix + fmt(row))
    return log


def dump_rollouts(out, step, groups, how_many=4):
    """A few decoded rollouts with their rewards, OUT/rollouts/step_N.jsonl, for reading what the policy does."""
    folder = os.path.join(out, "rollouts")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"step_{step:06d}.jsonl"), "w") as f:
        for p, samples, rewards in groups[:how_many]:
            for s, r in zip(samples, rewards):
                f.write(json.dumps({"question": p.get("question") or p["messages"][-1]["content"],
                                    "answer": p["answer"], "completion": s.text, "reward": r,
                                    "finish_reason": s.finish_reason}) + "\n")
