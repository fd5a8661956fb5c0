"""Tests for tiny.py: the character tokenizer and the tiny Qwen2 model of the embedded default.

Run: python -m pytest tests/test_tiny.py -q   (a few seconds)
"""
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tiny

TEXT = "  Q: What is 12 + 30?\n\nA: 42, i.e. \\boxed{42}.  ~`|{}[]  "  # spaces kept, at both ends


def test_char_tokenizer_round_trips_text_one_token_per_char():
    tok = tiny.build_char_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, len(tok)) == (0, 1, 3 + 1 + 95)
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT) and tok.bos_token_id is None  # no BOS, no merges
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    every_char = "".join(tiny.CHARS)
    assert tok.decode(tok.encode(every_char)) == every_char
    assert len(set(tok.encode(every_char))) == len(every_char)
    assert tok.decode(tok.encode("ab") + [tok.eos_token_id], skip_special_tokens=True) == "ab"
    assert tok.encode("é") == [tok.unk_token_id]  # outside the alphabet: <unk>, not an error


def test_saved_tokenizer_reloads_with_spaces(tmp_path):
    path = tiny.build_tiny_model(str(tmp_path / "m"))
    tok = tiny.load_tokenizer(path)
    assert tok.encode(TEXT) == tiny.build_char_tokenizer().encode(TEXT)
    assert tok.decode(tok.encode(TEXT), skip_special_tokens=True) == TEXT
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)


def test_tiny_model_loads_and_matches_tokenizer(tmp_path):
    path = tiny.build_tiny_model(str(tmp_path / "m"), seed=0)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = tiny.load_tokenizer(path)
    config = model.config
    assert config.model_type == "qwen2" and config.vocab_size == len(tok)
    assert (config.eos_token_id, config.pad_token_id) == (1, 0)
    assert config.hidden_size // config.num_attention_heads == 64
    assert next(model.parameters()).dtype == torch.float32
    assert 0.4e6 < tiny.num_parameters(path) < 0.6e6  # the "0.5M" preset
    logits = model(torch.tensor([tok.encode("Q: 1 + 1?")])).logits
    assert logits.shape == (1, 9, len(tok))


def test_seeded_and_presets(tmp_path):
    a = load_file(tiny.build_tiny_model(str(tmp_path / "a"), seed=0) + "/model.safetensors")
    b = load_file(tiny.build_tiny_model(str(tmp_path / "b"), seed=0) + "/model.safetensors")
    c = load_file(tiny.build_tiny_model(str(tmp_path / "c"), seed=1) + "/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    path = tiny.build_tiny_model(str(tmp_path / "5M"), **tiny.SIZES["5M"])
    assert 4.5e6 < tiny.num_parameters(path) < 5.5e6


def test_head_dim_below_32_is_refused(tmp_path):
    with pytest.raises(ValueError, match="head_dim .* 16 < 32"):
        tiny.build_tiny_model(str(tmp_path / "m"), hidden_size=64, num_heads=4, num_kv_heads=1)
    with pytest.raises(ValueError, match="divisible"):
        tiny.build_tiny_model(str(tmp_path / "m"), hidden_size=128, num_heads=3, num_kv_heads=1)


def test_command_line_builds_a_chat_model_with_the_context_asked_for(tmp_path):
    """`python tiny.py --chat qwen --context 4096` (the README's benchmark-on-a-laptop model): the
    context is the one asked for, the end-of-turn token is in generation_config; a context too small
    to hold a prompt is refused with one line."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "chat"
    proc = subprocess.run([sys.executable, "tiny.py", "--chat", "qwen", "--context", "4096", "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 4096
    tok = tiny.load_tokenizer(str(out))
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos
    bad = subprocess.run([sys.executable, "tiny.py", "--context", "10", "--out", str(tmp_path / "x")], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--context 10: must be >= 64" in bad.stderr and "Traceback" not in bad.stderr


def test_llama3_stand_in_has_no_pad_token_and_ends_turns_at_eot(tmp_path):
    """The Llama-3-style stand-in: no pad token (as the Llama 3 family ships), header-delimited turns,
    and sampling stops at <|eot_id|> and <|end_of_text|>."""
    import data
    path = tiny.build_chat_model(str(tmp_path / "llama"), "llama3")
    tok = tiny.load_tokenizer(path)
    assert tok.pad_token is None and tok.pad_token_id is None
    assert data.prompt_text(tok, {"question": "2+2?"}, data.PromptStyle(instruction="")) == \
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>" \
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert data.end_of_turn_token(tok) == "<|eot_id|>"
    assert data.stop_token_ids(path, tok) == sorted(tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"]))


@pytest.mark.parametrize("steps", [3])
def test_warm_start_reports_the_accuracy_of_its_final_weights(tmp_path, capsys, steps):
    """Fewer steps than one accuracy check (3; the same code path serves a budget ending between checks): the printed
    accuracy is the saved model's (recomputed here from the saved weights), not a stale or missing one."""
    import data
    path = tiny.build_tiny_model(str(tmp_path / "m"), seed=0)
    problems = data.arithmetic_problems("train", seed=0)
    tiny.warm_start(path, problems, data.TASKS["math"].demo, steps=steps, target=0.99, seed=0)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("warm start:"))
    assert int(line.split()[2]) == steps, line
    tok, model = tiny.load_tokenizer(path), AutoModelForCausalLM.from_pretrained(path)
    hits = 0
    for p in problems[:256]:  # greedy teacher-forced exact match, as warm_start measures it
        prompt = data.prompt_ids(tok, p, data.PromptStyle(instruction=""))
        answer = tok.encode(data.TASKS["math"].demo(p), add_special_tokens=False) + [tok.eos_token_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            pred = model(input_ids=ids).logits[0, len(prompt) - 1:-1].argmax(-1)
        hits += bool((pred == ids[0, len(prompt):]).all())
    assert abs(float(line.split()[-1]) - hits / 256) <= 1 / 256, (line, hits)
