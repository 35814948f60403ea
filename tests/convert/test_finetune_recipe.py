"""The fine-tuning recipe (configs/siglip/finetune_from_hf.py, convert.pretrained_recipe) on the
tiny random HF models, and export from trainer workdirs back to transformers."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from tests.convert.reference import (IMAGE, SIGLIP_CONFIG, SIGLIP_LEN, hf_outputs,
                                     max_abs_diffs, torch, transformers, vlmjax_outputs)
from tests.convert.test_pretrained import TEXTS, assert_same_params
from vlmjax import config as config_lib
from vlmjax.convert import import_pretrained, load_pretrained, pretrained_recipe
from vlmjax.convert.cli import main as cli_main
from vlmjax.convert.params import abstract_params, build_model, flatten
from vlmjax.data import pipeline_config
from vlmjax.data.tokenizers import load_tokenizer

CONFIG = "configs/siglip/finetune_from_hf.py"
PLACEHOLDER_INITS = ("temperature_init", "bias_init")  # from the weights, which a recipe skips


def finetune_config(src, data_dir=None, *overrides, presets="runlocal"):
    config = config_lib.load_config(f"{CONFIG}:{presets},src={src}")
    if data_dir is not None:
        overrides = (f"data.data_dir={data_dir}", *overrides)
    return config_lib.apply_overrides(config, overrides)


def without(config, keys):
    return {k: v for k, v in config.items() if k not in keys}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_recipe_reads_only_configs(siglip_hf, clip_hf, tmp_path):
    # No weights in the directory: the recipe still has everything (it never reads them).
    configs_only = str(tmp_path / "siglip_configs_only")
    shutil.copytree(siglip_hf[0], configs_only, ignore=shutil.ignore_patterns("*.safetensors"))
    recipe = pretrained_recipe(configs_only)
    _, _, model_config = load_pretrained(siglip_hf[0])
    assert recipe.family == "siglip" and recipe.loss == "siglip"
    assert without(recipe.model_config, PLACEHOLDER_INITS) == without(model_config,
                                                                      PLACEHOLDER_INITS)
    assert recipe.image_size == [IMAGE, IMAGE] and recipe.value_op() == "value_range"
    assert recipe.tokenizer["path"] == os.path.join(configs_only, "spiece.model")
    assert {k: recipe.tokenizer[k] for k in ("max_len", "add_bos", "eos", "text_mask", "pad_id")
            } == dict(max_len=SIGLIP_LEN, add_bos=False, eos="sticky", text_mask=False, pad_id=1)

    clip = pretrained_recipe(clip_hf[0])
    assert (clip.family, clip.loss, clip.value_op()) == ("clip", "clip", "normalize_clip")
    assert clip.tokenizer["add_bos"] is True and clip.tokenizer["text_mask"] is True

    # A converted directory gives the same recipe, with the checkpoint's own t and b.
    converted = str(tmp_path / "converted")
    import_pretrained(siglip_hf[0], converted)
    from_converted = pretrained_recipe(converted)
    assert from_converted.model_config == model_config
    assert from_converted.tokenizer["path"] == os.path.join(converted, "spiece.model")
    assert without(from_converted.tokenizer, ("path",)) == without(recipe.tokenizer, ("path",))

    bad = dict(recipe.__dict__, image_mean=[0.4, 0.5, 0.5])
    with pytest.raises(ValueError, match="match no preprocessing op"):
        type(recipe)(**bad).value_op()


def test_config_presets(siglip_hf, clip_hf):
    src = siglip_hf[0]
    config = finetune_config(src, presets="")
    recipe = pretrained_recipe(src)
    assert config.model.to_dict() == dict(recipe.model_config, use_text_mask=False,
                                          dtype="bfloat16")
    assert config.model_init == src
    assert config.loss.to_dict() == {"name": "siglip", "impl": "ppermute"}
    assert config.input.image_size == IMAGE
    assert config.input.preprocess.endswith("|value_range")
    assert (config.input.tokenizer, config.input.max_text_len, config.input.add_bos,
            config.input.eos) == (os.path.join(src, "spiece.model"), SIGLIP_LEN, False, "sticky")
    assert (config.optim.name, config.optim.lr, config.optim.weight_decay) == ("adamw", 1e-5,
                                                                              1e-4)
    assert config.optim.warmup_steps == 500 and config.data.source == "vlm_shapes"

    clip = finetune_config(clip_hf[0], presets="")
    assert clip.loss.name == "clip" and clip.model.use_text_mask is True
    assert clip.model.bias_init is None and clip.input.add_bos is True
    assert clip.input.preprocess.endswith("|normalize_clip")

    shards = finetune_config(src, presets="data=/data/{00000..00009}.tar,res=60,steps=100")
    assert (shards.data.source, shards.data.paths) == ("webdataset", "/data/{00000..00009}.tar")
    assert shards.input.image_size == 60 and shards.optim.warmup_steps == 10
    tfds = finetune_config(src, presets="data=tfds:coco_captions")
    assert (tfds.data.source, tfds.data.name) == ("tfds", "coco_captions")

    with pytest.raises(config_lib.ConfigError, match="needs src=DIR"):
        config_lib.load_config(f"{CONFIG}:runlocal")
    with pytest.raises(config_lib.ConfigError, match="src=/no/such/dir.*does not exist"):
        config_lib.load_config(f"{CONFIG}:src=/no/such/dir")


def test_pipeline_tokenizer_pads_like_the_reference(siglip_hf, clip_hf):
    """SigLIP's text tower reads the padding: the pipeline must pad with </s> (1) as
    transformers' SiglipTokenizer does, not with SentencePiece's pad piece (0)."""
    siglip = finetune_config(siglip_hf[0]).input
    reference = transformers.SiglipTokenizer(
        vocab_file=siglip.tokenizer, eos_token="</s>", pad_token="</s>", unk_token="<unk>",
        model_max_length=SIGLIP_LEN)
    want = reference(TEXTS, padding="max_length", max_length=SIGLIP_LEN, truncation=True)
    tokenizer = pipeline_config.resolve_tokenizer(siglip, [])
    ids, _ = tokenizer.encode_batch(TEXTS, siglip.max_text_len, siglip.add_bos, siglip.eos)
    np.testing.assert_array_equal(ids, want["input_ids"])
    assert ids[0, -1] == 1 and load_tokenizer(siglip.tokenizer).pad_id == 0  # file alone: 0

    clip = finetune_config(clip_hf[0]).input
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(clip_hf[0])
    want = reference(TEXTS, padding="max_length", max_length=clip.max_text_len, truncation=True)
    ids, _ = pipeline_config.resolve_tokenizer(clip, []).encode_batch(
        TEXTS, clip.max_text_len, clip.add_bos, clip.eos)
    np.testing.assert_array_equal(ids, want["input_ids"])


@pytest.mark.slow
def test_finetune_runlocal_starts_from_the_import_and_exports_to_hf(siglip_hf, data_dir,
                                                                    tmp_path, images,
                                                                    siglip_tokens):
    from vlmjax.train import trainer
    from vlmjax.train.checkpoint import restore_params

    src, reference_model = siglip_hf
    workdir = str(tmp_path / "run")
    config = finetune_config(src, data_dir, "optim.lr=1e-3",  # warmup: step 1 runs at lr 0
                             "evals={}")  # time
    result = trainer.train(config, workdir)
    assert int(result.state.step) == config.total_steps == 2
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in records if "train/loss" in r]
    assert len(train) == 2 and all(np.isfinite(r["train/loss"]) for r in train)
    assert train[0]["train/learning_rate"] == 0.0 and train[1]["train/learning_rate"] > 0

    # Step 0 is the import, bit for bit: the lr-0 first step leaves it in checkpoint 1.
    _, imported, model_config = load_pretrained(src)
    step1 = restore_params(workdir, abstract_params(model_config, (IMAGE, IMAGE)), step=1)
    assert_same_params(step1, imported)
    changed = [k for k, v in flatten(result.state.params).items()
               if not np.array_equal(np.asarray(v), np.asarray(flatten(imported)[k]))]
    assert changed, "step 2 (lr 1e-3) changed no parameter"

    # Export of the workdir (latest step): transformers gives the trained params' embeddings.
    out = str(tmp_path / "hf_latest")
    cli_main(["export", "--to", "hf", workdir, out])
    exported = transformers.SiglipModel.from_pretrained(out).eval()
    model = build_model(without(config.model.to_dict(), ("dtype",)))
    trained = jax.device_get(result.state.params)  # host arrays: eager ops on one device
    ours = vlmjax_outputs(model, trained, images, siglip_tokens)
    theirs = hf_outputs(exported, images, siglip_tokens)
    assert max(max_abs_diffs(ours, theirs).values()) < 1e-5
    original = hf_outputs(reference_model, images, siglip_tokens)
    assert max_abs_diffs(theirs, original)["image"] > 1e-4  # it is the trained model
    assert {"spiece.model", "tokenizer_config.json", "preprocessor_config.json"} <= set(
        os.listdir(out))
    processor = json.load(open(os.path.join(out, "preprocessor_config.json")))
    assert processor["size"] == {"height": IMAGE, "width": IMAGE}

    # The workdir is a pretrained source too: model_init, and the recipe of a further run.
    _, from_workdir, _ = load_pretrained(workdir)
    assert_same_params(from_workdir, trained)
    again = pretrained_recipe(os.path.join(workdir, "checkpoints", "2"))
    assert again.model_config == without(config.model.to_dict(), ("dtype",))
    assert again.tokenizer["path"] == config.input.tokenizer and again.tokenizer["pad_id"] == 1

    # Export of checkpoint 1 gives back the original HF weights exactly.
    out1 = str(tmp_path / "hf_step1")
    cli_main(["export", "--to", "hf", os.path.join(workdir, "checkpoints", "1"), out1])
    reloaded = transformers.SiglipModel.from_pretrained(out1).eval().state_dict()
    for name, tensor in reference_model.state_dict().items():
        assert torch.equal(tensor, reloaded[name]), name


def test_model_init_of_another_size_names_the_mismatch(siglip_hf, tmp_path):
    import flax.linen as nn

    from vlmjax import sharding
    from vlmjax.train.tasks.contrastive import ContrastiveTask

    bigger = {**SIGLIP_CONFIG, "text_config": {**SIGLIP_CONFIG["text_config"],
                                               "intermediate_size": 48}}
    other = str(tmp_path / "other_siglip")
    transformers.SiglipModel(transformers.SiglipConfig(**bigger)).save_pretrained(other)
    config = finetune_config(siglip_hf[0], None, f"model_init={other}")
    # What the trainer does with config.model_init, without compiling a train state.
    mesh = sharding.make_mesh(config.mesh)
    task = ContrastiveTask(config, mesh)
    boxed = jax.eval_shape(task.init_params, jax.random.key(0))
    shardings = sharding.param_shardings(boxed, mesh, sharding.logical_rules())
    with pytest.raises(config_lib.ConfigError, match="differs from the architecture") as error:
        task.pretrained_params(config.model_init, nn.meta.unbox(boxed), shardings)
    assert "model.text.mlp_dim: config 40, pretrained 48" in str(error.value)
    task.pretrained_params(siglip_hf[0], nn.meta.unbox(boxed), shardings)  # the right size passes

    # Same shapes, another function: caught by the architecture check, not by shapes.
    with config.unlocked():
        config.model.image.activation = "gelu"
        config.model_init = siglip_hf[0]
    task = ContrastiveTask(config, mesh)
    with pytest.raises(config_lib.ConfigError, match="model.image.activation: config 'gelu'"):
        task.pretrained_params(config.model_init, nn.meta.unbox(boxed), shardings)


def test_export_needs_a_checkpoint_of_a_trainer_workdir(siglip_hf, tmp_path, capsys):
    workdir = tmp_path / "no_checkpoint_yet"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text(config_lib.to_json(finetune_config(siglip_hf[0])))
    with pytest.raises(SystemExit):
        cli_main(["export", "--to", "hf", str(workdir), str(tmp_path / "out")])
    assert "no checkpoint in" in capsys.readouterr().err
    not_a_run = tmp_path / "x" / "checkpoints" / "7"
    not_a_run.mkdir(parents=True)
    with pytest.raises(SystemExit):
        cli_main(["export", "--to", "hf", str(not_a_run), str(tmp_path / "out2")])
    assert "trainer workdir" in capsys.readouterr().err


def test_model_init_into_scanned_layers_with_remat(siglip_hf):
    import flax.linen as nn

    from vlmjax import sharding
    from vlmjax.models import scan_layout
    from vlmjax.train.tasks.contrastive import ContrastiveTask

    config = finetune_config(siglip_hf[0])
    mesh = sharding.make_mesh(config.mesh)

    def load(config):
        task = ContrastiveTask(config, mesh)
        boxed = jax.eval_shape(task.init_params, jax.random.key(0))
        shardings = sharding.param_shardings(boxed, mesh, sharding.logical_rules())
        return task.pretrained_params(config.model_init, nn.meta.unbox(boxed), shardings)

    unrolled = load(config)
    with config.unlocked():  # compute switches, not architecture: the same weights load
        for tower in ("image", "text"):
            config.model[tower].scan_layers = True
            config.model[tower].remat = "full"
    scanned = load(config)
    assert scan_layout.is_scanned(scanned) and not scan_layout.is_scanned(unrolled)
    assert_same_params(scan_layout.to_unrolled(scanned), unrolled)
