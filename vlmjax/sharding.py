"""One mesh for every parallelism: data, FSDP and tensor parallel are config rules.

The mesh has axes (`data`, `fsdp`, `tensor`); the config gives their sizes (-1 = the rest of the
devices). Parameters and activations carry logical axis names, and `LOGICAL_RULES` (updated by
`config.sharding_rules`) map them onto mesh axes:

  parameters   embed, mlp, heads, kv_heads, head_dim, vocab   (nn.with_logical_partitioning in
               vlmjax.models.layers; `param_shardings` places them)
  activations  act_batch, act_length, act_embed, act_heads, act_mlp, act_vocab   (`constrain`
               inside the models)

The two sets are disjoint, as in MaxText: a weight's `embed` dimension is sharded over `fsdp`
(ZeRO-3: XLA gathers it per layer) while the residual stream's `act_embed` stays whole and its
batch is split over `BATCH_AXES`. With shared names a rule for one would bind the other, and
flax's first-come rule resolution would silently drop whichever came second.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The mesh axes the global batch is split over: the input pipeline, the activations' act_batch,
# the micro-batches and the contrastive losses' shard_maps all use this one constant.
BATCH_AXES = ("data", "fsdp")

PARAM_AXES = ("embed", "mlp", "heads", "kv_heads", "head_dim", "vocab")
ACTIVATION_AXES = ("act_batch", "act_length", "act_embed", "act_heads", "act_mlp", "act_vocab")

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated). `heads`/`mlp`/`vocab` over
# `tensor` is Megatron-style tensor parallelism, for weights and the activations between them.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
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
    """`LOGICAL_RULES` updated by `config.sharding_rules` ({logical axis: mesh axis, list of
    mesh axes, or None})."""
    rules = dict(LOGICAL_RULES)
    for name, axis in (overrides or {}).items():
        if name not in rules:
            raise ValueError(f"sharding rule for unknown logical axis {name!r}; valid: "
                             f"parameters {list(PARAM_AXES)}, activations {list(ACTIVATION_AXES)}")
        axis = tuple(axis) if isinstance(axis, (list, tuple)) else axis
        unknown = [a for a in _mesh_axes(axis) if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"sharding rule {name}: {axis!r} names mesh axes {unknown}, not "
                             f"among {MESH_AXES} (or None: replicated)")
        rules[name] = axis
    return tuple(rules.items())


# Not flax's nn.logical_axis_rules: under it (and a mesh) flax also constrains every boxed
# parameter when `apply` checks its shape, which fails for DenseGeneral's flattened kernels.
_ACTIVATION_RULES: contextvars.ContextVar = contextvars.ContextVar("activation_rules",
                                                                   default=LOGICAL_RULES)


@contextlib.contextmanager
def axis_rules(rules: Sequence[tuple[str, Any]]):
    """Context in which `constrain` uses `rules` (from `logical_rules`) for the activations;
    wrap the tracing of a step in it, beside `jax.set_mesh`. Without it `LOGICAL_RULES` apply."""
    token = _ACTIVATION_RULES.set(tuple(rules))
    try:
        yield
    finally:
        _ACTIVATION_RULES.reset(token)


def active_rules() -> tuple:
    """The activation rules in effect (the innermost `axis_rules`, else the defaults)."""
    return _ACTIVATION_RULES.get()


def _mesh_axes(rule) -> tuple[str, ...]:
    return (rule,) if isinstance(rule, str) else tuple(rule or ())


def activation_spec(logical_axes: Sequence[str | None], shape: Sequence[int],
                    rules: Sequence[tuple[str, Any]], mesh_sizes: Mapping[str, int]) -> P:
    """The PartitionSpec of an activation of `shape` whose dims are `logical_axes`.

    Mesh axes the mesh lacks are left out; a dimension its mesh axes do not divide (a batch of 3
    prompts over 4 batch shards) is replicated, as in `param_shardings`. Two dimensions mapped
    onto one mesh axis are an error, not a silently dropped rule.
    """
    table = dict(rules)
    dims, owner = [], {}
    for name, size in zip(logical_axes, shape):
        if name is not None and name not in table:
            raise ValueError(f"activation axis {name!r} has no sharding rule; valid: "
                             f"{sorted(n for n in table if n in ACTIVATION_AXES)}")
        axes = tuple(a for a in _mesh_axes(table.get(name)) if a in mesh_sizes)
        for axis in axes:
            if axis in owner:
                raise ValueError(f"sharding rules map activation axes {owner[axis]!r} and "
                                 f"{name!r} both onto mesh axis {axis!r}")
            owner[axis] = name
        if not axes or size % math.prod(mesh_sizes[a] for a in axes):
            dims.append(None)
        else:
            dims.append(axes[0] if len(axes) == 1 else axes)
    return P(*dims)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`x` constrained to the sharding its logical activation axes map to, under the rules of
    the enclosing `axis_rules` (default `LOGICAL_RULES`) and the mesh of `jax.set_mesh`. Outside
    a mesh (a model applied on one device) it is `x`; only the mesh's Auto axes are used, so it
    is a no-op for axes that a `shard_map` made manual or that are typed Explicit."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    sizes = {name: size for name, size, kind in
             zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types) if kind == AxisType.Auto}
    if not sizes:
        return x
    spec = activation_spec(logical_axes, x.shape, _ACTIVATION_RULES.get(), sizes)
    return jax.lax.with_sharding_constraint(x, spec)


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
