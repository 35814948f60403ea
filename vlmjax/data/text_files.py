"""Text documents from files: one document per line of plain-text or JSONL files.

    source = TextFileSource(paths="/data/corpus-{000..031}.jsonl", text_field="text")

`paths`: paths, globs or `{000..031}` braces, comma-separated (as webdataset shards). `format`
'auto' reads `.jsonl` / `.json` files as JSONL (one JSON object a line, the document in
`text_field`) and every other file as plain text (the line is the document); 'jsonl' / 'text'
force one. Blank lines are no documents. Bad lines are skipped and counted (data/skips.py):
a JSON line that does not parse or whose field is not a string (`bad_json`), a JSON object
without the field (`missing_text`), an empty document (`empty_text`), bytes that are not UTF-8
(`bad_text_encoding`), and a file that cannot be read (`unreadable_file`, once per file).

Records carry the document as their one text (`texts` [1]) and no image: the source is for text
tasks (the `lm` task), which read sources with `images=False`. Hosts split the files when there
are at least as many files as processes, else the lines (host p keeps every p-th line).
Record order is fixed (files shuffled per epoch in training), so the pipeline's saved position
resumes exactly.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Iterator

from vlmjax.data import sources, webdataset
from vlmjax.data.tf_cpu import tf

FORMATS = ("auto", "jsonl", "text")
JSONL_EXTENSIONS = (".jsonl", ".json")


def _lines(path: str) -> Iterator[bytes] | None:
    """The non-blank lines of a file (without line ends), or None when it cannot be read."""
    try:
        handle = tf.io.gfile.GFile(path, "rb")
        first = handle.readline()
    except (tf.errors.OpError, OSError):
        return None

    def generate():
        line = first
        with handle:
            while line:
                stripped = line.rstrip(b"\r\n")
                if stripped.strip():
                    yield stripped
                line = handle.readline()
    return generate()


@dataclasses.dataclass
class TextFileSource(sources.Source):
    """Documents, one a line, of plain-text or JSONL files (see the module docstring)."""
    paths: str
    text_field: str = "text"
    format: str = "auto"
    name = "text_file"
    has_images = False

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r} is not one of {FORMATS}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"data.text_field={self.text_field!r} must name the JSON field "
                             "holding the document")
        self.files = webdataset.expand_paths(self.paths)
        if not self.files:
            raise ValueError(f"data.paths={self.paths!r} matched no files")
        missing = [path for path in self.files if not tf.io.gfile.exists(path)]
        if missing:
            raise FileNotFoundError(f"data.paths: {missing[:5]} do not exist")

    def describe(self) -> str:
        shown = ", ".join(self.files[:5]) + (f" (+{len(self.files) - 5} more)"
                                             if len(self.files) > 5 else "")
        return f"text files {shown}"

    def is_jsonl(self, path: str) -> bool:
        if self.format == "auto":
            return path.lower().endswith(JSONL_EXTENSIONS)
        return self.format == "jsonl"

    def _example(self, line: bytes, path: str, number: int, jsonl: bool) -> dict:
        key = f"{path}:{number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return sources.placeholder("bad_text_encoding", key)
        if jsonl:
            try:
                record = json.loads(text)
            except ValueError:
                return sources.placeholder("bad_json", key)
            if not isinstance(record, dict) or self.text_field not in record:
                return sources.placeholder("missing_text", key)
            text = record[self.text_field]
            if not isinstance(text, str):
                return sources.placeholder("bad_json", key)
        if not text.strip():
            return sources.placeholder("empty_text", key)
        return sources.make_example(b"", [text.strip()], key=key)

    def iter_examples(self, path: str, keep=lambda number: True) -> Iterator[dict]:
        """The records of one file (those whose line number `keep` accepts)."""
        lines = _lines(path)
        if lines is None:
            yield sources.placeholder("unreadable_file", path)
            return
        jsonl = self.is_jsonl(path)
        for number, line in enumerate(lines):
            if keep(number):
                yield self._example(line, path, number, jsonl)

    def _split_by_file(self, process_count: int) -> bool:
        return len(self.files) >= process_count

    def _host_lines(self, process_index: int, process_count: int) -> Iterator[dict]:
        """All files, every process_count-th line (counted over the files in order)."""
        seen = 0
        for path in self.files:
            start = seen
            count = [0]

            def keep(number, start=start, count=count):
                count[0] = number + 1
                return (start + number) % process_count == process_index
            yield from self.iter_examples(path, keep)
            seen += count[0]

    def num_records(self, process_index: int, process_count: int) -> int:
        if self._split_by_file(process_count):
            return sum(1 for path in self.files[process_index::process_count]
                       for _ in self.iter_examples(path))
        return sum(1 for _ in self._host_lines(process_index, process_count))

    def records(self, process_index, process_count, training, seed):
        if not self._split_by_file(process_count):
            return self._from_generator(lambda: self._host_lines(process_index, process_count))
        files = self.files[process_index::process_count]
        file_dataset = tf.data.Dataset.from_tensor_slices(files)
        if training:
            file_dataset = file_dataset.shuffle(len(files), seed=seed,
                                                reshuffle_each_iteration=True)

        def file_records(path):
            return tf.data.Dataset.from_generator(
                lambda p: self.iter_examples(p.decode()), args=(path,),
                output_signature=sources.EXAMPLE_SIGNATURE)
        return file_dataset.interleave(file_records, cycle_length=min(len(files), 4),
                                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
