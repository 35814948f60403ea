"""Reading and writing the files of a Hugging Face model directory (no transformers needed).

Weights: `model.safetensors` (read with safetensors' numpy API; torch is not needed), sharded
`model.safetensors.index.json`, or `pytorch_model.bin[.index.json]` (needs torch).
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except TypeError:  # numpy has no bfloat16: read the file's raw buffers with ml_dtypes
        return _read_safetensors_raw(path)


def _read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
    import ml_dtypes

    dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32}
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, not one of "
                             f"{sorted(dtypes)}")
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a torch pickle and reading it needs torch; install torch or "
                          "use a directory with model.safetensors") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items()}


def _is_float(array) -> bool:
    dtype = np.asarray(array).dtype
    return dtype.kind == "f" or dtype.name == "bfloat16"


def read_state_dict(directory: str) -> dict[str, np.ndarray]:
    """All tensors of the model in `directory`, as float32 numpy arrays."""
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        reader = _read_safetensors if ".safetensors" in name else _read_torch_bin
        if name.endswith(".index.json"):
            files = sorted(set(read_json(path)["weight_map"].values()))
            state = {}
            for shard in files:
                state.update(reader(os.path.join(directory, shard)))
        else:
            state = reader(path)
        return {k: np.asarray(v, np.float32) if _is_float(v) else np.asarray(v)
                for k, v in state.items()}
    raise FileNotFoundError(f"no model weights in {directory}: expected one of {WEIGHT_FILES}")


def write_safetensors(path: str, state: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    # np.array, not np.ascontiguousarray: the latter turns CLIP's 0-d logit_scale into shape [1]
    save_file({k: np.array(v, np.float32, order="C") for k, v in state.items()}, path,
              metadata={"format": "pt"})  # transformers checks for format=pt


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32"}


class SafetensorsTensors:
    """The tensors of a directory's `model.safetensors` or sharded `*.safetensors` (with
    `model.safetensors.index.json`), read one at a time: `read(name)` seeks to that tensor and
    reads only its bytes (no mmap, whose pages would stay in the process's RSS), so a loader
    that places each tensor on device before reading the next holds one tensor on the host."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            files = sorted(set(read_json(index)["weight_map"].values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"no safetensors weights in {directory}: expected "
                                    "model.safetensors or model.safetensors.index.json")
        self.entries: dict[str, tuple[str, int, dict]] = {}
        for file in files:
            path = os.path.join(directory, file)
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            for name, info in header.items():
                if name != "__metadata__":
                    self.entries[name] = (path, 8 + header_len, info)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][2]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name][2]["dtype"]

    def nbytes(self) -> int:
        return sum(info["data_offsets"][1] - info["data_offsets"][0]
                   for _, _, info in self.entries.values())

    def read(self, name: str, dtype=np.float32) -> np.ndarray:
        """Tensor `name` as a numpy array of `dtype` (float tensors; bf16 through ml_dtypes)."""
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

        path, data_start, info = self.entries[name]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, not one of "
                             f"{sorted(SAFETENSORS_DTYPES)}")
        start, end = info["data_offsets"]
        with open(path, "rb") as f:
            f.seek(data_start + start)
            raw = f.read(end - start)
        stored = np.dtype(getattr(ml_dtypes, "bfloat16") if info["dtype"] == "BF16"
                          else SAFETENSORS_DTYPES[info["dtype"]])
        array = np.frombuffer(raw, stored).reshape(info["shape"])
        return array.astype(dtype) if dtype is not None else array.copy()


# numpy dtype name -> safetensors dtype (the inverse of SAFETENSORS_DTYPES)
SAFETENSORS_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
SHARD_INDEX = "model.safetensors.index.json"


def _safetensors_header(specs: list[tuple[str, tuple, str]]) -> bytes:
    """The length-prefixed JSON header for tensors (name, shape, numpy dtype name) stored in
    this order, padded to 8 bytes as safetensors does."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # transformers checks format=pt
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_numpy_dtype(dtype)).itemsize
        header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _numpy_dtype(name: str):
    import ml_dtypes

    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def write_safetensors_streaming(directory: str, specs, produce, dtype: str = "float32",
                                max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes tensors one at a time: `specs` is a list of (name, shape) and `produce(name)`
    returns that tensor (any float numpy/jax array), which is cast to `dtype`, written and
    dropped before the next is produced. One `model.safetensors`, or shards
    `model-0000i-of-0000n.safetensors` of at most `max_shard_bytes` (a tensor larger than that
    gets its own) with `model.safetensors.index.json`. Returns the files written."""
    if dtype not in SAFETENSORS_CODES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(SAFETENSORS_CODES)}")
    itemsize = np.dtype(_numpy_dtype(dtype)).itemsize
    shards, size = [[]], 0
    for name, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(int(s) for s in shape)))
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        with open(os.path.join(directory, file), "wb") as f:
            f.write(_safetensors_header([(name, shape, dtype) for name, shape in shard]))
            for name, shape in shard:
                array = np.asarray(produce(name), np.float32)
                if array.shape != shape:
                    raise ValueError(f"tensor {name}: produced shape {array.shape}, declared "
                                     f"{shape}")
                data = np.ascontiguousarray(array.astype(_numpy_dtype(dtype)))
                f.write(data.reshape(-1).view(np.uint8))  # no bytes copy
                total += data.nbytes
                weight_map[name] = file
                del array, data
    if len(files) > 1:
        write_json(os.path.join(directory, SHARD_INDEX),
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files
