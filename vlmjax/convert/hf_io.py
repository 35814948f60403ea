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
