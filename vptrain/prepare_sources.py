"""What `vptrain prepare-data` reads: local text, json / jsonl and parquet files, as batches of documents.

Text files (*.txt, or any file of an unknown kind named on the command line) are streamed line by
line, one file a document, bytes as they are. json / jsonl / parquet files go through Hugging Face
`datasets` (its packaged local builders, `load_dataset(builder, data_files=...)`): one row a
document, its text in the --text-field column. Its Arrow cache goes to a directory the caller gives
(prepare-data: a temporary one under --out, removed after), so nothing is written under the home
directory; the CLI also sets HF_DATASETS_OFFLINE / HF_HUB_OFFLINE, so nothing is fetched.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LINES_PER_BATCH = 2048
ROWS_PER_BATCH = 1024
BUILDERS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet"}
"""File name endings read through `datasets`, and the packaged builder for each."""
TEXT = "text"
DEFAULT_PATTERNS = ("*.txt", *(f"*{ending}" for ending in BUILDERS))
"""What a directory given to --input contributes when --pattern is not given."""


@dataclass
class Batch:
    """Consecutive pieces of text; ends[i]: piece i is the last of its document (an end-of-text
    token follows it). nbytes: their UTF-8 size, for the progress bar."""

    texts: list[str]
    ends: list[bool]
    nbytes: int


def input_kind(path: Path) -> str:
    """'text', or the `datasets` builder that reads the file ('json', 'parquet')."""
    name = path.name.lower()
    return next((builder for ending, builder in BUILDERS.items() if name.endswith(ending)), TEXT)


def input_files(paths: list[str], patterns: tuple[str, ...] | None, exclude: Path | None = None) -> list[Path]:
    """Files as given; directories contribute their files matching `patterns` (default: every kind
    prepare-data reads), recursively and in sorted order. Files under `exclude` (the output
    directory: its tokenizer.json and meta.json are not inputs) are skipped."""
    patterns = patterns or DEFAULT_PATTERNS
    skip = exclude.resolve() if exclude is not None else None
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            matched = {f for pattern in patterns for f in p.rglob(pattern) if f.is_file()}
            found += sorted(f for f in matched if skip is None or not f.resolve().is_relative_to(skip))
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"--input: {p} does not exist")
    if not found:
        raise FileNotFoundError(f"--input: no files matching {' '.join(patterns)} in {', '.join(paths)}")
    return found


@dataclass
class Source:
    """Consecutive input files of one kind: read directly (text) or as one `datasets` table."""

    kind: str
    files: list[Path]
    table: object | None = None
    """The datasets.Dataset of json / parquet files (None for text)."""
    text_field: str = "text"
    documents: int = 0

    def total_bytes(self) -> int:
        if self.table is None:
            return sum(f.stat().st_size for f in self.files)
        import pyarrow.compute as pc

        return int(pc.sum(pc.binary_length(self.table.data.column(self.text_field))).as_py() or 0)

    def batches(self) -> Iterator[Batch]:
        yield from (self._text_batches() if self.table is None else self._row_batches())

    def _text_batches(self) -> Iterator[Batch]:
        for f in self.files:
            texts: list[str] = []
            nbytes = 0
            with open(f, "rb") as fh:  # binary: "\r\n" stays as written (the tokenizers are byte-level)
                for raw in fh:
                    texts.append(raw.decode("utf-8", errors="replace"))
                    nbytes += len(raw)
                    if len(texts) == LINES_PER_BATCH:
                        yield Batch(texts, [False] * len(texts), nbytes)
                        texts, nbytes = [], 0
            texts = texts or [""]  # an empty file is still a document: its end-of-text token
            yield Batch(texts, [False] * (len(texts) - 1) + [True], nbytes)

    def _row_batches(self) -> Iterator[Batch]:
        import pyarrow.compute as pc

        rows = self.table.with_format("arrow").select_columns([self.text_field])
        for table in rows.iter(batch_size=ROWS_PER_BATCH):
            column = table.column(self.text_field)
            texts = [t for t in column.to_pylist() if t is not None]  # a null row is no document
            if texts:
                yield Batch(texts, [True] * len(texts), int(pc.sum(pc.binary_length(column)).as_py() or 0))


def load_sources(files: list[Path], text_field: str, cache_dir: Path) -> list[Source]:
    """Group consecutive files of one kind; load json / parquet groups with `datasets`."""
    groups: list[Source] = []
    for f in files:
        kind = input_kind(f)
        if groups and groups[-1].kind == kind:
            groups[-1].files.append(f)
        else:
            groups.append(Source(kind, [f], text_field=text_field))
    for source in groups:
        if source.kind == TEXT:
            source.documents = len(source.files)
        else:
            source.table = _load_table(source, cache_dir)
    return groups


def _load_table(source: Source, cache_dir: Path):
    import datasets

    names = ", ".join(str(f) for f in source.files[:3]) + (" ..." if len(source.files) > 3 else "")
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # prepare-data shows its own; restored below
    try:
        table = datasets.load_dataset(source.kind, data_files=[str(f) for f in source.files], split="train",
                                      cache_dir=str(cache_dir))
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err
        raise ValueError(f"--input: cannot read {names} as {source.kind}: {str(cause).splitlines()[0]}") from None
    finally:
        if shown:
            datasets.enable_progress_bars()
    columns = table.column_names
    if source.text_field not in columns:
        raise ValueError(f"--text-field: '{source.text_field}' is not a column of {names} (columns: "
                         f"{', '.join(columns)}); pass --text-field NAME")
    feature = table.features[source.text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"--text-field: column '{source.text_field}' of {names} holds {feature}, not text; "
                         "name a column of strings")
    source.documents = table.num_rows
    return table
