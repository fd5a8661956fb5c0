"""eval.py: Avg@k and Pass@k of one or more checkpoints on math benchmarks, as one table.

The paper's protocol: for each problem draw k samples (k = 32, temperature 0.6, top_p 0.95), score
each with the training reward (data.py: the last \\boxed{} checked by verify.py), and report per
benchmark
    Avg@k  = mean over problems of c / n                      (mean accuracy of the samples)
    Pass@k = mean over problems of 1 - C(n - c, k) / C(n, k)  (unbiased; n samples, c correct)
and their plain average over the benchmarks. Prompt, stop rule and answer extraction are exactly
train.py's (data.py: prompt_ids, stop_token_ids, TASKS[task].reward), with the instruction, system
prompt and chat-template setting of the training run when its config.json is there.

Run it
  laptop, the embedded default: the tiny model before (.cache/tiny-arith) and after RL (the latest
  checkpoint of runs/default) on the synthetic held-out arithmetic set; run `python train.py` first
      python eval.py
  the paper's six benchmarks (benchmarks/README.md: build them once with python benchmarks/build.py),
  checkpoints or run folders (a run folder means its latest checkpoint), one GPU
      python eval.py --model runs/maspo runs/grpo --max-tokens 8192
      python eval.py --model runs/maspo --benchmarks aime24 math500 my_problems.jsonl
  training curves of several runs overlaid (PNG; needs matplotlib)
      python eval.py --plot runs/maspo runs/grpo --out curves.png
  N GPUs on one node: the same command under torchrun, one engine per GPU
      torchrun --nproc_per_node 8 eval.py --model runs/maspo runs/grpo --max-tokens 8192
Writes to --out: results.md (the table), results.json (the same numbers), and per model one JSONL
per benchmark with every problem's samples, extracted answers and rewards (to read the failures).

N processes: every rank runs its own engine on a round-robin share of each model's problems (an
even share of the samples, of every benchmark), rank 0 gathers the results and writes the files one
process would write, the same bytes: each problem is seeded by its identity, problem_seed(seed,
(benchmark, index)), never by its place in a shard or a sampler call. Resume: after each round (--chunk
problems per rank) rank 0 appends the round's per-problem results to <out>/<model>/progress.jsonl,
whose first line holds the settings that made them; the same command into the same --out skips what
is there (and says how much), and refuses, in one line, a file of other settings (model, k, n,
temperature, top_p, max tokens, seed, task, prompt, backend, dtype). A line cut short by a kill is
dropped. One bar on rank 0 counts the samples of the whole job, with tokens/s and the time left.
Checked on CPU (tests/test_eval.py: 2 ranks give the 1-process files byte for byte). On GPUs vLLM's
kernels depend on the batch a request shares, so 1 and N processes agree in distribution but not
bit for bit unless vLLM runs batch-invariant (VLLM_BATCH_INVARIANT=1, slower). torchrun's own parser
takes `--n` for one of its options: under torchrun set n in a --config JSON file.

Several checkpoints in one call share one sampler: when a checkpoint has the same architecture
and vocabulary as the previous one, its weights are pushed into the live engine
(`sampler.load_weights`, as training does after each step); otherwise the engine is released and
a new one made (under torchrun the process group too, which vLLM's shutdown destroys: rejoin). This
keeps a single vLLM engine alive per process (what vLLM's CPU build needs).
"""
import datetime
import gc
import glob
import json
import math
import os
import re
import signal
import time
import zlib
from dataclasses import dataclass, field

import cli
import data
from cli import check

BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench")  # the paper's six

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_RESPONSE_TOKENS = 16  # train.TINY_PRESET's max_response_tokens (train.py imports eval.py, not the reverse)


@dataclass
class EvalConfig:
    model: list = field(default_factory=list)  # checkpoint folders, run folders (their latest checkpoint) or hub names; none = the embedded default
    names: list = field(default_factory=list)  # row labels of the table, one per --model (none = from the paths)
    benchmarks: list = field(default_factory=list)  # names (aime24 aime25 amc23 math500 minerva_math olympiadbench), files or hub names; none = all six (with --model)
    task: str = "auto"  # instruction + reward: a data.TASKS name or module:NAME; auto = the training run's, else math
    prompt_key: str = ""  # field holding the question ("" = try problem, question, prompt, ...)
    answer_key: str = ""  # field holding the reference answer ("" = try answer, final_answer, solution's \boxed{})
    limit: int = 0  # at most N problems per benchmark (0 = all)
    k: int = 32  # k of Avg@k / Pass@k
    n: int = 0  # samples per problem (0 = k); n > k gives Pass@k a lower variance (unbiased estimator)
    temperature: float = 0.6  # sampling temperature (0 = greedy)
    top_p: float = 0.95  # nucleus sampling
    max_tokens: int = 0  # response limit in tokens; 0 = the training run's limit when known (its config.json), else 4096
    instruction: str = "auto"  # appended to each question; auto = as in training (none for the tiny model); "" = none
    system_prompt: str = "auto"  # system turn; auto = as in training; "" = the chat template's default
    out: str = "out/eval"  # output folder (with --plot: a .png file, or a folder for curves.png)
    backend: str = "auto"  # sampler: auto (vLLM if importable) | vllm | hf
    dtype: str = "auto"  # sampler weights: auto = bfloat16 on GPU, float32 on CPU
    gpu_memory_utilization: float = 0.9  # share of GPU memory for vLLM: the GPU is eval's alone (train.py's 0.4 leaves room for training)
    chunk: int = 0  # problems per process per round: results are saved to --out after each round (0 = ~1024 samples' worth)
    workers: int = 0  # verifier processes of the math task (0 = verify.py's default); other tasks ignore it
    seed: int = 0  # sampling seed (the same for every model, so runs compare on equal terms)
    plot: list = field(default_factory=list)  # run folders: draw their training curves (metrics.jsonl) instead of evaluating


# ----------------------------------------------------------------------------------------------
# Metrics
def pass_at_k(n, c, k):
    """Unbiased Pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).
    Exact integer binomials, one rounding at the final division: stable for any n (1024 and more)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    total = math.comb(n, k)
    return (total - math.comb(n - c, k)) / total  # Eq.: 1 - C(n-c, k) / C(n, k)


def scores(counts, n, k):
    """Avg@k and Pass@k of one benchmark from its per-problem correct counts (n samples each)."""
    if not counts:
        raise ValueError("scores: no problems")
    return {"avg": sum(c / n for c in counts) / len(counts),  # Eq.: mean_i c_i / n
            "pass": sum(pass_at_k(n, c, k) for c in counts) / len(counts)}  # Eq.: mean_i pass@k(n, c_i)


def macro_average(per_benchmark):
    """Plain mean of Avg@k and Pass@k over benchmarks (each benchmark weighs the same, as in the paper)."""
    rows = list(per_benchmark.values())
    return {key: sum(r[key] for r in rows) / len(rows) for key in ("avg", "pass")}


def problem_seed(seed, key):
    """The sampling seed of one problem: a function of the run's seed and the problem's identity `key`
    (e.g. (benchmark, row id), or a held-out problem's global index), never of its position in a shard
    or batch, so that 1 and N processes draw the same samples for it."""
    return zlib.crc32(json.dumps([seed, key]).encode()) & 0x7FFFFFFF


def evaluate(sampler, tokenizer, problems, k=32, temperature=0.6, top_p=0.95, max_tokens=1024,
             style=None, seed=0, progress=True, n=None, stop_token_ids=None, reward=None, prompts=None,
             keys=None):
    """Sample n (default k) completions per problem, score them with `reward` (default: the math
    task's) and return {"avg", "pass", "n" (problems), "k", "samples" (per problem), "truncated",
    "no_answer", "response_len", "verify_timeouts", "results": one dict per problem}. The prompt is
    data.prompt_ids(tokenizer, problem, style) (`prompts`: those ids, when the caller has them); sampling stops at stop_token_ids (train.py and
    run() pass data.stop_token_ids); temperature 0 is greedy. `keys`: one identity per problem; each
    problem is then seeded by problem_seed(seed, key) alone (the same samples on 1 and N processes)."""
    import verify
    n, style, reward = n or k, style or data.PromptStyle(), reward or data.math_reward
    if not problems:  # e.g. a rank's empty shard in train.py: nothing to score
        return {"avg": float("nan"), "pass": float("nan"), "n": 0, "k": k, "samples": n, "truncated": 0.0,
                "no_answer": 0.0, "response_len": 0.0, "verify_timeouts": 0, "results": []}
    prompts = prompts if prompts is not None else data.tokenize_prompts(tokenizer, problems, style)
    draws = 1 if temperature == 0 else n  # greedy: one completion per problem stands for all n (vLLM wants n = 1)
    groups = sampler.generate(prompts, n=draws, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              seed=seed if keys is None else [problem_seed(seed, key) for key in keys],
                              stop_token_ids=stop_token_ids, progress=progress)
    groups = [group * (n // draws) for group in groups]  # (problems, n)
    texts = [s.text for group in groups for s in group]  # n per problem, in problem order
    rewards, timeouts = reward(texts, [p for p in problems for _ in range(n)])
    results = []
    for i, (p, group) in enumerate(zip(problems, groups)):
        r = rewards[i * n:(i + 1) * n]
        correct = sum(x > 0.5 for x in r)  # rewards are 0/1
        results.append({"question": question_of(p), "answer": p["answer"],
                        "where": p.get("where"), "correct": correct, "pass": pass_at_k(n, correct, k), "rewards": r,
                        "extracted": [verify.extract_answer(s.text, answer_line=bool(p.get("answer_line")))
                                      for s in group],
                        "samples": [s.text for s in group],
                        "finish_reasons": [s.finish_reason for s in group],
                        "lengths": [len(s.completion_ids) for s in group]})
    return summarize(results, n, k, timeouts)


def question_of(problem):
    return problem.get("question") or problem["messages"][-1]["content"]


def summarize(results, n, k, verify_timeouts):
    """A benchmark's numbers from its per-problem results (evaluate's records, in benchmark order):
    computed from the records alone, so a run resumed from its saved records, or gathered from N
    processes, reports exactly what one uninterrupted process would."""
    samples = len(results) * n
    return {**scores([r["correct"] for r in results], n, k), "n": len(results), "k": k, "samples": n,
            "truncated": sum(f == "length" for r in results for f in r["finish_reasons"]) / samples,
            "no_answer": sum(e is None for r in results for e in r["extracted"]) / samples,
            "response_len": sum(x for r in results for x in r["lengths"]) / samples,
            "verify_timeouts": verify_timeouts, "results": results}


# ----------------------------------------------------------------------------------------------
# Output
def markdown_table(rows, benchmarks, k):
    """rows: [{"name", "benchmarks": {bench: {"avg", "pass"}}, "average": {"avg", "pass"}}] ->
    a markdown table, one row per model, cells "Avg@k / Pass@k" in percent."""
    cell = lambda s: f"{100 * s['avg']:.1f} / {100 * s['pass']:.1f}"
    lines = [f"| model (Avg@{k} / Pass@{k}, %) | " + " | ".join(benchmarks) + " | average |",
             "|---" * (len(benchmarks) + 2) + "|"]
    for row in rows:
        lines.append(f"| {row['name']} | " + " | ".join(cell(row["benchmarks"][b]) for b in benchmarks)
                     + f" | {cell(row['average'])} |")
    return "\n".join(lines)


def write_results(out, rows, benchmarks, settings):
    """results.md, results.json and per-problem JSONL files under `out`; returns the table."""
    os.makedirs(out, exist_ok=True)
    table = markdown_table(rows, benchmarks, settings["k"])
    caption = (f"Avg@{settings['k']} / Pass@{settings['k']} ({settings['samples']} samples per problem, "
               f"temperature {settings['temperature']}, top_p {settings['top_p']}, {settings['max_tokens']} max tokens)")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(caption + "\n\n" + table + "\n")
    summary = [{**{k: v for k, v in row.items() if k != "details"},
                "benchmarks": {b: {k: v for k, v in s.items() if k != "results"} for b, s in row["details"].items()}}
               for row in rows]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"settings": settings, "runs": summary}, f, indent=2)
    for row in rows:
        folder = os.path.join(out, safe_name(row["name"]))
        os.makedirs(folder, exist_ok=True)
        for bench, res in row["details"].items():
            with open(os.path.join(folder, f"{safe_name(bench)}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in res["results"])
    return table


def safe_name(name):
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "model"


# ----------------------------------------------------------------------------------------------
# Models and benchmarks
def resolve_model(path):
    """A run folder (holding checkpoints/) -> its latest complete checkpoint; anything else unchanged."""
    root = os.path.join(path, "checkpoints")
    if not os.path.isdir(root):
        return path
    latest = os.path.join(root, "latest")
    if os.path.isdir(latest):  # a symlink to the newest checkpoint
        return os.path.realpath(latest)
    steps = sorted(d for d in os.listdir(root) if re.fullmatch(r"step_\d+", d)
                   and glob.glob(os.path.join(root, d, "*.safetensors")))
    if not steps:
        raise SystemExit(f"{path}: a run folder with no complete checkpoint under {root}")
    return os.path.join(root, steps[-1])


def run_config(path):
    """The training run's config.json (train.py's, recognised by its 'instruction' key) of a run
    folder or of a checkpoint inside one; {} when there is none. The embedded tiny model's cache
    (train.py's warm start, marked by warm_start.json) counts as trained with the embedded default."""
    if os.path.isfile(os.path.join(path, "warm_start.json")):
        return {"instruction": "auto", "model": ""}
    for folder in (path, os.path.dirname(os.path.dirname(os.path.abspath(path)))):
        file = os.path.join(folder, "config.json")
        if os.path.isfile(file):
            with open(file) as f:
                cfg = json.load(f)
            if isinstance(cfg, dict) and "instruction" in cfg:
                return cfg
    return {}


def label_of(path):
    """A short row label: "run/step_000060" for a checkpoint in a run, else the folder or hub name."""
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "checkpoints":
        return f"{parts[-3]}/{parts[-1]}"
    return parts[-1]


def embedded_default():
    """[(label, path, training config)] of the embedded tiny model before and after `python train.py`."""
    before = os.path.join(HERE, ".cache", "tiny-arith")
    run = os.path.join(HERE, "runs", "default")
    trained = {"model": "", "max_response_tokens": TINY_RESPONSE_TOKENS, **run_config(run)}
    models = [("tiny (before RL)", before, trained)] if os.path.isdir(before) else []
    if glob.glob(os.path.join(run, "checkpoints", "step_*", "*.safetensors")):
        models.append(("tiny (after RL)", resolve_model(run), trained))
    if not models:
        raise SystemExit("eval.py: no embedded model yet. Run `python train.py` first (it builds the tiny model in "
                         ".cache/tiny-arith and trains it into runs/default), or name models with --model.")
    return models


def benchmark_source(name):
    """A benchmark name (aime24, ...) -> its built file under benchmarks/; files and hub names as they are."""
    if os.path.exists(name) or name not in BENCHMARKS:
        return name
    path = os.path.join(HERE, "benchmarks", f"{name}.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"eval.py: benchmark {name!r} is not built yet ({path}): run `python benchmarks/build.py` "
                         "once (it downloads the pinned source files; benchmarks/README.md)")
    return path


def load_benchmarks(cfg, task):
    """{name: problems}: the paper's six by name (all six when --benchmarks is empty and models are
    named), files (named by their stem) or hub names (their last part); the embedded default's
    held-out arithmetic set when neither is given."""
    if not cfg.benchmarks and not cfg.model:
        return {"arith-test": data.arithmetic_problems("test")[:cfg.limit or None]}
    suites = {}
    for source in cfg.benchmarks or BENCHMARKS:
        path = benchmark_source(source)
        stem = os.path.splitext(os.path.basename(path if os.path.exists(path) else path.split(":")[0]))[0]
        name, i = stem, 1
        while name in suites:  # the same stem twice: aime24, aime24_2
            i += 1
            name = f"{stem}_{i}"
        suites[name] = task.load(path, cfg.prompt_key or None, cfg.answer_key or None, cfg.limit or None)
    return suites


def style_for(cfg, train_cfg, task):
    """The prompt the model was trained with (its run's config.json), unless given here: instruction
    (none for the embedded tiny model, else the task's), system prompt, chat template."""
    instruction = cfg.instruction if cfg.instruction != "auto" else train_cfg.get("instruction", "auto")
    if instruction == "auto":
        instruction = "" if train_cfg.get("model", None) == "" else task.instruction
    system = cfg.system_prompt if cfg.system_prompt != "auto" else train_cfg.get("system_prompt", "")
    return data.PromptStyle(instruction=instruction, system_prompt=system,
                            chat_template=train_cfg.get("chat_template", True))


def read_config(path):
    """A model folder's config.json as a dict, None when there is none."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def same_architecture(a, b):
    """True when both model folders hold the same config.json up to names and versions (a folder
    without one never matches)."""
    def config(path):
        cfg = read_config(path)
        return cfg and {k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version", "architectures")}
    ca = config(a)
    return ca is not None and ca == config(b)


def checkpoint_weights(path):
    """(name, tensor) pairs of a checkpoint's safetensors files, one file at a time."""
    from safetensors.torch import load_file
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        yield from load_file(file).items()


def free_memory():
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# One process or N (torchrun): the process group and the two collectives eval.py uses
GROUP = {}  # world size, rendezvous store and how many groups were made on it (rejoin)
GROUP_TIMEOUT = datetime.timedelta(hours=6)  # a rank waits for the slowest rank's round of long responses; NCCL's default 10 min would kill the run
KILL_AFTER_ROUNDS = "EVAL_TEST_KILL_AFTER_ROUNDS"  # tests only: rank 0 SIGKILLs itself after this many saved rounds, mid-write


def setup_distributed():
    """(rank, world). Under torchrun: a process group over every rank (gloo on CPU, nccl on GPU, each
    rank on its own GPU). Plain python: no group, rank 0 of 1, and gather / broadcast below are identities."""
    import torch
    import torch.distributed as dist
    GROUP.update(world=int(os.environ.get("WORLD_SIZE", "1")), generation=0)
    if GROUP["world"] == 1:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    GROUP["store"] = next(dist.rendezvous("env://", timeout=GROUP_TIMEOUT))[0]  # torchrun's store, kept for rejoin()
    join_group()
    return dist.get_rank(), dist.get_world_size()


def join_group():
    import torch
    import torch.distributed as dist
    GROUP["generation"] += 1
    # a fresh key prefix per group: the keys of a destroyed group stay in the store, and a new group
    # made under the same prefix reads them and connects to the dead group's ports
    store = dist.PrefixStore(f"eval_group_{GROUP['generation']}", GROUP["store"])
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=store, timeout=GROUP_TIMEOUT,
                            rank=int(os.environ["RANK"]), world_size=GROUP["world"])


def rejoin():
    """After an engine is closed: vLLM's shutdown (rollout's close: cleanup_dist_env_and_memory)
    destroys every process group of this process, eval.py's too; make a new one."""
    import torch.distributed as dist
    if GROUP.get("world", 1) > 1 and not dist.is_initialized():
        join_group()


def gather(obj):
    """Every rank's obj, as a list on rank 0 (None elsewhere); [obj] in one process."""
    import torch.distributed as dist
    if GROUP.get("world", 1) == 1:
        return [obj]
    objs = [None] * GROUP["world"] if dist.get_rank() == 0 else None
    dist.gather_object(obj, objs, dst=0)
    return objs


def broadcast(obj):
    """Rank 0's obj on every rank."""
    import torch.distributed as dist
    if GROUP.get("world", 1) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------
# Resume: each model's results are appended to <out>/<model>/progress.jsonl as they come; a line
# is one round of every rank ({"verify_timeouts": {bench: count}, "results": [[bench, index, record]]}),
# the first line holds the settings that made them
def progress_path(out, label):
    return os.path.join(out, safe_name(label), "progress.jsonl")


def read_progress(path, settings, suites):
    """({(bench, index): record}, {bench: verify timeouts}) saved in `path` by an earlier run of
    these settings; empty when there is none. Other settings, or problems that changed since, are
    refused in one line (never mixed). A last line cut short by a kill is dropped from the file."""
    if not os.path.isfile(path):
        return {}, {}
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")
    if lines[-1]:  # no newline at the end: a write cut short; keep the complete lines only (atomic rewrite)
        lines = lines[:-1]
        with open(path + ".tmp", "w") as f:
            f.write("".join(line + "\n" for line in lines if line))
        os.replace(path + ".tmp", path)
    lines = [line for line in lines if line]
    if not lines:
        return {}, {}
    try:
        header, rounds = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    except json.JSONDecodeError as e:
        raise SystemExit(f"eval.py: {path}: not valid JSON ({e}); delete it to evaluate this model again") from None
    saved = header.get("settings", {})
    diff = [f"{key} {saved.get(key)!r} there, {value!r} here" for key, value in settings.items() if saved.get(key) != value]
    if diff:
        raise SystemExit(f"eval.py: {path} holds results of other settings ({'; '.join(diff)}); use another --out, "
                         "or delete that file to evaluate this model again")
    done, timeouts = {}, {}
    for line in rounds:
        for bench, index, record in line["results"]:
            done[bench, index] = record
        for bench, count in line["verify_timeouts"].items():
            timeouts[bench] = timeouts.get(bench, 0) + count
    for (bench, index), record in done.items():
        problems = suites.get(bench, [])
        if index < len(problems) and (record["question"], record["answer"]) != (question_of(problems[index]),
                                                                                 problems[index]["answer"]):
            raise SystemExit(f"eval.py: {path}: {bench} problem {index} is not the one saved there (the benchmark "
                             "changed); use another --out, or delete that file to evaluate this model again")
    return done, timeouts


def append_line(path, obj):
    """One JSON line, on disk before this returns (a kill after it loses nothing)."""
    line = json.dumps(obj) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return line


def killed_for_test(path, rounds, line):
    """tests only (EVAL_TEST_KILL_AFTER_ROUNDS=N): after N saved rounds, half a line, then SIGKILL."""
    if os.environ.get(KILL_AFTER_ROUNDS) == str(rounds):
        with open(path, "a") as f:
            f.write(line[:len(line) // 2])
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------
# The evaluation: every model on every benchmark, one table
def context_of(path):
    """The model's context length (max_position_embeddings of its config.json), None if unknown."""
    config = read_config(path)
    if config is None:
        return None
    return config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")


def plan_model(cfg, label, path, train_cfg, task, suites, max_tokens, settings):
    """What one model's evaluation needs before any engine: tokenizer, prompt style, prompt ids, the
    response budget (capped by its context), and the settings its saved results must match."""
    import tiny
    tokenizer = tiny.load_tokenizer(path)
    style = style_for(cfg, train_cfg, task)
    prompts = {bench: data.tokenize_prompts(tokenizer, ps, style) for bench, ps in suites.items()}
    longest = max(len(ids) for ids_of_bench in prompts.values() for ids in ids_of_bench)
    context = context_of(path)
    budget = min(max_tokens, context - longest) if context else max_tokens
    if budget < 1:
        raise SystemExit(f"{path}: the longest prompt ({longest} tokens) fills its context ({context}); use --limit "
                         "or benchmarks with shorter problems")
    return {"label": label, "path": path, "tokenizer": tokenizer, "style": style, "prompts": prompts,
            "longest": longest, "budget": budget, "capped": budget < max_tokens, "context": context,
            "settings": {"model": path, **settings, "max_tokens": budget, "instruction": style.instruction,
                         "system_prompt": style.system_prompt, "chat_template": style.chat_template}}


def run(cfg):
    """Evaluate cfg.model (or the embedded default) on cfg.benchmarks, on this process or on every
    torchrun rank (each its own engine, an even share of the samples); rank 0 writes and returns the rows."""
    import rollout
    import tiny
    import torch
    from tqdm import tqdm
    rank, world = setup_distributed()
    say = print if rank == 0 else (lambda *args, **kwargs: None)
    if cfg.model:
        names = cfg.names or [label_of(m.rstrip("/")) for m in cfg.model]
        try:  # run folders -> their latest checkpoint; hub names -> the local copy (downloaded once)
            models = [(name, tiny.local_model(resolve_model(m)), run_config(m)) for name, m in zip(names, cfg.model)]
        except OSError as e:
            raise SystemExit(f"eval.py: --model: {e}") from None
    else:
        models = embedded_default()
    task_name = cfg.task if cfg.task != "auto" else models[0][2].get("task", "math")
    task = data.get_task(task_name)
    # --workers reaches the math reward only: a task's reward takes (completions, problems, timeout)
    workers = {"workers": cfg.workers} if cfg.workers and task.reward is data.math_reward else {}
    suites = load_benchmarks(cfg, task)  # all loaded before any model: a malformed file fails fast
    max_tokens = cfg.max_tokens or next((m[2]["max_response_tokens"] for m in models if m[2].get("max_response_tokens")), 4096)
    n = cfg.n or cfg.k
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    backend = cfg.backend if cfg.backend != "auto" else ("vllm" if rollout.vllm_available() else "hf")
    num_problems = sum(len(p) for p in suites.values())
    say(f"{len(models)} model(s) x {len(suites)} benchmark(s) "
        f"({', '.join(f'{b}: {len(p)}' for b, p in suites.items())} problems), {n} samples each, "
        f"temperature {cfg.temperature}, top_p {cfg.top_p}, {max_tokens} max tokens, {world} process(es)")

    # 1. Every model planned, and --out read, before any engine starts (a refusal costs nothing)
    settings = {"k": cfg.k, "samples": n, "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed,
                "task": task_name, "prompt_key": cfg.prompt_key, "answer_key": cfg.answer_key, "backend": backend,
                "dtype": dtype}
    plans = [plan_model(cfg, label, path, train_cfg, task, suites, max_tokens, settings)
             for label, path, train_cfg in models]
    saved, error = [], None
    if rank == 0:  # only rank 0 reads and writes --out (ranks need no shared file system)
        try:
            saved = [read_progress(progress_path(cfg.out, p["label"]), p["settings"], suites) for p in plans]
        except SystemExit as e:
            error = str(e)
    # collective: every rank must split the same remaining work, and a refusal must stop every rank
    done_keys, error = broadcast(([set(done) for done, _ in saved], error))
    if error:
        raise SystemExit(error)
    skipped = sum(len([key for key in keys if key[1] < len(suites.get(key[0], []))]) for keys in done_keys)
    if skipped:
        say(f"resuming: {skipped} of {num_problems * len(plans)} problem evaluations ({skipped * n} samples) are "
            f"already in {cfg.out}, skipped")
    if rank == 0:
        for plan, (done, _) in zip(plans, saved):
            path = progress_path(cfg.out, plan["label"])
            if not os.path.isfile(path) or os.path.getsize(path) == 0:  # a new model (or a header cut short)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                append_line(path, {"settings": plan["settings"]})
    bar = tqdm(total=num_problems * n * len(plans), initial=skipped * n, unit="sample", desc="eval",
               disable=rank != 0, dynamic_ncols=True)
    start, tokens = time.time(), 0

    # 2. Each model: the problems not yet done, dealt round-robin over the ranks, in rounds
    rows, sampler, engine, rounds_saved = [], None, None, 0  # engine = (path, max_model_len, tokenizer) of the live sampler
    for i, plan in enumerate(plans):
        label, path, tokenizer = plan["label"], plan["path"], plan["tokenizer"]
        todo = [(bench, j) for bench, ps in suites.items() for j in range(len(ps)) if (bench, j) not in done_keys[i]]
        if plan["capped"] and todo:
            say(f"note: {label}: responses capped at {plan['budget']} tokens (context {plan['context']}, longest prompt "
                f"{plan['longest']})")
        if todo and (sampler is not None and same_architecture(engine[0], path)
                     and plan["longest"] + plan["budget"] <= engine[1] and tokenizer.get_vocab() == engine[2].get_vocab()):
            sampler.load_weights(checkpoint_weights(path))  # same architecture and vocabulary: reuse the live engine
        elif todo:
            if sampler is not None:  # a different architecture: a new engine, after the old one is gone
                sampler.close()
                sampler = None
                free_memory()
                rejoin()
            engine = (path, plan["longest"] + plan["budget"], tokenizer)
            sampler = rollout.make_sampler(path, tokenizer, backend=cfg.backend, max_model_len=engine[1], seed=cfg.seed,
                                           dtype=dtype, gpu_memory_utilization=cfg.gpu_memory_utilization)
        stop_ids = data.stop_token_ids(path, tokenizer)  # the training stop rule
        reward = lambda texts, probs: task.reward(texts, probs, 1.0, **workers)  # noqa: E731
        # round-robin: every rank gets an even share of every benchmark (balanced by samples: AIME's
        # long responses are not all on one rank), whatever was done before
        mine = todo[rank::world]
        size = cfg.chunk or max(1, 1024 // n)  # problems per rank per round: ~1024 samples between saves
        for r in range(math.ceil(math.ceil(len(todo) / world) / size)):  # the same number of rounds on every rank
            part, records, timeouts = mine[r * size:(r + 1) * size], [], {}
            for bench in dict.fromkeys(b for b, _ in part):  # one sampler call per benchmark in the round
                index = [j for b, j in part if b == bench]
                res = evaluate(sampler, tokenizer, [suites[bench][j] for j in index], k=cfg.k, n=n,
                               temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=plan["budget"], style=plan["style"],
                               seed=cfg.seed, progress=False, stop_token_ids=stop_ids, reward=reward,
                               prompts=[plan["prompts"][bench][j] for j in index],
                               keys=[[bench, j] for j in index])  # seeded by (benchmark, index): any rank, any round
                records += [[bench, j, rec] for j, rec in zip(index, res["results"])]
                timeouts[bench] = res["verify_timeouts"]
            rounds = gather((records, timeouts))  # collective: rank 0 saves every rank's round and moves the bar
            if rank == 0:
                line = {"verify_timeouts": {}, "results": [x for recs, _ in rounds for x in recs]}
                for _, counts in rounds:
                    for bench, count in counts.items():
                        line["verify_timeouts"][bench] = line["verify_timeouts"].get(bench, 0) + count
                text = append_line(progress_path(cfg.out, label), line)
                rounds_saved += 1
                killed_for_test(progress_path(cfg.out, label), rounds_saved, text)
                saved[i][0].update({(b, j): rec for b, j, rec in line["results"]})
                for bench, count in line["verify_timeouts"].items():
                    saved[i][1][bench] = saved[i][1].get(bench, 0) + count
                repeats = n if cfg.temperature == 0 else 1  # greedy: one draw copied n times
                tokens += sum(x for _, _, rec in line["results"] for x in rec["lengths"]) // repeats
                bar.update(len(line["results"]) * n)
                bar.set_postfix_str(f"{tokens / max(time.time() - start, 1e-9):.0f} tok/s")
        if rank != 0:
            continue
        done, timeouts = saved[i]
        details = {bench: summarize([done[bench, j] for j in range(len(ps))], n, cfg.k, timeouts.get(bench, 0))
                   for bench, ps in suites.items()}
        for bench, res in details.items():
            bar.write(f"{label} | {bench}: Avg@{cfg.k} {100 * res['avg']:.1f} | Pass@{cfg.k} {100 * res['pass']:.1f} | "
                      f"truncated {100 * res['truncated']:.1f}% | no answer {100 * res['no_answer']:.1f}%")
        per_bench = {b: {"avg": r["avg"], "pass": r["pass"]} for b, r in details.items()}
        rows.append({"name": label, "model": path, "instruction": plan["style"].instruction,
                     "system_prompt": plan["style"].system_prompt, "max_tokens": plan["budget"],
                     "benchmarks": per_bench, "average": macro_average(per_bench), "details": details})
    bar.close()
    if sampler is not None:
        sampler.close()  # leave no engine behind (a caller may make its own next)
        sampler = None
        free_memory()
    if world > 1:
        import torch.distributed as dist
        if dist.is_initialized():  # vLLM's close may have destroyed it already
            dist.destroy_process_group()
    if rank != 0:
        return None
    settings = {"k": cfg.k, "samples": n, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "max_tokens": max_tokens, "seed": cfg.seed, "backend": backend, "task": task_name}
    table = write_results(cfg.out, rows, list(suites), settings)
    print("\n" + table + f"\n\nwritten to {cfg.out}/ (results.md, results.json, per-problem JSONL)")
    return rows


# ----------------------------------------------------------------------------------------------
# Command line, generated from EvalConfig (cli.py), every value checked before anything loads
def parse_args(argv=None):
    settings, _ = cli.parse(EvalConfig, argv, "Avg@k / Pass@k evaluation (eval.py)")
    cfg = cli.build(EvalConfig, settings)
    check(cfg.k >= 1, "k", cfg.k, "must be >= 1")
    check(cfg.n == 0 or cfg.n >= cfg.k, "n", cfg.n, f"Pass@{cfg.k} needs at least k = {cfg.k} samples per problem")
    check(cfg.temperature >= 0, "temperature", cfg.temperature, "must be >= 0 (0 = greedy)")
    check(0 < cfg.top_p <= 1, "top_p", cfg.top_p, "must be in (0, 1]")
    check(cfg.limit >= 0 and cfg.max_tokens >= 0 and cfg.workers >= 0, "limit", cfg.limit,
          "--limit, --max-tokens and --workers must be >= 0")
    check(cfg.chunk >= 0, "chunk", cfg.chunk, "must be >= 0 (0 = about 1024 samples per process per round)")
    check(cfg.backend in ("auto", "vllm", "hf"), "backend", cfg.backend, "choose auto, vllm or hf")
    check(cfg.dtype in ("auto", "bfloat16", "float32", "float16"), "dtype", cfg.dtype, "choose auto, bfloat16, float32 or float16")
    check(0 < cfg.gpu_memory_utilization <= 1, "gpu_memory_utilization", cfg.gpu_memory_utilization, "must be in (0, 1]")
    check(not cfg.names or len(cfg.names) == len(cfg.model), "names", cfg.names,
          f"give one label per --model ({len(cfg.model)})")
    if cfg.task != "auto":
        try:
            data.get_task(cfg.task)
        except data.DataError as err:
            check(False, "task", cfg.task, str(err).split(": ", 1)[-1])
    for model in cfg.model:
        cli.check_model("model", resolve_model(model) if os.path.isdir(model) else model)
    for source in cfg.benchmarks:
        check(source in BENCHMARKS or cli.source_exists(source), "benchmarks", source,
              f"not one of {list(BENCHMARKS)}, no such file, and not a hub name org/name[:config][:split]")
    return cfg


def main(argv=None):
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights" bars at every checkpoint
    try:
        cfg = parse_args(argv)
    except cli.SettingError as err:
        cli.exit_with(err)
    if cfg.plot:
        import plot
        out = cfg.out if cfg.out.endswith(".png") else os.path.join(cfg.out, "curves.png")
        print(f"wrote {plot.plot_runs(cfg.plot, out)}")
        return
    try:
        run(cfg)
    except data.DataError as e:  # a malformed benchmark file: its name and line, no traceback
        raise SystemExit(f"eval.py: {e}") from None


if __name__ == "__main__":  # guarded: vLLM spawns processes that re-import this file
    main()
