"""configs/llava/llava15_7b.py:runlocal: stage 1 from tiny random HF CLIP and Llama directories
(the 7B recipe's path: vision and LLM from HF, image token in the LLM's vocabulary), then
stage 2 from stage 1's workdir."""
import os

import jax
import numpy as np
import pytest

from tests.convert.decoder_fixtures import tiny_llama_dir
from tests.train.test_llava_task import llava_dirs  # noqa: F401  (a fixture)
from vlmjax import config as config_lib
from vlmjax.config import ConfigError
from vlmjax.convert import load_pretrained
from vlmjax.train import trainer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIG = "configs/llava/llava15_7b.py"


@pytest.fixture(scope="module")
def hf_parts(tmp_path_factory):
    """(CLIP directory, Llama directory) with the :runlocal shapes."""
    from configs.llava import llava15_7b as recipe
    vision, llm = recipe.TINY_VISION, recipe.TINY_LLM
    clip = transformers.CLIPConfig(
        vision_config=dict(hidden_size=vision["width"], intermediate_size=vision["mlp_dim"],
                           num_hidden_layers=vision["depth"],
                           num_attention_heads=vision["num_heads"],
                           patch_size=vision["patch_size"], image_size=16,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, vocab_size=64, max_position_embeddings=16),
        projection_dim=32)
    torch.manual_seed(0)
    clip_dir = str(tmp_path_factory.mktemp("clip_hf"))
    transformers.CLIPModel(clip).save_pretrained(clip_dir)
    llm_dir = tiny_llama_dir(
        tmp_path_factory, vocab_size=llm["vocab_size"], hidden_size=llm["width"],
        intermediate_size=llm["mlp_dim"], num_hidden_layers=llm["depth"],
        num_attention_heads=llm["num_heads"], num_key_value_heads=llm["num_kv_heads"],
        head_dim=llm["head_dim"], rms_norm_eps=llm["norm_eps"])
    return clip_dir, llm_dir


def recipe_config(stage, **presets):
    extra = ",".join(f"{k}={v}" for k, v in presets.items())
    return config_lib.load_config(f"{CONFIG}:runlocal,stage={stage},{extra}")


def test_runlocal_stage1_from_hf_clip_and_llama_then_stage2(hf_parts, llava_dirs,  # noqa: F811
                                                             tmp_path):
    clip_dir, llm_dir = hf_parts
    _, llava_dir = llava_dirs
    data = dict(data=os.path.join(llava_dir, "train_caption.json"),
                images=os.path.join(llava_dir, "images"))
    from vlmjax.data.tokenizers import load_tokenizer
    tokenizer = load_tokenizer(os.path.join(llm_dir, "tokenizer.json"))
    tokenizer.add_special_tokens(["<image>"])  # as the pipeline does: the next free id
    data["image_token_id"] = tokenizer.token_id("<image>")
    config = recipe_config(1, vision_init=clip_dir, llm_init=llm_dir, **data)
    first = trainer.train(config, str(tmp_path / "s1"))
    params = first.state.params
    _, llm_params, _ = load_pretrained(llm_dir)
    for ours, theirs in zip(jax.tree.leaves(params["llm"]), jax.tree.leaves(llm_params)):
        np.testing.assert_array_equal(ours, theirs)  # frozen in stage 1: the HF weights
    assert np.isfinite(first.train_metrics["loss"]) and first.train_metrics["num_tokens"] > 0

    config = recipe_config(2, stage1=str(tmp_path / "s1"), tokenizer=os.path.join(
        llm_dir, "tokenizer.json"), **data)
    second = trainer.train(config, str(tmp_path / "s2"))
    assert np.isfinite(second.train_metrics["loss"])
    moved = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(params["llm"]), jax.tree.leaves(second.state.params["llm"]))]
    assert any(moved)  # stage 2 trains the LLM


def test_recipe_values_and_preset_mistakes():
    config = recipe_config(1)
    assert (config.optim.lr, config.input.global_batch_size, config.input.template) == (
        1e-3, 8, "plain")
    assert config.data.json_path.endswith("blip_laion_cc_sbu_558k.json")
    full = config_lib.load_config(f"{CONFIG}:stage=2,stage1=/ckpt/s1")
    assert (full.optim.lr, full.input.global_batch_size, full.total_steps) == (2e-5, 128, 5197)
    assert full.model.vision_feature_select_strategy == "default" and full.mesh.fsdp == -1
    with pytest.raises(ConfigError, match="stage=2 starts from stage 1"):
        recipe_config(2)
    with pytest.raises(ConfigError, match="must be 1 or 2"):
        recipe_config(3)
