"""experiments/chain.py: a task whose solutions are a written chain of 60-100 tokens, for the
laptop comparison in a regime where MASPO's mechanism has something to act on
(experiments/sweep.py).

A problem: start at a two-digit number s, then add a and b in turn (one-digit, signed), n times
(5 <= n <= 9; the running total stays two-digit). The solution writes one line per step, a countdown
of the steps left, the operation and its result, and boxes the last total:
    question  "59+5-8 x7"                      (s = 59, a = +5, b = -8, n = 7)
    solution  "7:59+5=64\\n6:64-8=56\\n5:56+5=61\\n4:61-8=53\\n3:53+5=58\\n2:58-8=50\\n1:50+5=55\\n\\boxed{55}"
With the character tokenizer of tiny.py (1 character = 1 token) a solution is 10 n + 10 = 60-100
tokens, and a correct answer needs all n results right. Every line has the same width, so what a
token depends on sits at a fixed distance (the line above, or the short prompt): a model of 0.2M
parameters learns the format in ~500 supervised steps on one core and reaches 25-35% whole-chain
accuracy after 500-2000, and what remains uncertain is mostly the arithmetic of each result. (Two
designs that needed a look-up into the prompt, running sums of 7-10 different terms written as
"37+8-5+6..." and rewritten line by line or labelled a+8 b-5 ..., stayed at 60-73% token accuracy,
0% whole chains, after 5-10 minutes of supervised training on one core.)

The problems come from one seeded generator (POOL_SIZE draws, duplicates dropped) and are split
by a hash of the question text: 80% for training ("chain:train"), 20% held out, whatever the seed
or the order. A second hash splits the held-out 20% in two halves, "chain:validation" (to choose
settings such as the learning rate) and "chain:test" (reported only; never used to choose), so a
sweep that picks its best setting does not peek at the numbers it reports. The training split is
the same as before the held-out part was divided (warm starts made from it are unchanged). The reward is exact match of the last \\boxed{} with the reference
integer (verify.extract_answer reads the box; no sympy is needed to compare integers).

Use it with train.py:  --task experiments.chain:TASK --train-data TRAIN.jsonl --eval-data VALIDATION.jsonl
(files written by write_split: train.py checks that a data source is a file or a hub name)
Print the split sizes and a few problems:  python experiments/chain.py
No paper equation lives here.
"""
import hashlib
import json
import os
import random
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: data.py and verify.py live one folder up
    sys.path.insert(0, ROOT)
import data  # noqa: E402

STEPS = (5, 9)  # fewest and most steps n of a problem
POOL_SIZE = 40000  # problems drawn by the generator (before duplicates are dropped)
TEST_PERCENT = 20  # share held out, by hash of the question (half validation, half test)
SPLITS = ("train", "validation", "test")
QUESTION_RE = re.compile(r"(\d\d)([+-]\d)([+-]\d) x(\d)")  # our own question text (never model output)


def generate(pool_size=POOL_SIZE, seed=0):
    """Every problem of the pool as (question, answer) strings, duplicates dropped, in draw order."""
    rng, seen, out = random.Random(seed), set(), []
    digits = [d for d in range(-9, 10) if d]
    for _ in range(pool_size):
        s, a, b, n = rng.randint(10, 99), rng.choice(digits), rng.choice(digits), rng.randint(*STEPS)
        totals = [s + sum(a if k % 2 == 0 else b for k in range(j + 1)) for j in range(n)]
        question = f"{s}{a:+d}{b:+d} x{n}"
        if all(10 <= x <= 99 for x in totals) and question not in seen:  # every total stays two-digit
            seen.add(question)
            out.append((question, str(totals[-1])))
    return out


def split_of(question):
    """A stable split from hashes of the question text: TEST_PERCENT percent held out, the rest
    "train"; a second hash (of "validation:" + question, independent of the first) sends half of the
    held-out problems to "validation", the other half to "test"."""
    if int(hashlib.sha256(question.encode()).hexdigest(), 16) % 100 >= TEST_PERCENT:
        return "train"
    return "validation" if int(hashlib.sha256(f"validation:{question}".encode()).hexdigest(), 16) % 2 else "test"


def chain_problems(split):
    """Problems of one split ("train", "validation" or "test"), in the generator's (random) order."""
    if split not in SPLITS:
        raise data.DataError(f"chain:{split}: the chain task has the splits 'train', 'validation' and 'test'")
    return [{"question": q, "answer": a, "where": f"chain:{q}", "answer_line": False}
            for q, a in generate() if split_of(q) == split]


def load(source, prompt_key=None, answer_key=None, limit=None):
    """data.Task.load: "chain:train" / "chain:validation" / "chain:test", or a file written by write_split (train.py's
    setting check accepts only files, "arithmetic" and hub names as --train-data / --eval-data)."""
    if os.path.isfile(source):
        return data.load_problems(source, prompt_key, answer_key, limit)
    name, _, split = source.partition(":")
    if name != "chain":
        raise data.DataError(f"{source}: the chain task reads 'chain:train', 'chain:validation', 'chain:test' or a JSONL file")
    return chain_problems(split or "train")[:limit]


def write_split(split, path):
    """One split as a JSONL file of {"question", "answer"} rows (for train.py); returns the path."""
    with open(path, "w") as f:
        f.writelines(json.dumps({"question": p["question"], "answer": p["answer"]}) + "\n" for p in chain_problems(split))
    return path


def demo(problem):
    """The correct solution of a problem (the warm start's supervised target)."""
    s, a, b, n = (int(g) for g in QUESTION_RE.fullmatch(problem["question"]).groups())
    x, lines = s, []
    for k in range(n):
        d = a if k % 2 == 0 else b
        lines.append(f"{n - k}:{x}{d:+d}={x + d}")
        x += d
    return "\n".join(lines + [f"\\boxed{{{x}}}"])


def reward(completions, problems, timeout=1.0):
    """data.Task.reward: 1.0 where the last \\boxed{} holds exactly the reference integer. Nothing
    can time out, so the count of lost checks is 0."""
    import verify  # only its string parsing (extract_answer) is used here
    return [float(verify.extract_answer(c) == p["answer"]) for c, p in zip(completions, problems)], 0


# no instruction: the tiny model's prompt is the plain "Q: 59+5-8 x7\nA: " it was warm-started on
TASK = data.Task(load=load, instruction="", reward=reward, demo=demo)


if __name__ == "__main__":
    train, validation, test = (chain_problems(split) for split in SPLITS)
    lengths = sorted(len(demo(p)) for p in train)
    print(f"{len(train)} train, {len(validation)} validation, {len(test)} test problems; solutions {lengths[0]}-{lengths[-1]} tokens "
          f"(median {lengths[len(lengths) // 2]})")
    for p in train[:2]:
        print(f"\nQ: {p['question']}\nA: {demo(p)}")
