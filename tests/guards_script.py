"""Helper script for tests/test_guards.py (not collected by pytest): one optimizer update through
train.update_policy with the real FSDP2 model of train.load_policy, run by torchrun on 2 processes
(or plain python on 1). Writes the full weights and the update's metrics to OUT (rank 0).

    torchrun --standalone --nproc_per_node 2 tests/guards_script.py MODEL_DIR OUT.pt MODE

MODE "bapo": loss BAPO, SGD (lr LR_SGD), the rollout batch's old log-probs shifted by DELTA so that
the update is off-policy (rho = exp(-DELTA)) and the ratio bounds cut some tokens' gradient.
MODE "clip": loss MASPO on-policy, AdamW (lr LR_ADAM, no weight decay), --grad-clip CLIP.
Rank 0 holds the rows with A > 0, rank 1 those with A < 0 (batch() orders them so).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import maspo  # noqa: E402
import checkpoint  # noqa: E402
import train  # noqa: E402

N, GROUP, TEMPERATURE = 16, 4, 0.7
LR_SGD, LR_ADAM, CLIP = 0.5, 1e-2, 1e-5


def batch(vocab=99):
    """16 sequences of ragged prompt / completion lengths; rewards 2 of 4 correct in every group
    (A = +-0.866), rows ordered A > 0 first; DELTA [B, T-1], the shift of the old log-probs."""
    g = torch.Generator().manual_seed(17)
    lengths = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    prompts = [torch.randint(3, vocab, (lengths(3, 8),), generator=g).tolist() for _ in range(N)]
    completions = [torch.randint(3, vocab, (lengths(2, 12),), generator=g).tolist() for _ in range(N)]
    ids, attn, mask = data.pad_batch(prompts, completions, pad_id=0)
    adv = maspo.group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0] * (N // GROUP)), GROUP)
    order = torch.argsort(-adv, stable=True)  # A > 0 rows first: rank 0 gets them all
    b = {"ids": ids[order], "attn": attn[order], "mask": mask[order], "adv": adv[order]}
    pos = (b["adv"] > 0)[:, None].float()
    delta = torch.randn(mask.shape, generator=g) * (0.3 + 0.6 * pos) + 0.5 * pos
    return b, delta


def settings(mode):
    return train.cli.build(train.Config, dict(
        loss="bapo" if mode == "bapo" else "maspo", model="x", prompts_per_step=N // GROUP,
        group_size=GROUP, mini_batch_size=N, epochs=1, micro_batch_tokens=40, max_prompt_tokens=8,
        max_response_tokens=12, grad_clip=CLIP if mode == "clip" else 1e9, temperature=TEMPERATURE,
        weight_decay=0.0, grad_checkpointing=False))


def main(model_dir, out, mode):
    rank, world, device = train.setup_distributed()
    cfg = settings(mode)
    model = train.load_policy(model_dir, cfg, device)
    full, delta = batch()
    shard = slice(rank * N // world, (rank + 1) * N // world)
    local = {k: v[shard] for k, v in full.items()}
    train.old_logprobs(model, local, cfg)
    if mode == "bapo":
        local["old_logp"] += delta[shard]  # pi_old differs from pi_theta: rho = exp(-delta)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR_SGD)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR_ADAM, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    metrics = train.update_policy(model, optimizer, scheduler, local, cfg, world, step=1)
    weights = {k: v.detach().cpu().clone() for k, v in checkpoint.gathered(model)}
    if rank == 0:
        torch.save({"weights": weights, "metrics": metrics}, out)
    del model, optimizer, scheduler
    torch.distributed.barrier()  # both ranks are done communicating before either tears down
    train.shutdown({})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
