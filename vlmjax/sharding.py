"""One mesh for every parallelism: data, FSDP and tensor parallel are config rules.

The mesh has axes (`data`, `fsdp`, `tensor`); the config gives their sizes (-1 = the rest of the
devices). Parameters carry logical axis names (see `vlmjax.models.layers`); `LOGICAL_RULES` map
them onto mesh axes. The batch is split over (`data`, `fsdp`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or None = replicated). `embed` over `fsdp` shards every weight
# matrix's model dimension (ZeRO-3 style: XLA gathers it per layer); `heads`/`mlp`/`vocab` over
# `tensor` is Megatron-style tensor parallelism.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
)


def mesh_shape(sizes: Mapping[str, int], device_count: int) -> tuple[int, ...]:
    """Resolve the config's axis sizes (one may be -1) against the device count."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} are not among {MESH_AXES}")
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(sizes)}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if device_count % known:
            raise ValueError(f"{device_count} devices do not divide into mesh {dict(sizes)}")
        shape[shape.index(-1)] = device_count // known
    if math.prod(shape) != device_count:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                         f"but {device_count} exist; set one axis to -1 to use the rest")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_rules(overrides: Mapping[str, Any] | None = None) -> tuple[tuple[str, Any], ...]:
    rules = dict(LOGICAL_RULES)
    for name, axis in (overrides or {}).items():
        if name not in rules:
            raise ValueError(f"sharding rule for unknown logical axis {name!r}; "
                             f"valid: {sorted(rules)}")
        rules[name] = tuple(axis) if isinstance(axis, (list, tuple)) else axis
    return tuple(rules.items())


def param_shardings(boxed_params, mesh: Mesh, rules) -> Any:
    """NamedShardings for a pytree of `nn.LogicallyPartitioned` params (or their abstract shapes
    from `jax.eval_shape`); unboxed leaves are replicated.

    A dimension that its mesh axes do not divide (e.g. 3 heads over tensor=2) is replicated
    rather than failing: a rule is a preference, not a demand.
    """
    mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_params), rules)
    shapes = nn.meta.unbox(boxed_params)

    def fit(spec: P, leaf) -> NamedSharding:
        dims = []
        for size, axes in zip(leaf.shape, tuple(spec) + (None,) * len(leaf.shape)):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            dims.append(axes if size % math.prod(mesh.shape[a] for a in names) == 0 else None)
        return NamedSharding(mesh, P(*dims))

    return jax.tree.map(fit, mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """Leading dim split over the batch axes the mesh has (replicated if it has none)."""
    axes = tuple(axis for axis in batch_axes if axis in mesh.axis_names)
    return NamedSharding(mesh, P(axes if axes else None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh,
                         batch_axes: Sequence[str] = BATCH_AXES) -> dict[str, jax.Array]:
    """Each process's numpy batch (its share of the global batch) -> global `jax.Array`s split
    over the batch axes the mesh has (leading dim; replicated if it has none)."""
    sharding = batch_sharding(mesh, batch_axes)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
