"""config.model_init from several sources: one per sub-model, optional prefixes, named errors."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from tests.convert.test_finetune_recipe import data_dir, finetune_config  # noqa: F401 (fixture)
from tests.convert.test_pretrained import assert_same_params
from vlmjax import sharding
from vlmjax.config import ConfigError
from vlmjax.convert import load_pretrained
from vlmjax.convert.model_init import InitEntry, assemble_params, parse_model_init

SUB_MODELS = {"vision": ("vision_tower", "projector"), "llm": ("llm",)}


def tree(seed, **shapes):
    """{'a/b': shape} -> nested dict of distinct float32 arrays."""
    rng, out = np.random.default_rng(seed), {}
    for path, shape in shapes.items():
        node = out
        *parents, leaf = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = rng.normal(size=shape).astype(np.float32)
    return out


OURS = dict(vision_tower__w=(4, 3), projector__w=(3, 2), llm__embed=(5, 2), scale=())


def test_parse_accepts_one_source_or_one_per_sub_model_and_names_what_is_valid():
    assert parse_model_init("", SUB_MODELS) == [] and parse_model_init(None, SUB_MODELS) == []
    assert parse_model_init("/a", SUB_MODELS) == [InitEntry(None, "/a", None)]
    assert parse_model_init({"source": "/a", "prefix": "model/"}, SUB_MODELS) == [
        InitEntry(None, "/a", "model")]
    assert parse_model_init({"vision": {"source": "/c", "prefix": "image_tower"}, "llm": "/l"},
                            SUB_MODELS) == [InitEntry("vision", "/c", "image_tower"),
                                            InitEntry("llm", "/l", None)]
    with pytest.raises(ConfigError, match=r"unknown sub-model\(s\) \['image'\]; this task's "
                                          r"sub-models: \['llm', 'vision'\]"):
        parse_model_init({"image": "/a"}, SUB_MODELS)
    with pytest.raises(ConfigError, match=r"model_init.llm: unknown key\(s\) \['path'\]"):
        parse_model_init({"llm": {"path": "/a"}}, SUB_MODELS)
    with pytest.raises(ConfigError, match="model_init.llm needs a non-empty 'source'"):
        parse_model_init({"llm": {"prefix": "x"}}, SUB_MODELS)


def test_sub_models_come_from_their_sources_and_the_rest_keeps_the_random_init():
    random = tree(0, **OURS)
    clip = tree(1, image_tower__w=(4, 3), image_proj__w=(3, 9))      # another model's layout
    lm = tree(2, llm__embed=(5, 2), lm_head__w=(2, 5))
    sources, loads = {"/clip": clip, "/lm": lm}, []
    entries = parse_model_init({"vision": {"source": "/clip", "prefix": "image_tower"},
                                "llm": "/lm"}, SUB_MODELS)

    def load(src):
        loads.append(src)
        return sources[src]

    params = assemble_params(entries, SUB_MODELS, random, load, lambda: random)
    np.testing.assert_array_equal(params["vision_tower"]["w"], clip["image_tower"]["w"])
    np.testing.assert_array_equal(params["llm"]["embed"], lm["llm"]["embed"])
    # The projector (not under the prefix) and the parameters of no sub-model stay random.
    np.testing.assert_array_equal(params["projector"]["w"], random["projector"]["w"])
    np.testing.assert_array_equal(params["scale"], random["scale"])
    assert loads == ["/clip", "/lm"] and "lm_head" not in params

    # Two sub-models of one source: it is loaded once.
    both = tree(3, **OURS)
    loads.clear()
    sources["/both"] = both
    params = assemble_params(parse_model_init({"vision": "/both", "llm": "/both"}, SUB_MODELS),
                             SUB_MODELS, random, load, lambda: random)
    assert loads == ["/both"]
    assert_same_params({k: params[k] for k in ("vision_tower", "projector", "llm")},
                       {k: both[k] for k in ("vision_tower", "projector", "llm")})
    np.testing.assert_array_equal(params["scale"], random["scale"])


def test_errors_name_the_sub_model_and_each_mismatching_parameter_with_both_shapes():
    random = tree(0, **OURS)
    wide = tree(1, vision_tower__w=(4, 7), projector__w=(3, 2))
    with pytest.raises(ConfigError) as error:
        assemble_params(parse_model_init({"vision": "/wide"}, SUB_MODELS), SUB_MODELS, random,
                        lambda _: wide, lambda: random)
    assert "model_init.vision: /wide does not fit config.model at 1 parameter(s)" in str(
        error.value)
    assert "vision_tower/w: model (4, 3), pretrained (4, 7)" in str(error.value)
    with pytest.raises(ConfigError, match=r"model_init.llm: /wide has no parameters under "
                                          r"'llm'; its top-level subtrees: \['projector', "
                                          r"'vision_tower'\]"):
        assemble_params(parse_model_init({"llm": "/wide"}, SUB_MODELS), SUB_MODELS, random,
                        lambda _: wide, lambda: random)
    nested = {"model": tree(4, **OURS), "head": {"w": np.zeros(3)}}  # the model under a prefix
    params = assemble_params(parse_model_init({"source": "/n", "prefix": "model"}, SUB_MODELS),
                             SUB_MODELS, random, lambda _: nested, lambda: random)
    assert_same_params(params, nested["model"])
    with pytest.raises(ConfigError, match="missing llm/embed"):  # whole model: every parameter
        assemble_params(parse_model_init("/wide", SUB_MODELS), SUB_MODELS, random,
                        lambda _: wide, lambda: random)


@pytest.fixture(scope="module")
def task_and_abstract(siglip_hf):
    from vlmjax.train.tasks.contrastive import ContrastiveTask

    def make(*overrides):
        config = finetune_config(siglip_hf[0], None, *overrides)
        mesh = sharding.make_mesh(config.mesh)
        task = ContrastiveTask(config, mesh)
        boxed = jax.eval_shape(task.init_params, jax.random.key(0))
        return task, nn.meta.unbox(boxed), sharding.param_shardings(boxed, mesh,
                                                                    sharding.logical_rules())
    return make


def test_contrastive_image_tower_from_hf_text_tower_random(task_and_abstract, siglip_hf):
    task, abstract, shardings = task_and_abstract()
    params = task.pretrained_params({"image": siglip_hf[0]}, abstract, shardings)
    _, pretrained, _ = load_pretrained(siglip_hf[0], image_size=(task.image_size,) * 2)
    seed_rng = jax.random.split(jax.random.PRNGKey(int(task.config.get("seed", 0))))[0]
    random = nn.meta.unbox(jax.jit(task.init_params)(seed_rng))  # as the trainer inits
    assert_same_params(params["image_tower"], pretrained["image_tower"])
    assert_same_params(params["text_tower"], random["text_tower"])
    assert_same_params(params["text_proj"], random["text_proj"])
    # t and b belong to no tower: the config's init, not the pretrained model's values.
    np.testing.assert_array_equal(params["log_temperature"], random["log_temperature"])
    assert not np.allclose(params["log_temperature"], pretrained["log_temperature"])
    leaf = params["image_tower"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]
    path_sharding = shardings["image_tower"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]
    assert leaf.sharding == path_sharding


def test_contrastive_sub_model_architecture_mismatch_names_the_sub_model(task_and_abstract,
                                                                         siglip_hf):
    # The text tower differs in activation (same shapes): only the text entry is refused.
    task, abstract, shardings = task_and_abstract("model.text.activation='gelu'")
    task.pretrained_params({"image": siglip_hf[0]}, abstract, shardings)
    with pytest.raises(ConfigError, match=r"architecture of model_init.text .*"
                                          r"model.text.activation: config 'gelu'"):
        task.pretrained_params({"text": siglip_hf[0]}, abstract, shardings)


@pytest.mark.slow
def test_lit_trains_a_random_text_tower_against_a_frozen_pretrained_image_tower(siglip_hf,
                                                                                data_dir,
                                                                                tmp_path):
    """LiT through the trainer: model_init={"image": SRC} and optim.freeze='^image_tower/'."""
    from vlmjax.train import trainer
    from vlmjax.train.checkpoint import restore_params
    from vlmjax.train.tasks.contrastive import ContrastiveTask

    src = siglip_hf[0]
    config = finetune_config(src, data_dir, f'model_init={{"image": "{src}"}}',
                             "optim.lr=1e-3", "evals={}")
    with config.unlocked():
        config.optim.freeze = "^image_tower/"
    result = trainer.train(config, str(tmp_path / "lit"))
    _, pretrained, _ = load_pretrained(src, image_size=(config.input.image_size,) * 2)
    task = ContrastiveTask(config, sharding.make_mesh(config.mesh))
    seed_rng = jax.random.split(jax.random.PRNGKey(int(config.get("seed", 0))))[0]
    random = nn.meta.unbox(jax.jit(task.init_params)(seed_rng))
    trained = jax.device_get(result.state.params)
    assert_same_params(trained["image_tower"], pretrained["image_tower"])  # loaded, frozen
    # Step 1 runs at lr 0 (warmup): checkpoint 1 holds the init, the text tower's random one.
    step1 = restore_params(str(tmp_path / "lit"), jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), random), step=1)
    assert_same_params(step1["text_tower"], random["text_tower"])
    assert not np.array_equal(trained["text_tower"]["token_embed"]["embedding"],
                              random["text_tower"]["token_embed"]["embedding"])  # it trained
