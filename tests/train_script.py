"""Helper script for tests/test_train.py (not collected by pytest): one rollout batch of fixed
sequences through train.old_logprobs + train.update_policy, in 1 process (plain python) or N
(torchrun). Writes the resulting full weights and the update metrics to OUT (rank 0).

    python tests/train_script.py MODEL_DIR OUT.pt [update|nan_first|nan_all]
    torchrun --nproc_per_node 2 tests/train_script.py MODEL_DIR OUT.pt update
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import maspo  # noqa: E402
import train  # noqa: E402


def fixed_batch(n=16, group_size=4, vocab=99):
    """16 sequences of varied prompt / completion lengths and rewards with signal in every group."""
    g = torch.Generator().manual_seed(1)
    lengths = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    prompts = [torch.randint(3, vocab, (lengths(3, 8),), generator=g).tolist() for _ in range(n)]
    completions = [torch.randint(3, vocab, (lengths(2, 10),), generator=g).tolist() for _ in range(n)]
    ids, attn, mask = train.pad_batch(prompts, completions, pad_id=0)
    rewards = torch.tensor([1., 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 0])
    return {"ids": ids, "attn": attn, "mask": mask, "adv": maspo.group_advantages(rewards, group_size)}


def main(model_dir, out, mode):
    rank, world, device = train.setup_distributed()
    cfg = train.make_config(dict(mini_batch_size=16, micro_batch_size=3, epochs=2, grad_clip=1e9))
    model = train.load_policy(model_dir, cfg, device)
    batch = fixed_batch()
    shard = slice(rank * 16 // world, (rank + 1) * 16 // world)  # each rank holds its own sequences
    local = {k: v[shard] for k, v in batch.items()}
    train.old_logprobs(model, local, cfg.micro_batch_size)
    if mode != "update":  # inject NaN into the loss: every call, or only the first update's
        real, calls = maspo.policy_loss, []

        def poisoned(*args, **kwargs):
            loss, metrics = real(*args, **kwargs)
            calls.append(1)
            return (loss * float("nan") if mode == "nan_all" or len(calls) == 1 else loss), metrics
        maspo.policy_loss = poisoned
    # SGD, not Adam: Adam's first step is scale-free and would hide a wrong loss normalisation
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    metrics = train.update_policy(model, optimizer, scheduler, local, cfg, world, torch.Generator().manual_seed(0))
    weights = {k: v.detach().cpu().clone() for k, v in train.full_weights(model)}
    if rank == 0:
        torch.save({"weights": weights, "metrics": metrics}, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "update")
