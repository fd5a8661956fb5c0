"""Tests of benchmarks/build.py and of the benchmark answers against verify.py.

(a) The conversion of each source format (AIME / AMC / MATH500 `answer` field, Minerva's boxed
    solution, OlympiadBench's list of $-delimited final answers) on small rows written here, with
    outputs written by hand; the sha256 and row-count checks; the two corrected golds
    (ANSWER_FIXES); a whole build from a local folder. No network and no large file.
(b) The gold self-check, one test that always runs: every gold answer is read whole and verifies
    against itself written bare, inside \\boxed{} (as a completion, through verify.reward) and
    inside $...$. It covers real rows copied into this file (always, so CI checks them too) and
    every row of each benchmarks/<name>.jsonl built locally (`python benchmarks/build.py`); the
    built files are not in the repository. Nothing here is skipped.

Run: python -m pytest -q tests/test_benchmarks.py (a few seconds; ~1,550 rows when all six are built).
"""
import hashlib
import importlib.util
import json
import os

import pytest

import verify
import verify_engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("build", os.path.join(ROOT, "benchmarks", "build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


# ---- (a) conversion of each source format
def test_answer_field_rows_aime_math500():
    aime = {"id": 67, "problem": "Find $x$.", "question": "Find $x$.", "solution": "...", "answer": "025",
            "url": "https://example.org"}
    assert build.convert_answer_field(aime, 7) == {"problem": "Find $x$.", "answer": "025", "id": 67}
    math500 = {"problem": "Convert $(0,3)$.", "solution": "$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$",
               "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
               "unique_id": "test/precalculus/807.json"}
    assert build.convert_answer_field(math500, 0) == {
        "problem": "Convert $(0,3)$.", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
        "id": "test/precalculus/807.json"}
    dollars = {"problem": "How much?", "answer": "\\$32,\\!348", "unique_id": "test/algebra/1.json"}
    assert build.convert_answer_field(dollars, 0)["answer"] == "\\$32,\\!348"  # an escaped $ is a dollar sign


def test_answer_field_row_without_id_takes_its_index():  # AIME25's rows have only problem and answer
    assert build.convert_answer_field({"problem": "Find $N$.", "answer": "336^\\circ"}, 19) == {
        "problem": "Find $N$.", "answer": "336^\\circ", "id": 19}


def test_amc_float_answer_becomes_an_integer_string():
    row = {"id": 0, "problem": "How many miles?", "question": "How many miles?", "answer": 27.0, "url": "u"}
    assert build.convert_answer_field(row, 0)["answer"] == "27"
    assert build.convert_answer_field(dict(row, answer=-1.0), 0)["answer"] == "-1"
    with pytest.raises(build.BuildError, match="not a whole number"):
        build.convert_answer_field(dict(row, answer=2.5), 0)


def test_minerva_answer_is_the_last_box_of_the_solution():
    row = {"problem": "Find the diameter (in cm).", "type": "Astronomy", "idx": 0,
           "solution": "First $s=\\boxed{2}$ is wrong; then\n\\[\ns=\\frac{45}{3600}=\\boxed{\\frac{1}{2}} \\mathrm{~cm}\n\\]"}
    assert build.convert_minerva(row, 0) == {"problem": "Find the diameter (in cm).", "answer": "\\frac{1}{2}", "id": 0}
    nested = dict(row, solution="so $\\boxed{\\{1, \\frac{a}{b}\\}}$ and $\\boxed{x_{0} \\cos t+$ $\\dot{x}_{0}}$.")
    assert build.convert_minerva(nested, 0)["answer"] == "x_{0} \\cos t+ \\dot{x}_{0}"  # stray "$ $" removed
    piecewise = "\\left\\{\\begin{array}{ll} x & x>0 \\\\ 0 & x \\le 0 \\end{array}\\right."
    assert build.last_boxed(f"so $f(x)=\\boxed{{{piecewise}}}$") == piecewise  # an escaped \\{ opens no group
    with pytest.raises(build.BuildError, match="no \\\\boxed"):
        build.convert_minerva(dict(row, solution="The answer is 3."), 0)


def test_olympiadbench_final_answer_list_loses_its_dollars():
    row = {"id": 1610, "subfield": "Algebra", "context": None, "question": "Determine the largest $C$.",
           "solution": ["..."], "final_answer": ["$\\frac{1}{2 n+2}$"], "is_multiple_answer": False,
           "unit": None, "answer_type": "Expression", "error": None}
    assert build.convert_olympiadbench(row, 0) == {"problem": "Determine the largest $C$.",
                                                   "answer": "\\frac{1}{2 n+2}", "id": 1610}
    assert build.convert_olympiadbench(dict(row, final_answer=["$69$,$84$"]), 0)["answer"] == "69,84"
    assert build.convert_olympiadbench(dict(row, final_answer=["2"]), 0)["answer"] == "2"
    assert build.convert_olympiadbench(dict(row, final_answer=["$1$", " $-2$ "]), 0)["answer"] == "1, -2"
    with pytest.raises(build.BuildError, match="context"):
        build.convert_olympiadbench(dict(row, context="A figure shows ..."), 0)
    with pytest.raises(build.BuildError, match="empty final_answer"):
        build.convert_olympiadbench(dict(row, final_answer=["$ $"]), 0)


def fake_source(monkeypatch, name, lines, expected_rows):
    """Point SOURCES[name] at small in-memory content: returns its bytes (sha256 pinned to them)."""
    raw = "".join(json.dumps(line) + "\n" if isinstance(line, dict) else line for line in lines).encode()
    path, _, _, converter = build.SOURCES[name]
    monkeypatch.setitem(build.SOURCES, name, (path, hashlib.sha256(raw).hexdigest(), expected_rows, converter))
    return raw


def test_convert_file_counts_rows_and_records_the_source_line(monkeypatch):
    raw = fake_source(monkeypatch, "aime25", [{"problem": "P1", "answer": "70"}, "\n",
                                              {"problem": "P2", "answer": "588"}], expected_rows=2)
    rows = build.convert("aime25", raw, "f.jsonl")
    prefix = "ypwang61/One-Shot-RLVR@21ed529ec900:Qwen2.5-Eval/evaluation/data/aime25/test.jsonl"
    assert rows == [{"problem": "P1", "answer": "70", "id": 0, "source": prefix + ":1"},
                    {"problem": "P2", "answer": "588", "id": 1, "source": prefix + ":3"}]  # line 2 is blank
    monkeypatch.setitem(build.SOURCES, "aime25", build.SOURCES["aime25"][:2] + (30,) + build.SOURCES["aime25"][3:])
    with pytest.raises(build.BuildError, match="2 rows, expected 30"):
        build.convert("aime25", raw, "f.jsonl")
    with pytest.raises(build.BuildError, match="f.jsonl:1: cannot convert"):  # a row without `answer`
        build.convert("aime25", b'{"problem": "P1"}\n', "f.jsonl")


def test_build_from_a_local_folder_writes_the_rows(monkeypatch, tmp_path, capsys):
    raw = fake_source(monkeypatch, "amc23", [{"id": 0, "problem": "Cities $A$ and $B$?", "answer": 27.0},
                                             {"id": 1, "problem": "What is $x+y$?", "answer": 36.0}], expected_rows=2)
    (tmp_path / "src" / "amc23").mkdir(parents=True)
    (tmp_path / "src" / "amc23" / "test.jsonl").write_bytes(raw)
    build.main(["amc23", "--from", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    out = tmp_path / "out" / "amc23.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["problem"], r["answer"], r["id"]) for r in rows] == [("Cities $A$ and $B$?", "27", 0),
                                                                    ("What is $x+y$?", "36", 1)]
    printed = capsys.readouterr().out
    assert "2 rows" in printed and hashlib.sha256(out.read_bytes()).hexdigest() in printed


def test_build_refuses_a_file_that_is_not_the_pinned_version(tmp_path):
    (tmp_path / "aime24").mkdir()
    (tmp_path / "aime24" / "test.jsonl").write_text('{"id": 60, "problem": "P", "answer": "204"}\n')
    with pytest.raises(SystemExit, match="sha256 .* expected af2b8bd2"):
        build.main(["aime24", "--from", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "aime24.jsonl").exists()
    with pytest.raises(SystemExit, match="none of"):
        build.main(["math500", "--from", str(tmp_path), "--out", str(tmp_path / "out")])


def test_answer_fixes_correct_the_two_defective_golds(monkeypatch):
    """Bug caught: a defective source answer (OlympiadBench 2045 't(0,4]', Minerva 5 'np.arcsin(10/13)')
    written as it is, or a fix applied to a row whose source answer has changed."""
    row = {"id": 2045, "question": "Determine all positive real numbers $t$ ...", "final_answer": ["$t(0,4]$"],
           "context": None}
    raw = fake_source(monkeypatch, "olympiadbench", [row, dict(row, id=2046, final_answer=["$t(0,4]$"])], 2)
    rows = build.convert("olympiadbench", raw, "f.jsonl")
    assert [(r["id"], r["answer"]) for r in rows] == [(2045, "(0,4]"), (2046, "t(0,4]")]  # only that id
    minerva = {"problem": "What is the critical angle?", "idx": 5, "solution": "so $\\boxed{np.arcsin(10/13)}$."}
    raw = fake_source(monkeypatch, "minerva_math", [minerva], 1)
    assert build.convert("minerva_math", raw, "f.jsonl")[0]["answer"] == "\\arcsin(10/13)"
    raw = fake_source(monkeypatch, "olympiadbench", [dict(row, final_answer=["$(0,5]$"])], 1)
    with pytest.raises(build.BuildError, match="ANSWER_FIXES expects"):
        build.convert("olympiadbench", raw, "f.jsonl")


# ---- (b) the gold self-check
# Real rows, (benchmark, id, answer) as the build writes them, copied by hand from the built files:
# a few plain ones per benchmark and every answer that once failed the self-check, was matched by a
# mere number of it (I(0) by 0), or needs the parser's rarer parts (prose, names, accents, floors,
# unknown functions), and the two corrected golds.
EMBEDDED_ROWS = [
    ("aime24", 60, "204"), ("aime24", 61, "113"), ("aime24", 62, "371"),
    ("aime25", 0, "70"), ("aime25", 1, "588"), ("aime25", 19, "336^\\circ"),
    ("amc23", 0, "27"), ("amc23", 1, "36"), ("amc23", 2, "45"),
    ("math500", "test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("math500", "test/intermediate_algebra/1994.json", "p - q"), ("math500", "test/algebra/2584.json", "\\frac{14}{3}"),
    ("math500", "test/algebra/2626.json", "\\$32,\\!348"), ("math500", "test/algebra/1349.json", "\\text{Evelyn}"),
    ("math500", "test/number_theory/864.json", "52_8"), ("math500", "test/intermediate_algebra/662.json", "1 \\pm \\sqrt{19}"),
    ("minerva_math", 0, "1.6"), ("minerva_math", 1, "4.5e33"), ("minerva_math", 2, "41.8"),
    ("minerva_math", 5, "\\arcsin(10/13)"), ("minerva_math", 61, "I(0)"), ("minerva_math", 62, "y^{\\prime}+r y-r x(t)=0"),
    ("minerva_math", 72, "x_{0} \\cos (\\omega t)+ \\dot{x}_{0} \\sin (\\omega t) / \\omega"),
    ("minerva_math", 86, "I(0) e^{-\\frac{t}{R C}}"), ("minerva_math", 89, "x^{\\prime}+\\frac{r}{V} x-r c=0"),
    ("minerva_math", 132, "m l \\ddot{\\theta}(t)-m g \\sin \\theta(t)=f(t) \\cos \\theta(t)"),
    ("minerva_math", 245, "MR=SRMC"), ("minerva_math", 250, "SRAC=LRAC"), ("minerva_math", 251, "SRMC=LRMC"),
    ("olympiadbench", 1606, "2"), ("olympiadbench", 1610, "\\frac{1}{2 n+2}"), ("olympiadbench", 1612, "2^{1009}"),
    ("olympiadbench", 1641, "\\binom{2n}{n}"), ("olympiadbench", 1687, "f(n)=n, g(n)=1"),
    ("olympiadbench", 1965, "f(x)=a x+b, where b is an arbitrary integer, and a is an arbitrary positive "
                            "integer with \\mho(a)=0"),
    ("olympiadbench", 1974, "\\lfloor\\sqrt{n-1}\\rfloor"), ("olympiadbench", 2045, "(0,4]"),
    ("olympiadbench", 2626, "\\frac{d !}{2 k(d-k) !}"),
]

# Rows known to fail the self-check, (benchmark, id) -> answer, each with the reason. The test
# checks that each still fails, so that an entry is removed when verify.py learns to read it.
KNOWN_GOLD_FAILURES = {}

BUILT = {name: os.path.join(ROOT, "benchmarks", f"{name}.jsonl") for name in build.SOURCES}


def self_check(gold):
    """Which checks `gold` fails: [] when none. It must verify against itself bare, inside
    \\boxed{} (as a completion, through verify.reward) and inside $...$; and be read whole ("whole"):
    a gold is never cut down to a part of it (OlympiadBench 1965, a sentence, once became its last
    number, "0", so that \\boxed{0} earned reward 1)."""
    forms = {"bare": verify.verify(gold, gold),
             "boxed": verify.reward(f"So the final answer is $\\boxed{{{gold}}}$.", gold) == 1.0,
             "dollar": verify.verify(gold, f"${gold}$"),
             "whole": verify_engine.answer_text(gold, gold=True) == gold.replace("\\$", " ").strip()}
    return [form for form, ok in forms.items() if not ok]


def test_self_check_catches_a_gold_that_does_not_verify():  # the check below is not vacuous
    assert self_check("") == ["bare", "boxed", "dollar", "whole"]
    assert self_check("\\boxed{3}") == ["whole"]  # it verifies, but the gold read is "3", a part of it


def read_built(name):
    """The rows of a built file, after checking its row count and the four fields of each row."""
    with open(BUILT[name], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == build.SOURCES[name][2], name
    for row in rows:
        assert set(row) == {"problem", "answer", "id", "source"}
        assert isinstance(row["problem"], str) and row["problem"].strip()
        assert isinstance(row["answer"], str) and row["answer"].strip()
        assert row["source"].startswith(f"{build.REPO}@{build.COMMIT[:12]}:{build.SOURCES[name][0]}:")
    return rows


def test_gold_self_check(capsys):
    """Every gold answer passes self_check(). Always covers EMBEDDED_ROWS (real rows of the six
    benchmarks, so CI checks them without the data); additionally every benchmarks/<name>.jsonl
    built locally (all six: 1,547 rows), whose row counts and fields are checked too, and whose
    copy of each embedded row must equal the embedded one. It prints what it covered. Failures
    must be exactly KNOWN_GOLD_FAILURES."""
    rows = {(name, i): gold for name, i, gold in EMBEDDED_ROWS}
    covered = [f"{len(EMBEDDED_ROWS)} embedded rows"]
    for name, path in BUILT.items():
        if os.path.isfile(path):
            built = {(name, r["id"]): r["answer"] for r in read_built(name)}
            embedded = {k: v for k, v in rows.items() if k[0] == name}
            assert {k: built.get(k) for k in embedded} == embedded, f"{path} differs from EMBEDDED_ROWS"
            rows.update(built)
            covered.append(f"{name} ({len(built)} rows)")
    failures = {key: gold for key, gold in rows.items() if self_check(gold)}
    assert failures == KNOWN_GOLD_FAILURES, {key: self_check(gold) for key, gold in failures.items()}
    with capsys.disabled():
        print(f"\ngold self-check: {len(rows)} golds: {', '.join(covered)}")
