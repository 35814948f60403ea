"""BLIP's ITM hard negatives and ITC with momentum distillation: every mesh against mesh=None, and
the losses against numpy implementations of the papers' formulas."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vlmjax.losses import contrastive, matching

B, D, N = 16, 8, 3  # batch, feature dim, image tokens per example
MESHES = {1: (1, 1), 2: (2, 1), 4: (2, 2), 8: (2, 4)}
RTOL = 1e-5


def make_mesh(shape, names=("data", "fsdp")):
    n = int(np.prod(shape))
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                         devices=jax.devices()[:n])


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def features(seed, batch=B, dim=D):
    rng = np.random.default_rng(seed)
    return unit(rng.normal(size=(batch, dim))), unit(rng.normal(size=(batch, dim)))


# Rows 0-3 show one image, 4-5 another, ...: duplicates that must never be negatives.
IDS = np.array([0, 0, 0, 0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 9], np.int32)


def assert_close(actual, expected, rtol=RTOL):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        scale = max(np.abs(e).max(), 0.1) if e.ndim == 0 else np.abs(e).max()
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale)


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max() - np.log(np.sum(np.exp(x - x.max())))


# ------------------------------------------------------------------------- sharded == single device
def itm_head(image_embeds, text, w):
    """A stand-in differentiable ITM head: [B, N, D] x [B, D] -> logits [B, 2]."""
    return (jnp.mean(image_embeds, axis=1) * text) @ w


def itm_pipeline(image_embeds, text, w, zimg, ztxt, rng, *, mesh):
    neg_text, neg_image, valid_text, valid_image = matching.hard_negative_indices(
        rng, zimg, ztxt, IDS, 0.2, mesh=mesh)
    text_neg = matching.gather_rows(text, neg_text, mesh=mesh)
    image_neg = matching.gather_rows(image_embeds, neg_image, mesh=mesh)
    logits_pos = itm_head(image_embeds, text, w)
    logits_neg = jnp.concatenate([itm_head(image_embeds, text_neg, w),
                                  itm_head(image_neg, text, w)])
    return matching.itm_loss(logits_pos, logits_neg, jnp.concatenate([valid_text, valid_image]))


# Jitted once at module level so the single-device references compile once for all meshes.
mine = jax.jit(matching.hard_negative_indices, static_argnames=("mesh",))
itm_loss_and_grads = jax.jit(jax.value_and_grad(itm_pipeline, argnums=(0, 1, 2), has_aux=True),
                             static_argnames=("mesh",))


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_mesh_mines_same_negatives_and_same_itm_loss_and_grads(devices):
    mesh = make_mesh(MESHES[devices])
    zimg, ztxt = features(devices)
    rng = jax.random.key(7)
    expected = mine(rng, zimg, ztxt, IDS, 0.1, mesh=None)
    actual = mine(rng, zimg, ztxt, IDS, 0.1, mesh=mesh)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, e)
        assert a.dtype == e.dtype and a.shape == (B,)
        assert a.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 1)
    assert expected[0].dtype == jnp.int32 and bool(np.all(expected[2]))

    data = np.random.default_rng(100 + devices)
    image_embeds = data.normal(size=(B, N, D)).astype(np.float32)
    text = data.normal(size=(B, D)).astype(np.float32)
    w = data.normal(size=(D, 2)).astype(np.float32)

    args = (image_embeds, text, w, zimg, ztxt, rng)
    (loss_e, acc_e), grads_e = itm_loss_and_grads(*args, mesh=None)
    (loss_a, acc_a), grads_a = itm_loss_and_grads(*args, mesh=mesh)
    assert_close((loss_a, grads_a), (loss_e, grads_e))
    assert acc_a == acc_e
    # The negatives' rows got gradient: the image rows chosen as negatives differ from plain ITM.
    assert np.abs(np.asarray(grads_e[0])).min(axis=(1, 2)).max() > 0


@pytest.mark.parametrize("devices", [2, 8])
def test_gather_rows_value_and_gradient_scatter_back_to_chosen_rows(devices):
    mesh = make_mesh(MESHES[devices])
    data = np.random.default_rng(devices)
    x = data.normal(size=(B, N, D)).astype(np.float32)
    index = data.integers(0, B, size=B).astype(np.int32)
    index[:3] = 5  # one row chosen several times: its gradient is the sum
    weights = data.normal(size=(B, N, D)).astype(np.float32)

    def fn(x, mesh):
        return jnp.sum(weights * matching.gather_rows(x, jnp.asarray(index), mesh=mesh) ** 2)

    value, grad = jax.jit(jax.value_and_grad(functools.partial(fn, mesh=mesh)))(x)
    expected_grad = np.zeros_like(x)
    np.add.at(expected_grad, index, 2 * weights * x[index])
    np.testing.assert_allclose(value, np.sum(weights * x[index] ** 2), rtol=RTOL)
    np.testing.assert_allclose(grad, expected_grad, rtol=RTOL, atol=1e-6)
    assert_close(jax.jit(jax.value_and_grad(functools.partial(fn, mesh=None)))(x), (value, grad))
    tokens = np.arange(B * 5, dtype=np.int32).reshape(B, 5)  # integer rows, e.g. token ids
    gathered = jax.jit(functools.partial(matching.gather_rows, mesh=mesh))(tokens, index)
    np.testing.assert_array_equal(gathered, tokens[index])


# ------------------------------------------------------------------------------ sampling semantics
def grouped_features(ids, dim=D, seed=0):
    """Rows of one image share identical image and text features: without the id mask, their
    own duplicates would be by far the most similar candidates."""
    protos = unit(np.random.default_rng(seed).normal(size=(ids.max() + 1, dim)))
    return protos[ids], protos[ids]


def test_no_negative_ever_shows_the_rows_image():
    zimg, ztxt = grouped_features(IDS)
    keys = jax.random.split(jax.random.key(0), 64)
    mine_many = jax.jit(jax.vmap(
        lambda k: matching.hard_negative_indices(k, zimg, ztxt, IDS, 0.02)))
    neg_text, neg_image, valid_text, valid_image = map(np.asarray, mine_many(keys))
    assert valid_text.all() and valid_image.all()
    assert np.all(IDS[neg_text] != IDS[None, :]) and np.all(IDS[neg_image] != IDS[None, :])
    assert len(np.unique(neg_text[:, 0])) > 1  # a draw, not a fixed choice
    mesh = make_mesh(MESHES[4])
    neg_text, neg_image, *_ = mine(keys[0], zimg, ztxt, IDS, 0.02, mesh=mesh)
    assert np.all(IDS[np.asarray(neg_text)] != IDS) and np.all(IDS[np.asarray(neg_image)] != IDS)


def test_draw_frequencies_follow_masked_softmax():
    zimg, ztxt = features(11)
    temperature, draws = 0.25, 4000
    keys = jax.random.split(jax.random.key(1), draws)
    out = jax.jit(jax.vmap(lambda k: matching.hard_negative_indices(
        k, zimg, ztxt, IDS, temperature)))(keys)
    # image -> text draws texts by image . text; text -> image draws images by text . image.
    for queries, candidates, index in ((zimg, ztxt, out[0]), (ztxt, zimg, out[1])):
        index = np.asarray(index)
        for row in (0, 4, 7):  # a row with 3 duplicates, with 1, with none
            logits = queries[row] @ candidates.T / temperature
            logits = np.where(IDS == IDS[row], -np.inf, logits)
            expected = np.exp(log_softmax(logits))
            observed = np.bincount(index[:, row], minlength=B) / draws
            assert np.all(observed[IDS == IDS[row]] == 0)
            np.testing.assert_allclose(observed, expected, atol=0.03)  # ~4 sigma at p = 0.5
    # The two directions are separate streams and separate similarities.
    assert not np.array_equal(np.asarray(out[0]), np.asarray(out[1]))


def test_peaked_similarity_picks_the_hardest_negative():
    zimg, ztxt = features(12)
    ztxt[7] = zimg[0]  # text 7 is as close to image 0 as any text can be; ids differ
    keys = jax.random.split(jax.random.key(2), 200)
    neg_text = jax.jit(jax.vmap(
        lambda k: matching.hard_negative_indices(k, zimg, ztxt, IDS, 0.01)[0]))(keys)
    assert np.mean(np.asarray(neg_text)[:, 0] == 7) > 0.99


@pytest.mark.parametrize("devices", [None, 4])
def test_rows_without_any_negative_are_flagged(devices):
    mesh = devices and make_mesh(MESHES[devices])
    zimg, ztxt = features(13)
    rng = jax.random.key(3)
    same = np.zeros(B, np.int32)
    neg_text, neg_image, valid_text, valid_image = map(np.asarray, mine(
        rng, zimg, ztxt, same, 0.1, mesh=mesh))
    assert not valid_text.any() and not valid_image.any()
    np.testing.assert_array_equal(neg_text, np.arange(B))  # in range: the row itself
    np.testing.assert_array_equal(neg_image, np.arange(B))
    # One row of another image: every row has a negative, and the 15 others must all take it.
    one_off = np.array([0] * (B - 1) + [1], np.int32)
    neg_text, neg_image, valid_text, valid_image = map(np.asarray, mine(
        rng, zimg, ztxt, one_off, 0.1, mesh=mesh))
    assert valid_text.all() and valid_image.all()
    assert np.all(neg_text[:-1] == B - 1) and np.all(neg_image[:-1] == B - 1)
    assert neg_text[-1] < B - 1 and neg_image[-1] < B - 1


# ------------------------------------------------------------------------------------------ ITM
def test_itm_loss_matches_numpy_and_ignores_invalid_pairs():
    data = np.random.default_rng(4)
    pos = data.normal(size=(5, 2)).astype(np.float32)
    neg = data.normal(size=(7, 2)).astype(np.float32)
    valid_neg = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    neg[1] = np.nan  # an invalid pair's logits may be anything, even NaN
    nll, correct = [], []
    for logits, label in [(p, 1) for p in pos] + [(n, 0) for n, v in zip(neg, valid_neg) if v]:
        nll.append(-log_softmax(logits)[label])
        correct.append(np.argmax(logits) == label)
    loss, accuracy = jax.jit(matching.itm_loss)(pos, neg, valid_neg)
    assert loss.dtype == jnp.float32 and accuracy.dtype == jnp.float32
    np.testing.assert_allclose(loss, np.mean(nll), rtol=1e-6)
    np.testing.assert_allclose(accuracy, np.mean(correct), rtol=1e-6)
    grad = jax.jit(jax.grad(lambda n: matching.itm_loss(pos, n, valid_neg)[0]))(neg)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~valid_neg] == 0)
    valid_pos = np.array([1, 1, 0, 1, 1], bool)
    loss, _ = jax.jit(matching.itm_loss)(pos, neg, valid_neg, valid_pos=valid_pos)
    np.testing.assert_allclose(loss, np.mean(np.delete(nll, 2)), rtol=1e-6)


# ------------------------------------------------------------- ITC with momentum distillation
def numpy_distill(img, txt, img_m, txt_m, ids, temp, alpha, image_queue, text_queue, id_queue):
    col_img = np.concatenate([img_m, image_queue]).astype(np.float64)
    col_txt = np.concatenate([txt_m, text_queue]).astype(np.float64)
    col_ids = np.concatenate([ids, id_queue])
    keep = col_ids != -1

    def direction(queries, queries_m, columns):
        total = 0.0
        for r in range(len(queries)):
            logp = log_softmax(queries[r] @ columns[keep].T / temp)
            soft = np.exp(log_softmax(queries_m[r] @ columns[keep].T / temp))
            hard = (col_ids[keep] == ids[r]).astype(np.float64)
            total -= np.sum(logp * (alpha * soft + (1 - alpha) * hard / hard.sum()))
        return total / len(queries)

    return (direction(img, img_m, col_txt) + direction(txt, txt_m, col_img)) / 2


def distill_inputs(seed, queue_size=12):
    data = np.random.default_rng(seed)
    img, txt = features(seed)
    img_m, txt_m = unit(img + 0.3 * data.normal(size=img.shape)), unit(
        txt + 0.3 * data.normal(size=txt.shape))
    image_queue, text_queue = features(seed + 1, batch=queue_size)
    id_queue = data.integers(0, 20, size=queue_size).astype(np.int32)
    id_queue[[1, 5, 6]] = -1  # empty slots
    id_queue[2] = IDS[7]  # an earlier view of a batch image: a positive column
    return (img, txt, img_m, txt_m, IDS, np.float32(0.07)), dict(
        image_queue=image_queue, text_queue=text_queue, id_queue=id_queue)


def test_distill_at_alpha_zero_without_queue_is_clip_loss():
    img, txt = features(20)
    distinct = np.arange(B, dtype=np.int32)
    expected = jax.jit(contrastive.clip_loss)(img, txt, 1 / 0.07)
    for mesh in (None, make_mesh(MESHES[4])):
        got = jax.jit(functools.partial(matching.itc_distill_loss, alpha=0.0, mesh=mesh))(
            img, txt, img, txt, distinct, 0.07)
        np.testing.assert_allclose(got, expected, rtol=RTOL)


def test_distill_matches_numpy_with_queue_duplicates_and_empty_slots():
    args, queue = distill_inputs(21)
    expected = numpy_distill(*args, 0.4, queue["image_queue"], queue["text_queue"],
                             queue["id_queue"])
    got = jax.jit(functools.partial(matching.itc_distill_loss, alpha=0.4))(*args, **queue)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # The empty slots are out of the softmax, whatever features they hold.
    queue["image_queue"][[1, 5, 6]] = queue["text_queue"][[1, 5, 6]] = args[0][0]
    np.testing.assert_allclose(jax.jit(functools.partial(matching.itc_distill_loss, alpha=0.4))(
        *args, **queue), expected, rtol=1e-5)


@pytest.mark.parametrize("devices", [2, 8])
def test_distill_sharded_equals_unsharded_value_and_grads(devices):
    mesh = make_mesh(MESHES[devices])
    args, queue = distill_inputs(22 + devices)

    def loss_and_grads(mesh):
        fn = functools.partial(matching.itc_distill_loss, alpha=0.4, mesh=mesh, **queue)
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3, 5)))(*args)

    value, grads = loss_and_grads(mesh)
    expected = loss_and_grads(None)
    assert_close((value, grads), expected)
    assert np.abs(np.asarray(grads[0])).max() > 0 and np.asarray(grads[4]) != 0
    # Momentum features are targets and columns of an EMA model: no gradient.
    assert not np.asarray(grads[2]).any() and not np.asarray(grads[3]).any()


def test_blip_step_under_explicit_mesh_keeps_batch_sharding_without_host_transfers():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Explicit,) * 3)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    args, queue = distill_inputs(40)
    img, txt, img_m, txt_m, ids, temp = args
    rng = jax.random.key(5)

    def step(img, txt, img_m, txt_m, ids, queue_feats, queue_ids, ptr):
        neg_text, neg_image, valid_text, valid_image = matching.hard_negative_indices(
            rng, img, txt, ids, temp, mesh=mesh)
        text_neg = matching.gather_rows(txt, neg_text, mesh=mesh)
        loss = matching.itc_distill_loss(img, txt, img_m, txt_m, ids, temp, mesh=mesh, **queue)
        return neg_text, text_neg, loss, matching.enqueue(queue_feats, queue_ids, ptr, txt_m, ids)

    inputs = jax.device_put((img, txt, img_m, txt_m, ids), batch_sharding)
    ring = jax.device_put((np.zeros((20, D), np.float32), np.full(20, -1, np.int32),
                           np.int32(10)), NamedSharding(mesh, P()))
    with jax.set_mesh(mesh), jax.transfer_guard("disallow"):
        neg_text, text_neg, loss, (queue_feats, queue_ids, ptr) = jax.jit(step)(*inputs, *ring)
    assert neg_text.sharding.is_equivalent_to(batch_sharding, 1)
    assert text_neg.sharding.is_equivalent_to(batch_sharding, 2)
    np.testing.assert_array_equal(neg_text, mine(rng, img, txt, ids, temp, mesh=None)[0])
    np.testing.assert_array_equal(text_neg, txt[np.asarray(neg_text)])
    np.testing.assert_allclose(loss, matching.itc_distill_loss(*args, **queue), rtol=RTOL)
    np.testing.assert_array_equal(np.asarray(queue_ids)[[10, 19, 0, 5]], ids[[0, 9, 10, 15]])
    assert int(ptr) == 6


# ------------------------------------------------------------------------------- queue and EMA
def test_enqueue_wraps_around_the_ring():
    size = 10
    feats0 = np.arange(size * 2, dtype=np.float32).reshape(size, 2)
    ids0 = np.full(size, -1, np.int32)
    batch_feats = -np.arange(1, 9, dtype=np.float32).reshape(4, 2)
    batch_ids = np.array([40, 41, 42, 43], np.int32)
    feats, ids, ptr = jax.jit(matching.enqueue)(feats0, ids0, jnp.int32(8), batch_feats,
                                                batch_ids)
    assert int(ptr) == 2
    np.testing.assert_array_equal(np.asarray(ids), [42, 43, -1, -1, -1, -1, -1, -1, 40, 41])
    np.testing.assert_array_equal(np.asarray(feats)[[8, 9, 0, 1]], batch_feats)
    np.testing.assert_array_equal(np.asarray(feats)[2:8], feats0[2:8])
    feats, ids, ptr = jax.jit(matching.enqueue)(feats, ids, ptr, batch_feats + 100,
                                                batch_ids + 10)
    assert int(ptr) == 6
    np.testing.assert_array_equal(np.asarray(ids)[2:6], batch_ids + 10)
    with pytest.raises(ValueError, match="larger than the queue"):
        matching.enqueue(feats0[:3], ids0[:3], 0, batch_feats, batch_ids)


def test_momentum_update_is_ema_of_every_leaf():
    params_m = {"a": jnp.ones((2, 3)), "b": {"c": jnp.full((4,), 2.0)}}
    params = {"a": jnp.zeros((2, 3)), "b": {"c": jnp.full((4,), 4.0)}}
    out = matching.momentum_update(params_m, params, momentum=0.9)
    np.testing.assert_allclose(out["a"], 0.9)
    np.testing.assert_allclose(out["b"]["c"], 0.9 * 2 + 0.1 * 4)


def test_bad_inputs_raise_clear_errors():
    img, txt = features(30, batch=6)
    ids = np.arange(6, dtype=np.int32)
    mesh = make_mesh(MESHES[4])
    with pytest.raises(ValueError, match="not divisible by the 4 batch shards"):
        matching.hard_negative_indices(jax.random.key(0), img, txt, ids, 0.1, mesh=mesh)
    with pytest.raises(ValueError, match=r"image_ids must be \[B\]"):
        matching.hard_negative_indices(jax.random.key(0), img, txt, ids[:5], 0.1)
    with pytest.raises(ValueError, match="all of image_queue"):
        matching.itc_distill_loss(img, txt, img, txt, ids, 0.1, image_queue=img)


# ------------------------------------------------------------- BLIP-2: query features [B, Q, D]
def numpy_query_itc(img, txt, ids, t):
    """BLIP-2's ITC from its formula: sim(i, j) = max_q img[i, q] . txt[j]; id-equality targets."""
    sim = np.einsum("iqd,jd->ijq", img.astype(np.float64), txt.astype(np.float64)).max(-1) / t
    target = (ids[:, None] == ids[None, :]).astype(np.float64)
    target /= target.sum(1, keepdims=True)
    i2t = -np.mean([np.sum(target[i] * log_softmax(sim[i])) for i in range(len(ids))])
    t2i = -np.mean([np.sum(target[j] * log_softmax(sim[:, j])) for j in range(len(ids))])
    return (i2t + t2i) / 2


@pytest.mark.parametrize("devices", [1, 4])
def test_query_itc_matches_numpy_and_mesh_and_one_query_is_plain_itc(devices):
    mesh = None if devices == 1 else make_mesh(MESHES[devices])
    rng = np.random.default_rng(40)
    img, txt = unit(rng.normal(size=(B, 4, D))), unit(rng.normal(size=(B, D)))
    loss = jax.jit(functools.partial(matching.itc_loss, mesh=mesh))
    np.testing.assert_allclose(loss(img, txt, IDS, 0.1), numpy_query_itc(img, txt, IDS, 0.1),
                               rtol=1e-5)
    # One query is BLIP's ITC on [B, D] features.
    np.testing.assert_allclose(loss(img[:, :1], txt, IDS, 0.1), loss(img[:, 0], txt, IDS, 0.1),
                               rtol=1e-6)
    grads = jax.jit(jax.grad(functools.partial(matching.itc_loss, mesh=mesh)))(img, txt, IDS,
                                                                               0.1)
    # Only each pair's best query gets a gradient (the max routes it).
    per_query = np.abs(np.asarray(grads)).sum(-1)
    assert (per_query > 0).sum() < per_query.size and (per_query > 0).any(axis=1).all()


def test_query_features_mine_negatives_by_max_over_queries():
    rng = np.random.default_rng(41)
    txt = unit(rng.normal(size=(B, D)))
    img = unit(rng.normal(size=(B, 3, D)))
    # Query 2 of image 0 is text 9's direction: at a tiny temperature text 9 is its negative.
    img[0, 2] = txt[9]
    ids = np.arange(B, dtype=np.int32)
    neg_text, neg_image, valid_text, _ = mine(jax.random.PRNGKey(0), img, txt, ids, 1e-3,
                                              mesh=None)
    assert int(neg_text[0]) == 9 and bool(valid_text[0])
    assert int(neg_image[9]) == 0
    sharded = mine(jax.random.PRNGKey(0), img, txt, ids, 1e-3, mesh=make_mesh(MESHES[8]))
    for a, e in zip(sharded, (neg_text, neg_image, valid_text)):
        np.testing.assert_array_equal(a, e)
