"""plan.py, the memory plan behind `train.py --plan`: parameter counts equal transformers' (presets
included, from configs/arch/ offline), the activation model equals the bytes autograd actually saves
(counted with saved-tensor hooks, with and without checkpointing, float32 and bf16), the KV cache per
token and the sharding arithmetic, and the verdicts / advice of the printed plan. Structural counts
only; the plan against measured peaks is bench/update.py's output (README)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {"configs/r1_distill_1.5b.json": "DeepSeek-R1-Distill-Qwen-1.5B", "configs/r1_distill_7b.json":
           "DeepSeek-R1-Distill-Qwen-7B"}


def arch_dict(name):
    with open(os.path.join(ROOT, "configs", "arch", name + ".json")) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def count(config):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [
    Qwen2Config(vocab_size=1000, hidden_size=256, intermediate_size=640, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True),
    Qwen2Config(vocab_size=1000, hidden_size=256, intermediate_size=640, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=8, tie_word_embeddings=False),
    LlamaConfig(vocab_size=500, hidden_size=128, intermediate_size=300, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, head_dim=64),  # no attention bias, head_dim != hidden / heads
], ids=["qwen2-tied-gqa", "qwen2-untied-mha", "llama-head-dim"])
def test_parameter_count_equals_transformers(config):
    assert plan.architecture(config.to_dict())["params"] == count(config)


def test_presets_architectures_offline():
    """The presets' hub names resolve to configs/arch/ (no network), with the published sizes."""
    counts = {}
    for preset, name in PRESETS.items():
        with open(os.path.join(ROOT, preset)) as f:
            model = json.load(f)["model"]
        assert plan.find_config(model).endswith(os.path.join("configs", "arch", name + ".json"))
        counts[name] = plan.architecture(arch_dict(name))["params"]
        assert counts[name] == count(AutoConfig.for_model(**arch_dict(name)))
    assert counts == {"DeepSeek-R1-Distill-Qwen-1.5B": 1_777_088_000, "DeepSeek-R1-Distill-Qwen-7B": 7_615_616_512}
    with pytest.raises(OSError, match="no config.json for 'org/unknown-model'.*configs/arch/unknown-model.json"):
        plan.find_config("org/unknown-model")


def saved_bytes(config, tokens, dtype, checkpointing):
    """Bytes autograd keeps for the backward after the model body's forward (saved-tensor hooks,
    parameters and duplicates of one storage not counted)."""
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t
    ids = torch.randint(0, config.vocab_size, (2, tokens // 2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_model_equals_saved_tensors(dtype, checkpointing):
    """plan.activations (per token and layer b (8D + 4I + 2 KV hd) + the RMSNorms' float32 copies; D per
    layer with checkpointing) against what autograd saves in transformers' Qwen2, two shapes whose D, I
    and KV differ: within 5%. Dropping a term (the MLP's 4I, the norms' copies in bf16) fails it."""
    for D, I, H, KV in ((256, 1024, 4, 2), (384, 2048, 6, 6)):
        config = Qwen2Config(vocab_size=512, hidden_size=D, intermediate_size=I, num_hidden_layers=3,
                             num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=1024)
        a = plan.architecture(config.to_dict())
        b = torch.tensor([], dtype=dtype).element_size()
        got = saved_bytes(config, 512, dtype, checkpointing)
        want = plan.activations(a, 512, b, checkpointing)[0]
        assert abs(got - want) <= 0.05 * got, (D, I, KV, got, want)


def test_kv_cache_sharding_and_phases():
    """KV bytes per token (2 L KV hd b: 28 KiB for 1.5B, 56 KiB for 7B in bf16), the training state as
    16 N / W bytes per rank, and vLLM's share split into weights + overhead + KV cache."""
    small, large = plan.architecture(arch_dict(PRESETS["configs/r1_distill_1.5b.json"])), \
        plan.architecture(arch_dict(PRESETS["configs/r1_distill_7b.json"]))
    cfg = dict(gpu_memory_utilization=0.7, max_prompt_tokens=512, max_response_tokens=8192, prompts_per_step=128,
               group_size=8, micro_batch_tokens=16384, grad_checkpointing=True)
    assert plan.vllm_share(small, cfg, 80 * plan.GIB, 1)["kv_per_token"] == 28 * 1024
    v = plan.vllm_share(large, cfg, 80 * plan.GIB, 8)
    assert v["kv_per_token"] == 56 * 1024 and v["wanted"] == 128 and v["seq"] == 8704
    assert v["share"] == v["weights"] + plan.VLLM_OVERHEAD + v["kv"] and v["weights"] == 2 * 7_615_616_512
    assert v["at_once"] == int(v["kv"] / (56 * 1024) // 8704)
    for world in (1, 8):
        t = plan.train_phase(large, 16384, 2, True, world)
        assert t["resident"] + t["parts"]["gradients"] == 16 * 7_615_616_512 / world
    p = plan.plan(cfg, arch_dict(PRESETS["configs/r1_distill_7b.json"]), world=8, gpu_gib=80)
    assert p["phases"]["sample"] == plan.CUDA_CONTEXT + p["train"]["resident"] + v["share"]
    assert p["phases"]["train"] == plan.CUDA_CONTEXT + p["train"]["peak"] + plan.VLLM_ASLEEP
    assert p["host"]["resume: at most, per rank"] == 12 * 7_615_616_512 / 8  # its shard of weights + AdamW, no more


def run_plan(*args):
    return subprocess.run([sys.executable, "plan.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_printed_plan_verdicts_and_advice():
    """The presets fit their intended machines; 7B on one 80 GB GPU does not and the plan names the fix
    (more GPUs); a small card for 1.5B likewise; without activation checkpointing the 1.5B update does
    not fit and the plan says to turn it on."""
    ok = run_plan("configs/r1_distill_7b.json", "--world", "8", "--gpu-gib", "80")
    assert ok.returncode == 0 and "verdict: fits" in ok.stdout and "DOES NOT FIT" not in ok.stdout
    for section in ("training state", "activations, checkpointing on", "log-prob path", "KV cache",
                    "sample", "train", "sync", "host RAM: load: rank 0 reads"):
        assert section in ok.stdout, section
    one = run_plan("configs/r1_distill_7b.json", "--world", "1")
    assert "verdict: DOES NOT FIT" in one.stdout and "more GPUs: 2 processes" in one.stdout
    assert "fits" in run_plan("configs/r1_distill_1.5b.json").stdout.split("verdict:")[1]
    cfg = {**json.load(open(os.path.join(ROOT, "configs/r1_distill_1.5b.json"))), "grad_checkpointing": False}
    p = plan.plan(cfg, arch_dict(PRESETS["configs/r1_distill_1.5b.json"]), world=1, gpu_gib=80)
    assert p["phases"]["train"] > p["usable"] and any("--grad-checkpointing" in x for x in p["advice"])
    bad = run_plan("no-such-config.json")
    assert bad.returncode != 0
