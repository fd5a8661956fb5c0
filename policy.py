"""policy.py: the trained policy pi_theta as train.py holds it: a Hugging Face causal LM, FSDP2-sharded,
float32 master weights, bf16 compute on GPUs, whose forward returns token log-probs, not logits.

    model = load_policy(path, cfg, device)                 # every rank: its shard only
    logp, H = model(ids, attn, temperature, with_entropy)  # (B, T-1) each: log pi(o_t) and H_t at T

Sharding: each decoder layer is one FSDP2 unit, then the root (embeddings, lm_head, final norm).
Loading: every rank builds the model on the meta device (no memory), shards it and allocates its own
shard; rank 0 alone reads the safetensors files and broadcasts them (one host copy of the weights,
on rank 0). At a resume the weights come from the checkpoint's sharded trainer state instead
(checkpoint.load: float32 master weights, not the export's bf16), so nothing is read here
(`weights=False`).
The lm_head is applied chunk by chunk (logprobs.hidden_logprobs): [B, T, V] logits never exist.
No paper equation lives here (the log-probs' formula is logprobs.py's).
"""
import os
import types

import torch
import torch.distributed as dist

import logprobs


def load_policy(path, cfg, device, forward=None, weights=True):
    """The policy of the model in folder `path`, FSDP2-sharded, float32 master weights; the weights of
    `path` are loaded unless weights=False (a resume: checkpoint.load fills them). `forward` replaces
    policy_forward (bench/gpu_check.py's unfused path). A collective: every rank calls it."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.forward = types.MethodType(forward or policy_forward, model)  # before fully_shard: FSDP hooks wrap it
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    # bf16 compute, float32 master weights and gradient reductions; log-probs and loss are float32
    bf16 = compute_dtype(cfg, device) == torch.bfloat16
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.to_empty(device=device)
    for module in model.modules():  # non-persistent buffers (rotary inv_freq) are not in checkpoints
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            fresh = type(module)(module.config)
            module.inv_freq.copy_(fresh.inv_freq)
            module.original_inv_freq.copy_(fresh.original_inv_freq)
    if not weights:
        return model
    full = {}
    if dist.get_rank() == 0:
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                full.update(load_file(os.path.join(path, name)))
        if config.tie_word_embeddings and "lm_head.weight" not in full:
            full["lm_head.weight"] = full["model.embed_tokens.weight"]  # tied: saved once
    # collective: rank 0's full tensors are broadcast, each rank keeps its shard
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    return model


def compute_dtype(cfg, device):
    """The dtype of the forward and backward (and of the checkpoints' HF export): --precision, auto = bf16 on GPUs."""
    return torch.bfloat16 if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda") else torch.float32


def load_reference(path, cfg, device):
    """The frozen reference policy pi_ref of the KL term, sharded as the policy, in eval mode (from_config
    leaves a model in train mode: dropout, where its config has any, would make pi_ref random)."""
    return load_policy(path, cfg, device).eval()


def policy_forward(self, input_ids, attention_mask, temperature, with_entropy=False):
    """The policy's forward inside FSDP's root forward: token log-probs of the next token at temperature
    T (B, T-1) and optionally the entropy H_t (B, T-1). lm_head is applied chunk by chunk by
    logprobs.hidden_logprobs: [B, T, V] logits never exist, forward or backward. It must run inside
    the root module's forward: lm_head's weight belongs to the root's FSDP shard group, which is
    gathered only there."""
    hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, D)
    logp, H = logprobs.hidden_logprobs(hidden[:, :-1], self.lm_head.weight, input_ids[:, 1:], temperature=temperature,
                                       with_entropy=with_entropy)  # (B, T-1) each
    # FSDP hooks the root's outputs for its backward; a view output would warn (in-place ops could skip it)
    return logp.clone(), (H.clone() if H is not None else None)


def dummy_forward(model, cfg, device, backward=False):
    """A zero-weight forward (and backward) on two tokens: keeps FSDP's collectives matched on a rank
    that has run out of sequences while others have not."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    logp, _ = model(ids, torch.ones_like(ids), cfg.temperature)
    if backward:
        (logp.sum() * 0.0).backward()
