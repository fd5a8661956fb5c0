"""data.py: the task. What the model is asked, when it stops, and how its answer is scored.

train.py and eval.py both go through this file, so training and evaluation can never disagree on
the prompt, the stop rule or the reward:
  1. problems   load_problems(source) -> [{"question" or "messages", "answer", "where", "answer_line"}]
                from JSONL / JSON / parquet files, hub datasets "org/name[:config][:split]", files in the
                verl / DAPO schema (chat-message prompts, reward_model.ground_truth, used as they are),
                and the synthetic arithmetic task of the embedded default ("arithmetic[:train|:test]").
  2. prompt     prompt_ids(tokenizer, problem, style): an optional system prompt, one user turn holding
                the question and the instruction, the chat template with the assistant's turn opened
                (or a plain "Q: ...\\nA: " for tokenizers without a template, like the tiny model's).
  3. stopping   stop_token_ids(model_path, tokenizer): the tokenizer's EOS, the model's
                generation_config.json EOS ids and the chat template's end-of-turn token. Chat models
                end their turn with a token of their own (<|im_end|>); a sampler that stops only at
                EOS writes an invented next turn, and the reward would grade that turn's answer.
  4. reward     TASKS[name].reward(completions, problems, timeout) -> (rewards in {0, 1}, timeouts).
                "math" reads the last \\boxed{} (or a final "Answer: X" line when the prompt asked for
                one, as DAPO-Math-17k's prompts do) and checks it with verify.py.

A new task is one Task (a loader, an instruction and a reward): an entry in TASKS, or a file of your
own named on the command line as --task file:NAME (README, "A new task").
No paper equation lives here. Nothing heavy is imported; nothing runs on import.
"""
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from typing import Callable

import cli

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# Field names tried in order when --prompt-key / --answer-key are not given. They cover MATH500,
# AIME24/25, AMC23, Minerva, OlympiadBench (`final_answer` is a list with $-delimiters),
# GSM8K-style `question`, and DAPO-Math-17k / verl parquet (`prompt` as chat messages,
# `reward_model.ground_truth`). A `solution` with a \boxed{} is the last resort for the answer.
QUESTION_KEYS = ("problem", "question", "prompt", "query", "input")
ANSWER_KEYS = ("answer", "final_answer", "reward_model.ground_truth", "ground_truth", "target",
               "expected_answer", "solution")
# A chat-message prompt that asks for a last line "Answer: X" (DAPO-Math-17k: "The last line of your response
# should be of the form Answer: $Answer ...") is graded on that line (verify.extract_answer).
ANSWER_LINE_RE = re.compile(r"(?:form|after|with|line)\W{0,3}\"?Answer:", re.I)
SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")


class DataError(ValueError):
    """A problem source that cannot be used; the message names the file, the line and the field."""


# ----------------------------------------------------------------------------------------------
# 1. Problems
def load_problems(source, prompt_key=None, answer_key=None, limit=None):
    """[{"question" | "messages", "answer", "where", "answer_line"}] from a file, a hub name or
    "arithmetic[:split]"; stops at the first malformed row, naming it."""
    if source == "arithmetic" or source.startswith("arithmetic:"):
        return arithmetic_problems(source.partition(":")[2] or "train")[:limit]
    rows = read_rows(source)
    if not rows:
        raise DataError(f"{source}: holds no rows")
    return [problem_of(row, where, prompt_key, answer_key) for where, row in rows[:limit]]


def problem_of(row, where, prompt_key=None, answer_key=None):
    """One problem from one row. A chat-message prompt (verl / DAPO schema) is kept whole as
    "messages" and used as it is: its own instruction, no second one appended."""
    problem = {"answer": answer_of(row, where, answer_key), "where": where}
    for key in ((prompt_key,) if prompt_key else QUESTION_KEYS):
        value = _field(row, key)
        if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
            problem["messages"] = [{"role": m.get("role", "user"), "content": str(m["content"])} for m in value]
            break
        if isinstance(value, str) and value.strip():
            problem["question"] = value
            break
    else:
        hint = f"field '{prompt_key}' missing or not text" if prompt_key else f"none of the fields {list(QUESTION_KEYS)}"
        raise DataError(f"{where}: no question: {hint}; name the field with --prompt-key")
    user_text = " ".join(m["content"] for m in problem.get("messages", []) if m["role"] == "user")
    problem["answer_line"] = bool(ANSWER_LINE_RE.search(user_text))
    return problem


def answer_of(row, where, key=None):
    """The reference answer of a row as a string. Lists (OlympiadBench's `final_answer`) are joined
    with ", " after dropping $-delimiters; a `solution` contributes the content of its last \\boxed{}."""
    for k in ((key,) if key else ANSWER_KEYS):
        value = _field(row, k)
        if value is None:
            continue
        if k == "solution" and not key:  # only its boxed answer counts
            from verify import extract_answer  # local import: verify is only needed here
            value = extract_answer(str(value))
            if value is None:
                continue
        if isinstance(value, list):
            value = ", ".join(str(v).strip().strip("$").strip() for v in value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value.strip():
            return value.strip()
    hint = f"field '{key}' missing or empty" if key else f"none of the fields {list(ANSWER_KEYS)}"
    raise DataError(f"{where}: no answer: {hint}; name the field with --answer-key")


def _field(row, key):
    """row["a.b"] reads nested dicts; None when absent."""
    value = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def read_rows(source):
    """Rows of a source as [(where, dict)]; `where` is "path:line" (JSONL) or "path[i]". A hub name
    is tried only when `source` is not a path on disk."""
    if os.path.isfile(source):
        ext = os.path.splitext(source)[1].lower()
        readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
        if ext not in readers:
            raise DataError(f"{source}: unknown file type '{ext}'; use .jsonl, .json or .parquet")
        return readers[ext](source)
    if os.path.exists(source):
        raise DataError(f"{source}: is a directory, not a problem file (.jsonl, .json or .parquet)")
    if not re.fullmatch(cli.HUB_SOURCE, source):
        raise DataError(f"{source}: no such file (and not a hub dataset name org/name[:config][:split])")
    return _read_hub(source)


def _read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path}:{line_no}", row))
    return rows


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(rows, dict):  # {"data": [...]} / {"test": [...]}: the first list value
        rows = next((v for v in rows.values() if isinstance(v, list)), None)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects (or an object holding one)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}[{i}]: expected a JSON object, got {type(row).__name__}")
    return [(f"{path}[{i}]", row) for i, row in enumerate(rows)]


def _read_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path).to_pylist()
    except Exception as e:  # a truncated or foreign file: say which, in one line
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {first_line(e)})") from None
    return [(f"{path}[{i}]", row) for i, row in enumerate(table)]


def first_line(error, limit=300):
    """The first line of an exception's message (at most `limit` characters), "" if it has none."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else ""


def parse_hub_name(source):
    """"org/name[:config][:split]" -> (name, config or None, split or None). With one suffix it is a
    split when it looks like one (train, test, ...), else a config: "openai/gsm8k:main",
    "HuggingFaceH4/MATH-500:test"."""
    name, *rest = source.split(":")
    if len(rest) == 1 and rest[0] in SPLIT_NAMES:
        rest = ["", rest[0]]
    config, split = (rest + ["", ""])[:2]
    return name, config or None, split or None


def _read_hub(source):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: no such file, and loading hub datasets needs the optional "
                        "package `datasets` (pip install datasets)") from None
    name, config, split = parse_hub_name(source)
    try:
        loaded = datasets.load_dataset(name, config)
    except Exception as e:  # not found, no network, a config that is needed or unknown: one line
        raise DataError(f"{source}: could not load it from the Hugging Face hub: {first_line(e) or type(e).__name__} "
                        f"(name it org/name[:config][:split], or pass a local file)") from None
    splits = list(loaded)
    split = split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
    if split not in splits:
        raise DataError(f"{source}: split {split!r} not found; it has {splits} (name one: {name}:"
                        f"{config or ''}:{splits[0]})")
    return [(f"{name}:{split}[{i}]", dict(row)) for i, row in enumerate(loaded[split])]


# ----------------------------------------------------------------------------------------------
# 2. Prompts
@dataclass
class PromptStyle:
    instruction: str = INSTRUCTION  # appended to each question ("" = none); not to chat-message prompts
    system_prompt: str = ""  # a system turn first ("" = the template's own default, if any)
    chat_template: bool = True  # use the tokenizer's chat template when it has one


def messages_of(problem, style):
    """The chat turns of a problem: its own messages, or one user turn of question + instruction."""
    if "messages" in problem:
        messages = list(problem["messages"])
    else:
        content = f"{problem['question']}\n{style.instruction}" if style.instruction else problem["question"]
        messages = [{"role": "user", "content": content}]
    if style.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": style.system_prompt})
    return messages


def prompt_text(tokenizer, problem, style):
    """The prompt as text: the chat template with the assistant's turn opened, or "Q: ...\\nA: "."""
    messages = messages_of(problem, style)
    if style.chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n".join(m["content"] for m in messages[:-1]) + ("\n" if len(messages) > 1 else "") + \
        f"Q: {messages[-1]['content']}\nA: "


def prompt_ids(tokenizer, problem, style):
    """Token ids of one prompt (the template already holds any BOS it wants: nothing is added)."""
    return tokenizer.encode(prompt_text(tokenizer, problem, style), add_special_tokens=False)


def tokenize_prompts(tokenizer, problems, style, batch=4096):
    """Prompt ids of many problems: templates rendered one by one, tokenized in batches (the fast
    tokenizer's batch call runs in Rust, in parallel)."""
    ids = []
    for start in range(0, len(problems), batch):
        texts = [prompt_text(tokenizer, p, style) for p in problems[start:start + batch]]
        ids += tokenizer(texts, add_special_tokens=False)["input_ids"]
    return ids


def dedupe(problems):
    """Drop rows whose prompt and answer repeat an earlier row (DAPO-Math-17k's original release holds
    each of its ~17k problems ~100 times); returns (unique problems, number dropped)."""
    seen, unique = set(), []
    for p in problems:
        key = (json.dumps(p.get("messages")) if "messages" in p else p["question"], p["answer"])
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, len(problems) - len(unique)


def pad_id(tokenizer):
    """The id that pads batches: the tokenizer's pad token, or its EOS when it has none (the Llama 3 family
    ships no pad token; the HF sampler falls back the same way). Padded positions are masked out of the
    attention and the loss, so which id fills them changes nothing."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_batch(prompts, completions, pad_id):
    """Right-padded prompt + completion ids (B, T), their attention mask (B, T), and the response mask
    (B, T-1): mask[b, t] = 1 where token t+1 is a completion token (whose log-prob the loss uses)."""
    import torch
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), length), dtype=torch.long)
    mask = torch.zeros((len(prompts), length - 1))
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, :len(p) + len(c)] = torch.tensor(p + c)
        attn[b, :len(p) + len(c)] = 1
        mask[b, len(p) - 1:len(p) + len(c) - 1] = 1.0
    return ids, attn, mask


# ----------------------------------------------------------------------------------------------
# 3. Stopping
def stop_token_ids(model_path, tokenizer):
    """Every token that ends the assistant's turn: the tokenizer's EOS, the ids listed as eos_token_id
    in the model's generation_config.json, and the chat template's end-of-turn token (the special
    token the template writes right after an assistant message)."""
    ids = {tokenizer.eos_token_id} - {None}
    file = os.path.join(model_path, "generation_config.json")
    if os.path.isfile(file):
        with open(file) as f:
            eos = json.load(f).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    end = end_of_turn_token(tokenizer)
    if end is not None:
        ids.add(tokenizer.convert_tokens_to_ids(end))
    if not ids:
        raise DataError(f"{model_path}: its tokenizer has no EOS token and no end-of-turn token: no sampler "
                        "could stop (set eos_token in tokenizer_config.json)")
    return sorted(ids)


def end_of_turn_token(tokenizer):
    """The special token that the chat template writes right after an assistant message, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "MARKER7f3a"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)
    except Exception:  # a template that refuses this conversation: fall back to EOS and generation_config
        return None
    after = text[text.rfind(marker) + len(marker):] if marker in text else ""
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    return next((s for s in specials if s and after.lstrip().startswith(s)), None)


# ----------------------------------------------------------------------------------------------
# 4. Rewards and tasks
def math_reward(completions, problems, timeout=1.0, workers=None):
    """1.0 when a completion's final answer equals its problem's reference (verify.py), else 0.0:
    the last \\boxed{}, or the last "Answer: X" line where the prompt asked for one. Returns
    (rewards, number of checks that timed out, which score 0)."""
    import verify
    rewards, timeouts = [0.0] * len(completions), 0
    for answer_line in (False, True):
        idx = [i for i, p in enumerate(problems) if bool(p.get("answer_line")) == answer_line]
        if idx:
            r, t = verify.reward_batch([completions[i] for i in idx], [problems[i]["answer"] for i in idx],
                                       timeout=timeout, workers=workers, answer_line=answer_line)
            for i, value in zip(idx, r):
                rewards[i] = value
            timeouts += t
    return rewards, timeouts


def unreadable_answers(problems):
    """How many reference answers the verifier cannot read at all (their rewards are always 0)."""
    import verify
    return sum(not verify.readable(p["answer"]) for p in problems)


@dataclass
class Task:
    load: Callable  # (source, prompt_key, answer_key, limit) -> problems [{"question" or "messages", "answer", ...}]
    instruction: str  # the default instruction appended to each question
    reward: Callable  # (completions, problems, timeout) -> (rewards, n_lost); problems[i] is completions[i]'s
    demo: Callable = None  # optional: problem -> a correct completion (tiny.warm_start's supervised targets)


TASKS = {"math": Task(load=load_problems, instruction=INSTRUCTION, reward=math_reward,
                      demo=lambda p: arithmetic_completion(p["answer"]))}


def get_task(name):
    """A task by name: a key of TASKS, or "module:attribute" for a Task defined in a file of your
    own (e.g. --task mytask:TASK with mytask.py beside train.py; README, "A new task")."""
    if name in TASKS:
        return TASKS[name]
    module, _, attribute = name.partition(":")
    if not attribute:
        raise DataError(f"unknown task {name!r}: choose one of {sorted(TASKS)} or name one as module:attribute")
    import importlib
    try:
        task = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as e:
        raise DataError(f"task {name!r}: cannot import it ({e})") from None
    if not isinstance(task, Task):
        raise DataError(f"task {name!r}: {attribute} is a {type(task).__name__}, not a data.Task")
    return task


# ----------------------------------------------------------------------------------------------
# 5. The synthetic arithmetic task of the embedded default
def _all_arithmetic():
    """Every problem of the family, as (question, answer) strings."""
    problems = [(f"{a}+{b}", a + b) for a in range(10) for b in range(10)]   # 1-digit sums
    problems += [(f"{a}*{b}", a * b) for a in range(10) for b in range(10)]  # 1-digit products
    problems += [(f"{a}+{b}", a + b) for a in range(10, 100) for b in range(10)]  # 2-digit + 1-digit
    return [(q, str(ans)) for q, ans in problems]


def _split_of(question):
    """A stable split from a hash of the problem text: 20% test, 80% train."""
    h = int(hashlib.sha256(question.encode()).hexdigest(), 16) % 10
    return "test" if h < 2 else "train"


def arithmetic_problems(split, seed=0):
    """Problems of one split ("train" or "test"), shuffled by `seed`."""
    if split not in ("train", "test"):
        raise DataError(f"arithmetic:{split}: the arithmetic task has the splits 'train' and 'test'")
    pool = [{"question": q, "answer": a, "where": f"arithmetic:{q}", "answer_line": False}
            for q, a in _all_arithmetic() if _split_of(q) == split]
    random.Random(seed).shuffle(pool)
    return pool


def arithmetic_completion(answer):
    """The completion the warm start teaches: just the boxed answer (the tiny model does no reasoning)."""
    return f"\\boxed{{{answer}}}"
