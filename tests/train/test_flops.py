"""Analytic FLOP counts agree with XLA's own count of the compiled forward pass (and, for the
convolutional towers, exactly with the multiply-adds of the traced program)."""
import math

import jax
import jax.numpy as jnp
import pytest

from vlmjax.config import load_config
from vlmjax.models.two_towers import TwoTowers
from vlmjax.train import flops, hlo_flops

IMAGE = dict(patch_size=8, width=128, depth=2, num_heads=4, mlp_dim=512, pool="map")
TEXT = dict(vocab_size=64, max_len=16, width=128, depth=2, num_heads=4, mlp_dim=512)


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


CNN = dict(channels=(32, 64, 128))


@pytest.mark.parametrize("arch,image", [("vit", dict(IMAGE, stem="patch")),
                                        ("vit", dict(IMAGE, stem="conv")), ("cnn", CNN)])
def test_two_towers_forward_flops_match_xla(arch, image):
    model_cfg = dict(image=image, image_arch=arch, text=TEXT, embed_dim=128,
                     image_projection=False, bias_init=-10.0)
    model = TwoTowers(**model_cfg)
    batch = 4
    images, tokens = jnp.zeros((batch, 64, 64, 3)), jnp.zeros((batch, 16), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), images, tokens)

    def forward(p, x, t):
        zimg, ztxt, _ = model.apply(p, x, t)
        return zimg @ ztxt.T  # the logits the loss counts

    counted = flops.two_towers_train_flops_per_example(model_cfg, 64, 16, batch) / 3 * batch
    # XLA also counts norms, softmax and activations (a few percent at this width) and skips
    # the multiplies with a 3x3 convolution's zero border (3% for the small CNN maps).
    assert 0.96 <= xla_flops(forward, params, images, tokens) / counted < 1.12


def test_conv_stem_flops_match_xla():
    from vlmjax.models.vit import ConvStem
    stem = ConvStem(8, 128)
    images = jnp.zeros((1, 64, 64, 3))
    params = jax.jit(stem.init)(jax.random.key(0), images)
    # XLA leaves out the multiplies with the padding border: within 2%.
    assert xla_flops(stem.apply, params, images) == pytest.approx(
        flops.conv_stem_flops(64, 8, 128), rel=0.02)


def test_device_peak_flops_table():
    assert flops.device_peak_flops() is None  # CPU: measured, not looked up

    class Fake:
        platform, device_kind = "gpu", "NVIDIA H100 PCIe"
    assert flops.device_peak_flops(Fake()) == 756e12
    Fake.device_kind = "NVIDIA H100 80GB HBM3"
    assert flops.device_peak_flops(Fake()) == 989e12
    Fake.device_kind = "TPU v5 lite"
    assert flops.device_peak_flops(Fake()) == 197e12


def negatives_flops_ratio(model_cfg, size, length, count, batch=4):
    """(XLA's FLOPs / the analytic count) of a forward pass that scores `count` hard-negative
    captions per image, and the analytic counts with and without the negatives."""
    model = TwoTowers(**model_cfg)
    images, tokens = jnp.zeros((batch, size, size, 3)), jnp.zeros((batch, length), jnp.int32)
    negatives = jnp.zeros((batch * count, length), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), images, tokens)

    def forward(p, x, t, n):
        zimg, ztxt, _ = model.apply(p, x, t)
        zneg = model.apply(p, n.reshape(batch, count, -1), method=model.encode_text)
        return zimg @ ztxt.T, jnp.einsum("bd,bkd->bk", zimg, zneg)

    counted, plain = (flops.two_towers_train_flops_per_example(
        model_cfg, size, length, batch, hard_negatives=k) / 3 * batch for k in (count, 0))
    return xla_flops(forward, params, images, tokens, negatives) / counted, counted, plain


def test_hard_negative_captions_are_counted():
    model_cfg = dict(image=dict(IMAGE, stem="patch"), text=TEXT, embed_dim=128, bias_init=-10.0)
    ratio, counted, plain = negatives_flops_ratio(model_cfg, 64, 16, count=3)
    assert counted > 1.5 * plain  # 3 more captions per image cost about as much as the image
    assert 0.98 <= ratio < 1.12


def test_tiny_config_model_flops_match_xla():
    """The demo's recipe as shipped: CNN image tower, a depth-0 text tower pooled by a MAP head,
    7 hard-negative captions per image."""
    config = load_config("configs/siglip/tiny.py")
    model_cfg = config.model.to_dict()
    assert model_cfg["text"]["depth"] == 0 and model_cfg["image_arch"] == "cnn"
    ratio, _, _ = negatives_flops_ratio(model_cfg, config.input.image_size,
                                        config.input.max_text_len,
                                        count=config.input.hard_negatives.count)
    # XLA skips the 3x3 taps on the zero border: 4% / 8% / 16% of the 32 / 16 / 8 px maps.
    assert 0.92 <= ratio < 1.05


def test_peak_table_by_device_kind_and_dtype():
    class Fake:
        platform, device_kind = "gpu", "NVIDIA H200"
    assert flops.device_peak_flops(Fake(), "bfloat16") == 989e12
    assert flops.device_peak_flops(Fake(), "float32") == 494.7e12  # TF32 tensor cores
    Fake.platform, Fake.device_kind = "tpu", "TPU v4"
    assert flops.device_peak_flops(Fake(), "float32") is None  # no data-sheet figure: measure
    Fake.device_kind = "Unknown accelerator"
    assert flops.device_peak_flops(Fake(), "bfloat16") is None


def test_trainer_flops_from_xla_match_the_analytic_count():
    """The trainer's FLOPs per example (XLA's cost analysis of the compiled, sharded train step,
    plus the matmuls of the accumulation loop's second trip, which XLA counts once) against 3x
    the analytic forward."""
    accum_steps = 2
    import optax
    from vlmjax import sharding
    from vlmjax.losses import contrastive
    from vlmjax.train import step as step_lib
    from vlmjax.train.tasks.base import TaskDefaults
    model_cfg = dict(image=dict(IMAGE, stem="patch"), text=TEXT, embed_dim=128, bias_init=-10.0)
    model, batch_size = TwoTowers(**model_cfg), 16
    mesh = sharding.make_mesh({"data": -1})

    def loss_fn(p, extra, b, rng):
        zimg, ztxt, out = model.apply({"params": p}, b["image"], b["text"])
        return contrastive.siglip_loss(zimg, ztxt, out["temperature"], out["bias"], mesh=mesh,
                                       impl="dense"), {}

    images, tokens = jnp.zeros((batch_size, 64, 64, 3)), jnp.zeros((batch_size, 16), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), images[:1], tokens[:1])["params"]
    tx = optax.adam(1e-3)
    state = step_lib.init_state(params, tx, jax.random.PRNGKey(0))
    batch = jax.device_put({"image": images, "text": tokens}, sharding.batch_sharding(mesh))
    step = jax.jit(step_lib.make_train_step(loss_fn, tx, optax.constant_schedule(1e-3),
                                            accum_steps=accum_steps, mesh=mesh))
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    counted = TaskDefaults().flops_per_example(compiled, batch_size)
    analytic = flops.two_towers_train_flops_per_example(model_cfg, 64, 16,
                                                        batch_size // accum_steps)
    print(f"\naccum {accum_steps}: XLA {counted:.4g} FLOPs/example, analytic {analytic:.4g}, "
          f"ratio {counted / analytic:.3f}")
    assert 0.95 <= counted / analytic < 1.15  # measured 1.06 (the update, norms, softmax)



def matmul_flops(jaxpr) -> int:
    """2 x the multiply-adds of every convolution and dot in a jaxpr (nested ones included):
    exactly what the analytic counts count, so they must agree to the FLOP."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":  # kernel HWIO, I per group
            kernel = eqn.invars[1].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel[:-1])
        elif eqn.primitive.name == "dot_general":
            (contracted, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                lhs[i] for i in contracted)
        # A scan's body runs `length` times (scan_layers).
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for param in eqn.params.values():  # pjit, remat, custom_vjp, scan bodies
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                total += times * matmul_flops(inner)
    return total


def counted_by_jaxpr(fn, *args) -> int:
    return matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


# ResNet: two blocks in stage 0 (an identity shortcut), one strided block in each later stage.
RESNET = dict(layers=(2, 1, 1, 1), width=16, num_heads=4, output_dim=48, norm="groupnorm",
              norm_groups=4)
EFFICIENTNET = dict(width_coefficient=0.5, depth_coefficient=1.0, kernel_sizes=[3, 3, 5],
                    in_channels=[32, 16, 24], out_channels=[16, 24, 40], strides=[1, 2, 2],
                    num_block_repeats=[1, 2, 1], expand_ratios=[1, 6, 6])


@pytest.mark.parametrize("arch,image,size,low,high", [
    ("resnet", RESNET, 64, 0.9, 1.05), ("resnet", RESNET, 96, 0.9, 1.05),
    # EfficientNet is elementwise-heavy (BatchNorm, swish and the SE gate on 6x expanded maps,
    # cheap depthwise convolutions): XLA counts 17% more than the multiply-adds (measured).
    ("efficientnet", EFFICIENTNET, 64, 1.05, 1.25),
    ("efficientnet", dict(EFFICIENTNET, depthwise_padding=[1]), 96, 1.05, 1.25)])
def test_conv_image_tower_flops_match_xla(arch, image, size, low, high):
    from vlmjax.models.two_towers import IMAGE_TOWERS
    cfg = dict(image, image_size=size) if arch == "resnet" else image
    tower = IMAGE_TOWERS[arch](**cfg)
    images = jnp.zeros((2, size, size, 3))
    params = jax.jit(tower.init)(jax.random.key(0), images)
    counted = 2 * flops.image_tower_flops({"image": cfg, "image_arch": arch}, size)
    assert counted_by_jaxpr(tower.apply, params, images) == counted  # every conv and dot
    # XLA adds norms, pools and activations and skips the multiplies with the zero border of
    # the 3x3 / 5x5 convolutions (large on the small maps of the last stages).
    assert low <= xla_flops(tower.apply, params, images) / counted < high


def test_rn50_forward_flops():
    """CLIP RN50 at 224 px (configs/clip/rn50.py): 5.8 GMACs, of which 0.4 are the attention
    pool's keys and values (7x7 + 1 tokens at width 2048)."""
    from vlmjax.config import load_config
    model = load_config("configs/clip/rn50.py").model.to_dict()
    assert flops.image_tower_flops(model, 224) == pytest.approx(11.586e9, rel=1e-3)
    assert flops.image_tower_width(model) == 1024



def test_cbow_text_flops_are_its_projection_only():
    """A bag of words costs a gather and a mean: XLA counts the projection and the masked mean,
    no encoder."""
    from vlmjax.models.cbow import CBOW
    width, length, batch = 64, 16, 4
    tower = CBOW(vocab_size=100, max_len=length, width=width, projection=True)
    tokens, mask = jnp.zeros((batch, length), jnp.int32), jnp.ones((batch, length), bool)
    params = jax.jit(tower.init)(jax.random.key(0), tokens, mask)
    model = {"text": dict(vocab_size=100, max_len=length, width=width, projection=True),
             "text_arch": "cbow"}
    counted = batch * flops.text_tower_flops(model, length)
    assert counted == batch * 2 * width * width
    assert counted_by_jaxpr(tower.apply, params, tokens, mask) == counted
    measured = xla_flops(tower.apply, params, tokens, mask)
    assert counted <= measured <= counted + batch * 4 * length * width  # + the masked mean
    no_projection = dict(model, text=dict(model["text"], projection=False))
    assert flops.text_tower_flops(no_projection, length) == 0.0


@pytest.mark.parametrize("scan", [False, True])
def test_bert_text_flops_match_xla(scan):
    from vlmjax.models.bert import BertTextTower
    cfg = dict(vocab_size=100, max_len=16, width=128, depth=2, num_heads=4, mlp_dim=512)
    tower = BertTextTower(**cfg, scan_layers=scan)
    tokens = jnp.zeros((4, 16), jnp.int32)
    params = jax.jit(tower.init)(jax.random.key(0), tokens)
    counted = 4 * flops.text_tower_flops({"text": cfg, "text_arch": "bert"}, 16)
    assert counted_by_jaxpr(tower.apply, params, tokens) == counted
    # XLA counts a loop body once: scanned layers are undercounted by the depth, and
    # hlo_flops adds the matmuls of the other trips back (the elementwise work of the other
    # trips stays out: a few percent here).
    compiled = jax.jit(tower.apply).lower(params, tokens).compile()
    xla = xla_flops(tower.apply, params, tokens)
    if scan:
        assert xla * cfg["depth"] / counted < 1.12 and xla / counted < 0.6
    total = xla + hlo_flops.loop_dot_flops_missed(compiled.as_text())
    assert 0.98 <= total / counted < 1.12


def test_resnet_cbow_two_towers_train_flops_match_xla():
    """The whole model as configs/clip/cbow_tiny.py pairs them, ResNet image tower: the image
    tower dominates, and the analytic per-example count agrees with XLA's."""
    model_cfg = dict(image=dict(RESNET, image_size=64), image_arch="resnet",
                     text=dict(vocab_size=100, max_len=16, width=64), text_arch="cbow",
                     embed_dim=48, image_projection=False)
    model = TwoTowers(**model_cfg)
    batch = 4
    images, tokens = jnp.zeros((batch, 64, 64, 3)), jnp.zeros((batch, 16), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), images, tokens)

    def forward(p, x, t):
        zimg, ztxt, _ = model.apply(p, x, t)
        return zimg @ ztxt.T

    counted = flops.two_towers_train_flops_per_example(model_cfg, 64, 16, batch) / 3 * batch
    assert 0.9 <= xla_flops(forward, params, images, tokens) / counted < 1.1
