"""Where pretraining text comes from: local files and folders, JSONL, a Hugging Face `datasets` name, or the
embedded default, the docstrings of the Python standard library (present wherever Python is; nothing is
downloaded or copied into the repository).

Every source yields a list of documents (str); blank-line-separated paragraphs of a text file are documents.
"""

import ast
import json
import os
import sysconfig
import warnings

__all__ = ["BUILTIN", "jsonl_records", "load_texts", "stdlib_docstrings"]

BUILTIN = "builtin"
_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def stdlib_docstrings(max_chars=2_000_000):
    """Module, class and function docstrings of the standard library's .py files (sorted by path, tests and
    site-packages skipped), until ``max_chars`` characters are collected."""
    root = sysconfig.get_paths()["stdlib"]
    docs, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idle_test"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f, warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # invalid escape sequences in old sources
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 40:
                        docs.append(doc)
                        total += len(doc)
                        if total >= max_chars:
                            return docs
    if not docs:
        raise ValueError(f"found no standard-library docstrings under {root!r}")
    return docs


def _paragraphs(text):
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def jsonl_records(path, f):
    """(line number, record) of each non-blank line of the JSONL file ``f`` opened from ``path``; ValueError
    naming the file and line at a line that is not a JSON object."""
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got a {type(record).__name__}")
        yield lineno, record


def _read_jsonl(path, text_field):
    docs = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, row in jsonl_records(path, f):
                if text_field not in row:
                    raise ValueError(f"{path}:{lineno}: expected an object with a {text_field!r} field")
                docs.append(str(row[text_field]))
    except UnicodeDecodeError as e:
        raise ValueError(f"data {path!r} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    return docs


def _read_file(path, text_field):
    if path.endswith((".jsonl", ".json")):
        return _read_jsonl(path, text_field)
    with open(path, encoding="utf-8", errors="replace") as f:
        return _paragraphs(f.read())


def _load_hf(name, text_field):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"data {name!r}: the `datasets` library is not installed (pip install datasets)") from None
    dataset_name, _, config = name.removeprefix("hf:").partition(":")
    try:
        ds = datasets.load_dataset(dataset_name, config or None, split="train")
    except Exception as e:  # network errors, unknown names: all surface as a bad --data
        raise ValueError(f"data {name!r}: could not load the dataset ({type(e).__name__}: {e})") from None
    if text_field not in ds.column_names:
        raise ValueError(f"data {name!r}: no {text_field!r} column (columns: {', '.join(ds.column_names)})")
    return [t for t in ds[text_field] if t and t.strip()]


def load_texts(source=BUILTIN, *, text_field="text", max_chars=None):
    """Documents (list[str]) of ``source``: "builtin" (the stdlib docstrings), a text/.jsonl file, a folder
    (its .txt/.md/.rst/.jsonl files, recursively, sorted), or "hf:NAME[:CONFIG]" (a `datasets` name).
    ``max_chars`` caps the total size. Missing or empty data is a ValueError naming the source."""
    if source in (None, BUILTIN):
        return stdlib_docstrings(max_chars or 2_000_000)
    if source.startswith("hf:"):
        docs = _load_hf(source, text_field)
    elif os.path.isdir(source):
        files = sorted(
            os.path.join(d, n)
            for d, _, names in os.walk(source)
            for n in names
            if n.endswith((*_TEXT_SUFFIXES, ".jsonl", ".json"))
        )
        docs = [doc for path in files for doc in _read_file(path, text_field)]
    elif os.path.isfile(source):
        docs = _read_file(source, text_field)
    else:
        raise ValueError(f"data {source!r}: no such file or folder (or use 'builtin', or 'hf:NAME')")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"data {source!r}: holds no text")
    if max_chars:
        kept, total = [], 0
        for d in docs:
            if total >= max_chars:
                break
            kept.append(d)
            total += len(d)
        docs = kept
    return docs
