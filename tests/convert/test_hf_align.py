"""HF AlignModel <-> vlmjax TwoTowers (EfficientNet + BERT): image and text embeddings and
logits against transformers, export back to transformers (through `python -m vlmjax.convert
export`'s function), the tokenizer, EfficientNet's compound scaling, and configs HF and vlmjax
cannot share named in the error; model_init into a BERT with scan_layers and its export."""
import json
import os
import shutil

import numpy as np
import pytest

from vlmjax.convert import load_pretrained, load_pretrained_tokenizer
from vlmjax.convert.cli import export_pretrained
from vlmjax.convert.hf_align import load_hf_align, model_config_from_hf
from vlmjax.convert.hf_align_export import export_hf_align
from vlmjax.models.efficientnet import EfficientNet, round_filters, round_repeats

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZE, TOL, TEMPERATURE = 32, 1e-4, 0.37
# 8 MBConv blocks (depth 1.2: 2 + 3 + 3): a residual block, expansion 1 and 6, kernels 3 and 5,
# stride-2 blocks with the adjusted (block 2) and the symmetric (block 5) padding.
VISION = dict(image_size=SIZE, width_coefficient=0.5, depth_coefficient=1.2,
              kernel_sizes=[3, 5, 3], in_channels=[32, 16, 24], out_channels=[16, 24, 40],
              strides=[1, 2, 2], num_block_repeats=[1, 2, 2], expand_ratios=[1, 6, 6],
              depthwise_padding=[5], hidden_dim=64)
WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "left", "right", "big", "small"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXT = dict(vocab_size=len(SPECIALS) + len(WORDS) + 3, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=48, max_position_embeddings=24)
EMBED = 24  # round_filters(40, 0.5)


def hf_config(**overrides):
    vision = {**VISION, **overrides.pop("vision", {})}
    return transformers.AlignConfig(text_config=TEXT, vision_config=vision,
                                    projection_dim=overrides.pop("projection_dim", EMBED),
                                    **overrides)


def redraw(model, seed=0):
    """Weights, biases, BatchNorm statistics and token-type rows all away from HF's init
    (zeros, ones), so that a tensor mapped wrongly shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or name == "temperature":
                continue
            if name.endswith("running_var") or ("norm" in name.lower() and
                                                 name.endswith("weight")):
                p.copy_(0.5 + torch.rand(p.shape, generator=generator))
            elif name.endswith(("bias", "running_mean")):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
            elif "embeddings" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=generator) / np.sqrt(fan_in))
        model.temperature.fill_(TEMPERATURE)
    return model.eval()


def write_bert_tokenizer(directory):
    vocab = os.path.join(directory, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(SPECIALS + WORDS) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=vocab, model_max_length=16)
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.fixture(scope="module")
def align_hf(tmp_path_factory):
    """(directory, torch AlignModel, HF tokenizer) of a tiny random AlignModel."""
    torch.manual_seed(0)
    model = redraw(transformers.AlignModel(hf_config()))
    directory = str(tmp_path_factory.mktemp("align_hf"))
    model.save_pretrained(directory)
    return directory, model, write_bert_tokenizer(directory)


def normalise(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def text_inputs():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, TEXT["vocab_size"], (4, 10)).astype(np.int32)
    mask = np.arange(10)[None] < np.array([10, 7, 3, 1])[:, None]
    return tokens, mask


def hf_embeddings(model, images, tokens, mask):
    with torch.no_grad():
        pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
        ids, attention = torch.from_numpy(tokens).long(), torch.from_numpy(mask).long()
        zimg = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        ztxt = model.get_text_features(input_ids=ids, attention_mask=attention).pooler_output
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=attention)
    return normalise(zimg), normalise(ztxt.numpy()), out.logits_per_image.numpy()


def vlmjax_embeddings(model, params, images, tokens, mask):
    v = {"params": params}
    zimg = np.asarray(model.apply(v, images, method=model.encode_image))
    ztxt = np.asarray(model.apply(v, tokens, mask, method=model.encode_text))
    _, _, out = model.apply(v, None, None)
    return zimg, ztxt, zimg @ ztxt.T * float(out["temperature"])


def test_round_filters_and_repeats_match_efficientnet_scaling():
    from transformers.models.align import modeling_align
    for width in (0.5, 1.0, 1.1, 1.6, 2.0, 4.3):
        config = transformers.AlignVisionConfig(width_coefficient=width)
        for channels in (16, 24, 32, 40, 80, 112, 192, 320):
            assert round_filters(channels, width) == modeling_align.round_filters(
                config, channels)
    assert round_filters(320, 4.3) == 1376       # EfficientNet-L2's last block
    assert round_filters(16, 0.25) == 8          # never below the divisor
    assert round_filters(20, 1.0, 16) == 32      # 16 would be > 10% below 20: one more step
    assert [round_repeats(n, 3.1) for n in (1, 2, 3, 4)] == [4, 7, 10, 13]
    default = transformers.AlignVisionConfig()   # ALIGN-base: EfficientNet-B7
    tower = EfficientNet()
    assert len(tower.blocks()) == default.num_hidden_layers == 55 and tower.width == 640


def test_embeddings_and_logits_match_transformers(align_hf):
    directory, reference, _ = align_hf
    model, params, config = load_pretrained(directory)
    assert (config["image_arch"], config["text_arch"], config["embed_dim"]) == (
        "efficientnet", "bert", EMBED)
    assert config["temperature_init"] == pytest.approx(1 / TEMPERATURE, rel=1e-6)
    tokens, mask = text_inputs()
    for size in (SIZE, 37):  # an odd size: the stride-2 paddings differ from 'same'
        images = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
        want, got = (hf_embeddings(reference, images, tokens, mask),
                     vlmjax_embeddings(model, params, images, tokens, mask))
        for name, w, g in zip(("image", "text", "logits_per_image"), want, got):
            np.testing.assert_allclose(g, w, atol=TOL * max(1, np.abs(w).max()), err_msg=name)


def test_export_reloads_in_transformers_with_the_same_embeddings(align_hf, tmp_path):
    directory, reference, _ = align_hf
    out = str(tmp_path / "exported")
    assert export_pretrained(directory, out) == "align"
    exported, info = transformers.AlignModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    images = np.random.default_rng(3).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    tokens, mask = text_inputs()
    for w, g in zip(hf_embeddings(reference, images, tokens, mask),
                    hf_embeddings(exported.eval(), images, tokens, mask)):
        np.testing.assert_allclose(g, w, atol=TOL * max(1, np.abs(w).max()))
    # A second import of the export: the same params, image settings and tokenizer files.
    first, second = load_hf_align(directory), load_hf_align(out)
    temperature = first[1].pop("temperature_init")
    assert second[1].pop("temperature_init") == pytest.approx(temperature, rel=1e-6)
    assert first[1] == second[1] and first[2]["image_mean"] == second[2]["image_mean"]
    for name, value in first[0].items():
        np.testing.assert_allclose(second[0][name], value, atol=1e-6, err_msg=name)
    assert os.path.exists(os.path.join(out, "tokenizer.json"))


def test_tokenizer_frames_text_as_bert(align_hf):
    directory, _, hf_tokenizer = align_hf
    tokenizer, settings = load_pretrained_tokenizer(directory)
    texts = ["a red circle on the left", "big blue square"]
    ids, mask = tokenizer.encode_batch(texts, settings["max_len"], settings["add_bos"],
                                       settings["eos"])
    want = hf_tokenizer(texts, padding="max_length", max_length=settings["max_len"])
    np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"], bool))
    assert settings["text_mask"]


def test_configs_align_cannot_share_are_named():
    def config(**overrides):
        return hf_config(**overrides).to_dict()

    with pytest.raises(ValueError, match="projection_dim 32 differs from the image embedding "
                                         "width 24"):
        model_config_from_hf(config(projection_dim=32))
    with pytest.raises(ValueError, match="hidden_dim 2 .* smaller than the 4x4"):
        model_config_from_hf(config(vision=dict(hidden_dim=2)))
    with pytest.raises(ValueError, match="hidden_act='tanh'"):
        model_config_from_hf(config(vision=dict(hidden_act="tanh")))
    with pytest.raises(ValueError, match="stage lists"):
        model_config_from_hf(config(vision=dict(strides=[1, 2])))
    with pytest.raises(ValueError, match="not 'align'"):
        model_config_from_hf({"model_type": "clip"})
    model_config, _ = model_config_from_hf(config())
    with pytest.raises(ValueError, match="image_projection=True"):
        export_hf_align({}, dict(model_config, image_projection=True), "/nonexistent")
    with pytest.raises(ValueError, match="text_arch 'bert'"):
        export_hf_align({}, dict(model_config, text_arch="transformer"), "/nonexistent")


def test_a_checkpoint_that_does_not_fit_its_config_is_named(align_hf, tmp_path):
    directory, _, _ = align_hf
    broken = str(tmp_path / "broken")
    shutil.copytree(directory, broken)
    path = os.path.join(broken, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["text_config"]["num_hidden_layers"] = 3  # the weights have 2
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="missing .*text_model.encoder.layer.2"):
        load_pretrained(broken)


def test_model_init_into_a_scanned_bert_and_export_back(align_hf, tmp_path):
    """config.model_init of an HF AlignModel into a model whose BERT scans its layers: the
    contrastive task fits the unrolled weights into `layer_scan` (the same text embeddings as
    the unrolled import), and the export of the scanned params unrolls them again."""
    import flax.linen as nn
    import jax

    from vlmjax import config as config_lib, sharding
    from vlmjax.convert.params import build_model, flatten
    from vlmjax.convert.recipe import pretrained_recipe
    from vlmjax.models import scan_layout
    from vlmjax.train.tasks.contrastive import ContrastiveTask

    directory, _, _ = align_hf
    model, unrolled, _ = load_pretrained(directory)
    recipe = pretrained_recipe(directory)  # what the task checks the architecture against
    assert (recipe.family, recipe.loss) == ("align", "clip")
    model_config = dict(recipe.model_config)
    model_config["text"] = dict(model_config["text"], scan_layers=True, remat="full")
    config = config_lib.load_config("configs/align/efficientnet.py:runlocal")
    with config.unlocked():
        config.model = dict(model_config, dtype="float32")
        config.model_init = directory
        config.input.image_size = SIZE
    mesh = sharding.make_mesh(config.mesh)
    task = ContrastiveTask(config, mesh)
    boxed = jax.eval_shape(task.init_params, jax.random.key(0))
    shardings = sharding.param_shardings(boxed, mesh, sharding.logical_rules())
    scanned = task.pretrained_params(config.model_init, nn.meta.unbox(boxed), shardings)
    assert "layer_scan" in scanned["text_tower"]["bert"]
    assert scanned["text_tower"]["bert"]["layer_scan"]["mlp"]["fc1"]["kernel"].shape[0] == 2
    back, want = flatten(scan_layout.to_unrolled(scanned)), flatten(unrolled)
    assert set(back) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(value), err_msg=name)

    tokens, mask = text_inputs()
    scanned_model = build_model(model_config)
    got = scanned_model.apply({"params": scanned}, tokens, mask,
                              method=scanned_model.encode_text)
    want = model.apply({"params": unrolled}, tokens, mask, method=model.encode_text)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)

    out = str(tmp_path / "exported")
    export_hf_align(scanned, model_config, out)
    first, second = load_hf_align(directory)[0], load_hf_align(out)[0]
    assert set(first) == set(second)
    for name, value in first.items():
        np.testing.assert_allclose(second[name], value, atol=1e-6, err_msg=name)
