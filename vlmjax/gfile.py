"""Paths that may be local or remote (gs://...): tf.io.gfile for remote ones, plain os for local.

Workdirs, checkpoints and data sources accept either; orbax opens remote paths itself.
"""
from __future__ import annotations

import os


def is_remote(path: str) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    return str(path) if is_remote(path) else os.path.abspath(path)


def join(*parts: str) -> str:
    return os.path.join(*map(str, parts))  # '/'-joins gs:// paths too


def _tf_gfile():
    from vlmjax.data.tf_cpu import tf  # TensorFlow without accelerators
    return tf.io.gfile


def makedirs(path: str):
    if is_remote(path):
        _tf_gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    return _tf_gfile().exists(path) if is_remote(path) else os.path.exists(path)


def read_text(path: str) -> str:
    if is_remote(path):
        with _tf_gfile().GFile(path, "r") as f:
            return f.read()
    with open(path) as f:
        return f.read()


def write_text(path: str, text: str):
    if is_remote(path):
        with _tf_gfile().GFile(path, "w") as f:
            f.write(text)
        return
    with open(path, "w") as f:
        f.write(text)
