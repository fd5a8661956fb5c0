"""The embedded default's model: a tiny, randomly initialised Qwen2 with a character tokenizer.

No model hub is reachable on a fresh machine, so `python train.py` builds its own model here:
a `Qwen2ForCausalLM` (float32) whose vocabulary is one token per printable ASCII character plus
newline, saved in Hugging Face format so that both transformers and vLLM (CPU build) load it.
No paper equations live here.

Token ids: 0 `<pad>`, 1 `<eos>`, 2 `<unk>` (any character outside printable ASCII and "\\n"),
then "\\n" and the characters 32..126. No BOS token and no chat template: the trainer writes a
plain "Q: ... A:" prompt for this model.

Tokenizer pitfall (DESIGN.md): transformers 5 maps `model_type: qwen2` to its own Qwen2 tokenizer
class, so `AutoTokenizer.from_pretrained(model_dir)` silently breaks a character tokenizer saved
there (spaces vanish). Load it with `load_tokenizer(model_dir)`, which detects the generic class.

Run:  python tiny.py --out runs/tiny --size 0.5M      (prints the directory and parameter count)
"""
import argparse
import json
import math
import os

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]  # ids 0, 1, 2
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]  # newline + printable ASCII
MIN_HEAD_DIM = 32  # vLLM's CPU attention serves head sizes 32, 64, 80, ..., not 16

# Presets (parameter counts with the 99-token character vocabulary, untied embeddings).
SIZES = {
    "0.5M": dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1),  # 0.52M
    "5M": dict(hidden_size=256, num_layers=5, num_heads=4, num_kv_heads=2),  # 4.97M
    "30M": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2),  # 30.5M
}


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; decode(encode(text)) == text for printable ASCII and newlines."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char
    tok.decoder = decoders.Fuse()  # join characters with nothing between them (keeps spaces)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def build_tiny_model(out_dir, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                     intermediate_size=None, max_position_embeddings=512, seed=0) -> str:
    """Save a random Qwen2ForCausalLM (float32) + the character tokenizer to out_dir; return it."""
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"tiny model: hidden_size {hidden_size} must be divisible by num_heads "
                         f"{num_heads}, and num_heads by num_kv_heads {num_kv_heads}")
    head_dim = hidden_size // num_heads
    if head_dim < MIN_HEAD_DIM:
        raise ValueError(f"tiny model: head_dim = hidden_size / num_heads = {head_dim} < "
                         f"{MIN_HEAD_DIM}, which vLLM's CPU attention rejects; use fewer heads "
                         f"(e.g. num_heads={max(1, hidden_size // 64)}) or a larger hidden_size")
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,  # separate lm_head: the plainest case for vLLM's reload
        bos_token_id=tokenizer.eos_token_id,  # unused (no BOS is added); kept inside the vocab
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    with torch.random.fork_rng():  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.eos_token_id
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path):
    """Load the tokenizer saved in a model directory (char tokenizer safe; see module docstring)."""
    config_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            tokenizer_class = json.load(f).get("tokenizer_class")
        # A generic fast tokenizer (ours) must not be re-routed to the model type's own class.
        if tokenizer_class in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def num_parameters(model_dir) -> int:
    """Parameter count of a saved model (read from its safetensors files)."""
    from safetensors import safe_open
    total = 0
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), "pt") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/tiny", help="output directory")
    parser.add_argument("--size", default="0.5M", choices=list(SIZES), help="size preset")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    args = parser.parse_args()
    path = build_tiny_model(args.out, seed=args.seed, **SIZES[args.size])
    print(f"{path}: {num_parameters(path) / 1e6:.2f}M parameters")
