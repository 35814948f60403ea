"""HF LlavaForConditionalGeneration -> PrefixLM: logits and greedy generation against
transformers (CLIP + Llama, SigLIP + Qwen2), export back to HF, the checkpoint names of other
transformers versions in sharded files, and errors for config values PrefixLM cannot express."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.convert import hf_io, load_pretrained
from vlmjax.convert.hf_llava import canonical_name, llava_config_from_hf
from vlmjax.convert.hf_llava_export import export_hf_llava
from vlmjax.convert.params import flatten
from vlmjax.inference import generate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, IMAGE_ID, SIZE, PATCH = 96, 95, 16, 8   # 2 x 2 patches per image
TOL = 1e-4
MEAN, STD = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]  # a preprocessor_config.json's, not CLIP's own
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              image_size=SIZE, patch_size=PATCH)
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
CASES = {  # name -> LlavaConfig arguments
    # LLaVA-1.5: CLIP's penultimate layer without its class token; the last block is not built.
    "clip_llama": dict(
        vision_config=dict(VISION, model_type="clip_vision_model"),
        text_config=dict(TEXT, model_type="llama"), vision_feature_layer=-2,
        vision_feature_select_strategy="default"),
    # SigLIP (no class token: 'full'), two feature layers concatenated, a tied Qwen2.
    "siglip_qwen2": dict(
        vision_config=dict(VISION, model_type="siglip_vision_model"),
        text_config=dict(TEXT, model_type="qwen2", tie_word_embeddings=True),
        vision_feature_layer=[1, -1], vision_feature_select_strategy="full"),
}
TOKENS_PER_IMAGE = 4


def redraw_weights(model, seed=0):
    """Matrices and convolutions ~ N(0, 1/fan_in) (lm_head 6.25/fan_in), embeddings ~ N(0, 1/4),
    norm scales ~ U(0.5, 1.5), biases ~ N(0, 0.3^2): HF's init gives near-uniform logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
            elif any(k in name for k in ("embed_tokens", "position_embedding", "class_embedding")):
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            elif "lm_head" in name:
                p.copy_(2.5 * torch.randn(p.shape, generator=generator) / np.sqrt(p.shape[1]))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=generator) / np.sqrt(fan_in))
    return model.eval()


def load_reference(directory):
    return transformers.LlavaForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(model, tokens, images):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                     pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2))).logits.numpy()


_FORWARD = {}  # id(model) -> its jitted forward (op by op, the first call takes ~10 s)


def ours_logits(model, params, tokens, images):
    if id(model) not in _FORWARD:
        _FORWARD[id(model)] = jax.jit(lambda p, t, x: model.apply({"params": p}, t, images=x))
    return np.asarray(_FORWARD[id(model)](params, jnp.asarray(tokens), jnp.asarray(images)))


def prompts(batch=2, length=12, starts=(1, 5), seed=0):
    """Random text ids (no special or image ids) with one image's tokens at `starts[row]`."""
    tokens = np.random.default_rng(seed).integers(4, IMAGE_ID, (batch, length)).astype(np.int32)
    for row, start in enumerate(starts):
        tokens[row, start:start + TOKENS_PER_IMAGE] = IMAGE_ID
    return tokens


def random_images(batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """name -> (directory, transformers reference, vlmjax model, params, model_config), each
    built once per module."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = build(name, str(tmp_path_factory.mktemp(name)))
        return built[name]
    return get


def build(name, directory):
    config = transformers.LlavaConfig(**CASES[name], image_token_id=IMAGE_ID)
    torch.manual_seed(0)
    redraw_weights(transformers.LlavaForConditionalGeneration(config)).save_pretrained(directory)
    hf_io.write_json(os.path.join(directory, "tokenizer_config.json"), {"bos_token": "<s>"})
    if name == "clip_llama":
        hf_io.write_json(os.path.join(directory, "preprocessor_config.json"),
                         {"image_mean": MEAN, "image_std": STD})
    model, params, model_config = load_pretrained(directory)
    return directory, load_reference(directory), model, params, model_config


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(llava, name):
    _, reference, model, params, model_config = llava(name)
    tokens, images = prompts(), random_images()
    expected = hf_logits(reference, tokens, images)
    ours = ours_logits(model, params, tokens, images)
    diff = np.abs(ours - expected).max()
    print(f"PARITY llava {name}: max |logits diff| {diff:.2e} (|logits| max "
          f"{np.abs(expected).max():.1f})")
    assert diff < TOL
    # The images matter, so the parity covers the vision tower and the projector.
    assert np.abs(ours_logits(model, params, tokens, random_images(seed=1)) - ours).max() > 0.1
    family, text = name.split("_")
    assert (model_config["vision_family"], model_config["text_model_type"]) == (family, text)
    assert model_config["image_size"] == [SIZE, SIZE]
    assert model_config["image_token_id"] == IMAGE_ID
    assert model_config["eos_id"] == 2
    if family == "clip":  # from preprocessor_config.json
        assert (model_config["image_mean"], model_config["image_std"]) == (MEAN, STD)
        assert "block2" not in params["vision"]["encoder"]  # after the feature layer: not built
    else:  # SigLIP's defaults
        assert (model_config["image_mean"], model_config["image_std"]) == ([0.5] * 3, [0.5] * 3)
        assert model_config["llm"]["tie_embeddings"] and "lm_head" not in params["llm"]


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_generation_matches_transformers(llava, name):
    _, reference, model, params, _ = llava(name)
    tokens, images, new = prompts(length=10, starts=(0, 4), seed=2), random_images(seed=2), 6
    reference.generation_config.eos_token_id = None  # all `new` tokens, as with eos_id=None
    with torch.no_grad():
        expected = reference.generate(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2)), max_new_tokens=new,
            do_sample=False, pad_token_id=0).numpy()[:, tokens.shape[1]:]
    out = generate(model, params, jnp.asarray(tokens), images=jnp.asarray(images),
                   max_new_tokens=new, strategy="greedy")
    print(f"GENERATE llava {name}: {expected.tolist()}")
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    assert len(set(expected.ravel().tolist())) > 2  # not one token over and over


@pytest.mark.parametrize("name", list(CASES))
def test_export_gives_transformers_the_same_model(llava, tmp_path, name):
    directory, _, model, params, model_config = llava(name)
    out = str(tmp_path / "exported")
    config = export_hf_llava(model_config, params, out, tokenizer_dir=directory)
    exported, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens, images = prompts(seed=3), random_images(seed=3)
    diff = np.abs(hf_logits(exported.eval(), tokens, images)
                  - ours_logits(model, params, tokens, images)).max()
    print(f"PARITY llava export {name}: {diff:.2e}")
    assert diff < TOL
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))
    if name == "clip_llama":  # the unused last block is cut: the penultimate layer is now last
        assert config["vision_config"]["num_hidden_layers"] == 2
        assert config["vision_feature_layer"] == -1
        assert os.path.exists(os.path.join(out, "preprocessor_config.json"))
    else:
        assert config["vision_config"]["vision_use_head"] is False
    # Importing the export gives back the same params.
    _, again, again_config = load_pretrained(out)
    assert again_config["image_mean"] == model_config["image_mean"]
    flat, flat_again = flatten(params), flatten(again)
    assert set(flat) == set(flat_again)
    for key, value in flat.items():
        np.testing.assert_array_equal(np.asarray(flat_again[key]), np.asarray(value), key)


NAME_STYLES = {  # canonical prefix -> checkpoint prefix, per transformers version
    "hub (transformers < 4.52)": {"vision_model.": "vision_tower.vision_model.",
                                  "projector.": "multi_modal_projector.",
                                  "model.": "language_model.model.",
                                  "lm_head.": "language_model.lm_head."},
    "transformers 4.52 - 4.57": {"vision_model.": "model.vision_tower.vision_model.",
                                 "projector.": "model.multi_modal_projector.",
                                 "model.": "model.language_model.", "lm_head.": "lm_head."},
}


def renamed_checkpoint(directory, out, style, extra=None):
    """`directory`'s config and tensors in `out`, under the names of `style`, in small shards."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(directory, "config.json")) as f:
        hf_io.write_json(os.path.join(out, "config.json"), json.load(f))
    state = hf_io.read_state_dict(directory)
    renamed = dict(extra or {})
    for name, value in state.items():
        canonical = canonical_name(name)
        prefix = next(p for p in NAME_STYLES[style] if canonical.startswith(p))
        renamed[NAME_STYLES[style][prefix] + canonical[len(prefix):]] = value
    files = hf_io.write_safetensors_streaming(
        out, [(n, v.shape) for n, v in renamed.items()], renamed.__getitem__, "float32",
        max_shard_bytes=20_000)
    assert len(files) > 1
    return out


@pytest.mark.parametrize("style", list(NAME_STYLES))
def test_other_checkpoint_names_in_shards_load_the_same(llava, tmp_path, style):
    directory, _, _, params, _ = llava("clip_llama")
    _, again, _ = load_pretrained(renamed_checkpoint(directory, str(tmp_path / "ckpt"), style))
    flat, flat_again = flatten(params), flatten(again)
    assert set(flat) == set(flat_again)
    for key, value in flat.items():
        np.testing.assert_array_equal(np.asarray(flat_again[key]), np.asarray(value), key)


def test_a_tensor_the_model_lacks_is_named(llava, tmp_path):
    directory, *_ = llava("clip_llama")
    extra = {"model.multi_modal_projector.linear_3.weight": np.zeros((4, 4), np.float32)}
    out = renamed_checkpoint(directory, str(tmp_path / "ckpt"), "transformers 4.52 - 4.57",
                             extra)
    with pytest.raises(ValueError, match="unused.*multi_modal_projector.linear_3"):
        load_pretrained(out)


def config_dict(name, **overrides):
    config = transformers.LlavaConfig(**CASES[name], image_token_id=IMAGE_ID).to_dict()
    return {**config, **overrides}


@pytest.mark.parametrize("name, overrides, message", [
    ("clip_llama", dict(projector_hidden_act="gelu_pytorch_tanh"),
     r"projector_hidden_act 'gelu_pytorch_tanh' is not supported; supported: \['gelu'\]"),
    ("clip_llama", dict(vision_feature_select_strategy="cls_only"),
     r"vision_feature_select_strategy 'cls_only' is not one of \['default', 'full'\]"),
    ("siglip_qwen2", dict(vision_feature_select_strategy="default"),
     r"'default' drops the first token.*SigLIP.*'full'"),
    ("clip_llama", dict(vision_feature_layer=5), r"vision_feature_layer 5 .*\[-4, 3\]"),
    ("clip_llama", dict(image_token_index=VOCAB), r"image_token_index 96 .*\[0, 96\)"),
])
def test_unsupported_config_values_are_named(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        llava_config_from_hf(config_dict(name, **overrides))


def test_load_pretrained_names_a_bad_vision_tower(tmp_path):
    config = config_dict("clip_llama")
    config["vision_config"] = {**config["vision_config"], "model_type": "dinov2"}
    hf_io.write_json(os.path.join(tmp_path, "config.json"), config)
    with pytest.raises(ValueError, match=r"vision_config.model_type 'dinov2' is not supported; "
                                         r"supported: \['clip_vision_model', "):
        load_pretrained(str(tmp_path))


def test_convert_cli_exports_an_hf_llava_dir_and_a_vit_llava_run(llava, tmp_path, capsys):
    """`python -m vlmjax.convert export` of an HF LLaVA directory and of a `llava` workdir
    (ViT tower) holding the same params: transformers loads both with our logits. `import` of
    an HF LLaVA directory says it needs none."""
    from vlmjax.convert.cli import main as cli_main
    from vlmjax.convert.hf_llava import prefix_lm_kwargs
    from vlmjax.train.checkpoint import Checkpointer

    directory, _, model, params, model_config = llava("siglip_qwen2")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["import", "--from", "hf", directory, "--out", str(tmp_path / "imported")])
    assert exit_info.value.code == 2 and "needs no import" in capsys.readouterr().err
    workdir = tmp_path / "llava_run"
    checkpointer = Checkpointer(str(workdir), every=1, async_save=False)
    checkpointer.save(5, {"params": params, "step": 5}, {})
    checkpointer.close()
    (workdir / "config.json").write_text(json.dumps({
        "task": "llava", "model": {**prefix_lm_kwargs(model_config), "dtype": "float32"},
        "input": {"image_size": SIZE, "preprocess": "resize|value_range", "template": "chatml",
                  "tokenizer": "spm.model"}}))
    tokens, images = prompts(seed=4), random_images(seed=4)
    expected = ours_logits(model, params, tokens, images)
    for src in (directory, str(workdir)):
        out = str(tmp_path / f"exported_{os.path.basename(src)}")
        cli_main(["export", "--to", "hf", src, out])
        assert "(llava)" in capsys.readouterr().out
        exported = transformers.LlavaForConditionalGeneration.from_pretrained(
            out, dtype=torch.float32, attn_implementation="eager")
        diff = np.abs(hf_logits(exported.eval(), tokens, images) - expected).max()
        assert diff < TOL, (src, diff)


@pytest.mark.parametrize("override,message", [
    (dict(projector="linear"), "HF LLaVA's projector is 'mlp2x_gelu'"),
    (dict(prefix_attention="full"), "HF LLaVA's prefix is 'causal'"),
    (dict(projector_posemb=True), "HF LLaVA's projector has no position embedding"),
    (dict(projector_norm="instance"), "HF LLaVA's projector has no input normalisation")])
def test_export_refuses_what_hf_llava_cannot_express(llava, tmp_path, override, message):
    _, _, _, params, model_config = llava("clip_llama")
    with pytest.raises(ValueError, match=message):
        export_hf_llava({**model_config, **override}, params, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")
