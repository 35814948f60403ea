"""The `llava` task through the real trainer: stage 1 from a SigLIP workdir's image tower and an
lm workdir's LLM trains the projector alone (the rest bit-identical, no optimiser state for it);
stage 2 from the stage-1 workdir trains the projector and the LLM; the loss falls on a fixed
batch; model_init and config mistakes are ConfigErrors naming the field."""
import io
import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import pytest

from vlmjax import config as config_lib, generate as generate_cli, sharding
from vlmjax.convert import load_pretrained
from vlmjax.convert.cli import export_pretrained
from vlmjax.data import pipeline_config
from vlmjax.evals.generation import ImageQuestionAnswerer
from vlmjax.config import ConfigError
from vlmjax.data import export, shapes
from vlmjax.train import checkpoint, optim, step as step_lib, trainer
from vlmjax.train.tasks import base, get_task

RUNLOCAL_SIZES = dict(train_size=64, eval_size=16, novel_size=8)  # configs/llava/tiny.py's
SIGLIP = "configs/siglip/tiny.py:runlocal,text_depth=1,negatives=0"  # its CNN: (8, 16)


@pytest.fixture(scope="module")
def llava_dirs(tmp_path_factory):
    """(vlm_shapes data_dir of the :runlocal build, its LLaVA export)."""
    data_dir = str(tmp_path_factory.getbasetemp() / "runlocal_tfds")  # shared with test_configs
    builder = shapes.prepare(shapes.make_builder("64px", data_dir, **RUNLOCAL_SIZES,
                                                 num_workers=0))
    out = str(tmp_path_factory.mktemp("llava_shapes"))
    export.export_llava(builder, out, "train")
    return data_dir, out


def random_params(task_name, config):
    task = get_task(task_name)(config, sharding.make_mesh({"data": -1}))
    return jax.jit(lambda r: nn.meta.unbox(task.init_params(r)))(jax.random.PRNGKey(7))


def fake_workdir(path, config, params) -> str:
    """A trainer workdir holding `params` at step 1 (what model_init reads of a real run)."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as file:
        file.write(config_lib.to_json(config))
    saver = checkpoint.Checkpointer(path, every=1, async_save=False)
    saver.save(1, {"params": params}, {})
    saver.close()
    return path


@pytest.fixture(scope="module")
def part_workdirs(llava_dirs, tmp_path_factory):
    """{"vision": a contrastive workdir (CNN of 2 stages), "llm": an lm workdir, and their
    params} with the towers of configs/llava/tiny.py:runlocal."""
    data_dir, _ = llava_dirs
    root = tmp_path_factory.mktemp("parts")
    siglip = config_lib.load_config(SIGLIP)
    config_lib.apply_overrides(siglip, [f"data.data_dir={data_dir}"])
    lm = config_lib.load_config("configs/lm/tiny.py:runlocal")
    config_lib.apply_overrides(lm, [f"data.data_dir={data_dir}"])
    out = {"vision_params": random_params("contrastive", siglip),
           "llm_params": random_params("lm", lm)}
    out["vision"] = fake_workdir(str(root / "siglip"), siglip, out["vision_params"])
    out["llm"] = fake_workdir(str(root / "lm"), lm, out["llm_params"])
    return out


def llava_config(llava_dirs, stage, **presets):
    data_dir, llava_dir = llava_dirs
    extra = "".join(f",{k}={v}" for k, v in presets.items())
    config = config_lib.load_config(f"configs/llava/tiny.py:runlocal,stage={stage},"
                                    f"shapes_dir={data_dir},llava_dir={llava_dir}{extra}")
    with config.unlocked():
        config.evals = ml_collections.ConfigDict()  # the generative evals: tests/evals
    return config


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def moved(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def adam_mu(opt_state):
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)).mu


@pytest.mark.slow
def test_stage1_trains_the_projector_alone_then_stage2_the_llm(llava_dirs, part_workdirs,
                                                                tmp_path):
    config = llava_config(llava_dirs, 1, vision_init=part_workdirs["vision"],
                          llm_init=part_workdirs["llm"], steps=2, vision_layer=-2)
    config.input.max_len = 128  # 64 visual tokens (the 8x8 map of stage 1) and a caption
    first = trainer.train(config, str(tmp_path / "stage1"))
    params = first.state.params
    # The SigLIP CNN as far as feature layer -2 of 2 stages: conv0 alone; the LLM is the lm
    # workdir's. Both untouched by stage 1.
    tower = part_workdirs["vision_params"]["image_tower"]
    assert set(tower) == {"conv0", "conv1"}
    assert_same(params["vision"], {"conv0": tower["conv0"]})
    assert_same(params["llm"], part_workdirs["llm_params"])
    task = get_task("llava")(config, sharding.make_mesh({"data": -1}))
    init = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)))(
        jax.random.split(jax.random.PRNGKey(config.seed))[0])
    assert moved(init["projector"], params["projector"])
    mu = adam_mu(first.state.opt_state)  # Adam state for the projector alone
    assert jax.tree.leaves(mu["vision"]) == jax.tree.leaves(mu["llm"]) == []
    assert len(jax.tree.leaves(mu["projector"])) == 5  # 2 kernels, 2 biases, the posemb
    assert np.isfinite(first.train_metrics["loss"]) and first.train_metrics["num_tokens"] > 0

    config = llava_config(llava_dirs, 2, stage1=str(tmp_path / "stage1"), steps=2,
                          vision_layer=-2)
    second = trainer.train(config, str(tmp_path / "stage2"))
    assert_same(second.state.params["vision"], params["vision"])
    assert moved(params["llm"], second.state.params["llm"])
    assert moved(params["projector"], second.state.params["projector"])
    records = [json.loads(line) for line in open(tmp_path / "stage2" / "metrics.jsonl")]
    assert {"train/perplexity", "train/num_tokens", "perf/num_tokens_per_s",
            "train/data/skipped/truncated_conversation"} <= set(records[-1])

    # The stage-2 workdir as a pretrained model, and `python -m vlmjax.generate --image` on it:
    # the answer the evaluators' answerer gives with the run's tokenizer and template.
    model, loaded, model_config = load_pretrained(str(tmp_path / "stage2"))
    assert_same(loaded, second.state.params)
    assert model_config["num_image_tokens"] == 64 and model_config["template"] == "chatml"
    with pytest.raises(ValueError, match="vision_arch='cnn'; HF LLaVA holds a CLIP or SigLIP"):
        export_pretrained(str(tmp_path / "stage2"), str(tmp_path / "hf"))
    image = os.path.join(llava_dirs[1], "images", sorted(os.listdir(
        os.path.join(llava_dirs[1], "images")))[0])
    question = "What colour is the circle?"
    args = generate_cli.parser().parse_args(["--model", str(tmp_path / "stage2"), "--image",
                                             image, "--prompt", question,
                                             "--max_new_tokens", "5"])
    printed = io.StringIO()
    text, _ = generate_cli.run(args, out=printed)
    task = get_task("llava")(config, sharding.make_mesh({"data": -1}))
    answerer = ImageQuestionAnswerer(task.model, pipeline_config.resolve_tokenizer(
        task.eval_input(), []), "chatml", 64, max_new_tokens=5)
    expected = answerer.answer(second.state.params,
                               generate_cli.load_image(image, model_config)[None], [question])
    assert printed.getvalue() == text + "\n" and text == expected[0]


def test_loss_falls_on_a_fixed_batch_and_counts_answer_tokens(llava_dirs):
    config = llava_config(llava_dirs, 2)
    config.input.max_len = 128  # a cheaper step; the long samples are cut (and counted)
    mesh = sharding.make_mesh({"data": -1})
    task = get_task("llava")(config, mesh)
    assert isinstance(task, base.Task) and task.num_image_tokens == 16  # (32 / 2 / 4) ** 2
    with task.train_input(None, 0, 1) as data:
        batch = next(data)
    params = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)))(jax.random.PRNGKey(0))
    mask = step_lib.trainable_mask(params, task.trainable)
    assert not any(jax.tree.leaves(mask["vision"])) and all(jax.tree.leaves(mask["llm"]))
    trainable, _ = step_lib.split_params(params, mask)
    with config.unlocked():
        config.optim.update(lr=1e-2, warmup_steps=0, schedule="constant")
    tx, schedule = optim.make_optimizer(config.optim, 20, trainable)
    state = step_lib.init_state(params, tx, jax.random.PRNGKey(1), trainable=mask)
    batch = sharding.host_batch_to_global(batch, mesh)
    with jax.set_mesh(mesh):
        step = jax.jit(step_lib.make_train_step(task.loss_fn, tx, schedule, mesh=mesh,
                                                trainable=mask))
        losses = []
        for _ in range(6):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    assert float(metrics["num_tokens"]) == int(np.asarray(batch["loss_mask"]).sum())
    assert losses[-1] < 0.85 * losses[0], losses
    assert_same(state.params["vision"], params["vision"])


def test_packed_batch_has_the_loss_of_its_samples_unpacked(llava_dirs):
    """The loss (mean over answer tokens) and answer tokens of a packed batch are those of the
    same samples one per row (positions restart, attention stays inside each sample, images in slot order)."""
    config = llava_config(llava_dirs, 2, pack=False)
    config.input.update(max_len=384)
    mesh = sharding.make_mesh({"data": -1})
    task = get_task("llava")(config, mesh)
    with task.train_input(None, 0, 1) as data:
        unpacked = [next(data) for _ in range(4)]
    config.input.update(pack=True, images_per_row=3)
    packed_task = get_task("llava")(config, mesh)
    with packed_task.train_input(None, 0, 1) as data:
        packed = next(data)
    samples = int(sum(packed["segment_ids"][r].max() for r in range(len(packed["tokens"]))))
    assert samples > len(packed["tokens"]) and packed["image"].ndim == 5
    rows = {k: np.concatenate([b[k] for b in unpacked])[:samples] for k in unpacked[0]}
    params = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)))(jax.random.PRNGKey(3))
    sums = jax.jit(lambda p, b: task.token_sums(p, b)[1])
    want, got = sums(params, rows), sums(params, packed)
    assert float(got["num_tokens"]) == float(want["num_tokens"]) > 0
    np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(got["accuracy"]), float(want["accuracy"]), rtol=1e-5)


@pytest.mark.parametrize("model_init, edit, message", [
    ({"vision": "llm"}, None, r"model_init.vision: .* a decoder LM, which holds \['llm'\], "
                              r"not the vision"),
    ("llm", None, r"model_init .* is a decoder LM, not a whole LLaVA model"),
    ({"llm": "llm"}, "model.llm.depth=2", r"model.llm.depth: config 2, pretrained 1"),
    ({"vision": "vision"}, "model.vision.patch_size=4",
     r"model.vision.patch_size: config 4, pretrained 2"),
])
def test_model_init_mismatches_are_config_errors(llava_dirs, part_workdirs, model_init, edit,
                                                 message):
    config = llava_config(llava_dirs, 1)
    if edit:
        config_lib.apply_overrides(config, [edit])
    mesh = sharding.make_mesh({"data": -1})
    task = get_task("llava")(config, mesh)
    sources = ({k: part_workdirs[v] for k, v in model_init.items()}
               if isinstance(model_init, dict) else part_workdirs[model_init])
    with pytest.raises(ConfigError, match=message):
        task.pretrained_params(sources, None, None)  # checked before anything is read


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(stage=3), r"config.stage must be 1 .* or 2"),
    (lambda c: c.update(train_vision=True), r"True only with stage=2"),
    (lambda c: c.model.llm.update(dtype="bfloat16"), r"model.llm.dtype: the compute dtype"),
    (lambda c: c.model.update(projecter="linear"), r"config key model.projecter is not used"),
    (lambda c: c.model.update(vision_arch="swin"), r"vision_arch 'swin' is not one of"),
    (lambda c: c.model.update(vision_feature_select_strategy="default"),
     r"config.model: .*drops the class token"),
    (lambda c: c.update(model_init={"vision": {"source": "/x", "prefix": "image_tower"}}),
     r"model_init.vision: 'prefix' is not used"),
    (lambda c: c.input.update(max_len=16), r"input.max_len=16 leaves no room"),
    (lambda c: (c.input.update(pack=True), c.model.update(prefix_attention="full")),
     r"input.pack=True with model.prefix_attention='full'"),
])
def test_config_mistakes_are_errors_before_anything_runs(llava_dirs, edit, message):
    config = llava_config(llava_dirs, 1)
    with config.unlocked(), config.ignore_type():
        edit(config)
    with pytest.raises(ConfigError, match=message):
        get_task("llava")(config, sharding.make_mesh({"data": -1}))


def test_evaluators_get_an_answerer_of_the_model(llava_dirs):
    config = config_lib.load_config(
        f"configs/llava/tiny.py:runlocal,stage=2,shapes_dir={llava_dirs[0]},"
        f"llava_dir={llava_dirs[1]}")
    task = get_task("llava")(config, sharding.make_mesh({"data": -1}))
    evaluators = task.evaluators(config.evals)
    assert sorted((e.name, e.type) for e in evaluators) == [
        ("test_captions", "captioning"), ("test_novel_vqa", "vqa"), ("test_vqa", "vqa"),
        ("validation_captions", "captioning"), ("validation_vqa", "vqa")]
    answerer = evaluators[0].context.model
    assert answerer.model is task.model and answerer.num_image_tokens == 16
    assert answerer.template.name == "chatml" and answerer.tokenizer.token_id("<image>") == 4


def test_hard_preset_adds_a_source_of_the_hard_question_kinds(llava_dirs):
    """`hard=W` adds the short-answer questions of `hard_types` once more, at weight W."""
    from vlmjax.data import pipeline_config
    config = config_lib.load_config(
        f"configs/llava/tiny.py:runlocal,stage=2,shapes_dir={llava_dirs[0]},"
        f"llava_dir={llava_dirs[1]},vqa=6,hard=8,hard_types=colour+existence")
    sources = config.data.sources
    assert (sources.vqa.weight, sources.vqa_hard.weight) == (6, 8)
    assert sources.vqa.json_path == sources.vqa_hard.json_path
    hard = pipeline_config.make_source(sources.vqa_hard, training=True)
    kept = {tuple(e["question_types"]) for e in hard._entries}
    assert kept == {("colour",), ("existence",)}
    assert 0 < len(hard._entries) < len(pipeline_config.make_source(sources.vqa, True)._entries)


def test_hard_types_entry_with_a_weight_is_a_source_of_its_own(llava_dirs):
    """hard_types 'colour+shape:12': colour in the shared `vqa_hard` at `hard`, shape alone in
    `vqa_shape` at 12; a weight that is not a number is an error naming the entry."""
    presets = (f"configs/llava/tiny.py:runlocal,stage=2,shapes_dir={llava_dirs[0]},"
               f"llava_dir={llava_dirs[1]},hard=5")
    sources = config_lib.load_config(presets + ",hard_types=colour+shape:12").data.sources
    assert set(sources) == {"conversation", "detailed_description", "complex_reasoning", "vqa",
                            "vqa_hard", "vqa_shape"}
    assert (sources.vqa_hard.weight, list(sources.vqa_hard.question_types)) == (5, ["colour"])
    assert (sources.vqa_shape.weight, list(sources.vqa_shape.question_types)) == (12, ["shape"])
    with pytest.raises(config_lib.ConfigError, match="'shape:many'"):
        config_lib.load_config(presets + ",hard_types=colour+shape:many")


def test_vqa_only_preset_trains_one_question_kind_alone(llava_dirs):
    """`vqa_only=shape`: stage 2's data is the shape questions and nothing else, checked on
    validation VQA alone; on stage 1 it is an error."""
    from vlmjax.data import pipeline_config
    presets = (f"configs/llava/tiny.py:stage=2,shapes_dir={llava_dirs[0]},"
               f"llava_dir={llava_dirs[1]}")
    config = config_lib.load_config(presets + ",vqa_only=shape")
    assert config.data.source == "llava_json" and config.data.json_path.endswith("train_vqa.json")
    source = pipeline_config.make_source(config.data, training=True)
    assert {tuple(e["question_types"]) for e in source._entries} == {("shape",)}
    assert list(config.evals) == ["validation_vqa"]
    assert config.evals.validation_vqa.max_examples == 100
    with pytest.raises(config_lib.ConfigError, match="stage-2 preset"):
        config_lib.load_config(presets.replace("stage=2", "stage=1") + ",vqa_only=shape")


@pytest.mark.slow
def test_llava_cot_runlocal_trains_and_evaluates(llava_dirs, tmp_path_factory):
    """configs/llava_cot/tiny.py:runlocal: a few SFT steps on the cot + cot_judge export, then
    the cot evaluator on validation."""
    data_dir, _ = llava_dirs
    builder = shapes.make_builder("64px", data_dir, **RUNLOCAL_SIZES, num_workers=0)
    out = str(tmp_path_factory.mktemp("llava_cot"))
    counts = export.export_llava(builder, out, "train", kinds=("cot", "cot_judge"))
    assert counts["cot"] == counts["cot_judge"] == RUNLOCAL_SIZES["train_size"]
    config = config_lib.load_config(
        f"configs/llava_cot/tiny.py:runlocal,shapes_dir={data_dir},llava_dir={out}")
    assert set(config.data.sources) == {"cot", "cot_judge"}
    workdir = str(tmp_path_factory.mktemp("cot_workdir"))
    result = trainer.train(config, workdir)
    assert int(result.state.step) == config.total_steps
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state.params))
    assert {"cot/validation_cot/accuracy", "cot/validation_cot/format_valid",
            "cot/validation_cot/judge_accuracy"} <= set(result.metrics)
    assert result.metrics["cot/validation_cot/questions"] == 8.0  # max_examples of runlocal
    # `python -m vlmjax.generate --cot stage_beam` on the run: the answer stage_beam gives
    # over ModelCot with the run's answerer, and the tokens it cost
    from vlmjax.inference import cot
    image = os.path.join(out, "images", sorted(os.listdir(os.path.join(out, "images")))[0])
    question = "How many corners do the red shape and the blue shape have together?"
    model, params, model_config = load_pretrained(workdir)
    argv = ["--model", workdir,
            "--image", image, "--prompt", question, "--cot", "stage_beam", "--num_beams", "2",
            "--max_new_tokens", "6", "--temperature", "1.0", "--seed", "3", "--judge", "model"]
    printed = io.StringIO()
    text, _ = generate_cli.run(generate_cli.parser().parse_args(argv), out=printed)
    answerer = generate_cli.llava_answerer(model, model_config)
    searcher = cot.ModelCot(answerer, params, generate_cli.load_image(image, model_config)[None],
                            [question], temperature=1.0, max_stage_tokens=6)
    assert text == cot.stage_beam(searcher.sample, searcher.judge, keys=[0], num_beams=2,
                                  seed=3)[0]
    assert printed.getvalue().rstrip().endswith(
        f"[stage_beam, 2 beams: {searcher.generated_tokens} tokens generated, judge prompts "
        "included]")
