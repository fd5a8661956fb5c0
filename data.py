"""data.py: where problems come from and how they become prompts.

Three things live here, shared by train.py and eval.py:
  1. Loading problem files: JSONL / JSON / parquet, or a dataset name on the HF hub (only when the
     optional `datasets` package is installed). Each row becomes {"question", "answer", "where"},
     "where" being "file:line" so that a malformed row is reported where it is.
  2. The prompt: the tokenizer's chat template with the instruction "put your final answer within
     \\boxed{}" when the tokenizer has one, a plain "Q: ...\\nA: " template otherwise (the embedded
     tiny model's character tokenizer has none).
  3. The synthetic arithmetic task of the embedded default (`python train.py` with no --model):
     one-digit sums and products and two-digit + one-digit sums, split by a hash of the problem
     into a training pool (warm start and RL) and a held-out test set never seen by either.

No paper equation lives here. Imports nothing heavy; nothing runs on import.
"""
import hashlib
import json
import os
import random

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# Field names tried in order when --prompt-key / --answer-key are not given. They cover MATH500,
# AIME24/25, AMC23, Minerva, OlympiadBench (`final_answer` is a list with $-delimiters),
# GSM8K-style `question`, and DAPO-Math-17K / verl parquet (`prompt` as chat messages,
# `reward_model.ground_truth`). A `solution` with a \boxed{} is the last resort for the answer.
QUESTION_KEYS = ("problem", "question", "prompt", "query", "input")
ANSWER_KEYS = ("answer", "final_answer", "reward_model.ground_truth", "ground_truth", "target",
               "expected_answer", "solution")


class DataError(ValueError):
    """A problem file that cannot be used; the message names the file, the line and the field."""


# ----------------------------------------------------------------------------------------------
# 1. Loading
def read_rows(source):
    """Rows of a problem source as a list of (where, dict). `where` is "path:line" (JSONL), "path[i]"
    (JSON list, parquet, hub dataset). A hub name is tried only when `source` is not a file."""
    if os.path.isfile(source):
        ext = os.path.splitext(source)[1].lower()
        if ext in (".jsonl", ".ndjson"):
            return _read_jsonl(source)
        if ext == ".json":
            return _read_json(source)
        if ext == ".parquet":
            return _read_parquet(source)
        raise DataError(f"{source}: unknown file type '{ext}'; use .jsonl, .json or .parquet")
    if os.path.exists(source):
        raise DataError(f"{source}: is a directory, not a problem file (.jsonl, .json or .parquet)")
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
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict):  # {"data": [...]} / {"test": [...]}: the first list value
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (or an object holding one)")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}[{i}]: expected a JSON object, got {type(row).__name__}")
    return [(f"{path}[{i}]", row) for i, row in enumerate(data)]


def _read_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path).to_pylist()
    return [(f"{path}[{i}]", row) for i, row in enumerate(table)]


def _read_hub(name):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: no such file, and loading hub datasets needs the optional "
                        "package `datasets` (pip install datasets)") from None
    name, _, split = name.partition(":")  # "org/name:split", default split "train"
    ds = datasets.load_dataset(name, split=split or "train")
    return [(f"{name}[{i}]", dict(row)) for i, row in enumerate(ds)]


def _field(row, key):
    """row["a.b"] reads nested dicts; returns None when absent."""
    value = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def question_of(row, where, key=None):
    """The problem text of a row: a string, or the last user message of a chat-message list."""
    keys = (key,) if key else QUESTION_KEYS
    for k in keys:
        value = _field(row, k)
        if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            users = [m.get("content") for m in value if m.get("role") == "user"]
            value = users[-1] if users else None
        if isinstance(value, str) and value.strip():
            return value
    hint = f"field '{key}' missing or not text" if key else f"none of the fields {list(QUESTION_KEYS)}"
    raise DataError(f"{where}: no question: {hint}; name the field with --prompt-key")


def answer_of(row, where, key=None):
    """The reference answer of a row as a string. Lists (OlympiadBench's `final_answer`) are joined
    with ", " after dropping $-delimiters; a `solution` contributes the content of its last \\boxed{}."""
    keys = (key,) if key else ANSWER_KEYS
    for k in keys:
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


def load_problems(source, prompt_key=None, answer_key=None, limit=None):
    """[{"question", "answer", "where"}] from a file or hub name; stops at the first malformed row."""
    rows = read_rows(source)
    if not rows:
        raise DataError(f"{source}: holds no rows")
    rows = rows[:limit] if limit else rows
    return [{"question": question_of(row, where, prompt_key), "answer": answer_of(row, where, answer_key),
             "where": where} for where, row in rows]


# ----------------------------------------------------------------------------------------------
# 2. Prompts
def prompt_ids(tokenizer, question, instruction=INSTRUCTION):
    """Token ids of the prompt for one question. With a chat template: one user turn holding the
    question and the instruction, then the assistant's turn opened. Without: "Q: ...\\nA: "."""
    content = f"{question}\n{instruction}" if instruction else question
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer.encode(f"Q: {content}\nA: ", add_special_tokens=False)


# ----------------------------------------------------------------------------------------------
# 3. The synthetic arithmetic task of the embedded default
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


def arithmetic_problems(split, n=None, seed=0):
    """Problems of one split ("train" or "test") as [{"question", "answer", "where"}], shuffled by
    `seed`; `n` draws that many (with repetition only if n exceeds the split)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    pool = [{"question": q, "answer": a, "where": f"arithmetic:{q}"}
            for q, a in _all_arithmetic() if _split_of(q) == split]
    rng = random.Random(seed)
    rng.shuffle(pool)
    if n is None or n <= len(pool):
        return pool[:n]
    return pool + [rng.choice(pool) for _ in range(n - len(pool))]


def arithmetic_completion(answer):
    """The completion the warm start teaches: just the boxed answer (the tiny model does no reasoning)."""
    return f"\\boxed{{{answer}}}"
