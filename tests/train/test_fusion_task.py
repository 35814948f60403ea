"""The `fusion` task through the real trainer: from a SigLIP workdir's image tower and an lm
workdir's LM it trains the resampler, the gated blocks and the added tokens alone (the frozen
parts bit-identical, no optimiser state for them); few-shot VQA prompts and the evaluator's
in-context draw; config mistakes are ConfigErrors naming the field."""
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from vlmjax import config as config_lib, sharding
from vlmjax.config import ConfigError
from vlmjax.data import export, interleaved, shapes
from vlmjax.evals import registry
from vlmjax.evals.interleaved import InterleavedAnswerer
from vlmjax.train import trainer
from vlmjax.train.tasks import get_task

from tests.train.test_llava_task import SIGLIP, adam_mu, assert_same, fake_workdir, moved, \
    random_params

RUNLOCAL_SIZES = dict(train_size=64, eval_size=16, novel_size=8)  # configs/fusion/tiny.py's


@pytest.fixture(scope="module")
def fusion_dirs(tmp_path_factory):
    """(vlm_shapes data_dir of the :runlocal build, its mmc4 export, part workdirs)."""
    data_dir = str(tmp_path_factory.getbasetemp() / "runlocal_tfds")  # shared with test_configs
    builder = shapes.prepare(shapes.make_builder("64px", data_dir, **RUNLOCAL_SIZES,
                                                 num_workers=0))
    out = str(tmp_path_factory.mktemp("mmc4_shapes"))
    export.export_mmc4(builder, out, "train")
    root = tmp_path_factory.mktemp("fusion_parts")
    siglip = config_lib.load_config(SIGLIP)
    config_lib.apply_overrides(siglip, [f"data.data_dir={data_dir}"])
    lm = config_lib.load_config("configs/lm/tiny.py:runlocal")
    config_lib.apply_overrides(lm, [f"data.data_dir={data_dir}"])
    parts = {"vision_params": random_params("contrastive", siglip),
             "llm_params": random_params("lm", lm)}
    parts["vision"] = fake_workdir(str(root / "siglip"), siglip, parts["vision_params"])
    parts["llm"] = fake_workdir(str(root / "lm"), lm, parts["llm_params"])
    return data_dir, out, parts


def fusion_config(fusion_dirs, **presets):
    data_dir, mmc4_dir, _ = fusion_dirs
    extra = "".join(f",{k}={v}" for k, v in presets.items())
    return config_lib.load_config(f"configs/fusion/tiny.py:runlocal,shapes_dir={data_dir},"
                                  f"mmc4_dir={mmc4_dir}{extra}")


@pytest.mark.slow
def test_fusion_trains_the_new_parts_alone_and_evaluates_few_shot(fusion_dirs, tmp_path):
    parts = fusion_dirs[2]
    config = fusion_config(fusion_dirs, vision_init=parts["vision"], llm_init=parts["llm"],
                           steps=3)
    result = trainer.train(config, str(tmp_path / "fusion"))
    params = result.state.params
    assert_same(params["vision"], parts["vision_params"]["image_tower"])
    lm_layers = {k: v for k, v in params["llm"]["layers"].items() if not k.startswith("xattn")}
    assert_same({**params["llm"], "layers": lm_layers}, parts["llm_params"])
    task = get_task("fusion")(config, sharding.make_mesh({"data": -1}))
    init = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)))(
        jax.random.split(jax.random.PRNGKey(config.seed))[0])
    for name in ("perceiver", "media_posemb", "additional_embed", "additional_head"):
        assert moved(init[name], params[name]), name
    assert moved(init["llm"]["layers"]["xattn0"], params["llm"]["layers"]["xattn0"])
    # The gates left 0: the images now change the LM's output.
    assert float(abs(params["llm"]["layers"]["xattn0"]["alpha_attn"])) > 0
    mu = adam_mu(result.state.opt_state)  # no optimiser state for the frozen parts
    assert jax.tree.leaves(mu["vision"]) == []
    frozen_lm = {k: v for k, v in mu["llm"].items() if k != "layers"}
    assert jax.tree.leaves(frozen_lm) == jax.tree.leaves(mu["llm"]["layers"]["block0"]) == []
    assert jax.tree.leaves(mu["llm"]["layers"]["xattn0"])
    assert np.isfinite(result.train_metrics["loss"]) and result.train_metrics["num_tokens"] > 0
    evals = result.metrics
    for k in (0, 2):  # the same questions of 4 test images with and without examples
        assert evals[f"vqa/test/{k}shot/questions"] == evals["vqa/test/0shot/questions"] > 4
        assert 0.0 <= evals[f"vqa/test/{k}shot/exact_match"] <= 1.0


class FakeTokenizer:
    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 50

    def encode_raw(self, texts):
        return [[10 + len(word) for word in text.split()] for text in texts]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def test_few_shot_prompt_is_interleaved_chunks_and_a_query():
    model = get_task("fusion")(fusion_config(("/d", "/m", None)),
                               sharding.make_mesh({"data": -1})).model
    answerer = InterleavedAnswerer(model, FakeTokenizer())
    image = np.zeros((4, 4, 3), np.float32)
    ids = answerer.prompt("what colour", [(image, "q a", "red"), (image, "q b", "two")])
    image_id, end_id = model.image_token_id, model.end_of_chunk_id
    # BOS, then <image> Q: q a A: red <eoc> <image> Q: q b A: two <eoc> <image> Q: what colour A:
    assert ids[0] == 1 and ids.count(image_id) == 3 and ids.count(end_id) == 2
    chunks = np.split(np.array(ids[1:]), np.flatnonzero(np.array(ids[1:]) == image_id)[1:])
    assert [int(c[0]) for c in chunks] == [image_id] * 3
    assert [int(c[-1]) for c in chunks[:2]] == [end_id] * 2
    query = FakeTokenizer().encode_raw([interleaved.vqa_text("what colour")])[0]
    assert list(chunks[2][1:]) == query and 2 not in ids  # no EOS: the answer follows
    assert answerer.eos_ids == [2, end_id]


class RecordingModel:
    """An answerer that records the in-context examples it is given."""
    supports_context = True

    def __init__(self):
        self.contexts = []

    def answer(self, params, images, questions, max_new_tokens=None, context=None):
        self.contexts += list(context)
        return ["x"] * len(questions)


def vqa_evaluator(fusion_dirs, model, shots):
    data_dir = fusion_dirs[0]
    entry = ml_collections.ConfigDict(dict(
        type="vqa", shots=shots, shots_pool=8, max_examples=3, batch_size=4,
        data=dict(source="vlm_shapes", split="test", config="64px", data_dir=data_dir,
                  **RUNLOCAL_SIZES)))
    task = get_task("fusion")(fusion_config(fusion_dirs), sharding.make_mesh({"data": -1}))
    context = registry.EvalContext(mesh=None, train_data=task.config.data,
                                   input=task.eval_input(), model=model)
    return registry.evaluator_class("vqa", "evals.x")("test/2shot", entry, context)


def test_vqa_shots_draw_distinct_train_images_the_same_way_every_run(fusion_dirs):
    model = RecordingModel()
    evaluator = vqa_evaluator(fusion_dirs, model, shots=2)
    metrics = evaluator(None)
    questions = int(metrics["vqa/test/2shot/questions"])
    assert questions > 3  # several a test image
    assert len(model.contexts) == questions and all(len(c) == 2 for c in model.contexts)
    pool_questions = [set(qs) for _, qs, _ in evaluator.shot_pool()]
    assert len(pool_questions) == 8  # shots_pool images of train
    for shots in model.contexts:
        assert not np.array_equal(shots[0][0], shots[1][0])  # two different images
        for image, question, answer in shots:
            assert any(question in qs for qs in pool_questions) and answer
    again = RecordingModel()
    vqa_evaluator(fusion_dirs, again, shots=2)(None)
    for a, b in zip(model.contexts, again.contexts):
        assert [q for _, q, _ in a] == [q for _, q, _ in b]


def test_shots_need_a_model_that_takes_examples(fusion_dirs):
    class NoContext:
        def answer(self, *args, **kwargs):
            return []
    with pytest.raises(ConfigError, match="shots=2: this task's model answers without"):
        vqa_evaluator(fusion_dirs, NoContext(), shots=2)


@pytest.mark.parametrize("section,key,value,match", [
    ("model.llm", "scan_layers", True, "gated cross-attention blocks sit between"),
    ("model", "image_token_id", 600, r"model.image_token_id=600 is not an id of the model's 514"),
    ("", "train_embeddings", 1, "config.train_embeddings must be True or False"),
    ("model.vision", "depth", 2, r"unknown key\(s\) \['depth'\]"),
])
def test_fusion_config_errors(section, key, value, match):
    config = fusion_config(("/d", "/m", None))
    where = config
    for name in filter(None, section.split(".")):
        where = where[name]
    with config.unlocked():
        if key in where:
            del where[key]  # a new type (ConfigDict keeps a key's type)
        where[key] = value
    with pytest.raises(ConfigError, match=match):
        get_task("fusion")(config, sharding.make_mesh({"data": -1}))


def test_model_init_names_parts():
    config = fusion_config(("/d", "/m", None))
    config.model_init = "/some/whole/model"
    with pytest.raises(ConfigError, match=r"the fusion task reads parts, \{'vision': SRC"):
        get_task("fusion")(config, sharding.make_mesh({"data": -1}))
