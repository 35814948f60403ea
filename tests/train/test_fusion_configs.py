"""configs/fusion/openflamingo_3b.py: its :runlocal preset trains from tiny random HF CLIP and
Llama directories on a small MMC4 file (the frozen parts stay the HF weights, the new parts
train); the recipe's numbers are OpenFlamingo's; xattn_every places the gated blocks."""
import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from tests.convert.decoder_fixtures import WORDS, tiny_llama_dir
from vlmjax import config as config_lib, sharding
from vlmjax.config import ConfigError
from vlmjax.convert import load_pretrained
from vlmjax.models import scan_layout
from vlmjax.train import trainer
from vlmjax.train.tasks import get_task

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIG = "configs/fusion/openflamingo_3b.py"


@pytest.fixture(scope="module")
def hf_parts(tmp_path_factory):
    """(CLIP directory, Llama directory with llama3 RoPE) of the :runlocal shapes."""
    from configs.fusion import openflamingo_3b as recipe
    vision, llm = recipe.TINY_VISION, recipe.TINY_LLM
    clip = transformers.CLIPConfig(
        vision_config=dict(hidden_size=vision["width"], intermediate_size=vision["mlp_dim"],
                           num_hidden_layers=vision["depth"],
                           num_attention_heads=vision["num_heads"],
                           patch_size=vision["patch_size"], image_size=recipe.TINY_IMAGE_SIZE,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, vocab_size=64, max_position_embeddings=16),
        projection_dim=32)
    torch.manual_seed(0)
    clip_dir = str(tmp_path_factory.mktemp("of_clip_hf"))
    transformers.CLIPModel(clip).save_pretrained(clip_dir)
    rope = llm["rope_scaling"]
    llm_dir = tiny_llama_dir(
        tmp_path_factory, kind="llama3", vocab_size=llm["vocab_size"], hidden_size=llm["width"],
        intermediate_size=llm["mlp_dim"], num_hidden_layers=llm["depth"],
        num_attention_heads=llm["num_heads"], num_key_value_heads=llm["num_kv_heads"],
        head_dim=llm["head_dim"], rms_norm_eps=llm["norm_eps"], tie_word_embeddings=True,
        rope_parameters={**rope, "rope_theta": llm["rope_theta"]})
    return clip_dir, llm_dir


@pytest.fixture(scope="module")
def mmc4_dir(tmp_path_factory):
    """An MMC4-style .jsonl of 12 documents (1-3 images each, one under the 0.24 threshold)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("of_mmc4")
    os.makedirs(root / "images")
    rng = np.random.default_rng(0)
    with open(root / "docs.jsonl", "w") as file:
        for d in range(12):
            sentences = [" ".join(rng.choice(WORDS, 6)) for _ in range(4)]
            infos = []
            for i in range(1 + d % 3):
                name = f"{d}_{i}.png"
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "images" / name)
                infos.append(dict(image_name=name, matched_text_index=i,
                                  matched_sim=0.1 if (d, i) == (5, 1) else 0.3))
            file.write(json.dumps(dict(text_list=sentences, image_info=infos)) + "\n")
    return str(root)


def recipe_config(**presets):
    extra = ",".join(f"{k}={v}" for k, v in presets.items())
    return config_lib.load_config(f"{CONFIG}:{extra}")


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_runlocal_trains_from_hf_clip_and_llama(hf_parts, mmc4_dir, tmp_path):
    clip_dir, llm_dir = hf_parts
    config = recipe_config(runlocal=True, vision_init=clip_dir, llm_init=llm_dir,
                           data=os.path.join(mmc4_dir, "docs.jsonl"),
                           images=os.path.join(mmc4_dir, "images"))
    assert config.model.llm.depth == 4 and config.model.image_token_id == 256  # from llm_init
    result = trainer.train(config, str(tmp_path / "of"))
    params = result.state.params
    # Frozen: the LM's layers and the CLIP tower are the HF weights, bit for bit.
    _, llm_params, _ = load_pretrained(llm_dir)
    ours_llm = {k: v for k, v in params["llm"]["layers"].items() if not k.startswith("xattn")}
    theirs_llm = scan_layout.to_unrolled(dict(llm_params))
    ours_llm, theirs_llm = _flat({**params["llm"], "layers": ours_llm}), _flat(theirs_llm)
    assert ours_llm.keys() == theirs_llm.keys()
    for path, ours in ours_llm.items():
        np.testing.assert_array_equal(ours, theirs_llm[path], err_msg=path)
    _, clip_params, _ = load_pretrained(clip_dir)
    clip_tower = _flat(scan_layout.to_unrolled(dict(clip_params["image_tower"])))
    ours_vision = _flat(params["vision"])
    assert ours_vision and set(ours_vision) <= set(clip_tower)
    for path, ours in ours_vision.items():
        np.testing.assert_array_equal(ours, clip_tower[path], err_msg=path)
    # Trained: one gated block per LM layer (every 1); gates, blocks and resampler moved.
    blocks = sorted(k for k in params["llm"]["layers"] if k.startswith("xattn"))
    assert blocks == [f"xattn{j}" for j in range(4)]
    task = get_task("fusion")(config, sharding.make_mesh({"data": -1}))
    # the random init pretrained_params starts the new parts from (fusion.py init_random)
    init = _flat(jax.jit(lambda r: nn.meta.unbox(task.init_params(r)))(
        jax.random.split(jax.random.PRNGKey(config.seed))[0]))
    final = _flat(params)
    for prefix in ("['perceiver']", "['llm']['layers']['xattn0']['query']",
                   "['additional_embed']"):
        moved = [k for k in init if k.startswith(prefix) and not np.array_equal(init[k], final[k])]
        assert moved, prefix
    assert float(abs(params["llm"]["layers"]["xattn0"]["alpha_attn"])) > 0
    assert np.isfinite(result.train_metrics["loss"]) and result.train_metrics["num_tokens"] > 0


def test_recipe_is_openflamingos():
    config = recipe_config()
    optim = config.optim
    assert (optim.lr, optim.schedule, optim.warmup_steps, optim.weight_decay, optim.clip_norm) == (
        1e-4, "constant", 1875, 0.1, 1.0)
    assert (config.input.global_batch_size, config.total_steps) == (256, 234_240)
    assert config.total_steps * config.input.global_batch_size == pytest.approx(60e6, rel=0.01)
    assert (config.input.max_len, config.input.max_images, config.input.image_size) == (256, 6, 224)
    assert config.data.source == "mmc4" and config.data.sim_threshold == 0.24
    resampler, xattn = config.model.resampler, config.model.cross_attention
    assert (resampler.num_latents, resampler.depth, resampler.num_heads, resampler.head_dim,
            resampler.mlp_ratio, resampler.activation) == (64, 6, 8, 64, 4, "gelu")
    assert (xattn.num_heads, xattn.head_dim, xattn.mlp_dim, xattn.activation, xattn.norm,
            xattn.mlp) == (8, 64, 4 * 2048, "gelu", "layernorm", "plain")
    assert xattn.gate == "float" and xattn.skip_without_media is False  # MaskedCrossAttention
    assert config.model.vision.patch_size == 14 and config.model.vision.width == 1024
    assert config.model.vision_feature_select_strategy == "default"  # open_clip drops the class token
    # The weight decay of the gated blocks only.
    no_decay = re.compile(optim.no_decay)
    assert no_decay.search("perceiver/block0_fc/kernel")
    assert no_decay.search("additional_head/kernel")
    assert not no_decay.search("llm/layers/xattn3/query/kernel")
    # One scalar range near CLIP's per-channel normalisation of [0, 1].
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    low, high = config.input.value_range
    assert np.abs(low + mean / std).max() < 0.2 and np.abs(high - (1 - mean) / std).max() < 0.2


@pytest.mark.parametrize("every, blocks", [(1, 4), (2, 2), (4, 1)])
def test_xattn_every_places_one_block_per_k_layers(every, blocks):
    config = recipe_config(runlocal=True, xattn_every=every)  # the tiny LM: 4 layers
    assert config.model.cross_attn_every == every
    task = get_task("fusion")(config, sharding.make_mesh({"data": -1}))
    shapes = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
    layers = shapes["llm"]["layers"]
    assert sorted(k for k in layers if k.startswith("xattn")) == [
        f"xattn{j}" for j in range(blocks)]
    assert len([k for k in layers if k.startswith("block")]) == 4


def test_preset_mistakes_are_config_errors():
    with pytest.raises(ConfigError, match="xattn_every=0 must be an integer >= 1"):
        recipe_config(xattn_every=0)
    with pytest.raises(ConfigError, match="unknown config preset 'xattn'"):
        recipe_config(xattn=4)
