"""benchmarks/build.py: builds the paper's six evaluation benchmarks as JSONL files.

The paper reports Avg@32 / Pass@32 on AIME24 (30 problems), AIME25 (30), AMC23 (40), MATH500 (500),
Minerva Math (272) and OlympiadBench (675: the English, text-only, open-ended math competition
subset). This script writes benchmarks/<name>.jsonl for each, one row a line:
    {"problem": str, "answer": str, "id": int | str, "source": "repo@commit:path:line"}
which is what data.py reads and what eval.py resolves by name (`python eval.py --benchmarks aime24`).

Every source file comes from one public repository at one pinned commit, the evaluation data of
the Qwen2.5-Math evaluation harness as carried by ypwang61/One-Shot-RLVR (benchmarks/README.md says
why this repository and what each file is). Each file is checked against its pinned sha256 and row
count before it is converted; a mismatch stops the build with the file named. No extra package is
needed (urllib, json, hashlib). No paper equation lives here.

Answers are normalised only as far as needed to make one string that verify.py reads. In every
benchmark an unescaped $ is a math delimiter, never part of an answer, so it is removed ("\\$" stays);
beyond that:
  AIME24, AIME25, MATH500   the `answer` field as it is (a string).
  AMC23                     the `answer` field is a float (27.0): written as an integer string ("27").
  Minerva Math              no answer field: the content of the last \\boxed{} of the `solution`.
  OlympiadBench             `final_answer` is a list of $-delimited strings ("$\\frac{1}{2}$",
                            "$69$,$84$"): its items, $ removed, joined with ", " (as data.py joins it).
Two source answers are defective and corrected by ANSWER_FIXES below (listed in benchmarks/README.md).

Run it
    python benchmarks/build.py                       download the pinned files (raw.githubusercontent.com)
    python benchmarks/build.py --from DIR            offline: DIR is a checkout of the source repository,
                                                     or a folder holding <name>/test.jsonl per benchmark
    python benchmarks/build.py aime24 math500        only these benchmarks
It prints, per benchmark, the number of rows, the sha256 of the written file and its path.
"""
import argparse
import hashlib
import json
import os
import re
import sys
import urllib.request

REPO = "ypwang61/One-Shot-RLVR"  # public GitHub repository holding all six source files
COMMIT = "21ed529ec90002597c92aee957af1dd8166bb66c"  # pinned commit (2025-06-30)
DATA_DIR = "Qwen2.5-Eval/evaluation/data"  # the Qwen2.5-Math evaluation harness's data folder
RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
HERE = os.path.dirname(os.path.abspath(__file__))


class BuildError(RuntimeError):
    """A source file that is missing, altered or not in the expected format; the message says which."""


# ----------------------------------------------------------------------------------------------
# Conversion: one source row -> {"problem", "answer", "id"}
def last_boxed(text):
    """Content of the last \\boxed{...} (or \\fbox{...}) of `text`, braces matched; None when there is none."""
    found = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "\\":  # an escaped character (\{, \}) does not count as a brace
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end():i - 1].strip()
    return found


def strip_dollars(s):
    """'$69$,$84$' -> '69,84': every unescaped $ (a math delimiter) removed; '\\$' is kept."""
    return re.sub(r"(?<!\\)\$", "", s).strip()


def convert_answer_field(row, index):
    """AIME24, AIME25, AMC23, MATH500: `problem` and `answer`; the id is the row's `id` or `unique_id`
    when it has one, else its 0-based index in the file. A float answer (AMC23's 27.0) that is a whole
    number is written as an integer; unescaped $ are removed (none of these files has one)."""
    answer = row["answer"]
    if isinstance(answer, float):
        if not answer.is_integer():
            raise BuildError(f"row {index}: answer {answer!r} is not a whole number")
        answer = str(int(answer))
    if not isinstance(answer, (str, int)) or isinstance(answer, bool):
        raise BuildError(f"row {index}: answer {answer!r} is not a string or a number")
    return {"problem": row["problem"], "answer": strip_dollars(str(answer)),
            "id": row.get("id", row.get("unique_id", index))}


def convert_minerva(row, index):
    """Minerva Math: no answer field; the answer is the content of the solution's last \\boxed{}."""
    answer = strip_dollars(last_boxed(row["solution"]) or "")  # idx 72's box holds a stray "$ $"
    if not answer:
        raise BuildError(f"row {index} (idx {row.get('idx')}): no \\boxed{{}} answer in its solution")
    return {"problem": row["problem"], "answer": answer, "id": row.get("idx", index)}


def convert_olympiadbench(row, index):
    """OlympiadBench: the problem is `question`; `final_answer` is a list of $-delimited strings,
    joined with ", " once their $ are removed (as data.py joins such a list)."""
    if row.get("context"):  # none of the 675 rows has one; it would have to go before the question
        raise BuildError(f"row {index} (id {row.get('id')}): has a `context`, which this script does not handle")
    items = [strip_dollars(str(a)) for a in row["final_answer"]]
    if not items or not all(items):
        raise BuildError(f"row {index} (id {row.get('id')}): empty final_answer {row['final_answer']!r}")
    return {"problem": row["question"], "answer": ", ".join(items), "id": row["id"]}


# name -> (path in the repository, sha256 of the file, rows, converter)
SOURCES = {
    "aime24": (f"{DATA_DIR}/aime24/test.jsonl",
               "af2b8bd2aa911b6333ad0df32f3ca05c7ae8ed10f1731f4372c8ae26990bf7ac", 30, convert_answer_field),
    "aime25": (f"{DATA_DIR}/aime25/test.jsonl",
               "4613b7d3b5346f007625969f4380d932d6a2618fdcc9b89e5d39c7fbddc074b8", 30, convert_answer_field),
    "amc23": (f"{DATA_DIR}/amc23/test.jsonl",
              "43707e1ca784602d8479de24ee8ce36609dbebc46dd152b0b12a46611aa898a4", 40, convert_answer_field),
    "math500": (f"{DATA_DIR}/math500/test.jsonl",
                "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132", 500, convert_answer_field),
    "minerva_math": (f"{DATA_DIR}/minerva_math/test.jsonl",
                     "0e656b430d3a0a1dab6aa853f453ba3805e28e2cabe4fc72486a897cc09d8ba2", 272, convert_minerva),
    "olympiadbench": (f"{DATA_DIR}/olympiadbench/test.jsonl",
                      "bb8c1e38a16ea9eacb77530315a674d883f267fbff79183effc53681b4fcc416", 675,
                      convert_olympiadbench),
}


# (benchmark, id) -> (the source's answer, the corrected answer). Only typos that make a right
# answer unreadable; the build checks that the source still holds the first string.
ANSWER_FIXES = {
    # "t(0,4]": a stray "t" from "t \in (0,4]"; the problem asks for all t, the answer is the interval
    ("olympiadbench", 2045): ("t(0,4]", "(0,4]"),
    # numpy code in a LaTeX answer (the critical angle arcsin(1/1.3)); written as LaTeX
    ("minerva_math", 5): ("np.arcsin(10/13)", "\\arcsin(10/13)"),
}


def fix_answer(name, row):
    """The row with its ANSWER_FIXES correction applied, if it has one; a source answer other than
    the one the fix was written for stops the build."""
    fix = ANSWER_FIXES.get((name, row["id"]))
    if fix is None:
        return row
    if row["answer"] != fix[0]:
        raise BuildError(f"{name} id {row['id']}: answer {row['answer']!r}, but ANSWER_FIXES expects {fix[0]!r}")
    return dict(row, answer=fix[1])


def convert(name, raw, where):
    """The bytes of one source file -> its rows in our format. `where` names the file in errors and
    goes, with the line number, into each row's `source`."""
    path, _, expected_rows, converter = SOURCES[name]
    rows = []
    for line_no, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = fix_answer(name, converter(json.loads(line), len(rows)))
        except (json.JSONDecodeError, KeyError, TypeError, BuildError) as e:
            raise BuildError(f"{where}:{line_no}: cannot convert this row ({type(e).__name__}: {e})") from None
        if not isinstance(row["problem"], str) or not row["problem"].strip():
            raise BuildError(f"{where}:{line_no}: empty problem")
        row["source"] = f"{REPO}@{COMMIT[:12]}:{path}:{line_no}"
        rows.append(row)
    if len(rows) != expected_rows:
        raise BuildError(f"{where}: {len(rows)} rows, expected {expected_rows} for {name}")
    return rows


# ----------------------------------------------------------------------------------------------
# Reading the pinned source files
def read_source(name, from_dir=None):
    """(bytes, where) of a benchmark's source file: from `from_dir` (a checkout: DIR/<path>, or a
    folder of the data: DIR/<name>/test.jsonl) or downloaded at the pinned commit. Checks the sha256."""
    path, sha256, _, _ = SOURCES[name]
    if from_dir:
        candidates = [os.path.join(from_dir, path), os.path.join(from_dir, name, os.path.basename(path))]
        where = next((c for c in candidates if os.path.isfile(c)), None)
        if where is None:
            raise BuildError(f"{name}: none of {candidates} exists")
        with open(where, "rb") as f:
            raw = f.read()
    else:
        where = RAW_URL.format(repo=REPO, commit=COMMIT, path=path)
        try:
            with urllib.request.urlopen(where, timeout=120) as response:
                raw = response.read()
        except OSError as e:
            raise BuildError(f"{name}: cannot download {where} ({e}); with a local copy of the "
                             f"repository use --from DIR") from None
    got = hashlib.sha256(raw).hexdigest()
    if got != sha256:
        raise BuildError(f"{where}: sha256 {got}, expected {sha256} ({REPO} at {COMMIT}, {path}); "
                         f"the file is not the pinned version")
    return raw, where


def write_jsonl(rows, out_path):
    """Write rows one JSON object a line (UTF-8, keys in a fixed order); return the file's sha256."""
    text = "".join(json.dumps({k: row[k] for k in ("problem", "answer", "id", "source")}, ensure_ascii=False)
                   + "\n" for row in rows)
    data = text.encode("utf-8")
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, out_path)  # a failed build never leaves half a file under the final name
    return hashlib.sha256(data).hexdigest()


def build(names, from_dir=None, out_dir=HERE):
    """Build the named benchmarks; returns [(name, rows, sha256 of the output, output path)]."""
    os.makedirs(out_dir, exist_ok=True)
    done = []
    for name in names:
        raw, where = read_source(name, from_dir)
        rows = convert(name, raw, where)
        out_path = os.path.join(out_dir, f"{name}.jsonl")
        done.append((name, len(rows), write_jsonl(rows, out_path), out_path))
        print(f"{name:14s} {len(rows):4d} rows  sha256 {done[-1][2]}  {out_path}", flush=True)
    return done


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build the evaluation benchmarks as JSONL files from pinned sources.")
    ap.add_argument("names", nargs="*", default=list(SOURCES), metavar="NAME",
                    help=f"benchmarks to build (default: all): {', '.join(SOURCES)}")
    ap.add_argument("--from", dest="from_dir", default=None, metavar="DIR",
                    help=f"read the source files from DIR (a checkout of {REPO}, or a folder with "
                         "<name>/test.jsonl) instead of downloading them")
    ap.add_argument("--out", default=HERE, help="output folder (default: this script's folder)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in SOURCES]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; known: {list(SOURCES)}")
    try:
        build(args.names, args.from_dir, args.out)
    except BuildError as e:
        sys.exit(f"build.py: {e}")


if __name__ == "__main__":
    main()
