"""Every contrastive loss impl against the dense reference, and the dense references against a
brute-force numpy implementation of the papers' formulas."""
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vlmjax.losses import contrastive

RTOL = 1e-5


def random_embeddings(batch, dim, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(2, batch, dim)).astype(np.float32)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    return jnp.asarray(z[0]), jnp.asarray(z[1])


def make_mesh(shape, names=("data", "fsdp"), axis_type=AxisType.Auto):
    n = int(np.prod(shape))
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape),
                         devices=jax.devices()[:n])


def assert_close(actual, expected):
    # Scalars (the loss, the gradients w.r.t. t and b) get an absolute floor: the t and b
    # gradients sum all B^2 pairs' O(1/B) terms, which can cancel to ~1e-5 and leave float32
    # round-off of ~1e-8 (seen: 1.5e-8).
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        scale = max(np.abs(e).max(), 0.1) if e.ndim == 0 else np.abs(e).max()
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=RTOL * scale)


# ---------------------------------------------------------------- references vs brute force
def brute_force_clip(zimg, ztxt, t):
    logits = t * np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T
    def ce(l):
        return np.mean([np.log(np.sum(np.exp(row))) - row[i] for i, row in enumerate(l)])
    return (ce(logits) + ce(logits.T)) / 2


def brute_force_siglip(zimg, ztxt, t, b):
    zimg, ztxt = np.asarray(zimg, np.float64), np.asarray(ztxt, np.float64)
    total = 0.0
    for i in range(len(zimg)):
        for j in range(len(ztxt)):
            z = 1.0 if i == j else -1.0
            total += np.log1p(np.exp(-z * (t * zimg[i] @ ztxt[j] + b)))
    return total / len(zimg)


def test_dense_references_match_paper_formulas():
    zimg, ztxt = random_embeddings(7, 5, seed=0)
    np.testing.assert_allclose(contrastive.clip_loss_dense(zimg, ztxt, 3.0),
                               brute_force_clip(zimg, ztxt, 3.0), rtol=1e-5)
    np.testing.assert_allclose(contrastive.siglip_loss_dense(zimg, ztxt, 4.0, -2.0),
                               brute_force_siglip(zimg, ztxt, 4.0, -2.0), rtol=1e-5)


# ------------------------------------------------------------------------ impls vs dense
MESHES = {1: (1, 1), 2: (2, 1), 4: (2, 2), 8: (2, 4)}
LOSSES = ["clip", "siglip/all_gather", "siglip/ppermute", "siglip/ppermute_bidir"]


def loss_and_grads(name, mesh, zimg, ztxt, t, b):
    if name == "clip":
        fn = lambda zi, zt, t, b: contrastive.clip_loss(zi, zt, t, mesh=mesh)  # noqa: E731
    elif name == "siglip/dense":
        fn = contrastive.siglip_loss_dense
    else:
        impl = name.split("/")[1]
        fn = lambda zi, zt, t, b: contrastive.siglip_loss(  # noqa: E731
            zi, zt, t, b, mesh=mesh, impl=impl)
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(zimg, ztxt, t, b)


def dense_loss_and_grads(name, zimg, ztxt, t, b):
    if name == "clip":
        fn = lambda zi, zt, t, b: contrastive.clip_loss_dense(zi, zt, t)  # noqa: E731
    else:
        fn = contrastive.siglip_loss_dense
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(zimg, ztxt, t, b)


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
@pytest.mark.parametrize("rows_per_device", [3, 4])  # global batches both powers of 2 and not
@pytest.mark.parametrize("name", LOSSES)
def test_impl_equals_dense_value_and_grads(name, devices, rows_per_device):
    batch = devices * rows_per_device
    seed = zlib.crc32(f"{name}/{devices}/{rows_per_device}".encode())  # hash() varies by run
    zimg, ztxt = random_embeddings(batch, 16, seed)
    t, b = jnp.float32(np.exp(np.random.default_rng(seed).uniform(0.5, 2.5))), jnp.float32(-3.5)
    mesh = make_mesh(MESHES[devices])
    expected = dense_loss_and_grads(name, zimg, ztxt, t, b)
    actual = loss_and_grads(name, mesh, zimg, ztxt, t, b)
    assert actual[0].dtype == jnp.float32 and actual[0].shape == ()
    if name == "clip":  # clip has no bias: compare value and grads w.r.t. zimg, ztxt, t
        actual, expected = (actual[0], actual[1][:3]), (expected[0], expected[1][:3])
    assert_close(actual, expected)


@pytest.mark.parametrize("devices", [3, 5, 7])  # odd: no opposite device, 1-3 two-way steps
def test_bidirectional_ring_equals_dense_on_odd_device_counts(devices):
    name = "siglip/ppermute_bidir"
    zimg, ztxt = random_embeddings(devices * 3, 16, seed=devices)
    t, b = jnp.float32(7.0), jnp.float32(-3.5)
    mesh = make_mesh((devices, 1))
    assert_close(loss_and_grads(name, mesh, zimg, ztxt, t, b),
                 dense_loss_and_grads(name, zimg, ztxt, t, b))


@pytest.mark.parametrize("devices", [1, 2, 3, 4, 5, 6, 7, 8])
def test_bidirectional_ring_visits_each_chunk_once_nearest_first(devices):
    """Visit k (own chunk: 0) brings a chunk ceil(k/2) devices away: the two directions advance
    together, so the last chunk arrives after ceil((N-1)/2) steps."""
    mesh = make_mesh((devices, 1))
    axes = ("data", "fsdp")

    def local(_):
        def visit(acc, chunk):  # chunk: the index of the device that owns it
            visits, order, count = acc
            return visits.at[chunk].add(1), order.at[chunk].set(count), count + 1

        me = jax.lax.axis_index(axes)
        init = contrastive._varying((jnp.zeros(devices, jnp.int32),
                                     jnp.zeros(devices, jnp.int32), jnp.int32(0)), axes)
        visits, order, _ = contrastive._visit_bidirectional_ring(visit, init, me, axes, devices)
        return visits[None], order[None]

    visits, order = jax.shard_map(local, mesh=mesh, in_specs=P(axes), out_specs=P(axes))(
        jnp.zeros(devices))
    np.testing.assert_array_equal(visits, np.ones((devices, devices)))
    me, owner = np.arange(devices)[:, None], np.arange(devices)[None, :]
    distance = np.minimum((me - owner) % devices, (owner - me) % devices)
    np.testing.assert_array_equal((order + 1) // 2, distance)


@pytest.mark.parametrize("name", LOSSES)
def test_under_jit_sharded_inputs_replicated_output_no_host_transfer(name):
    mesh = make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), AxisType.Explicit)
    zimg, ztxt = random_embeddings(16, 8, seed=3)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    replicated = NamedSharding(mesh, P())
    zimg, ztxt = jax.device_put((zimg, ztxt), batch_sharding)
    t, b = jax.device_put((jnp.float32(6.0), jnp.float32(-4.0)), replicated)
    step = jax.jit(lambda *args: loss_and_grads(name, mesh, *args))
    with jax.transfer_guard("disallow"):
        (value, grads) = step(zimg, ztxt, t, b)
    assert value.sharding.is_fully_replicated
    assert grads[0].sharding.is_equivalent_to(batch_sharding, 2)  # grads sharded like inputs
    dense = dense_loss_and_grads(name, np.asarray(zimg), np.asarray(ztxt), 6.0, -4.0)
    np.testing.assert_allclose(value, dense[0], rtol=RTOL)


def test_gspmd_auto_mesh_and_eager_call():
    mesh = jax.make_mesh((4, 1), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2,
                         devices=jax.devices()[:4])
    zimg, ztxt = random_embeddings(12, 8, seed=5)
    expected = contrastive.siglip_loss_dense(zimg, ztxt, 5.0, -1.0)
    for impl in contrastive.SIGLIP_IMPLS:
        np.testing.assert_allclose(
            contrastive.siglip_loss(zimg, ztxt, 5.0, -1.0, mesh=mesh, impl=impl), expected,
            rtol=RTOL)


def test_batch_axes_absent_from_mesh_are_ignored_and_tensor_axis_replicates():
    mesh = make_mesh((4, 2), ("data", "tensor"))
    zimg, ztxt = random_embeddings(8, 8, seed=6)
    np.testing.assert_allclose(contrastive.siglip_loss(zimg, ztxt, 2.0, 1.0, mesh=mesh),
                               contrastive.siglip_loss_dense(zimg, ztxt, 2.0, 1.0), rtol=RTOL)


def test_bias_none_means_zero():
    zimg, ztxt = random_embeddings(8, 4, seed=7)
    mesh = make_mesh((4, 1))
    np.testing.assert_allclose(contrastive.siglip_loss(zimg, ztxt, 3.0, None, mesh=mesh),
                               contrastive.siglip_loss_dense(zimg, ztxt, 3.0, 0.0), rtol=RTOL)


def test_bad_inputs_raise_clear_errors():
    zimg, ztxt = random_embeddings(6, 4, seed=8)
    mesh = make_mesh((4, 1))
    with pytest.raises(ValueError, match="not divisible by the 4 batch shards"):
        contrastive.siglip_loss(zimg, ztxt, 1.0, 0.0, mesh=mesh)
    with pytest.raises(ValueError, match="is not one of"):
        contrastive.siglip_loss(zimg, ztxt, 1.0, 0.0, impl="ring")
    with pytest.raises(ValueError, match="none of batch_axes"):
        contrastive.clip_loss(zimg[:4], ztxt[:4], 1.0, mesh=mesh, batch_axes=("batch",))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        contrastive.clip_loss(zimg, ztxt[:3], 1.0)


def temp_bytes(fn, mesh, batch, dim):
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    grad_fn = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
    return grad_fn.lower(spec, spec, scalar, scalar).compile().memory_analysis().temp_size_in_bytes


def test_ppermute_memory_flat_in_devices_unlike_all_gather():
    """The ring losses (forward and backward) hold O(b x b) per device, whatever N."""
    rows, dim = 256, 32
    usage = {}
    for impl in ("ppermute", "ppermute_bidir", "all_gather"):
        for devices in (2, 4, 8):
            mesh = make_mesh(MESHES[devices])
            fn = lambda zi, zt, t, b: contrastive.siglip_loss(  # noqa: E731
                zi, zt, t, b, mesh=mesh, impl=impl)
            usage[impl, devices] = temp_bytes(fn, mesh, rows * devices, dim)
    assert usage["ppermute", 8] <= 1.1 * usage["ppermute", 2], usage
    assert usage["ppermute", 8] <= 0.3 * usage["all_gather", 8], usage
    # The two-way ring holds two chunks per direction in flight (texts and images in its
    # backward), more than the one-way ring, but its b x b blocks are scored one at a time (each
    # visit waits for the previous one's sums): N=8 1.03x N=4, 0.17x all_gather, 1.65x the
    # one-way ring (before the visits were chained: 1.13x, 0.49x, 4.9x).
    assert usage["ppermute_bidir", 8] <= 1.05 * usage["ppermute_bidir", 4], usage
    assert usage["ppermute_bidir", 8] <= 0.25 * usage["all_gather", 8], usage
    assert usage["ppermute_bidir", 8] <= 2 * usage["ppermute", 8], usage
    assert usage["all_gather", 8] > 2 * usage["all_gather", 2], usage


def test_hard_negative_loss_matches_per_pair_formulas_and_ignores_invalid():
    rng = np.random.default_rng(7)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    zimg, ztxt = unit(rng.normal(size=(4, 6))), unit(rng.normal(size=(4, 6)))
    zneg = unit(rng.normal(size=(4, 3, 6)))
    valid = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]], bool)
    t, b = 5.0, -2.0
    sig = sum(np.log1p(np.exp(t * zimg[i] @ zneg[i, k] + b))
              for i in range(4) for k in range(3) if valid[i, k]) / 4
    got = contrastive.hard_negative_loss(zimg, ztxt, zneg, valid, t, b)
    np.testing.assert_allclose(got, sig, rtol=1e-5)
    ce = []
    for i in range(4):
        logits = [t * zimg[i] @ ztxt[i]] + [t * zimg[i] @ zneg[i, k] for k in range(3)
                                            if valid[i, k]]
        ce.append(np.log(np.sum(np.exp(logits))) - logits[0])
    got = contrastive.hard_negative_loss(zimg, ztxt, zneg, valid, t)
    np.testing.assert_allclose(got, np.mean(ce), rtol=1e-5)
    assert ce[2] == 0  # no valid negative: nothing to push away
    grads = jax.grad(lambda z: contrastive.hard_negative_loss(zimg, ztxt, z, valid, t))(zneg)
    assert np.all(np.asarray(grads)[~valid] == 0) and np.all(np.isfinite(grads))
