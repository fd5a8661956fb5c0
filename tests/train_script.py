"""Helper script for tests/test_train.py (not collected by pytest): one rollout batch of fixed
sequences through train.old_logprobs + train.update_policy, in 1 process (plain python) or N
(torchrun), with the real FSDP2 model of policy.load_policy. Writes the resulting full weights and
the update metrics to OUT (rank 0).

    python tests/train_script.py MODEL_DIR OUT.pt MODE
    torchrun --nproc_per_node 2 tests/train_script.py MODEL_DIR OUT.pt MODE

MODE: "update" / "bapo" (MASPO / BAPO; 2 epochs of one mini-batch, the whole batch: the second update is off-policy;
with smaller mini-batches 1 and 2 processes would shuffle different sequences together), "one" (a single
update over the whole batch, sequences split unevenly over ranks: 11 / 5), "empty_rank" (the same,
rank 1 holding no sequence), "fused" (one epoch of one mini-batch, the rollout batch: pi_old is free, so
train.old_logprobs is NOT called and update_policy takes it from its own forward), "nan_first" / "nan_all"
(the loss poisoned with NaN), "reference" (train.load_reference: its mode, and two passes of
train.old_logprobs over the batch as pi_ref).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import data  # noqa: E402
import maspo  # noqa: E402
import policy  # noqa: E402
import train  # noqa: E402

N, GROUP, TEMPERATURE = 16, 4, 0.7
REWARDS = [1., 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0]  # group 3 (rows 8-11): all equal, A = 0


def fixed_batch(vocab):
    """16 sequences of varied prompt / completion lengths (ragged masks), rewards with signal in
    three groups of 4 out of 4."""
    g = torch.Generator().manual_seed(1)
    lengths = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    prompts = [torch.randint(3, vocab, (lengths(3, 8),), generator=g).tolist() for _ in range(N)]
    completions = [torch.randint(3, vocab, (lengths(2, 12),), generator=g).tolist() for _ in range(N)]
    ids, attn, mask = data.pad_batch(prompts, completions, pad_id=0)
    return {"ids": ids, "attn": attn, "mask": mask, "adv": maspo.group_advantages(torch.tensor(REWARDS), GROUP)}


def settings(mode):
    """"one" / "empty_rank": one update over the whole batch (mini_batch_size / world >= every rank's
    share, so uneven ranks still make one mini-batch). Small token budgets (40 tokens: 1-3 sequences per micro-batch) so that micro-batching, and
    different micro-batch counts on different ranks, are exercised."""
    one = mode in ("one", "empty_rank")
    if mode == "fused":  # mini-batch = rollout batch, one epoch: train.free_old_logprobs holds
        return train.cli.build(train.Config, dict(model="x", prompts_per_step=N // GROUP, group_size=GROUP,
            mini_batch_size=N, epochs=1, micro_batch_tokens=40, max_prompt_tokens=8, max_response_tokens=12,
            grad_clip=1e9, temperature=TEMPERATURE, grad_checkpointing=False))
    loss = {"loss": "bapo"} if mode == "bapo" else {}
    return train.cli.build(train.Config, dict(**loss,
        model="x", prompts_per_step=N // GROUP, group_size=GROUP, mini_batch_size=2 * N if one else N,
        epochs=1 if one else 2, micro_batch_tokens=40, max_prompt_tokens=8, max_response_tokens=12,
        grad_clip=1e9, temperature=TEMPERATURE, grad_checkpointing=False))


def main(model_dir, out, mode):
    rank, world, device = train.setup_distributed()
    cfg = settings(mode)
    batch = fixed_batch(vocab=99)
    if mode == "reference":
        ref = train.load_reference(model_dir, cfg, device)
        passes = [dict(batch) for _ in range(2)]
        for b in passes:
            train.old_logprobs(ref, b, cfg, key="ref_logp")
        if rank == 0:
            torch.save({"training": ref.training, "ref_logp": [b["ref_logp"] for b in passes]}, out)
        del ref
        train.shutdown({})
        return
    model = policy.load_policy(model_dir, cfg, device)
    cut = {"one": 11, "empty_rank": N}.get(mode, N // 2) if world == 2 else N  # rank 0 holds rows [:cut]
    shard = slice(0, cut) if rank == 0 else slice(cut, N)
    local = {k: v[shard] for k, v in batch.items()}
    # SGD, not Adam: Adam's first step is scale-free and would hide a wrong loss normalisation
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    assert train.free_old_logprobs(cfg) == (mode == "fused")
    if mode != "fused":
        train.old_logprobs(model, local, cfg)
    if mode.startswith("nan"):  # inject NaN into the loss: every call, or only the first update's
        real, calls = maspo.policy_loss, []

        def poisoned(*args, **kwargs):
            loss, metrics = real(*args, **kwargs)
            calls.append(1)
            return (loss * float("nan") if mode == "nan_all" or len(calls) == 1 else loss), metrics
        maspo.policy_loss = poisoned
    metrics = train.update_policy(model, optimizer, scheduler, local, cfg, world, step=1)
    weights = {k: v.detach().cpu().clone() for k, v in checkpoint.gathered(model)}
    if rank == 0:
        torch.save({"weights": weights, "metrics": metrics, "old_logp": local["old_logp"]}, out)
    del model, optimizer, scheduler
    torch.distributed.barrier()  # both ranks are done communicating before either tears down
    train.shutdown({})  # the FSDP objects collected before the process group goes (see train.shutdown)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
