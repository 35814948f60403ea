"""Data parallel, FSDP and tensor parallel are config changes: same losses, sharded state, and
activations sharded as the logical rules say."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.train.test_trainer import (TRANSFORMER_PRESETS, data_dir,  # noqa: F401  (fixture)
                                      tiny_config)
from vlmjax import sharding
from vlmjax.models import layers
from vlmjax.models.two_towers import TwoTowers
from vlmjax.train import trainer

MESHES = {"dp": ("mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"),
          "dp_fsdp": ("mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1"),
          "dp_fsdp_tp": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")}


def losses(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]


def per_device_bytes(tree):
    """Bytes of the tree's leaves that device 0 holds."""
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
               for shard in leaf.addressable_shards if shard.device == jax.devices()[0])


@pytest.mark.slow
def test_loss_trajectory_is_the_same_on_every_mesh(data_dir, tmp_path):  # noqa: F811
    results, trajectories = {}, {}
    for name, mesh in MESHES.items():
        config = tiny_config(data_dir, *mesh, "total_steps=10", "log_every=1",
                             "checkpoint.every=1000", "evals={}", "model.dtype='float32'",
                             presets=TRANSFORMER_PRESETS)
        results[name] = trainer.train(config, str(tmp_path / name))
        trajectories[name] = losses(tmp_path / name)
    reference = trajectories["dp"]
    assert len(reference) == 10 and reference[-1] < reference[0]
    for name, trajectory in trajectories.items():
        np.testing.assert_allclose(trajectory, reference, rtol=1e-5, err_msg=name)
        print(f"MESH {name}: max relative loss difference to data=8 over 10 steps "
              f"{np.max(np.abs(np.subtract(trajectory, reference)) / np.abs(reference)):.1e}")

    state = {name: result.state for name, result in results.items()}
    fc1 = lambda s: s.params["text_tower"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]  # noqa
    query = lambda s: s.params["image_tower"]["encoder"]["block0"]["attn"]["query"]["kernel"]  # noqa
    assert fc1(state["dp"]).sharding.is_fully_replicated
    assert fc1(state["dp_fsdp"]).sharding.spec[0] == "fsdp"
    assert tuple(fc1(state["dp_fsdp_tp"]).sharding.spec) == ("fsdp", "tensor")
    assert tuple(query(state["dp_fsdp_tp"]).sharding.spec)[:2] == ("fsdp", "tensor")  # heads
    # FSDP shards the parameters and the Adam moments: each device holds a fraction of them.
    for part in ("params", "opt_state"):
        full = per_device_bytes(getattr(state["dp"], part))
        fsdp = per_device_bytes(getattr(state["dp_fsdp"], part))
        assert fsdp < 0.4 * full, (part, fsdp, full)


# ------------------------------------------------------------------ activation shardings (fast)
TINY_VIT = dict(patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64, pool="gap")
TINY_TEXT = dict(vocab_size=64, max_len=8, width=32, depth=2, num_heads=4, mlp_dim=64)
BATCH = P(("data", "fsdp"))[0]  # the spec entry of a dim split over BATCH_AXES


def compiled_activation_shardings(mesh, rules):
    """{what: PartitionSpec} of activations inside a TwoTowers forward pass on `mesh`, as XLA's
    partitioner placed them (jax.debug.inspect_array_sharding on the compiled program)."""
    model = TwoTowers(image=TINY_VIT, text=TINY_TEXT, embed_dim=16)
    images, tokens = jnp.zeros((8, 16, 16, 3)), jnp.zeros((8, 8), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), images, tokens)["params"])
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(boxed), sharding.param_shardings(boxed, mesh, rules))
    seen = {}

    def record(what, x):
        jax.debug.inspect_array_sharding(x, callback=lambda s: seen.setdefault(what, s.spec))

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module, path = context.module, "/".join(context.module.path)
        if context.method_name != "__call__":
            return out
        if isinstance(module, layers.EncoderBlock):
            record(f"{path}: residual", out)
        elif module.name in ("query", "key", "value") and "encoder" in path:
            record(f"{path}: heads", out)
        elif module.name == "fc1" and "encoder" in path:
            record(f"{path}: mlp hidden", out)
        elif module.name in ("image_proj", "text_proj"):
            record(f"{path}: embedding", out)
        return out

    def forward(params, images, tokens):
        with nn.intercept_methods(interceptor):
            return model.apply({"params": params}, images, tokens)

    batch = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        jax.jit(forward).lower(params, jax.ShapeDtypeStruct(images.shape, images.dtype,
                                                            sharding=batch),
                               jax.ShapeDtypeStruct(tokens.shape, tokens.dtype,
                                                    sharding=batch)).compile()
    return seen, params


def normalised(spec):
    """PartitionSpec -> tuple without trailing Nones (XLA reports them either way)."""
    dims = list(spec)
    while dims and dims[-1] is None:
        dims.pop()
    return tuple(dims)


@pytest.mark.parametrize("override,embed_axis", [({}, None), ({"act_embed": "tensor"}, "tensor")])
def test_fsdp_tensor_mesh_shards_activations_as_the_rules_say(override, embed_axis):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    seen, params = compiled_activation_shardings(mesh, sharding.logical_rules(override))
    kinds = {what.split(": ")[1] for what in seen}
    assert kinds == {"residual", "heads", "mlp hidden", "embedding"}, sorted(seen)
    # The batch is split over data x fsdp everywhere, although `embed` puts every weight's model
    # dimension on fsdp: parameter and activation axes are separate names.
    expected = {"residual": normalised((BATCH, None, embed_axis)),
                "heads": (BATCH, None, "tensor"), "mlp hidden": (BATCH, None, "tensor"),
                "embedding": normalised((BATCH, embed_axis))}
    for what, spec in seen.items():
        assert normalised(spec) == expected[what.split(": ")[1]], (what, spec)
    fc1 = params["text_tower"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]
    assert tuple(fc1.sharding.spec) == ("fsdp", "tensor")  # weights: embed on fsdp, mlp on tensor


def test_activation_spec_names_conflicts_and_replicates_indivisible_dims():
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    rules = sharding.logical_rules()
    assert sharding.activation_spec(("act_batch", "act_length", "act_heads", None),
                                    (8, 5, 4, 3), rules, sizes) == P(BATCH, None, "tensor", None)
    # 6 rows over 4 batch shards: replicated; 3 heads over tensor=2: replicated.
    assert sharding.activation_spec(("act_batch", "act_heads"), (6, 3), rules, sizes) == P(None,
                                                                                          None)
    assert sharding.activation_spec(("act_batch",), (8,), rules, {"data": 8}) == P("data")
    with pytest.raises(ValueError, match="'act_batch' and 'act_embed' both onto mesh axis 'fsdp'"):
        sharding.activation_spec(("act_batch", "act_embed"), (8, 4),
                                 sharding.logical_rules({"act_embed": "fsdp"}), sizes)
    with pytest.raises(ValueError, match="activation axis 'batch' has no sharding rule"):
        sharding.activation_spec(("batch",), (8,), rules, sizes)
    with pytest.raises(ValueError, match="unknown logical axis 'kv'.*activations "
                                         r"\['act_batch'"):
        sharding.logical_rules({"kv": None})  # the old name of head_dim
    with pytest.raises(ValueError, match=r"act_batch: \('data', 'dp'\) names mesh axes \['dp'\]"):
        sharding.logical_rules({"act_batch": ["data", "dp"]})
    assert dict(sharding.logical_rules({"embed": None, "act_length": ["tensor"]}))["act_length"] \
        == ("tensor",)


def test_trainer_traces_the_step_under_the_configured_activation_rules(tmp_path, monkeypatch):
    from tests.train.test_config_checks import quick_config
    seen_rules = []
    original = sharding.activation_spec

    def recording_spec(logical_axes, shape, rules, mesh_sizes):
        seen_rules.append(dict(rules))
        return original(logical_axes, shape, rules, mesh_sizes)

    monkeypatch.setattr(sharding, "activation_spec", recording_spec)
    config = quick_config(str(tmp_path / "tfds"), "mesh.data=4", "mesh.tensor=2")
    with config.unlocked():
        config.sharding_rules = {"act_embed": "tensor"}
    trainer.train(config, str(tmp_path / "workdir"))
    assert seen_rules, "the step constrained no activation"
    assert all(rules["act_embed"] == "tensor" for rules in seen_rules)
