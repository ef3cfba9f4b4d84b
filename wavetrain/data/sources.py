"""Corpora: each source yields the documents (strings) of a split.

``EmbeddedTextSource`` reads one text file (the shipped tiny-shakespeare, or ``data.path``) and cuts it into
train/validation/test by character fractions.  ``HFTextSource`` is the real Hugging Face ``datasets`` loader
(streaming where the corpus is big) for WikiText-2, C4, OpenWebText and UltraChat; with ``data.path`` it reads
local json/jsonl/parquet/text files of the same schema instead of the hub, which is how it runs offline.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import itertools
import re
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

from wavetrain.config import ConfigError, config_callable

SPLITS = ("train", "validation", "test")
DOCUMENT_UNITS = ("text", "paragraph", "line")


class DataError(ConfigError):
    """A corpus that cannot be read: the message names the setting and the fix."""


def read_text_file(path: Path) -> str:
    """UTF-8 text of a plain or gzip file (CRLF normalised), with clear errors for missing/empty/binary files."""
    if not path.exists():
        raise DataError(f"data.path={path} does not exist: point data.path at a local copy of the corpus")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read().replace("\r\n", "\n")
    except UnicodeDecodeError as err:
        raise DataError(f"data.path={path} is not UTF-8 text ({err.reason} at byte {err.start}): "
                        f"convert it to UTF-8") from err
    if not text.strip():
        raise DataError(f"data.path={path} is empty: give a file with text in it")
    return text


class EmbeddedTextSource:
    """One text, split by character fractions: train = head, validation/test = the tail (nanoGPT's split).

    ``document_unit`` says what one document of a split is: ``text`` (the whole split, one stream), ``paragraph``
    (blocks separated by blank lines, stripped: one speech of tiny-shakespeare) or ``line`` (each non-empty line,
    stripped); the last two give the one-example-per-paragraph protocol of spec wavefield.md §4."""

    def __init__(self, filename: str, val_fraction: float = 0.1, test_fraction: float = 0.0,
                 document_unit: str = "text") -> None:
        if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise DataError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: both in [0, 1) with "
                            f"val_fraction > 0 and a non-empty train part")
        if document_unit not in DOCUMENT_UNITS:
            raise DataError(f"data.source.document_unit={document_unit!r} is unknown: use one of "
                            f"{list(DOCUMENT_UNITS)}")
        self.filename = filename
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.document_unit = document_unit

    def fingerprint(self, path: str | None) -> str:
        origin = self.filename if path is None else _path_fingerprint(path)
        unit = "" if self.document_unit == "text" else f"-{self.document_unit}"
        return f"{origin}-{self.val_fraction}-{self.test_fraction}{unit}"

    def documents(self, split: str, path: str | None) -> Iterator[str]:
        if path is not None:
            text = read_text_file(Path(path))
        else:
            with resources.files("wavetrain.assets").joinpath(self.filename).open("rb") as raw:
                text = gzip.decompress(raw.read()).decode("utf-8")
        n = len(text)
        val_start = int(n * (1 - self.val_fraction - self.test_fraction))
        test_start = int(n * (1 - self.test_fraction))
        bounds = {"train": (0, val_start), "validation": (val_start, test_start), "test": (test_start, n)}
        start, stop = bounds[split]
        if stop > start:
            yield from split_documents(text[start:stop], self.document_unit)


def split_documents(text: str, unit: str) -> Iterator[str]:
    """``text`` as documents of one ``unit`` (see EmbeddedTextSource); empty documents are dropped."""
    if unit == "text":
        yield text
        return
    pieces = re.split(r"\n[ \t]*\n", text) if unit == "paragraph" else text.split("\n")
    yield from (piece.strip() for piece in pieces if piece.strip())


def _path_fingerprint(path: str) -> str:
    files = sorted(Path(p) for p in _expand(path))
    digest = hashlib.sha1()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:12]


def _expand(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file())
    elif any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    else:
        files = [path] if p.exists() else []
    if not files:
        raise DataError(f"data.path={path} does not exist or matches no file: point it at local corpus files")
    return files


def _builder_for(files: list[str]) -> str:
    names = [f[:-3] if f.endswith(".gz") else f for f in files]
    if all(n.endswith((".json", ".jsonl")) for n in names):
        return "json"
    if all(n.endswith(".parquet") for n in names):
        return "parquet"
    return "text"


class HFTextSource:
    """A Hugging Face dataset read through ``datasets``: hub id + config, or local files via ``data.path``.

    ``splits`` maps our split names to the dataset's (e.g. validation -> test_sft).  When the dataset has fewer
    splits than we need (OpenWebText has only train), ``carve`` cuts the first ``max_docs`` documents of its
    train split in order, e.g. {train: 0.95, validation: 0.025, test: 0.025} (spec dwarf.md §2).
    ``local_files`` maps each split to its file inside a ``data.path`` directory (a name, plain or ``.gz``, or a
    glob), e.g. WikiText-2's wiki.{train,valid,test}.raw; without it, local files are carved like one corpus.
    ``skip_prefixes`` drops rows whose (stripped) text starts with one of them (WikiText's "= Heading =" lines,
    spec wavefield.md §4).
    ``max_docs_counts``: ``kept`` takes the first ``max_docs`` documents that pass ``strip``/``min_chars``;
    ``read`` reads the first ``max_docs`` rows and filters those (DWARF §2.A: 100,000 docs, then len > 50).
    ``carve_edges``: ``round`` cuts at start + round(n·fraction) per split; ``floor`` at int(n·cumulative
    fraction), i.e. [0, int(0.95n)), [int(0.95n), int(0.975n)), rest (DWARF §2.A).
    ``formatter`` turns a row into its document (a callable path such as the UltraChat formatter, called with
    ``formatter_options`` as keyword arguments): a string, or (text, supervised) segments for a loss mask."""

    def __init__(self, hub_id: str, hub_config: str | None = None, text_field: str = "text",
                 splits: dict[str, str] | None = None, carve: dict[str, float] | None = None,
                 max_docs: int | None = None, streaming: bool = True, features: dict[str, str] | None = None,
                 min_chars: int = 0, strip: bool = False, formatter: str | None = None,
                 formatter_options: dict | None = None, local_files: dict[str, str] | None = None,
                 skip_prefixes: list[str] | None = None, max_docs_counts: str = "kept",
                 carve_edges: str = "round") -> None:
        if max_docs_counts not in ("kept", "read"):
            raise DataError(f"data.source.max_docs_counts={max_docs_counts!r}: use kept (documents after the "
                            f"filter) or read (rows read from the corpus, then filtered)")
        if carve_edges not in ("round", "floor"):
            raise DataError(f"data.source.carve_edges={carve_edges!r}: use round or floor")
        self.hub_id = hub_id
        self.hub_config = hub_config
        self.text_field = text_field
        self.splits = dict(splits or {"train": "train", "validation": "validation", "test": "test"})
        self.carve = dict(carve) if carve else None
        self.max_docs = max_docs
        self.streaming = streaming
        self.features = dict(features) if features else None
        self.min_chars = min_chars
        self.strip = strip
        self.formatter = formatter
        self.formatter_options = dict(formatter_options or {})
        self.local_files = dict(local_files) if local_files else None
        self.skip_prefixes = tuple(skip_prefixes or ())
        self.max_docs_counts = max_docs_counts
        self.carve_edges = carve_edges

    def fingerprint(self, path: str | None) -> str:
        origin = f"{self.hub_id}/{self.hub_config}" if path is None else _path_fingerprint(path)
        key = (origin, self.text_field, self.splits, self.carve, self.max_docs, self.min_chars, self.strip,
               self.formatter) + ((sorted(self.formatter_options.items()),) if self.formatter_options else ())
        key += ((self.local_files, self.skip_prefixes),) if self.local_files or self.skip_prefixes else ()
        key += ((self.max_docs_counts, self.carve_edges),) if (self.max_docs_counts, self.carve_edges) != (
            "kept", "round") else ()
        return hashlib.sha1(repr(key).encode()).hexdigest()[:12]

    def _load(self, split: str, path: str | None) -> Iterable[dict]:
        import datasets

        kwargs = {"streaming": self.streaming}
        if self.features:
            kwargs["features"] = datasets.Features({k: datasets.Value(v) for k, v in self.features.items()})
        if path is not None:
            files = self._split_files(split, path) if self._per_split(path) else _expand(path)
            builder = _builder_for(files)
            if builder == "text":
                kwargs.pop("features", None)
            return datasets.load_dataset(builder, data_files={"data": files}, split="data", **kwargs)
        try:
            return datasets.load_dataset(self.hub_id, self.hub_config, split=split, **kwargs)
        except Exception as err:  # offline hub: ConnectionError, OfflineModeIsEnabled, FileNotFoundError, ...
            raise DataError(f"loading {self.hub_id} ({self.hub_config or 'default'}) split {split!r} failed: "
                            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} — this corpus "
                            f"needs network or a local copy: set data.path=/path/to/files "
                            f"(json/jsonl/parquet/text of the same schema)") from err

    def _texts(self, rows: Iterable[dict]) -> Iterator[str | list[tuple[str, bool]]]:
        format_row = _resolve_formatter(self.formatter) if self.formatter else None
        for index, row in enumerate(rows):
            if format_row is not None:
                text = format_row(row, index, **self.formatter_options)
                if not isinstance(text, str):  # (text, supervised) segments, already stripped per turn
                    if len("".join(piece for piece, _ in text)) > self.min_chars:
                        yield text
                    continue
            else:
                if row.get(self.text_field) is None:  # the json builder fills a missing field with None
                    fields = sorted(k for k, v in row.items() if v is not None)
                    raise DataError(f"row {index} has no field {self.text_field!r} (fields: {fields}): "
                                    f"set data.source.text_field to the field holding the text")
                text = row[self.text_field]
            text = text.strip() if self.strip else text
            if self.skip_prefixes and text.lstrip().startswith(self.skip_prefixes):
                continue
            if len(text) > self.min_chars and text:
                yield text

    def documents(self, split: str, path: str | None) -> Iterator[str]:
        if path is not None and self._per_split(path):
            return self._texts(self._load(split, path))
        if self.carve is None and path is None:  # the hub's own split, at most max_docs of it (C4: 365M rows)
            rows = self._load(self.splits[split], path)
            if self.max_docs_counts == "read":
                return self._texts(itertools.islice(rows, self.max_docs))
            return itertools.islice(self._texts(rows), self.max_docs)
        return self._carved(split, path)

    def _per_split(self, path: str) -> bool:
        return bool(self.local_files) and Path(path).is_dir()

    def _split_files(self, split: str, path: str) -> list[str]:
        """The ``local_files`` of ``split`` inside the ``data.path`` directory (a name, its ``.gz``, or a glob)."""
        pattern = self.local_files.get(split)
        if pattern is None:
            raise DataError(f"data.source.local_files has no entry for the {split} split: add "
                            f"{split}: <file name or glob inside data.path>")
        files = sorted(glob.glob(str(Path(path) / pattern))) or sorted(glob.glob(str(Path(path) / f"{pattern}.gz")))
        if not files:
            raise DataError(f"no file matches {pattern!r} (or {pattern}.gz) in data.path={path} for the {split} "
                            f"split: put the corpus's {split} file there, or set data.source.local_files.{split}")
        return files

    def _carved(self, split: str, path: str | None) -> Iterator[str]:
        carve = self.carve or {"train": 0.9, "validation": 0.05, "test": 0.05}
        rows = self._load(self.splits.get("train", "train"), path)
        if self.max_docs_counts == "read":
            docs = list(self._texts(itertools.islice(rows, self.max_docs)))
        else:
            docs = list(itertools.islice(self._texts(rows), self.max_docs))
        n = len(docs)
        if n == 0:
            raise DataError(f"no documents in {path or self.hub_id}: the corpus is empty")
        edges, start, cumulative = {}, 0, 0.0
        for name in SPLITS:
            cumulative += carve.get(name, 0.0)
            if name == "test":
                stop = n
            elif self.carve_edges == "floor":
                stop = int(n * cumulative)
            else:
                stop = start + int(round(n * carve.get(name, 0.0)))
            edges[name] = (start, min(stop, n))
            start = edges[name][1]
        lo, hi = edges[split]
        return iter(docs[lo:hi])


def _resolve_formatter(dotted: str):
    return config_callable("data.source.formatter", dotted)  # Hydra's _target_ policy: no os.system & co.


CHAT_ROLES = {"user": "User", "human": "User", "assistant": "Assistant", "gpt": "Assistant", "bot": "Assistant",
              "system": "System"}


def chat_segments(row: dict, index: int, include_assistant_prefix_in_loss: bool = False) -> list[tuple[str, bool]]:
    """UltraChat row -> (text, supervised) segments with the reference's plain-text markers (spec wda.md §4).

    Each non-empty message (content stripped) becomes "User: " / "Assistant: " / "System: " + content + "\n", as
    three segments that the token cache encodes separately.  Roles are matched case-insensitively with the aliases
    user/human, assistant/gpt/bot, system; any other role is rendered as a user turn, as the reference does.  Only
    assistant content is supervised (assistant-only loss); the "Assistant: " prefix too when
    ``include_assistant_prefix_in_loss`` (the reference function's default; false in the 130M run).  ShareGPT-style
    turns ({from, value}) are read as the reference reads them.  An empty conversation gives no segments (the row
    is then skipped)."""
    if not isinstance(row.get("messages"), list):
        raise DataError(f"row {index} has no list field 'messages' (fields: {sorted(row)}): UltraChat rows need "
                        f"messages=[{{role, content}}, ...]")
    segments: list[tuple[str, bool]] = []
    for turn in row["messages"]:
        role = CHAT_ROLES.get(str(turn.get("role") or turn.get("from") or "user").strip().lower(), "User")
        content = str(turn.get("content") or turn.get("value") or turn.get("text") or "").strip()
        if not content:
            continue
        assistant = role == "Assistant"
        segments += [(f"{role}: ", assistant and include_assistant_prefix_in_loss), (content, assistant),
                     ("\n", False)]
    return segments


def format_chat(row: dict, index: int) -> str:
    """UltraChat row -> plain text with role markers, one turn per line: the text of ``chat_segments`` (spec
    wda.md §4) without its loss mask, for full-loss training on conversations."""
    return "".join(text for text, _ in chat_segments(row, index))
