"""Build an offline English prose corpus from the documentation that ships with CPython.

Why: training a sparse autoencoder on SmolLM2's residual stream needs a few hundred thousand
tokens of ordinary English. This machine is offline, so the text comes from the one English
corpus every Python installation carries: its own documentation.

Source (the running interpreter's, read from disk; nothing is downloaded):

a. ``pydoc_data.topics.topics``: the text of ``help('TOPIC')``, i.e. the language reference and
   the built-in types chapters of the Python documentation (topics in sorted order);
b. the docstrings of the standard library's modules, classes and functions, read with ``ast``
   from the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (the modules are never
   imported), files in sorted path order, docstrings in source order. Skipped folders: ``test``
   and ``tests`` (test suites), ``idlelib``, ``lib2to3``, ``turtledemo``, ``ensurepip``,
   ``pydoc_data`` (read as a), ``site-packages`` (not the standard library) and ``__pycache__``.

Licence: Python Software Foundation License (PSF-2.0). The text is part of CPython and ships with
it; the generated file is derived from it and is not committed to this repository.

Filtering (keep prose, not code): the model should see English sentences, the same kind of text
throughout, not Python source, grammar rules or tables. Every topic and every docstring
(``ast.get_docstring``, so indentation is cleaned) is cut into paragraphs at blank lines. A
paragraph is dropped when it

- is a doctest (a line starting with ``>>>`` or ``...``);
- is indented deeper than the prose paragraph (or the paragraph ending in ``:``) before it: a
  literal block (code, a grammar rule, an example), a nested list or a note;
- is reST markup: a directive (``.. ``), a line that is only ``::``, a table (a line starting with
  ``|`` or ``+-``/``+=``), a heading underline, or any line mostly of punctuation and symbols
  (fewer than half of its visible characters letters or digits);
- looks like code: a line starting ``def``/``class``/``import``/``from x import``/``return``/``@``,
  or more than 6% of its visible characters code symbols (``=(){}[]<>_#|\\`` and the like);
- is a list rather than sentences: a docstring field list (``Args:``/``Returns:`` over indented
  items) or several ``name() -- description`` lines;
- has fewer than 8 words, or fewer than 75% of its whitespace-separated tokens are words made of
  letters (optionally with quotes, brackets, ``*emphasis*`` or sentence punctuation around them;
  ``os.path.join()``, ``__init__`` or ``cp037`` are not words);
- does not end a sentence (``.``, ``!`` or ``?``, perhaps before a closing quote or bracket):
  headings and the lead-ins of the code blocks or lists dropped above ("... is equivalent to:").

Kept paragraphs lose reST inline markup (``:func:`len``` and ````len```` become ``len``), have their
whitespace collapsed to single spaces, and are deduplicated exactly across the whole corpus (first
occurrence wins). Consecutive paragraphs of the same source (one topic, or one ``.py`` file) are
joined with a blank line into prompts of about 300-600 characters (a short remainder at the end of
a source joins the prompt before it while that stays within 800); a paragraph is never split unless
it alone exceeds 800 characters, and then only at sentence ends (a single sentence over 800 at
``; ``). The order is deterministic (no shuffling, no seed): topics, then files by path.
``--max-prompts N`` keeps N prompts evenly spaced over the whole list, so every part of the
library stays represented.

Output: JSONL, one object per line, in the format ``workbench capture --prompts`` reads:
``{"id": "doc00000", "prompt": "...", "source": "topics:assert" | "stdlib:json/decoder.py"}``
(``source`` is kept as per-prompt metadata in the run).

Built for the SAE run with CPython 3.11.7 (its stdlib; other versions give other text):

    HF_HUB_OFFLINE=1 .venv/bin/python examples/build_docs_corpus.py \\
        --out /work/data/sae/docs_corpus.jsonl --count-tokens

which wrote 3,050 prompts (466 from the pydoc topics, 2,584 from 374 stdlib files), 1,157,680
characters, 263,011 SmolLM2 tokens (no BOS; SmolLM2's tokenizer adds none), SHA-256 74d73490...;
a rebuild gave the same bytes. Captured for the SAE (one hook, float32) with

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/workbench capture -m smollm2-135m \\
        --prompts /work/data/sae/docs_corpus.jsonl --hooks blocks.15.hook_resid_post \\
        --batch-size 1 -o /work/data/sae/docs.h5

in 38 min 46 s wall time, 1.18 GB peak RSS, giving a 636 MB run (263,011 tokens). On two shared
CPU cores ``--batch-size 1`` (no padding) was two to four times faster than batches of 8 or 32,
and one torch thread was about 2.5 times faster than two while other processes held the cores.
Stdlib only, except ``--count-tokens``, which loads SmolLM2's tokenizer (``transformers``) from
workbench's converted-model cache, or through ``workbench.load_model`` when that cache is empty.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

MIN_WORDS = 8
MIN_WORD_RATIO = 0.75
MAX_SYMBOL_RATIO = 0.06
PROMPT_MIN, PROMPT_MAX, PARAGRAPH_MAX = 300, 600, 800
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "pydoc_data",
             "site-packages", "__pycache__"}

WORD = re.compile(r"""[("'“‘\[*]*[A-Za-z]+(?:['’-][A-Za-z]+)*[*)"'”’\].,;:!?]*""")
CODE_LINE = re.compile(r"^(def |class \w+[(:]|import \w|from [\w.]+ import |return\b|@\w|\$ )")
CODE_SYMBOLS = set("=(){}[]<>_#|\\/^~%&+@$")
DEFINITION = re.compile(r"^\s*[\w.]+(\(.*?\))?\s+--?\s")
SENTENCE_CLOSE = re.compile(r"[.!?][\"'”’)\]]*$")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'“(A-Z0-9])")
ROLE = re.compile(r":[\w:.+-]+:`~?!?([^`]+)`")
LITERAL = re.compile(r"``([^`]+)``")
REFERENCE = re.compile(r"`([^`<]+?)(?:\s*<[^>]*>)?`_{0,2}")


def indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def paragraphs(text: str) -> Iterator[list[str]]:
    """Blank-line separated blocks of ``text``, as lists of lines (tabs expanded)."""
    block: list[str] = []
    for line in text.expandtabs(8).splitlines():
        if line.strip():
            block.append(line.rstrip())
        elif block:
            yield block
            block = []
    if block:
        yield block


def mostly_symbols(line: str) -> bool:
    visible = [c for c in line if not c.isspace()]
    return sum(c.isalnum() for c in visible) * 2 < len(visible)


def is_markup_or_code(lines: list[str]) -> bool:
    for line in lines:
        s = line.strip()
        if s.startswith((">>>", "...", ".. ", "|", "+-", "+=")) or s == "::":
            return True
        if mostly_symbols(s) or CODE_LINE.match(s):
            return True
    # "name() -- description" on several lines: a list of methods or options, not sentences
    return sum(bool(DEFINITION.match(line)) for line in lines) >= 2


def is_field_list(lines: list[str]) -> bool:
    """A heading such as ``Args:`` or ``Returns:`` over indented items (a docstring field list)."""
    head = lines[0].strip()
    return (len(lines) > 1 and head.endswith(":") and len(head.split()) <= 2
            and any(indent(x) > indent(lines[0]) for x in lines[1:]))


def clean(lines: list[str]) -> str:
    text = " ".join(" ".join(lines).split())
    text = ROLE.sub(r"\1", text)
    text = LITERAL.sub(r"\1", text)
    text = REFERENCE.sub(r"\1", text)
    if text.endswith(" ::"):
        text = text[:-3] + ":"
    elif text.endswith("::"):
        text = text[:-1]
    return text


def is_prose(text: str) -> bool:
    tokens = text.split()
    words = sum(bool(WORD.fullmatch(t)) for t in tokens)
    if words < MIN_WORDS or words < MIN_WORD_RATIO * len(tokens):
        return False
    visible = [c for c in text if not c.isspace()]
    return sum(c in CODE_SYMBOLS for c in visible) <= MAX_SYMBOL_RATIO * len(visible)


def prose_paragraphs(text: str) -> Iterator[str]:
    """The prose paragraphs of one topic or docstring, cleaned (see the module docstring)."""
    base: int | None = None  # indent of the last prose (or ':'-ending) paragraph
    for lines in paragraphs(text):
        if base is not None:
            if min(indent(x) for x in lines) > base:
                continue  # deeper than the prose before it: code, grammar, an example, a note
            base = None
        if lines[-1].rstrip().endswith(":"):
            base = indent(lines[0])
        if is_markup_or_code(lines) or is_field_list(lines):
            continue
        para = clean(lines)
        if is_prose(para):
            base = indent(lines[0])
            if SENTENCE_CLOSE.search(para):
                yield para


def split_long(para: str) -> list[str]:
    """``para`` itself, or (over PARAGRAPH_MAX characters) pieces of whole sentences of at most
    about PROMPT_MAX characters each (a sentence itself over PARAGRAPH_MAX splits at ``; ``)."""
    if len(para) <= PARAGRAPH_MAX:
        return [para]
    pieces: list[str] = []
    current = ""
    sentences: list[str] = []
    for sentence in SENTENCE_END.split(para):
        # a single sentence longer than PARAGRAPH_MAX (rare: long enumerations) splits at "; "
        sentences += re.split(r"(?<=;) ", sentence) if len(sentence) > PARAGRAPH_MAX else [sentence]
    for sentence in sentences:
        if current and len(current) + 1 + len(sentence) > PROMPT_MAX:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        pieces.append(current)
    return pieces


def group(paras: list[str]) -> list[str]:
    """Consecutive paragraphs joined into prompts of about PROMPT_MIN-PROMPT_MAX characters; a
    short remainder at the end joins the previous prompt when that stays within PARAGRAPH_MAX."""
    prompts: list[str] = []
    chunk: list[str] = []
    size = 0
    for para in paras:
        for piece in split_long(para):
            if chunk and size + 2 + len(piece) > PROMPT_MAX:
                prompts.append("\n\n".join(chunk))
                chunk, size = [], 0
            chunk.append(piece)
            size += len(piece) + (2 if size else 0)
            if size >= PROMPT_MIN:
                prompts.append("\n\n".join(chunk))
                chunk, size = [], 0
    if chunk:
        tail = "\n\n".join(chunk)
        if prompts and size < PROMPT_MIN // 2 and len(prompts[-1]) + 2 + size <= PARAGRAPH_MAX:
            prompts[-1] += "\n\n" + tail
        else:
            prompts.append(tail)
    return prompts


def topic_sources() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics  # plain data: a dict of strings

    for name in sorted(topics):
        yield f"topics:{name}", topics[name]


def stdlib_files(root: Path) -> list[Path]:
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def docstrings(tree: ast.AST) -> Iterator[str]:
    """Docstrings of the module, its classes and functions (nested ones too), in source order."""
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(tree, clean=True)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.stmt):
            yield from docstrings(child)


def docstring_sources(root: Path) -> Iterator[tuple[str, str]]:
    for path in stdlib_files(root):
        try:
            with tokenize.open(path) as f:
                tree = ast.parse(f.read(), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        docs = list(docstrings(tree))
        if docs:
            yield f"stdlib:{path.relative_to(root).as_posix()}", "\n\n".join(docs)


def build(stdlib: Path) -> list[dict[str, str]]:
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    for source, text in [*topic_sources(), *docstring_sources(stdlib)]:
        paras = []
        for para in prose_paragraphs(text):
            if para not in seen:
                seen.add(para)
                paras.append(para)
        for prompt in group(paras):
            rows.append({"prompt": prompt, "source": source})
    return rows


def evenly(rows: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    if n >= len(rows):
        return rows
    return [rows[i * len(rows) // n] for i in range(n)]


def smollm2_tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from workbench.models.gguf_cache import converted_root

    for entry in sorted(converted_root().glob("SmolLM2-135M-Instruct*")):
        if (entry / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(entry))
    import workbench

    return workbench.load_model("smollm2-135m").tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="JSONL prompts file to write")
    ap.add_argument("--max-prompts", type=int, default=None,
                    help="keep N prompts, evenly spaced over the whole corpus")
    ap.add_argument("--count-tokens", action="store_true",
                    help="also count SmolLM2 tokens (no BOS); needs transformers")
    args = ap.parse_args(argv)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = build(stdlib)
    total = len(rows)
    if args.max_prompts is not None:
        rows = evenly(rows, args.max_prompts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": f"doc{i:05d}", **row}, ensure_ascii=False) + "\n"
                     for i, row in enumerate(rows))

    chars = sum(len(r["prompt"]) for r in rows)
    topics = sum(r["source"].startswith("topics:") for r in rows)
    files = len({r["source"] for r in rows if r["source"].startswith("stdlib:")})
    print(f"CPython {sys.version.split()[0]} ({stdlib})")
    print(f"{args.out}: {len(rows):,} prompts (of {total:,}; {topics:,} from pydoc topics, "
          f"{len(rows) - topics:,} from {files:,} stdlib files), {chars:,} characters")
    if args.count_tokens:
        tok = smollm2_tokenizer()
        n = sum(len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows)
        print(f"SmolLM2 tokens (no BOS): {n:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
