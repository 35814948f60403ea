"""webdataset / img2dataset tar shards: path expansion, streaming reads, and writing.

A shard is a plain tar whose members are grouped into samples by key: `dir/000123.jpg`,
`dir/000123.txt`, `dir/000123.json` form sample `dir/000123` with files {jpg, txt, json} (the
extension is everything after the first dot of the base name, as in webdataset).

Paths: a list, or one string of comma-separated entries, each a path, a glob (`dir/shard-*.tar`)
or webdataset brace notation (`dir/shard-{000000..000099}.tar`, `{a,b}`). gs:// and other
`tf.io.gfile` paths work too.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import tarfile
from typing import Iterator, Sequence

from vlmjax.data.tf_cpu import tf

_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def _split_top_level_commas(spec: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in spec:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def expand_braces(pattern: str) -> list[str]:
    """`a-{01..03}.tar` -> a-01.tar, a-02.tar, a-03.tar (zero padding kept); `{x,y}` -> x, y."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail, body = pattern[:match.start()], pattern[match.end():], match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        start, stop = numeric.groups()
        width = len(start) if start.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(start), int(stop) + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def expand_paths(spec: str | Sequence[str]) -> list[str]:
    """Shard paths from paths / globs / brace patterns; globs are sorted, duplicates dropped."""
    entries = _split_top_level_commas(spec) if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for entry in entries:
        for pattern in expand_braces(os.fspath(entry)):
            if any(char in pattern for char in "*?["):
                paths.extend(sorted(tf.io.gfile.glob(pattern)))
            else:
                paths.append(pattern)
    return list(dict.fromkeys(paths))


@dataclasses.dataclass
class TarSample:
    key: str
    files: dict[str, bytes]  # extension (lower case, no leading dot) -> content


@dataclasses.dataclass
class TarProblem:
    """A shard that could not be read to its end: `reason` is a `skips` reason name."""
    reason: str
    path: str
    detail: str


def _split_name(name: str) -> tuple[str, str]:
    directory, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return os.path.join(directory, stem), extension.lower()


def iter_tar_samples(path: str) -> Iterator[TarSample | TarProblem]:
    """Streams the samples of one shard; a damaged shard ends with one TarProblem, never raises."""
    try:
        stream = tf.io.gfile.GFile(path, "rb")
    except Exception as error:  # noqa: BLE001  (any filesystem error: report, go on)
        yield TarProblem("unreadable_file", path, str(error))
        return
    current: TarSample | None = None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, extension = _split_name(member.name)
                if current is not None and current.key != key:  # before reading: may fail
                    yield current
                    current = None
                content = archive.extractfile(member).read()
                if len(content) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                if current is None:
                    current = TarSample(key, {})
                current.files[extension] = content
    except (tarfile.TarError, EOFError, OSError, tf.errors.OpError) as error:
        # The sample being assembled may lack files that were cut off: drop it with the shard tail.
        yield TarProblem("truncated_tar" if isinstance(error, (tarfile.TarError, EOFError))
                         else "unreadable_file", path, str(error))
        return
    if current is not None:
        yield current


class ShardWriter:
    """Writes samples to `directory/prefix-000000.tar`, `-000001.tar`, ..., `max_samples` each."""

    def __init__(self, directory: str, prefix: str = "shard", max_samples: int = 10_000):
        self.directory, self.prefix, self.max_samples = directory, prefix, max_samples
        tf.io.gfile.makedirs(directory)
        self.paths: list[str] = []
        self.num_samples = 0
        self._archive = None
        self._stream = None
        self._in_shard = 0

    def _next_shard(self) -> None:
        self._close_shard()
        path = os.path.join(self.directory, f"{self.prefix}-{len(self.paths):06d}.tar")
        self._stream = tf.io.gfile.GFile(path, "wb")
        self._archive = tarfile.open(fileobj=self._stream, mode="w")
        self.paths.append(path)
        self._in_shard = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if self._archive is None or self._in_shard >= self.max_samples:
            self._next_shard()
        for extension, content in files.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(content)
            info.mtime = 0  # identical inputs give byte-identical shards
            self._archive.addfile(info, io.BytesIO(content))
        self._in_shard += 1
        self.num_samples += 1

    def _close_shard(self) -> None:
        if self._archive is not None:
            self._archive.close()
            self._stream.close()
            self._archive = self._stream = None

    def close(self) -> list[str]:
        self._close_shard()
        return self.paths

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
