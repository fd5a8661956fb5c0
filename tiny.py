"""Small models built locally, in seconds, for laptops and tests (no model hub is needed).

1. The embedded default's model: a tiny Qwen2 (float32) with a character tokenizer (one token per
   printable ASCII character and newline; ids 0 <pad>, 1 <eos>, 2 <unk>), no chat template: the
   prompt is a plain "Q: ...\\nA: ". `prepare_tiny_model` builds it once and warm-starts it on the
   synthetic arithmetic task (cached in .cache/tiny-arith), which is what `python train.py` trains.
2. A realistic stand-in chat model, for running the real-model path on a laptop: the same Qwen2
   architecture with a byte-level BPE tokenizer trained here with `tokenizers`, special tokens and a
   chat template in one of three styles, and a small context (max_position_embeddings):
     "qwen"  Qwen2.5-Instruct's <|im_start|> / <|im_end|> turns with its default system prompt;
             tokenizer EOS <|endoftext|>, generation_config.json eos_token_id [<|im_end|>,
             <|endoftext|>]: the turn ends at a token that is NOT the tokenizer's EOS.
     "r1"    DeepSeek-R1-Distill-Qwen's <｜User｜> / <｜Assistant｜> turns, whose generation prompt
             opens a <think> block (the paper's base models); EOS <｜end▁of▁sentence｜>.
     "llama3" Llama-3-Instruct's <|start_header_id|> ... <|eot_id|> turns, and NO pad token, as the
             Llama 3 family ships (batches are padded with EOS: data.pad_id).
   Its weights are random unless warm-started (`--warm-start`), like the tiny model, on arithmetic.
No paper equation lives here.

Tokenizer pitfall: transformers 5 maps `model_type: qwen2` to its own Qwen2 tokenizer class, so
AutoTokenizer would silently rebuild a tokenizer saved here (a character tokenizer loses its
spaces). `load_tokenizer(model_dir)` loads the generic class these models are saved with.

Run:  python tiny.py --out runs/tiny --size 0.5M                 (random tiny model)
      python tiny.py --chat qwen --out runs/chat --warm-start     (stand-in chat model, ~1 min)
"""
import argparse
import functools
import json
import math
import os
import random
import shutil

import torch
import torch.distributed as dist
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from tqdm import tqdm

import data

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]  # ids 0, 1, 2 of the character tokenizer
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]  # newline + printable ASCII
MIN_HEAD_DIM = 32  # vLLM's CPU attention serves head sizes 32, 64, 80, ..., not 16
HERE = os.path.dirname(os.path.abspath(__file__))

# Presets (parameter counts with the 99-token character vocabulary, untied embeddings).
SIZES = {
    "0.5M": dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1),  # 0.52M
    "5M": dict(hidden_size=256, num_layers=5, num_heads=4, num_kv_heads=2),  # 4.97M
    "30M": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2),  # 30.5M
}
# The warm start's recipe (measured on 2 cores: lr 3e-3 plateaued at 10-20% for some seeds)
WARM_START_LR = 1e-3
WARM_START_BATCH = 64
WARM_START_CHECK_EVERY = 25  # steps between accuracy checks
WARM_START_TARGET = 0.3  # stop once greedy accuracy on 256 training problems reaches this


# ----------------------------------------------------------------------------------------------
# 1. The character tokenizer and the tiny model
def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; decode(encode(text)) == text for printable ASCII and newlines."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char
    tok.decoder = decoders.Fuse()  # join characters with nothing between them (keeps spaces)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_tiny_model(out_dir, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                     intermediate_size=None, max_position_embeddings=512, seed=0, tokenizer=None,
                     tie_word_embeddings=False, eos_token_ids=None, vocab_size=None) -> str:
    """Save a random Qwen2ForCausalLM (float32) and its tokenizer (default: the character one) to
    out_dir; return out_dir. vocab_size pads the embedding beyond the tokenizer (real shapes)."""
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"tiny model: hidden_size {hidden_size} must be divisible by num_heads "
                         f"{num_heads}, and num_heads by num_kv_heads {num_kv_heads}")
    head_dim = hidden_size // num_heads
    if head_dim < MIN_HEAD_DIM:
        raise ValueError(f"tiny model: head_dim = hidden_size / num_heads = {head_dim} < "
                         f"{MIN_HEAD_DIM}, which vLLM's CPU attention rejects; use fewer heads "
                         f"(e.g. num_heads={max(1, hidden_size // 64)}) or a larger hidden_size")
    tokenizer = tokenizer or build_char_tokenizer()
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    config = Qwen2Config(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="float32")
    with torch.random.fork_rng():  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = eos_token_ids or tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = bos
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path):
    """Load the tokenizer saved in a model directory (safe for the models of this file, see above)."""
    config_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            tokenizer_class = json.load(f).get("tokenizer_class")
        # A generic fast tokenizer (ours) must not be re-routed to the model type's own class.
        if tokenizer_class in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def local_model(name):
    """A local model folder for `name`: a folder as it is, a hub name downloaded once into the Hugging
    Face cache (weights, configs, tokenizer files) and read from there. train.py calls it on one rank
    per node first; OSError says what went wrong."""
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    try:
        return snapshot_download(name, allow_patterns=patterns)
    except Exception as e:  # offline, unknown name, gated model...: one line
        raise OSError(f"could not fetch {name!r} from the Hugging Face hub ({type(e).__name__}: "
                      f"{data.first_line(e, 200)}); pass a local folder") from None


def num_parameters(model_dir) -> int:
    """Parameter count of a saved model (read from its safetensors files)."""
    from safetensors import safe_open
    total = 0
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), "pt") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


# ----------------------------------------------------------------------------------------------
# 2. The stand-in chat model
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_TEMPLATE = (  # Qwen2.5-Instruct's template, without tool calls
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
R1_TEMPLATE = (  # DeepSeek-R1-Distill-Qwen's template, simplified: system text first, think block opened
    "{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'system' %}{{- message['content'] }}"
    "{%- endif %}{%- endfor %}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{{- '<｜User｜>' + message['content'] }}{%- elif message['role'] == 'assistant' %}"
    "{{- '<｜Assistant｜>' + message['content'].split('</think>')[-1] + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}{%- endif %}")
LLAMA3_TEMPLATE = (  # Llama-3-Instruct's template: header-delimited turns, each closed by <|eot_id|>
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
CHAT_STYLES = {  # special tokens (in id order), bos, eos, pad, the generation_config eos list, template, tied embeddings
    "qwen": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|endoftext|>",
                 pad="<|endoftext|>", gen_eos=["<|im_end|>", "<|endoftext|>"], template=QWEN_TEMPLATE, tied=True),
    "r1": dict(special=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>",
                        "</think>"], bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>",
               pad="<｜end▁of▁sentence｜>", gen_eos=["<｜end▁of▁sentence｜>"], template=R1_TEMPLATE, tied=False),
    "llama3": dict(special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                   gen_eos=["<|end_of_text|>", "<|eot_id|>"], template=LLAMA3_TEMPLATE, tied=False),
}
# Qwen2's pre-tokenizer: single digits, words with one leading non-letter, punctuation runs, spaces
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_bpe_tokenizer(style, vocab_size=1024):
    """A byte-level BPE tokenizer (Qwen2's pre-tokenization) trained on math-flavoured text."""
    spec = CHAT_STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    corpus = [QWEN_SYSTEM, data.INSTRUCTION, "system user assistant Answer: Solve the following math problem."]
    corpus += [f"What is {rng.randint(0, 999)} {rng.choice('+-*/')} {rng.randint(0, 99)}? The answer is "
               f"$\\boxed{{\\frac{{{rng.randint(1, 9)}}}{{{rng.randint(2, 9)}}}}}$, so x = {rng.randint(0, 99)}."
               for _ in range(2000)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["special"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"],
                                   pad_token=spec["pad"], additional_special_tokens=spec["special"])
    fast.chat_template = spec["template"]
    return fast


def build_chat_model(out_dir, style="qwen", **shape) -> str:
    """The stand-in chat model (random weights) in `style` "qwen", "r1" or "llama3"; returns out_dir. `shape`:
    build_tiny_model's size arguments (hidden_size, ..., max_position_embeddings, seed)."""
    if style not in CHAT_STYLES:
        raise ValueError(f"chat model style {style!r}: choose one of {sorted(CHAT_STYLES)}")
    tokenizer = build_bpe_tokenizer(style)
    spec = CHAT_STYLES[style]
    return build_tiny_model(out_dir, tokenizer=tokenizer, tie_word_embeddings=spec["tied"],
                            eos_token_ids=tokenizer.convert_tokens_to_ids(spec["gen_eos"]), **shape)


# ----------------------------------------------------------------------------------------------
# 3. The supervised warm start on arithmetic (the embedded default, and --warm-start above)
def prepare_tiny_model(tiny_dir, warm_start_steps, seed):
    """Path of the warm-started tiny model; built by rank 0 unless the cache holds these settings."""
    path = os.path.join(HERE, tiny_dir)  # an absolute tiny_dir stays as it is
    recipe = {"steps": warm_start_steps, "lr": WARM_START_LR, "target": WARM_START_TARGET, "seed": seed, "version": 3}
    marker = os.path.join(path, "warm_start.json")
    if dist.get_rank() == 0:
        cached = os.path.exists(marker) and json.load(open(marker)) == recipe
        if not cached:
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            build_tiny_model(tmp, seed=seed)
            warm_start(tmp, data.arithmetic_problems("train", seed=seed), data.TASKS["math"].demo,
                       warm_start_steps, WARM_START_TARGET, seed)
            with open(os.path.join(tmp, "warm_start.json"), "w") as f:
                json.dump(recipe, f)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)  # atomic: a killed warm start never leaves a model that looks finished
    dist.barrier()  # the other ranks wait for rank 0's model
    return path


def warm_start(path, problems, demo, steps, target, seed, lr=WARM_START_LR, style=None,
               batch_size=WARM_START_BATCH):
    """Supervised pass over `problems` (a training split: the held-out one is never looked at):
    completion = demo(problem) + end of turn; the arithmetic task's demo is "\\boxed{answer}".

    It stops early once greedy accuracy on 256 training problems reaches `target`: the model then
    starts RL at a known, modest accuracy with room to improve, whatever the seed or the thread count
    (a fixed step count at a fixed lr landed anywhere from 3% to 95% held-out across seeds, because
    the task is learned in sudden jumps). Greedy accuracy is measured as teacher-forced exact match
    (every answer token is the argmax), which equals greedy decoding's accuracy and costs one forward
    pass. Chat models get their chat prompt (by default the template's system prompt and no
    instruction) and, if the prompt opens a <think> block, an empty thought before the answer."""
    from transformers import AutoModelForCausalLM
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    style = style or data.PromptStyle(instruction="")
    end = data.end_of_turn_token(tok)
    end_id = tok.convert_tokens_to_ids(end) if end else tok.eos_token_id
    think = "</think>\n\n" if data.prompt_text(tok, problems[0], style).endswith("<think>\n") else ""

    pairs = {}  # problem index -> (prompt ids, target ids), each problem tokenized once

    def encode(indices):
        for i in indices:
            if i not in pairs:
                p = problems[i]
                pairs[i] = (data.prompt_ids(tok, p, style),
                            tok.encode(think + demo(p), add_special_tokens=False) + [end_id])
        prompts, answers = zip(*(pairs[i] for i in indices))
        return data.pad_batch(prompts, answers, data.pad_id(tok))  # (B, T), (B, T), (B, T-1)

    probe_ids, probe_attn, probe_mask = encode(range(min(256, len(problems))))

    def train_accuracy():
        with torch.no_grad():
            logits = model(input_ids=probe_ids, attention_mask=probe_attn).logits[:, :-1]  # (B, T-1, V)
        hit = (logits.argmax(-1) == probe_ids[:, 1:]) | (probe_mask == 0)
        return hit.all(1).float().mean().item()

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    bar = tqdm(range(steps), desc="warm start (supervised)", disable=not rank0)
    acc = None
    for step in bar:
        ids, attn, mask = encode([rng.choice(range(len(problems))) for _ in range(batch_size)])  # as rng.choice(problems)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]  # (B, T-1, V)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        loss = (nll * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if target and (step + 1) % WARM_START_CHECK_EVERY == 0:
            acc = train_accuracy()
            bar.set_postfix(train_acc=f"{acc:.2f}")
            if acc >= target:
                break
    bar.close()
    model.save_pretrained(path)
    if target and (acc is None or (step + 1) % WARM_START_CHECK_EVERY):  # the final weights' accuracy, not the last check's
        acc = train_accuracy()
    if target:
        print(f"warm start: {step + 1} steps, greedy accuracy on 256 train problems {acc:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/tiny", help="output directory")
    parser.add_argument("--size", default="0.5M", choices=list(SIZES), help="size preset")
    parser.add_argument("--chat", choices=sorted(CHAT_STYLES), help="build the stand-in chat model in this style")
    parser.add_argument("--warm-start", action="store_true",
                        help=f"warm-start it on arithmetic (to {WARM_START_TARGET * 100:.0f}%% train accuracy)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    parser.add_argument("--context", type=int, default=512,
                        help="max_position_embeddings (e.g. 4096 to run eval.py on the benchmarks' long prompts)")
    args = parser.parse_args()
    if args.context < 64:
        parser.error(f"--context {args.context}: must be >= 64")
    build = functools.partial(build_chat_model, style=args.chat) if args.chat else build_tiny_model
    path = build(args.out, seed=args.seed, max_position_embeddings=args.context, **SIZES[args.size])
    if args.warm_start:
        warm_start(path, data.arithmetic_problems("train", seed=args.seed), data.TASKS["math"].demo, steps=2000,
                   target=WARM_START_TARGET, seed=args.seed)
    print(f"{path}: {num_parameters(path) / 1e6:.2f}M parameters")
