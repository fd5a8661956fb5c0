"""Helper script for tests/test_checkpoint.py (not collected by pytest): a few AdamW updates of the real
FSDP2 policy (policy.load_policy on a tiny model) with checkpoint.save / checkpoint.load, in 1 process
(plain python) or N (torchrun). Every rank trains on the same fixed batch, so FSDP's average of the
ranks' gradients is the 1-process gradient and 1-process and 2-process runs can be compared.

    python tests/checkpoint_script.py MODE MODEL_DIR OUT DUMP [STEPS] [SAVE_AT]
    torchrun --standalone --nproc_per_node 2 tests/checkpoint_script.py ...

MODE
  train    steps 1..STEPS, checkpoint.save at the steps in SAVE_AT (comma-separated; a step written as
           "3b" saves with a bf16 export); DUMP.pt (rank 0): the full state after every step
  resume   checkpoint.load(latest(OUT)), then the steps after it up to STEPS; DUMP.pt: the state right
           after the load and after every step; DUMP.reads_rankR.json: every piece of the trainer state
           each rank read (file, entry, bytes), recorded by wrapping DCP's FileSystemReader.read_data
  fail     as train, but rank 1's DCP write raises OSError at step 2 (a planted full disk: DCP reports it on
           every rank), and at step 3 rank 1's own RNG file fails (only rank 1 knows)
  hang     as train, but at step 2 the export stops half-way (after the trainer state was written) and
           waits: the test SIGKILLs the process there
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import policy  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402

LR, B, T = 0.01, 4, 12


def make(model_dir, device):
    cfg = train.cli.build(train.Config, dict(model=model_dir, grad_checkpointing=False))
    model = policy.load_policy(model_dir, cfg, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0 / (1 + u))  # its state matters
    return model, optimizer, scheduler


def update(model, optimizer, scheduler, step):
    """One AdamW update on step's fixed batch (the same on every rank)."""
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, 99, (B, T), generator=g)
    logp, _ = model(ids, torch.ones_like(ids), 1.0)  # (B, T-1)
    (-logp.mean()).backward()
    optimizer.step()
    scheduler.step()
    model.zero_grad(set_to_none=True)


def full_state(model, optimizer, scheduler):
    """The whole state, gathered (a test-only helper: fine at this size): weights, AdamW, schedule."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
    if dist.get_rank() != 0:  # cpu_offload: the full state is on rank 0 only
        return {}
    return {"weights": {k: v.clone() for k, v in model_sd.items()},
            "optim": {k: {s: v.clone() if torch.is_tensor(v) else v for s, v in st.items()}
                      for k, st in optim_sd["state"].items()},
            "scheduler": scheduler.state_dict()}


def record_reads(rank, path):
    """Wrap DCP's FileSystemReader.read_data: each rank writes down every stored piece it reads."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    real, reads = FileSystemReader.read_data, []

    def read_data(self, plan, planner):
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            reads.append({"file": os.path.basename(info.relative_path), "fqn": item.storage_index.fqn,
                          "bytes": info.length, "numel": int(torch.Size(item.lengths).numel())})
        return real(self, plan, planner)
    FileSystemReader.read_data = read_data
    return lambda: json.dump(reads, open(f"{path}.reads_rank{rank}.json", "w"))


def plant(mode, rank, out):
    """The planted faults of modes fail and hang, active from step 2's save on."""
    if mode == "fail" and rank == 1:
        from torch.distributed.checkpoint.filesystem import FileSystemWriter
        real = FileSystemWriter.write_data

        def write_data(self, plan, planner):
            if "step_000002" in str(self.path):
                raise OSError(28, "No space left on device (planted)")
            return real(self, plan, planner)
        FileSystemWriter.write_data = write_data
        real_save = torch.save

        def save(obj, path, *args, **kwargs):  # step 3: a write of rank 1 alone fails (its RNG file)
            if "step_000003" in str(path):
                raise OSError(28, "No space left on device (planted, rank 1 only)")
            return real_save(obj, path, *args, **kwargs)
        checkpoint.torch.save = save
    if mode == "hang":
        real_export = checkpoint.write_hf_export

        def export(folder, *args):
            if "step_000002" in folder:
                open(os.path.join(out, "half_written"), "w").close()
                time.sleep(3600)  # the test kills the process here
            return real_export(folder, *args)
        checkpoint.write_hf_export = export


def main(mode, model_dir, out, dump, steps=3, save_at=""):
    rank, world, device = train.setup_distributed()
    model, optimizer, scheduler = make(model_dir, device)
    tokenizer = tiny.load_tokenizer(model_dir)
    states, start, finish = {}, 0, None
    if mode == "resume":
        finish = record_reads(rank, dump)
        start = checkpoint.load(checkpoint.latest(out), model, optimizer, scheduler)
        states[start] = full_state(model, optimizer, scheduler)
    plant(mode, rank, out)
    saves = {int(s.rstrip("b")): s.endswith("b") for s in save_at.split(",") if s}
    oks = {}
    for step in range(start + 1, int(steps) + 1):
        update(model, optimizer, scheduler, step)
        states[step] = full_state(model, optimizer, scheduler)
        if step in saves:
            oks[step] = checkpoint.save(out, step, model, optimizer, scheduler, tokenizer,
                                        dtype=torch.bfloat16 if saves[step] else torch.float32, extra={"mode": mode})
    if rank == 0:
        torch.save({"states": states, "oks": oks, "world": world}, dump + ".pt")
    with open(f"{dump}.oks_rank{rank}.json", "w") as f:
        json.dump(oks, f)
    if finish:
        finish()
    del model, optimizer, scheduler
    dist.barrier()  # both ranks are done communicating before either tears down
    train.shutdown({})


if __name__ == "__main__":
    main(*sys.argv[1:])
