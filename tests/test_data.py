"""Tests of data.py, the task seam shared by train.py and eval.py: problem sources (verl / DAPO schema,
hub names and their errors), prompts (chat templates, system prompt, no template, empty
instruction), the stop rule of real chat models, the reward with "Answer:" lines, custom tasks,
and the arithmetic task's split. Stand-in chat models are built locally (tiny.build_chat_model).
Expected values are written by hand. Run: python -m pytest tests/test_data.py -q
"""
import json
import os
import subprocess
import sys

import pytest

import data
import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAPO_PROMPT = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{q}\n\n"
               "Remember to put your answer on its own line after \"Answer:\".")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = tiny.build_chat_model(str(tmp_path_factory.mktemp("qwen")), "qwen")
    return path, tiny.load_tokenizer(path)


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    path = tiny.build_chat_model(str(tmp_path_factory.mktemp("r1")), "r1")
    return path, tiny.load_tokenizer(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------------------------
# Sources
def test_verl_dapo_schema_is_used_as_it_is(tmp_path):
    rows = [{"data_source": "math_dapo", "prompt": [{"role": "user", "content": DAPO_PROMPT.format(q="What is 2+2?")}],
             "reward_model": {"ground_truth": "4", "style": "rule"}},
            {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}],
             "reward_model": {"ground_truth": "2"}}]
    first, second = data.load_problems(write_jsonl(tmp_path / "dapo.jsonl", rows))
    assert first["messages"] == rows[0]["prompt"] and first["answer"] == "4" and first["answer_line"] is True
    assert "question" not in first  # the chat prompt is kept whole: no second instruction is appended
    assert second["messages"][0] == {"role": "system", "content": "be brief"} and second["answer_line"] is False


def test_parquet_in_the_verl_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = str(tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": [{"role": "user", "content": DAPO_PROMPT.format(q="3*3?")}],
                                          "reward_model": {"ground_truth": "9"}}]), path)
    (p,) = data.load_problems(path)
    assert p["answer"] == "9" and p["answer_line"] and p["where"] == f"{path}[0]"
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(data.DataError, match="broken.parquet: not a readable parquet file"):
        data.load_problems(str(tmp_path / "broken.parquet"))


@pytest.mark.parametrize("source,expected", [
    ("openai/gsm8k:main", ("openai/gsm8k", "main", None)),
    ("HuggingFaceH4/MATH-500:test", ("HuggingFaceH4/MATH-500", None, "test")),
    ("org/name:cfg:validation", ("org/name", "cfg", "validation")),
    ("org/name::train", ("org/name", None, "train")),
    ("org/name", ("org/name", None, None)),
])
def test_hub_names_with_config_and_split(source, expected):
    assert data.parse_hub_name(source) == expected


def test_hub_errors_are_one_data_error_line():
    """With no hub reachable (HF_HUB_OFFLINE), a hub name is one DataError line naming the source."""
    code = ("import data\ntry:\n    data.load_problems('org/no-such-dataset:main:train')\n"
            "except data.DataError as e:\n    print('DATAERROR', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = next(l for l in proc.stdout.splitlines() if l.startswith("DATAERROR"))
    assert "org/no-such-dataset:main:train: could not load it from the Hugging Face hub" in line
    with pytest.raises(data.DataError, match="no such file"):
        data.load_problems("not a name at all.jsonl")


def test_dedupe_and_unreadable_answers():
    problems = [{"question": "a", "answer": "1"}, {"question": "a", "answer": "1"}, {"question": "a", "answer": "2"},
                {"question": "b", "answer": "\\frac{1}{"}]
    unique, dropped = data.dedupe(problems)
    assert dropped == 1 and [p["answer"] for p in unique] == ["1", "2", "\\frac{1}{"]
    assert data.unreadable_answers(unique) == 1  # the broken fraction can never be rewarded


def test_arithmetic_splits_are_disjoint_and_stable():
    train, test = data.arithmetic_problems("train"), data.arithmetic_problems("test")
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert len(train) + len(test) == 1100 and 0.1 < len(test) / 1100 < 0.3  # 100 + 100 + 900 problems
    assert {p["question"] for p in data.load_problems("arithmetic:test")} == {p["question"] for p in test}
    with pytest.raises(data.DataError, match="splits 'train' and 'test'"):
        data.load_problems("arithmetic:dev")


# ----------------------------------------------------------------------------------------------
# Prompts and the stop rule
def test_prompt_styles(qwen):
    path, tok = qwen
    p = {"question": "What is 12+7?", "answer": "19"}
    text = data.prompt_text(tok, p, data.PromptStyle())
    assert text == ("<|im_start|>system\n" + tiny.QWEN_SYSTEM + "<|im_end|>\n<|im_start|>user\nWhat is 12+7?\n"
                    + data.INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
    assert data.prompt_text(tok, p, data.PromptStyle(instruction="", system_prompt="Be brief.")) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 12+7?<|im_end|>\n<|im_start|>assistant\n"
    assert data.prompt_text(tok, p, data.PromptStyle(instruction="", chat_template=False)) == "Q: What is 12+7?\nA: "
    ids = data.prompt_ids(tok, p, data.PromptStyle())
    assert tok.decode(ids, skip_special_tokens=False) == text
    problems = [p, {"question": "And 3*3?", "answer": "9"}, {"messages": [{"role": "user", "content": "hi"}], "answer": "0"}]
    assert data.tokenize_prompts(tok, problems, data.PromptStyle()) == \
        [data.prompt_ids(tok, q, data.PromptStyle()) for q in problems]  # batched == one by one


def test_stop_rule_of_chat_models(qwen, r1, tmp_path):
    path, tok = qwen
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id == eos != im_end  # the tokenizer's EOS is not the end of the turn
    assert data.end_of_turn_token(tok) == "<|im_end|>"
    assert data.stop_token_ids(path, tok) == sorted({eos, im_end})
    r1_path, r1_tok = r1
    assert data.prompt_text(r1_tok, {"question": "2+2?"}, data.PromptStyle(instruction="")) == \
        "<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜><think>\n"
    assert data.stop_token_ids(r1_path, r1_tok) == [r1_tok.convert_tokens_to_ids("<｜end▁of▁sentence｜>")]
    char = tiny.build_tiny_model(str(tmp_path / "char"))
    char_tok = tiny.load_tokenizer(char)
    assert data.end_of_turn_token(char_tok) is None and data.stop_token_ids(char, char_tok) == [char_tok.eos_token_id]


# ----------------------------------------------------------------------------------------------
# Rewards and tasks
def test_math_reward_reads_the_answer_format_the_prompt_asked_for():
    boxed = {"question": "2+2?", "answer": "4", "answer_line": False}
    line = {"messages": [{"role": "user", "content": DAPO_PROMPT.format(q="2+2?")}], "answer": "4", "answer_line": True}
    completions = ["so \\boxed{4}", "work...\nAnswer: 4", "Answer: 4\nno wait\nAnswer: 5", "work...\nAnswer: 4"]
    rewards, lost = data.math_reward(completions, [boxed, line, line, boxed])
    assert rewards == [1.0, 1.0, 0.0, 0.0] and lost == 0  # an "Answer:" line counts only where it was asked for


TASK_FILE = '''
import data

def problems(source, prompt_key=None, answer_key=None, limit=None):
    return [{"question": f"Say {i}", "answer": str(i), "where": f"say:{i}"} for i in range(5)][:limit]

def exact(completions, problems, timeout=1.0):
    return [float(c.strip() == p["answer"]) for c, p in zip(completions, problems)], 0

TASK = data.Task(load=problems, instruction="Answer with the number only.", reward=exact)
'''


def test_a_task_from_a_file_of_your_own(tmp_path, monkeypatch):
    (tmp_path / "mytask.py").write_text(TASK_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    task = data.get_task("mytask:TASK")
    assert [p["answer"] for p in task.load("x", limit=3)] == ["0", "1", "2"]
    assert task.reward([" 1", "2"], task.load("x")[1:3]) == ([1.0, 1.0], 0)
    for name, match in (("chess", "unknown task"), ("mytask:NOPE", "cannot import"), ("no_such_module:TASK", "cannot import"),
                        ("mytask:problems", "not a data.Task")):
        with pytest.raises(data.DataError, match=match):
            data.get_task(name)


def test_pad_batch_marks_exactly_the_completion_tokens():
    ids, attn, mask = data.pad_batch([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 9, 10], [8, 11, 12, 13, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # mask[b, t] = 1 where token t+1 is a completion token: row 0 predicts 9, 10 from positions 2, 3
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]


def test_the_readme_task_example(tmp_path, monkeypatch):
    """README "A new task": its GSM8K-style task file, taken from the README as it is, loads problems,
    strips the "####" answers and rewards the last number."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    code = readme.split("# gsm8k_task.py, beside train.py\n", 1)[1].split("```", 1)[0]
    (tmp_path / "gsm8k_task.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    task = data.get_task("gsm8k_task:TASK")
    rows = [{"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
             "answer": "In May she sold 48/2 = 24.\n48 + 24 = 72\n#### 72"},
            {"question": "A shirt costs $1,200 ...", "answer": "...\n#### 1,200"}]
    problems = task.load(write_jsonl(tmp_path / "gsm8k.jsonl", rows))
    assert [p["answer"] for p in problems] == ["72", "1200"]
    rewards, lost = task.reward(["48 + 24 = 72. The answer is 72", "So 72 clips, then 7", "It costs $1,200."],
                                [problems[0], problems[0], problems[1]])
    assert rewards == [1.0, 0.0, 1.0] and lost == 0


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tmp_path):
    """The Llama 3 family ships no pad token: data.pad_id falls back to EOS (as the HF sampler does),
    and the batch builds; padded positions are outside the attention and response masks."""
    path = tiny.build_chat_model(str(tmp_path / "llama"), "llama3")
    tok = tiny.load_tokenizer(path)
    assert tok.pad_token_id is None and data.pad_id(tok) == tok.eos_token_id == tok.convert_tokens_to_ids("<|eot_id|>")
    ids, attn, mask = data.pad_batch([[5, 6, 7], [8]], [[9, 10], [11]], data.pad_id(tok))
    assert ids[1].tolist() == [8, 11, tok.eos_token_id, tok.eos_token_id, tok.eos_token_id]
    assert attn[1].tolist() == [1, 1, 0, 0, 0] and mask[1].tolist() == [1, 0, 0, 0]
    qwen_tok = tiny.load_tokenizer(tiny.build_chat_model(str(tmp_path / "qwen"), "qwen"))
    assert data.pad_id(qwen_tok) == qwen_tok.pad_token_id  # a pad token, when there is one, is used
