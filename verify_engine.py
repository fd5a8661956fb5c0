"""verify_engine.py: the parser and comparison engine behind verify.py. You need not read this to
follow the training loop: verify.py's docstring says how a pair is decided and with which
tolerances; this file is the machinery that does it.

What is here, in order:
  1. Reading an answer out of text: brace matching, the last \\boxed{} (adjacent boxes joined), the
     DAPO "Answer: X" line, the prose fallback ("the answer is X", the last $...$, the last
     number) and answer_text(), which reduces a pred string to its answer (a gold: only by its
     explicit marks, never to a part of it).
  2. Normalisation (_clean: \\left, \\dfrac, thousands separators, ...) and a LaTeX / plain-math
     tokenizer.
  3. _Parser: tokens -> a small tree of tuples (the node kinds are listed above the class).
  4. Values without sympy: Fraction when exact and rational, else (complex) floats; the tolerance
     rules (_within_tol, _close).
  5. Structure: tuples, sets, intervals, equations, inequalities, \\pm, percent / degrees, bases.
  6. The sympy bridge (worker processes only): trees -> sympy objects by their constructors.
  7. decide(): one decision, in the caller (deep=False: raises NeedSympy when floats cannot tell)
     or in a worker (deep=True); parses() for verify.readable(); explain() for verify.py -v.
  8. The Math-Verify bridge (backend="math_verify").
  9. The pipe protocol (write_job, read_messages) and worker_loop(), the body of a worker
     process; verify.py starts, feeds and kills them.

Safety: model output is untrusted. It is tokenized by a regular expression and parsed by _Parser;
nothing from it reaches eval, exec, sympify or parse_expr, and sympy objects are built by their
constructors only. Every recursion and size is capped (MAX_NEST, MAX_ITEMS, MAX_BITS, answer
length). Importing this module imports no sympy: sympy is imported inside the functions of
sections 6 and 8, which run in verify.py's killable worker processes (and in `verify.py -v`, to
print a sympy form). Math-Verify, when asked for, parses with its own machinery, in those workers.
"""
import cmath
import json
import math
import os
import random
import re
import sys
from fractions import Fraction
from functools import lru_cache

REL_TOL = 1e-4            # relative tolerance when a decimal literal is involved
EXACT_TOL = 1e-10         # float agreement that counts as equal for exact irrational values
DIFF_TOL = 1e-6           # float disagreement that counts as different (in between: ask sympy)
MAX_TEXT_CHARS = 200_000  # longer gold / pred strings are rejected; of a completion, the tail is read
MAX_ANSWER_CHARS = 1_000  # longer extracted answers are rejected
MAX_NEST = 40             # parser nesting depth (brackets, powers, signs)
MAX_ITEMS = 64            # elements of a tuple / set / list
MAX_BITS = 20_000         # largest exact integer built in the calling process
MAX_SYMPY_BITS = 200_000  # largest exact integer power built in a worker


class _Bad(Exception):
    """The input is not a valid answer (or is too big): the pair is not equal."""


class NeedSympy(Exception):
    """Floats cannot settle this pair: a worker with sympy must."""


# ----------------------------------------------------------------------------------------------
# 1. Reading an answer out of text
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_MATH_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*", re.I)
_NUMBER_RE = re.compile(r"(?<![A-Za-z\d.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?")
_CONNECTOR = (r"\s|[,;.&$]|\\[()\[\]]|\\q?quad|\\[,;:! ]|\band\b|\bor\b|"
              r"\\text\{\s*(?:and|or|,)?\s*\}|\b[a-zA-Z](?:_\{?\w+\}?)?\s*=")
_CONNECTOR_RE = re.compile(_CONNECTOR, re.I)
_GAP_RE = re.compile(f"(?:{_CONNECTOR})*", re.I)


def _read_group(s, i):
    """s[i] == '{': (content, index after the matching '}'); unbalanced: (rest of s, len(s))."""
    depth, j, n = 0, i, len(s)
    while j < n:
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return s[i + 1:j], j + 1
        j += 1
    return s[i + 1:], n


def _boxes(text):
    """Outermost \\boxed{...} / \\fbox{...} (and '\\boxed 5') as (start, end, content)."""
    out, last_end = [], -1
    for m in _BOX_RE.finditer(text):
        if m.start() < last_end:
            continue  # a box inside a box
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            content, end = _read_group(text, i)
        else:
            word = re.match(r"[^\s$]*", text[i:]).group(0)
            content, end = word, i + len(word)
        out.append((m.start(), end, content.strip()))
        last_end = end
    return out


def last_boxed(text):
    """Content of the last box; boxes before it joined when only connectors separate them."""
    boxes = _boxes(text)
    if not boxes:
        return None
    k = len(boxes) - 1
    while k > 0:
        gap = text[boxes[k - 1][1]:boxes[k][0]]
        words = re.findall(r"[A-Za-z]+", re.sub(r"\\[a-zA-Z]+", " ", _CONNECTOR_RE.sub(" ", gap)))
        if len(gap) > 60 or "\n\n" in gap or re.search(r"[.?!:]\s", gap) or len(words) > 3 or \
                words and not re.search(r"\b(?:and|or)\b", gap):  # "\boxed{1} papers and \boxed{2} bins"
            break
        k -= 1
    parts = [c for _, _, c in boxes[k:] if c]
    return ", ".join(parts) if parts else None


_ANSWER_LINE_RE = re.compile(r"answer\s*:\s*([^\n]+)", re.I)  # verl's DAPO pattern, last match wins


def answer_line_text(text):
    """X of the last 'Answer: X' in `text` (DAPO-Math), its box unwrapped, $ / \\( \\) / ** stripped;
    or None."""
    found = _ANSWER_LINE_RE.findall(text)
    if not found:
        return None
    x = last_boxed(found[-1]) or found[-1]
    x = re.sub(r"\\[$()\[\]]|\$", " ", x).strip().strip("*").strip()
    return x or None


def _math_segments(text):
    return [next(g for g in m.groups() if g is not None).strip() for m in _MATH_RE.finditer(text)]


def fallback_answer(text):
    """No box: 'the answer is X', else the last $...$ (or a number after it), else the last number."""
    found = list(_ANSWER_IS_RE.finditer(text))
    if found:
        tail = text[found[-1].end():].split("\n")[0]
        tail = re.split(r"I hope|\.\s|\.$", tail)[0]
        if re.search(r"\bis\b", _MATH_RE.sub(" ", tail)):
            tail = re.split(r"\bis\b", tail)[-1]
        segs = _math_segments(tail)
        joined = _GAP_RE.fullmatch(_MATH_RE.sub(" ", tail).replace('"', " ")) and len(segs) > 1
        ans = ", ".join(segs) if joined else segs[-1] if segs else tail.strip().strip("$").strip()
        if ans and _prose_words(ans) and (len(ans) > MAX_ANSWER_CHARS or _parse(_clean(ans)) is None):
            nums = _NUMBER_RE.findall(ans)
            ans = nums[-1] if nums else ans
        if ans:
            return ans
    last = None
    for last in _MATH_RE.finditer(text):
        pass
    nums = _NUMBER_RE.findall(text[last.end():] if last else text)
    if nums:
        return nums[-1]
    return next(g for g in last.groups() if g is not None).strip() if last else None


_MATH_WORDS = {"and", "or", "sin", "cos", "tan", "cot", "sec", "csc", "log", "exp", "sqrt", "frac",
               "infty", "inf", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "max", "min",
               "gcd", "lcm", "mod", "pmod", "percent"}
_CODE_RE = re.compile(r"__|\bimport\s+\w|\blambda\b.*:|\b(?:eval|exec|open|system|compile)\s*\(|"
                      r"\\(?:input|include|def)\b")


def _prose_words(s):
    """Number of English-looking words (3+ letters, one of them lower case: SRMC is a name) outside
    LaTeX commands; 0 for code, never read as prose (no fallback digs a number out of
    "__import__('os')... 3")."""
    if _CODE_RE.search(s):
        return 0
    bare = re.sub(r"\\[a-zA-Z]+\s*\{[^{}]*\}|\\[a-zA-Z]+", " ", s)
    return sum(w.lower() not in _MATH_WORDS and not w.isupper() for w in re.findall(r"[A-Za-z]{3,}", bare))


_HASHES_RE = re.compile(r"^####\s*(\S.*?)\s*$", re.M)  # GSM8K's final line "#### 72"


def answer_text(s, gold=False):
    """The answer part of a pred (gold=False) string: the last box; else the math when there is only
    math ('$12$ and $13$', OlympiadBench's '1$,$2'); else, in prose, fallback_answer. A gold is read
    by explicit marks only (its last box, GSM8K's '#### 72'), else whole: a reference answer is never
    cut down to a fragment (a sentence to its last number), and prose is then compared as text."""
    if isinstance(s, (int, float, Fraction)) and not isinstance(s, bool):
        s = str(s)
    if not isinstance(s, str) or len(s) > MAX_TEXT_CHARS:
        return None
    s = s.replace("\\$", " ")
    boxes = _boxes(s)
    if gold:
        marked = [] if boxes else _HASHES_RE.findall(s)
        ans = last_boxed(s) if boxes else marked[-1] if marked else re.sub(r"\\[()\[\]]", " ", s)
    elif boxes and _ANSWER_IS_RE.search(s, boxes[-1][1]):  # "\boxed{200} ... The final answer is $10,455$."
        ans = fallback_answer(s[boxes[-1][1]:])
    elif boxes:
        ans = last_boxed(s)
    elif _prose_words(_MATH_RE.sub(" ", s)) == 0:
        ans = re.sub(r"\\[()\[\]]", " ", s)  # the $s go in _clean
    elif _MATH_RE.search(s) or _prose_words(s) >= 3 or len(s) > MAX_ANSWER_CHARS or \
            _parse(_clean(s)) is None:  # "so the number is 10 which is 1,000.99m"
        ans = fallback_answer(s) or s
    else:
        ans = s  # "125 miles"
    if ans is None or not ans.strip() or len(ans) > MAX_ANSWER_CHARS:
        return None
    return ans.strip()


# ----------------------------------------------------------------------------------------------
# 2. Normalisation and tokens
_CMD_NAMES = ("frac|dfrac|tfrac|cfrac|sqrt|left|right|boxed|text|textbf|mathrm|mathbf|mbox|pi|infty|"
              "cdot|times|div|le|leq|ge|geq|lt|gt|ne|neq|pm|mp|in|cup|begin|end|sin|cos|tan|cot|sec|"
              "csc|log|ln|exp|circ|approx|binom|dbinom|tbinom|quad|qquad|emptyset|varnothing|theta|"
              "alpha|beta|gamma|lambda|mu|sigma|omega|phi|dots|ldots|cdots|lfloor|rfloor|lceil|rceil")
_UNICODE = (("\u2212", "-"), ("\u2013", "-"), ("\u00d7", "*"), ("\u00b7", "*"), ("\u22c5", "*"),
            ("\u00f7", "/"), ("\u221a", "\\sqrt"), ("\u03c0", "\\pi"), ("\u221e", "\\infty"),
            ("\u2264", "\\le "), ("\u2265", "\\ge "), ("\u2260", "\\ne "), ("\u222a", "\\cup "),
            ("\u2208", "\\in "), ("\u2248", "\\approx "), ("\u00b2", "^2"), ("\u00b3", "^3"),
            ("\u20ac", " "), ("\u00a3", " "), ("\u00a5", " "), ("\u00a0", " "))
_CLEAN_SUBS = [(re.compile(a), b) for a, b in (
    (r"(?<!\\)\\\\(?=(?:%s)(?![a-zA-Z]))" % _CMD_NAMES, r"\\"),   # '\\frac' typed with a doubled backslash
    (r"\\[dtc]frac(?![a-zA-Z])", r"\\frac"),
    (r"\\[dt]binom(?![a-zA-Z])", r"\\binom"),
    (r"\\(?:left|right)\s*\.", " "),
    (r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])", " "),
    (r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])", "\u00b0"),
    (r",\\!\s*", ","),
    (r"\\!", ""),
    (r"\\q?quad|\\(?:displaystyle|textstyle|limits|nolimits)(?![a-zA-Z])|\\[,;: ]|~", " "),
    (r"\\hspace\*?\{[^{}]*\}", " "),
    (r"\\boxed\s*|\\fbox\s*", ""),
    (r"\\%|%", " % "),
    (r"(?<=\d)\s*\{\s*,\s*\}\s*(?=\d)", ""),  # 14{,}916
)]
_THOUSANDS_RE = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])")
_SPACED_THOUSANDS_RE = re.compile(r"(?<![\d.])\d{1,3}(?: \d{3})+(?![\d.])")


def _clean(s):
    """Normalise spelling without changing meaning; '$' delimiters and boxes already handled."""
    s = s.replace("$", " ")
    for a, b in _UNICODE:
        s = s.replace(a, b)
    s = _CLEAN_SUBS[0][0].sub(_CLEAN_SUBS[0][1], s).replace("\\\\", "\0")  # protect row breaks \\
    for pattern, repl in _CLEAN_SUBS[1:]:
        s = pattern.sub(repl, s)
    s = s.replace("\0", " \\\\ ")
    s = s.strip().rstrip(".,;").strip()
    if "," in s and not re.search(r"[(\[]|\\\{", s):  # 7,425,000 -> 7425000 when every comma is one
        joined = _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), s)
        if "," not in joined:
            s = joined
    return _SPACED_THOUSANDS_RE.sub(lambda m: m.group(0).replace(" ", ""), s)


_TOKEN_RE = re.compile(r"""
   (?P<sp>\s+)
 | (?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)
 | (?P<cmd>\\[a-zA-Z]+|\\[{}|%&$\\])
 | (?P<word>[a-zA-Z]+)
 | (?P<op><=|>=|!=|=<|=>|==|\*\*|[-+*/^_()\[\]{}|,;:=<>!&%\u00b0])
""", re.X)
_GREEK = set("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu "
             "xi omicron rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi "
             "Sigma Phi Psi Omega ell".split())
_FUNCS = set("sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh ln log exp max min gcd "
             "lcm".split())
_CMD_TOKENS = {
    "cdot": ("op", "*"), "times": ("op", "*"), "ast": ("op", "*"), "div": ("op", "/"),
    "pm": ("op", "pm"), "mp": ("op", "mp"), "le": ("op", "<="), "leq": ("op", "<="),
    "leqslant": ("op", "<="), "ge": ("op", ">="), "geq": ("op", ">="), "geqslant": ("op", ">="),
    "lt": ("op", "<"), "gt": ("op", ">"), "ne": ("op", "!="), "neq": ("op", "!="),
    "approx": ("op", "~="), "simeq": ("op", "~="), "cup": ("op", "cup"), "in": ("op", "in"),
    "{": ("op", "\\{"), "}": ("op", "\\}"), "lbrace": ("op", "\\{"), "rbrace": ("op", "\\}"),
    "langle": ("op", "("), "rangle": ("op", ")"), "vert": ("op", "|"), "lvert": ("op", "|"),
    "rvert": ("op", "|"), "|": ("op", "|"), "%": ("op", "%"), "\\": ("op", "\\\\"), "&": ("op", ","),
    "colon": ("op", ":"), "pi": ("const", "pi"), "infty": ("const", "oo"), "infin": ("const", "oo"),
    "emptyset": ("cmd", "emptyset"), "varnothing": ("cmd", "emptyset"),
    "frac": ("cmd", "frac"), "sqrt": ("cmd", "sqrt"), "binom": ("cmd", "binom"),
    "lfloor": ("cmd", "lfloor"), "rfloor": ("cmd", "rfloor"), "lceil": ("cmd", "lceil"),
    "rceil": ("cmd", "rceil"),
}
_TEXT_CMDS = set("text textbf textit textnormal textrm textsf texttt mbox hbox mathrm mathbf mathit "
                 "mathsf mathtt mathcal operatorname boldsymbol bm emph".split())
_MATRIX_ENVS = set("matrix pmatrix bmatrix Bmatrix vmatrix Vmatrix smallmatrix array".split())
_ACCENTS = set("dot ddot dddot hat widehat bar tilde widetilde vec check breve acute grave".split())
_UNITS = set("cm mm km m in ft yd mi mph kph hr hrs min sec kg mg ml oz lb lbs sq cu deg rad".split())


def _word_tokens(w, toks):
    low = w.lower()
    if low in ("and", "or"):
        toks.append(("op", ","))
    elif w in _FUNCS:
        toks.append(("func", w))
    elif low == "sqrt":
        toks.append(("cmd", "sqrt"))
    elif low == "pi":
        toks.append(("const", "pi"))
    elif low in ("inf", "infty", "infinity"):
        toks.append(("const", "oo"))
    elif low in ("percent", "pct", "percentage"):
        toks.append(("op", "%"))
    elif low in ("degree", "degrees"):
        toks.append(("op", "\u00b0"))
    elif len(w) == 1 or len(w) >= 3 and w.isupper():  # x; SRMC, LRAC, ABC: one name (ABC != CBA)
        toks.append(("name", w))
    else:
        toks.append(("word", w))  # xy, MR, abc: a product of letters; cm, miles: a unit


def _text_tokens(cmd, raw, toks, depth):
    c = re.sub(r"\\[,;:! ]|~|\\q?quad", " ", raw).strip()
    if not c:
        return
    low = c.lower()
    if low in ("and", "or", ",", "and/or", "&"):
        toks.append(("op", ","))
    elif cmd == "operatorname" and low in _FUNCS:
        toks.append(("func", low))
    elif low in ("percent", "pct", "percentage"):
        toks.append(("op", "%"))
    elif re.fullmatch(r"[A-Za-z][A-Za-z ]*", c) and (len(c) > 1 or raw[:1] in (" ", "~", "\\")):
        toks.append(("text", low))
    else:
        toks.extend(_tokenize(c, depth + 1))  # \mathbf{v}, \text{13}, \mathrm{e}


_CMD_RE = re.compile(r"\\[a-zA-Z]+")


def _brace_arg(s, i):
    while i < len(s) and s[i] == " ":
        i += 1
    if i < len(s) and s[i] == "{":
        return _read_group(s, i)
    m = _CMD_RE.match(s, i)  # \hat\theta: the command is the argument
    return (m.group(), m.end()) if m else (s[i:i + 1], i + 1)


def _tokenize(s, depth=0):
    """Tokens (kind, value); kinds: num name const func cmd word text op begin end."""
    if depth > 3:
        raise _Bad("text nested too deep")
    toks, i, n = [], 0, len(s)
    while i < n:
        m = _TOKEN_RE.match(s, i)
        if not m:
            raise _Bad(f"unexpected character {s[i]!r}")
        i, kind, v = m.end(), m.lastgroup, m.group()
        if kind == "sp":
            continue
        if kind == "num":
            toks.append(("num", v))
        elif kind == "word":
            _word_tokens(v, toks)
        elif kind == "op":
            toks.append(("op", {"**": "^", "==": "=", "=<": "<=", "=>": ">=", "&": ","}.get(v, v)))
        else:
            name = v[1:]
            if name in _TEXT_CMDS:
                content, i = _brace_arg(s, i)
                _text_tokens(name, content, toks, depth)
            elif name in ("begin", "end"):
                env, i = _brace_arg(s, i)
                toks.append((name, env.strip().rstrip("*")))
                if name == "begin" and env.strip() == "array":
                    _, i = _brace_arg(s, i)  # column spec {cc}
            elif name == "mathbb":
                content, i = _brace_arg(s, i)
                if content.strip() != "R":
                    raise _Bad("only \\mathbb{R} is understood")
                toks.append(("cmd", "reals"))
            elif name in _ACCENTS:  # \dot{x}, \hat{\theta}: one symbol, named with its accent
                content, i = _brace_arg(s, i)
                inner = _tokenize(content, depth + 1)
                if len(inner) != 1 or inner[0][0] not in ("name", "word"):
                    raise _Bad(f"\\{name} over more than one symbol")
                toks.append(("name", f"{name}{{{inner[0][1]}}}"))
            elif name == "$":
                continue
            elif name in _GREEK:
                toks.append(("name", name))
            elif name in _FUNCS:
                toks.append(("func", name))
            elif name in _CMD_TOKENS:
                toks.append(_CMD_TOKENS[name])
            elif name.isalpha():
                toks.append(("name", name))  # \hbar, \odot, \angle: an opaque symbol
            else:
                raise _Bad(f"unknown command {v}")
    return toks


# ----------------------------------------------------------------------------------------------
# 3. Parser: tokens -> tree of tuples
# ('n', Fraction, inexact, raw)  ('c', 'pi'|'E'|'I'|'oo')  ('s', name)  ('+', terms)  ('*', factors)
# ('/', a, b)  ('^', a, b)  ('neg', a)  ('pm', a|None, b)  ('f', name, args)  ('call', name, args)
# ('base', digits, b)  ('%', a)  ('deg', a)  ('tuple'|'list'|'set'|'union', items)
# ('iv', lo, hi, lo_closed, hi_closed)  ('mat', rows)  ('eq', exprs)  ('rel', exprs, "ops")  ('in', a, s)
_CALLABLE = set("f g h F G H P Q W".split())
_RELOPS = ("=", "<", ">", "<=", ">=", "!=", "~=")


def _number(raw):
    m = re.fullmatch(r"(\d*)(?:\.(\d*))?(?:[eE]([-+]?\d+))?", raw)
    whole, frac, exp = m.group(1) or "", m.group(2) or "", m.group(3)
    value = Fraction(int(whole + frac or "0"), 10 ** len(frac))
    if exp is not None:
        if abs(int(exp)) > 400:
            raise _Bad("exponent too large")
        value *= Fraction(10) ** int(exp)
    return ("n", value, bool(frac) or exp is not None, raw)


def _mul(a, b):
    return ("*", (a[1] if a[0] == "*" else (a,)) + (b,))


def _product_like(w):
    """'xy', 'abc' are products of variables; other words after a value are units."""
    return (len(w) == 2 and w.lower() not in _UNITS) or \
        (len(w) <= 4 and all(ord(a) < ord(b) for a, b in zip(w, w[1:])))


def _name_node(v):
    return {"e": ("c", "E"), "i": ("c", "I")}.get(v, ("s", v))


class _Parser:
    def __init__(self, toks):
        self.toks, self.i, self.nest, self.abs = toks, 0, 0, 0

    def peek(self, k=0):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ("eof", "")

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def at(self, kind, *values):
        tok = self.peek()
        return tok[0] == kind and (not values or tok[1] in values)

    def expect(self, kind, value):
        if not self.at(kind, value):
            raise _Bad(f"expected {value!r}, got {self.peek()[1]!r}")
        self.take()

    def parse(self):
        items = self.top()
        if self.peek()[0] != "eof":
            raise _Bad(f"unexpected {self.peek()[1]!r}")
        return items[0] if len(items) == 1 else ("list", tuple(items))

    def top(self):
        """Items separated by ',' (and 'and', 'or'); ';' separates groups of items."""
        groups = [self.items()]
        while self.at("op", ";"):
            self.take()
            groups.append(self.items())
        if len(groups) == 1:
            return groups[0]
        return [g[0] if len(g) == 1 else ("list", tuple(g)) for g in groups]

    def items(self):
        out = [self.item()]
        while self.at("op", ","):
            self.take()
            if self.peek()[0] == "eof" or self.at("op", ")", "]", "}", "\\}", ";"):
                break
            out.append(self.item())
            if len(out) > MAX_ITEMS:
                raise _Bad("too many items")
        return out

    def item(self):
        a = self.union()
        if self.at("op", "in"):
            self.take()
            return ("in", a, self.union())
        return a

    def union(self):
        parts = [self.relation()]
        while self.at("op", "cup"):
            self.take()
            parts.append(self.relation())
        return parts[0] if len(parts) == 1 else ("union", tuple(parts))

    def relation(self):
        exprs, ops = [self.ratio()], []
        while self.at("op", *_RELOPS):
            ops.append(self.take()[1])
            exprs.append(self.ratio())
        if not ops:
            return exprs[0]
        if "~=" in ops and not all(o == "~=" for o in ops):  # x = 1/3 \approx 0.33: keep x = 1/3
            k = ops.index("~=")
            exprs, ops = exprs[:k + 1], ops[:k]
            if not ops:
                return exprs[0]
        if all(o in ("=", "~=") for o in ops):
            return ("eq", tuple(exprs))
        if "=" in ops:
            raise _Bad("mixed = and inequality")
        return ("rel", tuple(exprs), " ".join(ops))

    def ratio(self):
        parts = [self.sum()]
        while self.at("op", ":"):
            self.take()
            parts.append(self.sum())
        return parts[0] if len(parts) == 1 else ("ratio", tuple(parts))

    def sum(self):
        sign = self.take()[1] if self.at("op", "+", "-", "pm", "mp") else "+"
        t = self.term()
        terms = [("neg", t) if sign == "-" else ("pm", None, t) if sign in ("pm", "mp") else t]
        while self.at("op", "+", "-", "pm", "mp"):
            op, t = self.take()[1], self.term()
            if op == "+":
                terms.append(t)
            elif op == "-":
                terms.append(("neg", t))
            else:
                left = terms[0] if len(terms) == 1 else ("+", tuple(terms))
                terms = [("pm", left, t)]
        return terms[0] if len(terms) == 1 else ("+", tuple(terms))

    def term(self):
        node = self.factor()
        while True:
            if self.at("op", "*"):
                self.take()
                node = _mul(node, self.factor())
            elif self.at("op", "/"):
                self.take()
                node = ("/", node, self.factor())
            elif self.unit_follows():
                self.skip_units()
            elif self.starts_atom():
                nxt = self.factor()
                if node[0] == "n" and not node[2] and nxt[0] == "/" and nxt[1][0] == "n" and \
                        nxt[2][0] == "n" and not nxt[1][2] and not nxt[2][2] and \
                        0 < nxt[1][1] < nxt[2][1]:
                    node = ("+", (node, nxt))  # mixed number 2\frac{1}{2}
                else:
                    node = _mul(node, nxt)
            else:
                return node

    def unit_follows(self):
        kind, v = self.peek()
        return kind == "text" or (kind == "word" and not _product_like(v))

    def skip_units(self):
        while True:
            if self.unit_follows():
                self.take()
            elif self.at("op", "^") and self.unit_power():  # cm^2, cm^{2}, s^{-1}
                continue
            elif self.at("op", "/", "*") and (self.peek(1)[0] in ("text", "word", "name")):
                self.take(), self.take()
            else:
                return

    def unit_power(self):
        """After a unit, its exponent ^2 / ^{2} / ^{-1}: skipped (True), or nothing taken (False)."""
        k = 2 if self.peek(1) == ("op", "{") else 1
        k += self.peek(k) == ("op", "-")
        if self.peek(k)[0] != "num" or (self.peek(1) == ("op", "{") and self.peek(k + 1) != ("op", "}")):
            return False
        self.i += k + 1 + (self.peek(1) == ("op", "{"))
        return True

    def starts_atom(self):
        kind, v = self.peek()
        if kind in ("num", "name", "const", "func", "begin"):
            return True
        if kind == "word":
            return _product_like(v)
        if kind == "cmd":
            return v in ("frac", "sqrt", "binom", "lfloor", "lceil")
        return kind == "op" and (v in ("(", "[") or (v == "|" and self.abs == 0))

    def factor(self):
        self.nest += 1
        if self.nest > MAX_NEST:
            raise _Bad("nested too deep")
        if self.at("op", "-"):
            self.take()
            node = ("neg", self.factor())
        elif self.at("op", "+"):
            self.take()
            node = self.factor()
        elif self.at("op", "pm", "mp"):
            self.take()
            node = ("pm", None, self.factor())
        else:
            node = self.atom()
            while self.at("op", "!"):
                self.take()
                node = ("f", "factorial", (node,))
            if self.at("op", "^"):
                self.take()
                node = ("^", node, self.exponent())
            while self.at("op", "%", "\u00b0"):
                node = ("%" if self.take()[1] == "%" else "deg", node)
        self.nest -= 1
        return node

    def exponent(self):
        if self.at("op", "{"):
            return self.braced()
        return self.factor()

    def braced(self):
        self.expect("op", "{")
        items = self.top()
        self.expect("op", "}")
        return items[0] if len(items) == 1 else ("list", tuple(items))

    def arg(self):
        """A LaTeX argument: {group}, or one token (\\frac12 takes the digits one by one)."""
        if self.at("op", "{"):
            return self.braced()
        kind, v = self.peek()
        if kind == "num" and len(v) > 1 and v.isdigit():
            self.toks[self.i] = ("num", v[1:])
            return _number(v[0])
        return self.atom()

    def atom(self):
        kind, v = self.take()
        if kind == "num":
            node = _number(v)
            if self.at("op", "_"):  # base subscript 52_8
                self.take()
                b = self.subscript()
                if not (v.isdigit() and b.isdigit() and 2 <= int(b) <= 36):
                    raise _Bad("bad base subscript")
                if any(int(d) >= int(b) for d in v):
                    raise _Bad("digit too large for its base")
                node = ("base", v, int(b))
            return node
        if kind == "name":
            if self.at("op", "_"):
                self.take()
                return ("s", f"{v}_{self.subscript()}")
            if v in _CALLABLE and self.at("op", "(") or \
                    self.at("op", "(") and self.peek(1)[0] == "num" and self.peek(2) == ("op", ")"):
                return ("call", v, tuple(self.paren_items()))  # f(x); I(0), x(1): a value, not I * 0
            return _name_node(v)
        if kind == "const":
            return ("c", v)
        if kind == "word" and (_product_like(v) or len(v) == 2):  # "mg" starting a term is m g, not a unit
            node = _name_node(v[0])
            for ch in v[1:]:
                node = _mul(node, _name_node(ch))
            return node
        if kind == "func":
            return self.func(v)
        if kind == "cmd":
            return self.command(v)
        if kind == "begin":
            return self.matrix(v)
        if kind == "op":
            if v in ("(", "["):
                return self.bracket(v)
            if v == "{":
                self.i -= 1
                return self.braced()
            if v == "\\{":
                items = [] if self.at("op", "\\}") else self.top()
                self.expect("op", "\\}")
                return ("set", tuple(items))
            if v == "|":
                self.abs += 1
                x = self.sum()
                self.expect("op", "|")
                self.abs -= 1
                return ("f", "abs", (x,))
        raise _Bad(f"unexpected {v!r}")

    def subscript(self):
        if self.at("op", "{"):
            self.take()
            parts = []
            while not self.at("op", "}"):
                if self.peek()[0] == "eof":
                    raise _Bad("unclosed subscript")
                parts.append(self.take()[1])
            self.take()
            return "".join(parts)
        return self.take()[1]

    def paren_items(self):
        self.expect("op", "(")
        items = self.top()
        self.expect("op", ")")
        return items

    def bracket(self, opener):
        items = self.top()
        closer = self.take()[1]
        if closer not in (")", "]"):
            raise _Bad("unclosed bracket")
        if len(items) == 1:
            if (opener == "(") != (closer == ")"):
                raise _Bad("mismatched brackets")
            return items[0]
        if opener == "(" and closer == ")":
            return ("tuple", tuple(items))
        if len(items) == 2:
            return ("iv", items[0], items[1], opener == "[", closer == "]")
        if opener == "[" and closer == "]":
            return ("tuple", tuple(items))
        raise _Bad("mismatched brackets")

    def func(self, name):
        power = base = None
        while True:
            if self.at("op", "^"):
                self.take()
                power = self.exponent()
            elif self.at("op", "_") and name == "log":
                self.take()
                base = self.arg()
            else:
                break
        if self.at("op", "("):
            args = self.paren_items()
        elif self.at("op", "{"):
            args = [self.braced()]
        else:
            node = self.factor()
            while self.starts_atom() and not self.at("func"):
                node = _mul(node, self.factor())
            args = [node]
        if base is not None:
            args = [args[0], base]
        node = ("f", name, tuple(args))
        if power is not None:
            if power == ("neg", ("n", Fraction(1), False, "1")) and name in ("sin", "cos", "tan"):
                return ("f", "arc" + name, tuple(args))
            node = ("^", node, power)
        return node

    def command(self, name):
        if name == "frac":
            return ("/", self.arg(), self.arg())
        if name == "binom":
            return ("f", "binom", (self.arg(), self.arg()))
        if name == "sqrt":
            n = None
            if self.at("op", "["):
                self.take()
                n = self.sum()
                self.expect("op", "]")
            return ("f", "sqrt", (self.arg(), n or ("n", Fraction(2), False, "2")))
        if name in ("lfloor", "lceil"):
            x = self.sum()
            self.expect("cmd", "rfloor" if name == "lfloor" else "rceil")
            return ("f", "floor" if name == "lfloor" else "ceil", (x,))
        if name == "emptyset":
            return ("set", ())
        if name == "reals":
            return ("iv", ("neg", ("c", "oo")), ("c", "oo"), False, False)
        raise _Bad(f"unexpected \\{name}")

    def matrix(self, env):
        if env not in _MATRIX_ENVS:
            raise _Bad(f"unknown environment {env}")
        rows, row = [], []
        while not self.at("end"):
            if self.peek()[0] == "eof":
                raise _Bad("unclosed matrix")
            if self.at("op", "\\\\"):
                self.take()
                if row:
                    rows.append(tuple(row))
                row = []
                continue
            row.append(self.item())
            if self.at("op", ","):  # '&' is tokenised as ','
                self.take()
        self.take()
        if row:
            rows.append(tuple(row))
        if not rows or any(len(r) != len(rows[0]) for r in rows):
            raise _Bad("ragged matrix")
        return ("mat", tuple(rows))


@lru_cache(maxsize=8192)
def _parse(s):
    """Tree of a cleaned answer string, or None when it is not math (a word answer, garbage)."""
    try:
        return _Parser(_tokenize(s)).parse()
    except (_Bad, RecursionError, ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------------------------
# 4. Values without sympy: Fraction when exact and rational, else (complex) floats
_CONSTS = {"pi": math.pi, "E": math.e, "I": 1j, "oo": math.inf}
_FLOAT_FUNCS = {
    "sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "arcsin": cmath.asin,
    "arccos": cmath.acos, "arctan": cmath.atan, "sinh": cmath.sinh, "cosh": cmath.cosh,
    "tanh": cmath.tanh, "exp": cmath.exp, "ln": cmath.log,
    "cot": lambda z: 1 / cmath.tan(z), "sec": lambda z: 1 / cmath.cos(z),
    "csc": lambda z: 1 / cmath.sin(z),
}


def _kids(node):
    """Child nodes of a tree node (nodes are tuples that start with their kind)."""
    for el in node[1:]:
        if isinstance(el, tuple) and el:
            if isinstance(el[0], str):
                yield el
            else:
                for sub in el:
                    if isinstance(sub, tuple) and sub and isinstance(sub[0], str):
                        yield sub
                    elif isinstance(sub, tuple):  # matrix row
                        yield from (x for x in sub if isinstance(x, tuple))


def _symbols(node):
    if node[0] == "s":
        return {node[1]}
    out = set()
    for k in _kids(node):
        out |= _symbols(k)
    return out


def _has(node, kinds):
    return node[0] in kinds or any(_has(k, kinds) for k in _kids(node))


def _int_root(n, k):
    """Exact k-th root of a non-negative int, or None."""
    if n.bit_length() > 4000:
        return None
    r = round(n ** (1.0 / k)) if n < 1 << 1000 else None
    if r is None:
        return None
    for c in (r - 1, r, r + 1):
        if c >= 0 and c ** k == n:
            return c
    return None


def _pow(a, b):
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        if a == 0 and b < 0:
            raise _Bad("0 to a negative power")
        if b.denominator == 1:
            bits = max(a.numerator.bit_length(), a.denominator.bit_length())
            if bits * abs(b.numerator) <= MAX_BITS:
                return a ** b.numerator
            if bits * abs(b.numerator) > MAX_SYMPY_BITS and abs(a) != 1:
                raise _Bad("number too large")
        elif a >= 0 and b.denominator <= 12:
            num, den = _int_root(a.numerator, b.denominator), _int_root(a.denominator, b.denominator)
            if num is not None and den is not None:
                return _pow(Fraction(num, den), Fraction(b.numerator))
    try:
        if isinstance(a, complex) or isinstance(b, complex) or a < 0:
            return complex(a) ** complex(b)
        return float(a) ** float(b)
    except (OverflowError, ZeroDivisionError):
        raise NeedSympy()


def _func(name, args):
    x = args[0]
    if name == "sqrt":
        n = args[1]
        if isinstance(x, Fraction) and isinstance(n, Fraction) and n.denominator == 1 and n > 0:
            if x < 0 and n.numerator % 2 == 1:
                return -_pow(-x, 1 / n)
            return _pow(x, 1 / n)
        return _pow(x, 1 / n)
    if name == "abs":
        return abs(x)
    if name in ("floor", "ceil"):
        if isinstance(x, complex):
            if abs(x.imag) > 1e-12:
                raise _Bad("floor of a complex number")
            x = x.real
        if not isinstance(x, Fraction) and abs(x - round(x)) <= 1e-9 * max(1.0, abs(x)):
            raise NeedSympy()  # a float at an integer: rounding decides its floor, so sympy must
        return Fraction(math.floor(x) if name == "floor" else math.ceil(x))
    if name == "factorial":
        if isinstance(x, Fraction) and x.denominator == 1 and 0 <= x <= 1000:
            return Fraction(math.factorial(int(x)))
        if isinstance(x, complex) or x > 170 or x < 0:
            raise NeedSympy()
        return math.gamma(float(x) + 1)
    if name in ("binom", "gcd", "lcm", "max", "min"):
        if len(args) < 2:
            raise _Bad(f"{name} needs two arguments")
        if name in ("max", "min"):
            if any(isinstance(a, complex) for a in args):
                raise _Bad("max of complex numbers")
            return max(args) if name == "max" else min(args)
        if not all(isinstance(a, Fraction) and a.denominator == 1 for a in args) or \
                any(abs(a) > 10 ** 6 for a in args):
            raise NeedSympy()
        ints = [int(a) for a in args]
        if name == "binom":
            return Fraction(math.comb(*ints[:2])) if ints[0] >= 0 and ints[1] >= 0 else Fraction(0)
        return Fraction(math.gcd(*ints) if name == "gcd" else math.lcm(*ints))
    if name == "log":
        if x == 0:
            raise _Bad("log of zero")
        if len(args) == 2:
            b = args[1]
            if isinstance(x, Fraction) and isinstance(b, Fraction) and x > 0 and b > 0 and b != 1:
                k = round(math.log(x) / math.log(b))  # log_2 8 = 3 exactly, as floor(log_2 n) needs
                if abs(k) <= 64 and b ** k == x:
                    return Fraction(k)
            return cmath.log(x) / cmath.log(b)
        return cmath.log(x)
    if name in _FLOAT_FUNCS:
        return _FLOAT_FUNCS[name](x)
    raise NeedSympy()


def _val(node, env, ctx):
    """Value of a scalar tree: Fraction (exact rational) or float/complex. ctx records whether a
    decimal literal was used ('inexact') and whether a sum cancelled badly ('cancel')."""
    k = node[0]
    if k == "n":
        ctx["inexact"] |= node[2]
        return node[1]
    if k == "c":
        ctx["infinity"] |= node[1] == "oo"
        return _CONSTS[node[1]]
    if k == "s":
        if node[1] not in env:
            raise NeedSympy()
        return env[node[1]]
    if k == "neg":
        return -_val(node[1], env, ctx)
    if k == "+":
        vals = [_val(t, env, ctx) for t in node[1]]
        total = sum(vals, Fraction(0))
        if not all(isinstance(v, Fraction) for v in vals):
            biggest = max(abs(v) for v in vals)
            if biggest and abs(total) < 1e-7 * biggest:
                ctx["cancel"] = True
        return total
    if k == "*":
        out = Fraction(1)
        for f in node[1]:
            v = _val(f, env, ctx)
            out, was = out * v, out
            if out == 0 and was != 0 and v != 0:
                raise NeedSympy()  # float underflow
        return out
    if k == "/":
        a, b = _val(node[1], env, ctx), _val(node[2], env, ctx)
        if b == 0:
            raise _Bad("division by zero")
        if a != 0 and a / b == 0:
            raise NeedSympy()
        return a / b
    if k == "^":
        a, b = _val(node[1], env, ctx), _val(node[2], env, ctx)
        out = _pow(a, b)
        if out == 0 and a != 0:
            raise NeedSympy()
        return out
    if k == "f":
        return _func(node[1], [None if a is None else _val(a, env, ctx) for a in node[2]])
    if k == "base":
        return Fraction(int(node[1], node[2]))
    if k == "%":
        return _val(node[1], env, ctx) / 100
    if k == "deg":
        return _val(node[1], env, ctx)
    if k in ("call", "mat", "pm"):
        raise NeedSympy()
    raise _Bad(f"{k} inside arithmetic")


_INT_NAME_RE = re.compile(r"[jklmnN](?:_.+)?")  # the names that count as integers inside a floor
STEP_POINTS = 48  # points where two expressions with a floor / ceiling are compared


def _points(names, steps=False):
    """The points where two expressions are compared, the same for both sides: 3 random values in
    (0.5, 2.5) per variable. With a floor or ceiling (steps=True: step functions can agree at 3
    points and differ at the next) STEP_POINTS points instead, where j, k, l, m, n, N (n_1, ...) are
    integers, as in such answers (floor(sqrt(n-1)): the first of them runs through 1, 2, ..., 48, so
    floor(sqrt(n-1)) != floor(sqrt(n)) shows at n = 4), and other names are reals in (1, 25)
    (floor(2x) != 2 floor(x)). A point outside one side's domain is skipped (_numeric_same)."""
    rng = random.Random(20240613)
    names = sorted(names)
    if not steps:
        return [{n: rng.uniform(0.5, 2.5) for n in names} for _ in range(3)]
    ints = [n for n in names if _INT_NAME_RE.fullmatch(n)]
    return [{n: Fraction(j + 1) if ints and n == ints[0] else Fraction(rng.randint(1, 12)) if n in ints
             else rng.uniform(1, 25) for n in names} for j in range(STEP_POINTS)]


def _steps(node):
    """Does the tree hold a floor or ceiling?"""
    return node[0] == "f" and node[1] in ("floor", "ceil") or any(_steps(k) for k in _kids(node))


def _gold_literal(node):
    """(half a unit in the last written place, significant digits) of a number-literal gold:
    16386.20 -> (0.005, 7), 1.6 -> (0.05, 2), 204 -> (0, 3); None when the gold is not a literal."""
    while node[0] in ("neg", "%", "deg"):
        node = node[1]
    if node[0] != "n":
        return None
    m = re.fullmatch(r"(\d*)(?:\.(\d*))?(?:[eE]([-+]?\d+))?", node[3])
    digits = (m.group(1) + (m.group(2) or "")).lstrip("0")
    if m.group(2) is None and m.group(3) is None:
        return Fraction(0), len(digits)
    return Fraction(1, 2 * 10 ** len(m.group(2) or "")) * Fraction(10) ** int(m.group(3) or 0), len(digits)


def _within_tol(d, scale, literal):
    """Equality when a decimal literal is involved: |a - b| <= REL_TOL * scale, and no looser than
    the gold literal's last place; a gold of 3+ significant digits takes any prediction that
    rounds to it (33.3 vs 100/3). Works on floats, Fractions and sympy Floats."""
    if literal is None:
        return d <= REL_TOL * scale
    half_unit, sig = literal
    if half_unit == 0 or d == 0:
        return d == 0
    return d < half_unit if sig >= 3 else d <= REL_TOL * scale and d < half_unit


def _close(a, b, ctx, literal=None):
    """True / False, or None when floats cannot tell."""
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        if not ctx["inexact"]:
            return a == b
        return _within_tol(abs(a - b), max(abs(a), abs(b)), literal)
    a, b = complex(a), complex(b)
    if not (cmath.isfinite(a) and cmath.isfinite(b)):  # explicit infinity, or a float overflow
        return a == b if ctx["infinity"] and not (cmath.isnan(a) or cmath.isnan(b)) else None
    d, scale = abs(a - b), max(abs(a), abs(b))
    if ctx["cancel"] or scale < 1e-12 and min(abs(a), abs(b)) == 0:  # sin(pi) vs 0: sympy
        return None
    if ctx["inexact"]:
        return _within_tol(d, scale, literal)
    if d <= EXACT_TOL * scale:
        return True
    return False if d > DIFF_TOL * scale else None


def _numeric_same(g, p, deep):
    names = _symbols(g) | _symbols(p)
    steps = bool(names) and (_steps(g) or _steps(p))
    literal, verdict, n_valid = _gold_literal(g), True, 0
    try:
        for env in (_points(names, steps) if names else [{}]):
            ctx = {"inexact": False, "cancel": False, "infinity": False}
            try:
                a, b = _val(g, env, ctx), _val(p, env, ctx)
            except _Bad:
                if steps:
                    continue  # outside a side's domain: floor(sqrt(n - 2)) at n = 1
                raise
            n_valid += 1
            v = _close(a, b, ctx, literal)
            if v is False:
                return False
            if v is None:
                verdict = None
    except NeedSympy:
        verdict = None
    except (OverflowError, ValueError, ZeroDivisionError, TypeError):
        verdict = None
    if steps and verdict is not None and n_valid < 3:
        raise _Bad("too few points where both sides are defined")
    if verdict is not None:
        return verdict
    if not deep:
        raise NeedSympy()
    return _sympy_same(g, p, literal)


# ----------------------------------------------------------------------------------------------
# 5. Structure: what kind of answer each side is, and how two kinds compare
_SEQ = {"tuple", "list", "set", "iv", "union", "mat", "ratio"}
_INF, _NINF = ("c", "oo"), ("neg", ("c", "oo"))
_FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "!=": "!="}


def _is_label(node, sums=True):
    """A left-hand side that names the answer: x, f(x), a_3, |AB|, (p,q), A:B, m + n; no numbers.
    sums=False (a gold's equation against a bare value): no sums either, as y' + r y - r x = 0 is
    an equation, not a name for 0."""
    k = node[0]
    if k in ("s", "call"):
        return True
    if k in ("n", "c", "base") or not sums and k in ("+", "neg", "pm"):
        return False
    kids = list(_kids(node))
    return bool(kids) and all(_is_label(c, sums) for c in kids)


def _same(g, p, deep):
    """Do trees g (gold) and p (pred) denote the same answer? deep=False may raise NeedSympy."""
    if g[0] not in _SEQ and _has(g, ("pm",)) and g[0] not in ("eq", "rel", "in"):
        g = ("list", tuple(_expand_pm(g)))
    if p[0] not in _SEQ and _has(p, ("pm",)) and p[0] not in ("eq", "rel", "in"):
        p = ("list", tuple(_expand_pm(p)))
    kg, kp = g[0], p[0]
    if kg in ("%", "deg") or kp in ("%", "deg"):
        if kg == kp:
            return _same(g[1], p[1], deep)
        if kg in ("%", "deg") and kp in ("%", "deg"):
            return False
        if kg in ("%", "deg"):
            return _same(g[1], p, deep) or _same(_unit_value(g), p, deep)
        return _same(g, p[1], deep) or _same(g, _unit_value(p), deep)
    if kg == "in" or kp == "in":
        return _same(g[2] if kg == "in" else g, p[2] if kp == "in" else p, deep)
    if kg == "eq" or kp == "eq":
        return _same_eq(g, p, deep)
    if kg == "rel" or kp == "rel":
        return _same_rel(g, p, deep)
    if kg in _SEQ or kp in _SEQ:
        return _same_seq(g, p, deep)
    return _same_scalar(g, p, deep)


def _unit_value(node):
    """28% -> 28/100; 45 degrees -> 45 pi / 180."""
    if node[0] == "%":
        return ("/", node[1], ("n", Fraction(100), False, "100"))
    return ("/", _mul(node[1], ("c", "pi")), ("n", Fraction(180), False, "180"))


def _same_eq(g, p, deep):
    """At least one side an equation (a chain a = b = c counts as a = c)."""
    if g[0] == "eq" and p[0] == "eq":
        (gl, gr), (pl, pr) = (g[1][0], g[1][-1]), (p[1][0], p[1][-1])
        if _is_label(gl) and _is_label(pl) and (gl == pl or _has(gr, _SEQ) or _has(pr, _SEQ)):
            return _same(gr, pr, deep)
        if not _symbols(g) and not _symbols(p):  # chains of numbers: their last members
            return _same(gr, pr, deep)
        if _has(g, _SEQ | {"pm"}) or _has(p, _SEQ | {"pm"}):
            return False
        return _proportional(("+", (gl, ("neg", gr))), ("+", (pl, ("neg", pr))), deep, False)
    eq, other = (g, p) if g[0] == "eq" else (p, g)
    lhs, rhs = eq[1][0], eq[1][-1]
    if _is_label(lhs, eq is p) or not _symbols(eq):  # x = 3 vs 3; 1/2 = 10/9 (number chain): the last
        return _same(rhs, other, deep) if eq is g else _same(other, rhs, deep)
    return False


def _rel_pairs(rel):
    """a < b < c -> [(b - a, 'lt'), (c - b, 'lt')]: each link as 'difference > 0' or '>= 0'."""
    exprs, ops = rel[1], rel[2].split()
    out = []
    for a, op, b in zip(exprs, ops, exprs[1:]):
        if op in ("<", "<="):
            out.append((("+", (b, ("neg", a))), "lt" if op == "<" else "le"))
        elif op in (">", ">="):
            out.append((("+", (a, ("neg", b))), "lt" if op == ">" else "le"))
        else:
            out.append((("+", (a, ("neg", b))), "ne"))
    return out


def _rel_to_set(rel):
    """x > 5 -> (5, oo); -2 <= x <= 7 -> [-2, 7]; None when it is not one variable vs constants."""
    exprs, ops = rel[1], rel[2].split()
    if len(exprs) == 2:
        a, b = exprs
        op = ops[0]
        if _is_label(b) and not _symbols(a) and not _is_label(a):
            a, b, op = b, a, _FLIP[op]
        if not _is_label(a) or _symbols(b) or _has(b, ("call",)):
            return None
        return {"<": ("iv", _NINF, b, False, False), "<=": ("iv", _NINF, b, False, True),
                ">": ("iv", b, _INF, False, False), ">=": ("iv", b, _INF, True, False),
                "!=": ("union", (("iv", _NINF, b, False, False), ("iv", b, _INF, False, False)))}[op]
    if len(exprs) == 3 and _is_label(exprs[1]) and not (_symbols(exprs[0]) or _symbols(exprs[2])):
        if all(o in ("<", "<=") for o in ops):
            return ("iv", exprs[0], exprs[2], ops[0] == "<=", ops[1] == "<=")
        if all(o in (">", ">=") for o in ops):
            return ("iv", exprs[2], exprs[0], ops[1] == ">=", ops[0] == ">=")
    return None


def _same_rel(g, p, deep):
    """At least one side an inequality: as sets when both are one variable against constants,
    else link by link up to a positive factor; against an interval / union, as a set."""
    if g[0] == "rel" and p[0] == "rel":
        gs, ps = _rel_to_set(g), _rel_to_set(p)
        if gs is not None and ps is not None and _same(gs, ps, deep):
            return True
        ga, pa = _rel_pairs(g), _rel_pairs(p)
        if len(ga) != len(pa):
            return False
        orders = [pa] if len(pa) == 1 else [pa, pa[::-1]]
        return any(all(gk == pk and _proportional(gd, pd, deep, gk != "ne")
                       for (gd, gk), (pd, pk) in zip(ga, order)) for order in orders)
    rel, other = (g, p) if g[0] == "rel" else (p, g)
    s = _rel_to_set(rel)
    if s is None or other[0] not in _SEQ:
        return False
    return _same(s, other, deep) if rel is g else _same(other, s, deep)


def _as_iv(node):
    if node[0] == "iv":
        return node
    if node[0] == "tuple" and len(node[1]) == 2:
        return ("iv", node[1][0], node[1][1], False, False)
    return None


def _flat(items):
    """Items of an unordered answer with a \\pm b spliced in: 'x = 0, x = 1 \\pm 2' -> [x = 0, x = 3,
    x = -1]."""
    out = []
    for it in items:
        if it[0] == "eq" and len(it[1]) == 2 and it[1][1][0] not in _SEQ and _has(it[1][1], ("pm",)):
            out += [("eq", (it[1][0], v)) for v in _expand_pm(it[1][1])]
        elif it[0] not in _SEQ | {"eq", "rel", "in"} and _has(it, ("pm",)):
            out += _expand_pm(it)
        else:
            out.append(it)
    return out


def _unordered(a_items, b_items, deep):
    a_items, b_items = _flat(a_items), _flat(b_items)
    if len(a_items) > MAX_ITEMS or len(b_items) > MAX_ITEMS:
        return False
    table = [[_same(a, b, deep) for b in b_items] for a in a_items]
    return all(any(row) for row in table) and all(any(col) for col in zip(*table))


def _same_seq(g, p, deep):
    """At least one side a tuple / list / set / interval / union / matrix / ratio."""
    kg, kp = g[0], p[0]
    if kg not in _SEQ or kp not in _SEQ:
        seq, other = (g, p) if kg in _SEQ else (p, g)
        if seq[0] in ("list", "set") and seq[1]:  # {5} vs 5; "15 39/40, or 639/40" vs 639/40
            return all(_same(x, other, deep) if seq is g else _same(other, x, deep) for x in seq[1])
        if seq[0] == "mat" and other[0] not in ("n", "c", "s", "base"):
            return _same_scalar(g, p, deep)  # matrix arithmetic: sympy decides
        return False
    if kg == "ratio" or kp == "ratio":
        return kg == kp and len(g[1]) == len(p[1]) and all(_same(a, b, deep) for a, b in zip(g[1], p[1]))
    if kg == "mat" or kp == "mat":
        if kg == kp:
            return len(g[1]) == len(p[1]) and all(
                len(r) == len(s) and all(_same(a, b, deep) for a, b in zip(r, s))
                for r, s in zip(g[1], p[1]))
        mat, other = (g, p) if kg == "mat" else (p, g)
        flat = [x for row in mat[1] for x in row]
        if other[0] not in ("tuple", "list") or len(mat[1]) > 1 and len(mat[1][0]) > 1:
            return False
        pairs = zip(flat, other[1]) if mat is g else zip(other[1], flat)
        return len(flat) == len(other[1]) and all(_same(a, b, deep) for a, b in pairs)
    if kg == "union" or kp == "union":
        return _unordered(g[1] if kg == "union" else (g,), p[1] if kp == "union" else (p,), deep)
    if kg == "iv" or kp == "iv":
        gv, pv = _as_iv(g), _as_iv(p)
        if gv is None or pv is None or gv[3:] != pv[3:]:
            return False
        return _same(gv[1], pv[1], deep) and _same(gv[2], pv[2], deep)
    if "tuple" in (kg, kp) and "set" not in (kg, kp):  # tuple vs tuple / list: in order
        return len(g[1]) == len(p[1]) and all(_same(a, b, deep) for a, b in zip(g[1], p[1]))
    return _unordered(g[1], p[1], deep)


def _expand_pm(node):
    """a \\pm b -> [a + b, a - b] (all combinations, at most 8)."""
    if node is None or not (isinstance(node, tuple) and node and isinstance(node[0], str)):
        return [node]
    if node[0] == "pm":
        out = []
        for a in _expand_pm(node[1]):
            for b in _expand_pm(node[2]):
                out += [b, ("neg", b)] if a is None else [("+", (a, b)), ("+", (a, ("neg", b)))]
        return out[:8]
    variants = [()]
    for el in node[1:]:
        if isinstance(el, tuple) and el and isinstance(el[0], tuple):
            options = [()]
            for sub in el:
                options = [o + (v,) for o in options for v in _expand_pm(sub)][:8]
        else:
            options = _expand_pm(el) if isinstance(el, tuple) else [el]
        variants = [v + (o,) for v in variants for o in options][:8]
    return [(node[0],) + v for v in variants]


def _same_scalar(g, p, deep):
    """Two single values (numbers or expressions)."""
    if g[0] == "base" or p[0] == "base":
        if g[0] == p[0]:
            return int(g[1], g[2]) == int(p[1], p[2])
        other = p if g[0] == "base" else g
        base = g if g[0] == "base" else p
        return other[0] == "n" and other[3].isdigit() and int(other[3]) == int(base[1])
    return _numeric_same(g, p, deep)


def _proportional(d1, d2, deep, positive):
    """d1 = c * d2 for a constant c != 0 (c > 0 when `positive`): same equation / inequality."""
    names = _symbols(d1) | _symbols(d2)
    ratios = []
    try:
        for env in (_points(names, _steps(d1) or _steps(d2)) if names else [{}]):
            ctx = {"inexact": False, "cancel": False, "infinity": False}
            a, b = complex(_val(d1, env, ctx)), complex(_val(d2, env, ctx))
            if ctx["cancel"]:
                raise NeedSympy()
            if abs(b) < 1e-12 or abs(a) < 1e-12:
                if abs(a) < 1e-12 and abs(b) < 1e-12:
                    continue
                return False
            ratios.append(a / b)
    except (NeedSympy, OverflowError, ValueError, ZeroDivisionError, TypeError):
        if not deep:
            raise NeedSympy()
        return _sympy_proportional(d1, d2, positive)
    if not ratios:
        return True
    tol = REL_TOL if ctx["inexact"] else 1e-9
    r = ratios[0]
    if any(abs(x - r) > tol * abs(r) for x in ratios) or abs(r.imag) > tol * abs(r):
        return False
    return r.real > 0 if positive else True


# ----------------------------------------------------------------------------------------------
# 6. sympy (worker processes only): exact checks for what floats could not settle
def _to_sympy(node, ctx):
    import sympy as sp
    k = node[0]
    if k == "n":
        ctx["inexact"] |= node[2]
        return sp.Rational(node[1].numerator, node[1].denominator)
    if k == "c":
        return {"pi": sp.pi, "E": sp.E, "I": sp.I, "oo": sp.oo}[node[1]]
    if k == "s":
        return sp.Symbol(node[1], positive=True)
    if k == "neg":
        return -_to_sympy(node[1], ctx)
    if k in ("+", "*"):
        vals = [_to_sympy(t, ctx) for t in node[1]]
        out = vals[0]
        for v in vals[1:]:
            out = out + v if k == "+" else out * v
        return out
    if k == "/":
        a, b = _to_sympy(node[1], ctx), _to_sympy(node[2], ctx)
        if b == 0:
            raise _Bad("division by zero")
        return a / b
    if k == "^":
        a, b = _to_sympy(node[1], ctx), _to_sympy(node[2], ctx)
        if a.is_Rational and b.is_Rational:
            bits = max(int(a.p).bit_length(), int(a.q).bit_length())
            if bits * abs(b) > MAX_SYMPY_BITS:
                raise _Bad("number too large")
        if b.is_Rational and abs(b) > 10 ** 6:
            raise _Bad("exponent too large")
        return a ** b
    if k == "f":
        args = [_to_sympy(a, ctx) for a in node[2]]
        return _sympy_func(node[1], args)
    if k == "call":
        return sp.Function(node[1])(*[_to_sympy(a, ctx) for a in node[2]])
    if k == "base":
        return sp.Integer(int(node[1], node[2]))
    if k == "%":
        return _to_sympy(node[1], ctx) / 100
    if k == "deg":
        return _to_sympy(node[1], ctx)
    if k == "mat":
        return sp.ImmutableMatrix([[_to_sympy(x, ctx) for x in row] for row in node[1]])
    raise _Bad(f"{k} inside arithmetic")


def _sympy_func(name, args):
    import sympy as sp
    x = args[0]
    if name == "sqrt":
        n = args[1]
        if x.is_number and x.is_negative and n.is_integer and n.is_odd:
            return -sp.root(-x, n)
        return sp.root(x, n)
    if name in ("factorial", "binom") and any(a.is_number and abs(a) > 10 ** 4 for a in args):
        raise _Bad("number too large")
    if name == "log":
        return sp.log(x, args[1]) if len(args) == 2 else sp.log(x)
    table = {"abs": sp.Abs, "floor": sp.floor, "ceil": sp.ceiling, "factorial": sp.factorial,
             "binom": sp.binomial, "gcd": sp.gcd, "lcm": sp.lcm, "max": sp.Max, "min": sp.Min,
             "sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "cot": sp.cot, "sec": sp.sec,
             "csc": sp.csc, "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan,
             "sinh": sp.sinh, "cosh": sp.cosh, "tanh": sp.tanh, "exp": sp.exp, "ln": sp.log}
    return table[name](*args)


def _sympy_points(symbols, a, b):
    """_points for sympy: the same values, as 60-digit Floats (integers exact)."""
    import sympy as sp
    if not symbols:
        return [{}]
    steps = a.has(sp.floor, sp.ceiling) or b.has(sp.floor, sp.ceiling)
    return [{n: sp.Rational(v.numerator, v.denominator) if isinstance(v, Fraction) else sp.Float(v, 60)
             for n, v in env.items()} for env in _points({s.name for s in symbols}, steps)]


def _sympy_at(expr, subs):
    """expr at the point `subs`, evaluated by sympy to 60 digits (adaptively: no cancellation);
    integer values are put in exactly first (floor(sin(pi n / 2)) at n = 4 is then exactly 0)."""
    exact = {s: v for s, v in subs.items() if v.is_Integer}
    rest = {s: v for s, v in subs.items() if not v.is_Integer}
    expr = expr.xreplace(exact) if exact else expr
    return expr.evalf(60, subs=rest) if rest else expr.evalf(60)


def _sympy_abs(expr, subs):
    """|expr| at the point `subs` (_sympy_at)."""
    import sympy as sp
    v = _sympy_at(expr, subs)
    if not v.is_number or v.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
        raise _Bad("not a finite number")
    return abs(v)  # a sympy Float: no underflow at 1e-15000


def _opaque_calls(a, b):
    """a, b with each application of an unknown function (f(t), g(2x)) replaced by a symbol of its
    own: equal or proportional with those as free values means the same for every f."""
    import sympy as sp
    from sympy.core.function import AppliedUndef
    calls = sorted(a.atoms(AppliedUndef) | b.atoms(AppliedUndef), key=sp.srepr)
    rep = {c: sp.Symbol(f"{c.func.__name__}({', '.join(map(str, c.args))})", positive=True) for c in calls}
    return (a.xreplace(rep), b.xreplace(rep)) if rep else (a, b)


def _sympy_same(g, p, literal=None):
    import sympy as sp
    ctx = {"inexact": False}
    a, b = _opaque_calls(_to_sympy(g, ctx), _to_sympy(p, ctx))
    if isinstance(a, sp.MatrixBase) or isinstance(b, sp.MatrixBase):
        if not (isinstance(a, sp.MatrixBase) and isinstance(b, sp.MatrixBase)) or a.shape != b.shape:
            return False
        return all(_sympy_scalar_same(x, y, ctx["inexact"]) for x, y in zip(a, b))
    return _sympy_scalar_same(a, b, ctx["inexact"], literal)


def _sympy_scalar_same(a, b, inexact, literal=None):
    """a - b is 0 by sympy's own simplification, or (exact forms) below 1e-30 of |a| + |b| at the
    _points (3 random ones; 48 with a floor), evaluated to 60 digits; (decimals) within the tolerance."""
    import sympy as sp
    if a.has(sp.nan, sp.zoo) or b.has(sp.nan, sp.zoo):
        return False
    if a.has(sp.oo) or b.has(sp.oo):
        return a == b
    d = a - b
    if d == 0 and not inexact:
        return True
    symbols = a.free_symbols | b.free_symbols
    for env in _sympy_points(symbols, a, b):
        subs = {s: env[s.name] for s in symbols}
        diff, scale = _sympy_abs(d, subs), max(_sympy_abs(a, subs), _sympy_abs(b, subs))
        ok = _within_tol(diff, scale, literal) if inexact else diff <= sp.Float("1e-30") * scale
        if not bool(ok):
            return False
    return True


def _sympy_proportional(d1, d2, positive):
    """d1 / d2 is a non-zero constant (positive when `positive`): sympy's 60-digit values at _points."""
    import sympy as sp
    ctx = {"inexact": False}
    a, b = _opaque_calls(_to_sympy(d1, ctx), _to_sympy(d2, ctx))
    symbols = a.free_symbols | b.free_symbols
    ratios = []
    for env in _sympy_points(symbols, a, b):
        subs = {s: env[s.name] for s in symbols}
        va, vb = complex(_sympy_at(a, subs)), complex(_sympy_at(b, subs))
        if vb == 0 or va == 0:
            return False
        ratios.append(va / vb)
    r, tol = ratios[0], (REL_TOL if ctx["inexact"] else 1e-20)
    if any(abs(x - r) > tol * abs(r) for x in ratios) or abs(r.imag) > tol * abs(r):
        return False
    return r.real > 0 or not positive


# ----------------------------------------------------------------------------------------------
# 7. One decision, in the caller (deep=False: may raise NeedSympy) or in a worker (deep=True)
_INT_RE = re.compile(r"-?\d+")
_CHOICE_RE = re.compile(r"\(?\s*([A-E])\s*\)?")
_PRED_CHOICE_RE = re.compile(r"\(\s*([A-Ea-e])\s*\).*|([A-Ea-e])[.)]?", re.S)
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|textit|textnormal|textrm|mbox|mathrm|mathbf)\s*\{([^{}]*)\}")


def _text_key(s):
    s = _TEXT_WRAP_RE.sub(r"\1", s)
    return re.sub(r"[\s{}\\.]", "", s).lower()


def decide(g_ans, p_ans, deep):
    g, p = _clean(g_ans), _clean(p_ans)
    if not g or not p:
        return False
    if _INT_RE.fullmatch(g) and _INT_RE.fullmatch(p):
        return int(g) == int(p)
    if re.sub(r"\s+", "", g) == re.sub(r"\s+", "", p):
        return True
    gc = _CHOICE_RE.fullmatch(_TEXT_WRAP_RE.sub(r"\1", g).strip())
    pc = _PRED_CHOICE_RE.fullmatch(_TEXT_WRAP_RE.sub(r"\1", p).strip())
    if gc and pc:  # multiple choice: (B) vs B, \text{(B)}, (B) 27
        return gc.group(1) == (pc.group(1) or pc.group(2)).upper()
    if pc and pc.group(1) and not gc:  # gold 27, pred "(B) 27": the value after the letter
        p = re.sub(r"^\s*\(\s*[A-Ea-e]\s*\)", "", _TEXT_WRAP_RE.sub(r"\1", p)).strip() or p
    gt, pt = _gold_tree(g), _parse(p)
    if gt is None or pt is None:
        return _text_key(g) == _text_key(p)
    return bool(_same(gt, pt, deep))


@lru_cache(maxsize=8192)
def _gold_tree(g):
    """Tree of a cleaned gold; None for prose (3+ words: "f(x)=ax+b, where b is an arbitrary
    integer, ..."), which is compared as text: a sentence is never read as math."""
    return None if _prose_words(g) >= 3 else _parse(g)


def pred_answer(s, g_ans):
    """answer_text of a prediction in verify(); one that is, whole, the gold's answer `g_ans` (up
    to spacing and $: a prose gold copied word for word) is kept whole, not cut down first."""
    ans = answer_text(s)
    if isinstance(s, str) and ans != s.strip() and g_ans is not None and \
            re.sub(r"\s+", "", _clean(g_ans)) == re.sub(r"\s+", "", _clean(s)):
        return s
    return ans


_WORDS_RE = re.compile(r"[a-z]+(?:[ '-][a-z]+)*")


def parses(ans):
    """Can decide() read this answer as more than a verbatim string? True when it parses into a
    tree, or is a word answer (\\text{Evelyn}, odd) compared case-free. In this process, no sympy."""
    g = _clean(ans)
    if not g:
        return False
    if _INT_RE.fullmatch(g) or _gold_tree(g) is not None:
        return True
    return bool(_WORDS_RE.fullmatch(_TEXT_WRAP_RE.sub(r"\1", g).strip().lower()))


def explain(gold, pred, timeout):
    """python verify.py -v: each side's extracted answer, normalised string, tree and sympy form;
    then the route the pair takes."""
    answers = []
    for name, s in (("gold", gold), ("pred", pred)):
        ans = answer_text(s, gold=True) if name == "gold" else pred_answer(s, answers[0])
        answers.append(ans)
        print(f"{name}: answer  {ans!r}")
        if ans is not None:
            tree = (_gold_tree if name == "gold" else _parse)(_clean(ans))
            print(f"      cleaned {_clean(ans)!r}\n      tree    {tree}")
            try:
                print(f"      sympy   {_to_sympy(tree, {'inexact': False})}")
            except Exception:
                print("      sympy   (not one expression)" if tree else "      sympy   (not math: compared as text)")
    try:
        how = "decided in this process, without sympy" if None not in answers and \
            decide(*answers, deep=False) in (True, False) else "no answer on one side"
    except NeedSympy:
        how = f"sent to a sympy worker (timeout {timeout} s)"
    except Exception as e:
        how = f"rejected ({type(e).__name__}: {e})"
    print(f"route: {how}")


# ----------------------------------------------------------------------------------------------
# 8. Math-Verify (worker processes only): the published grader, for backend="math_verify"
def math_verify_same(g_ans, p_ans):
    """Math-Verify's verdict on two extracted answers, each given to it as $...$, the gold first
    (it is not symmetric). It parses untrusted text with its own machinery (an ANTLR LaTeX grammar,
    and sympy's parse_expr on strings of digits and operators), so it runs only in verify.py's
    workers, where a hang or a blow-up is killed; its own signal-based timeouts are off for that
    reason: the worker's deadline replaces them."""
    import math_verify
    gold = math_verify.parse("$" + g_ans.replace("$", " ") + "$", parsing_timeout=None)
    pred = math_verify.parse("$" + p_ans.replace("$", " ") + "$", parsing_timeout=None)
    return bool(math_verify.verify(gold, pred, timeout_seconds=None))


# ----------------------------------------------------------------------------------------------
# 9. Workers: the pipe protocol and the body of a worker (verify.py starts, feeds and kills them)
def _deep(g_ans, p_ans):
    return decide(g_ans, p_ans, deep=True)


def write_job(fd, job_id, g_ans, p_ans):
    """Caller -> worker: one JSON line [id, gold_answer, pred_answer] on the pipe `fd` (the worker's
    stdin); OSError when the worker has died."""
    data = (json.dumps([job_id, g_ans, p_ans]) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def read_messages(fd, buf):
    """Worker -> caller: (the messages now complete on the pipe `fd`, the bytes of an unfinished
    line, kept for the next call); messages None on end of file or a line that is not JSON (the
    worker died, or is not ours)."""
    chunk = os.read(fd, 1 << 16)
    if not chunk:
        return None, buf
    *lines, buf = (buf + chunk).split(b"\n")
    try:
        return [json.loads(line) for line in lines if line.strip()], buf
    except ValueError:
        return None, buf


def worker_loop(backend, memory):
    """JSON lines [id, gold_answer, pred_answer] in, [id, bool] out, after one "ready" line once
    sympy (or Math-Verify) is imported; the process's address space is capped at `memory` bytes."""
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    except (ImportError, ValueError, OSError):
        pass
    out, sys.stdout = sys.stdout.buffer, sys.stderr  # nothing else may write to the protocol pipe
    same = {"ours": _deep, "math_verify": math_verify_same}[backend]
    try:  # import sympy (and Math-Verify) and warm their caches before the first job
        same(r"\sqrt{10^{20}+1}-10^{10}", r"\sin(\pi x)")
    except Exception:
        pass
    out.write(b'"ready"\n')
    out.flush()
    for line in sys.stdin.buffer:
        job_id, ok = None, False
        try:
            job_id, g_ans, p_ans = json.loads(line)
            ok = bool(same(g_ans, p_ans))
        except Exception:
            ok = False
        out.write((json.dumps([job_id, ok]) + "\n").encode())
        out.flush()
