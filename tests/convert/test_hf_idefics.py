"""HF IdeficsForVisionText2Text (Idefics v1) <-> FusionLM: logits against transformers (two images
per sequence, Perceiver resampler with qk norms, 'float' and 'vector' gates, a cross-attention
block before every layer and every second layer), media masks equal to IdeficsProcessor's, the
export loaded back by transformers, and errors for config values FusionLM cannot express."""
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.convert import hf_io, load_pretrained
from vlmjax.convert.hf_idefics import idefics_config_from_hf
from vlmjax.convert.hf_idefics_export import export_hf_idefics
from vlmjax.convert.params import flatten
from vlmjax.inference import generate
from vlmjax.models.fusion import media_mask_from_tokens

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
processing = pytest.importorskip("transformers.models.idefics.processing_idefics")

VOCAB, ADDED, BOS, EOS, PAD = 64, 2, 1, 2, 0
SIZE, PATCH = 16, 8  # 2 x 2 patches + the class token per image
TOL = 1e-4
TEXT = dict(vocab_size=VOCAB, additional_vocab_size=ADDED, hidden_size=32, intermediate_size=48,
            num_attention_heads=4, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
            qk_layer_norms=True, use_resampler=True,
            vision_config=dict(embed_dim=32, image_size=SIZE, patch_size=PATCH,
                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=48),
            perceiver_config=dict(resampler_n_latents=3, resampler_depth=2, resampler_n_heads=2,
                                  resampler_head_dim=8, qk_layer_norms_perceiver=True))
CASES = {  # name -> (IdeficsConfig overrides, image token id, fake token id)
    "float_every_layer": (dict(num_hidden_layers=2, alpha_type="float", cross_layer_interval=1),
                          VOCAB + 1, VOCAB),
    # <image> first among the added tokens: the id must come from the tokenizer file.
    "vector_every_2nd_tied": (dict(num_hidden_layers=4, alpha_type="vector",
                                   cross_layer_interval=2, tie_word_embeddings=True),
                              VOCAB, VOCAB + 1),
    # No resampler: the blocks attend to the tower's 5 tokens per image directly.
    "no_resampler": (dict(num_hidden_layers=2, use_resampler=False, qk_layer_norms=False),
                     VOCAB + 1, VOCAB),
}


def gate(name):
    return CASES[name][0].get("alpha_type", "float")


def redraw_weights(model, seed=0):
    """Matrices ~ N(0, 1/fan_in) (lm_head 6.25/fan_in), embeddings, latents and gates ~ N(0, 1/4)
    and N(0, 1), norm scales ~ U(0.5, 1.5), biases ~ N(0, 0.3^2): HF's init gives zero gates and
    near-uniform logits, which test little."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or name.endswith("ln.weight")) and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
            elif "alpha" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
            elif any(k in name for k in ("embed", "latents", "class_embedding")):
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            elif "lm_head" in name:
                p.copy_(2.5 * torch.randn(p.shape, generator=generator) / np.sqrt(p.shape[1]))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=generator) / np.sqrt(fan_in))
    return model.eval()


def write_tokenizer_config(directory, image_id, fake_id):
    hf_io.write_json(os.path.join(directory, "tokenizer_config.json"), {
        "bos_token": "<s>", "eos_token": "</s>", "added_tokens_decoder": {
            str(image_id): {"content": "<image>", "special": True},
            str(fake_id): {"content": "<fake_token_around_image>", "special": True}}})


def load_reference(directory):
    return transformers.IdeficsForVisionText2Text.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def idefics(tmp_path_factory):
    """name -> (directory, transformers reference, model, params, model_config), built once."""
    built = {}

    def get(name):
        if name not in built:
            overrides, image_id, fake_id = CASES[name]
            directory = str(tmp_path_factory.mktemp(name))
            config = transformers.IdeficsConfig(**{**TEXT, **overrides})
            torch.manual_seed(0)
            redraw_weights(transformers.IdeficsForVisionText2Text(config)).save_pretrained(
                directory)
            write_tokenizer_config(directory, image_id, fake_id)
            model, params, model_config = load_pretrained(directory)
            built[name] = (directory, load_reference(directory), model, params, model_config)
        return built[name]
    return get


def interleaved(image_id, fake_id, seed=0):
    """Row 0: text, image 0, text, eos (ends its chunk), text, image 1, text. Row 1: image 0
    first, text, image 1, text. Images as IdeficsProcessor writes them: <fake><image><fake>."""
    rng = np.random.default_rng(seed)
    rows = []
    for layout in ([3, "img", 3, "eos", 2, "img", 3], ["img", 4, "img", 5]):
        row = [BOS]
        for part in layout:
            if part == "img":
                row += [fake_id, image_id, fake_id]
            elif part == "eos":
                row.append(EOS)
            else:
                row += rng.integers(3, VOCAB, part).tolist()
        rows.append(row)
    length = max(map(len, rows))
    return np.array([r + rng.integers(3, VOCAB, length - len(r)).tolist() for r in rows],
                    np.int32)


def random_images(batch=2, count=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, count, SIZE, SIZE, 3)).astype(
        np.float32)


def processor_mask(tokens, image_id, count=2):
    """IdeficsProcessor's image_attention_mask [B, L, N] of these ids."""
    tokenizer = SimpleNamespace(convert_tokens_to_ids=lambda token: image_id,
                                eos_token_id=EOS)
    incremental, _ = processing.image_attention_mask_for_packed_input_ids(
        torch.as_tensor(tokens, dtype=torch.long), tokenizer, "pt")
    return processing.incremental_to_binary_attention_mask(incremental, "pt", count).numpy()


def hf_logits(model, tokens, images, mask):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                     pixel_values=torch.as_tensor(images.transpose(0, 1, 4, 2, 3)),
                     image_attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()


_FORWARD = {}


def ours_logits(model, params, tokens, images):
    """Our logits with the media mask derived from the tokens (no image_mask given)."""
    if id(model) not in _FORWARD:
        _FORWARD[id(model)] = jax.jit(lambda p, t, x: model.apply({"params": p}, t, images=x))
    return np.asarray(_FORWARD[id(model)](params, jnp.asarray(tokens), jnp.asarray(images)))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(idefics, name):
    _, reference, model, params, model_config = idefics(name)
    _, image_id, fake_id = CASES[name]
    tokens, images = interleaved(image_id, fake_id), random_images()
    mask = processor_mask(tokens, image_id)
    ours_mask = media_mask_from_tokens(tokens, image_id, 2, EOS, True, xp=np)
    np.testing.assert_array_equal(ours_mask, mask.astype(bool))
    assert mask[0].sum(0).tolist() == [6, 5] and not mask[0, :5].any()  # text before: none
    expected = hf_logits(reference, tokens, images, mask)
    ours = ours_logits(model, params, tokens, images)
    diff = np.abs(ours - expected).max()
    print(f"PARITY idefics {name}: max |logits diff| {diff:.2e} (|logits| max "
          f"{np.abs(expected).max():.1f})")
    assert ours.shape == (*tokens.shape, VOCAB + ADDED)
    assert diff < TOL
    # Each image matters, so the parity covers the tower, the resampler and the blocks.
    other = images.copy()
    other[:, 1] = random_images(seed=1)[:, 1]
    moved = np.abs(ours_logits(model, params, tokens, other) - ours).max(-1)
    assert moved[0, 14:].min() > 1e-3 and moved[0, :14].max() < 1e-5  # image 1: from pos 14
    assert (model_config["image_token_id"], model_config["fake_image_token_id"]) == (
        image_id, fake_id)
    assert model_config["end_of_chunk_id"] == EOS and model_config["image_size"] == [SIZE, SIZE]
    assert ("perceiver" in params) == (model_config["resampler"] is not None)
    gate_shape = np.shape(params["llm"]["layers"]["xattn0"]["alpha_attn"])
    assert gate_shape == (() if gate(name) == "float" else (32,))
    if "tied" in name:
        assert "lm_head" not in params["llm"]
        np.testing.assert_array_equal(params["additional_head"]["kernel"],
                                      np.asarray(params["additional_embed"]).T)


@pytest.mark.parametrize("name", list(CASES))
def test_export_gives_transformers_the_same_model(idefics, tmp_path, name):
    directory, _, model, params, model_config = idefics(name)
    _, image_id, fake_id = CASES[name]
    out = str(tmp_path / "exported")
    config = export_hf_idefics(model_config, params, out, tokenizer_dir=directory)
    exported, info = transformers.IdeficsForVisionText2Text.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens, images = interleaved(image_id, fake_id, seed=3), random_images(seed=3)
    diff = np.abs(hf_logits(exported.eval(), tokens, images, processor_mask(tokens, image_id))
                  - ours_logits(model, params, tokens, images)).max()
    print(f"PARITY idefics export {name}: {diff:.2e}")
    assert diff < TOL
    assert config["alpha_type"] == gate(name)
    _, again, again_config = load_pretrained(out)  # and back: the same params and config
    assert again_config == model_config
    flat, flat_again = flatten(params), flatten(again)
    assert set(flat) == set(flat_again)
    for key, value in flat.items():
        np.testing.assert_array_equal(np.asarray(flat_again[key]), np.asarray(value), key)


def config_dict(name, **overrides):
    config = transformers.IdeficsConfig(**{**TEXT, **CASES[name][0]}).to_dict()
    config["architectures"] = ["IdeficsForVisionText2Text"]
    return {**config, **overrides}


@pytest.mark.parametrize("overrides, message", [
    (dict(alpha_type="matrix"), r"alpha_type 'matrix' is not supported; supported: "
                                r"\['float', 'vector'\]"),
    (dict(cross_layer_interval=3), r"cross_layer_interval 3 must be a positive divisor of "
                                   r"num_hidden_layers 4"),
    (dict(architectures=["IdeficsModel"]), r"architectures \['IdeficsModel'\] are not supported"),
    (dict(eos_token_id=[2, 5]), r"eos_token_id \[2, 5\] is not supported; supported: one int"),
    (dict(additional_vocab_size=0), r"no image token id"),
    (dict(hidden_act="swish"), r"hidden_act 'swish' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     r"rope_type 'yarn' is not supported"),
])
def test_unsupported_config_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        idefics_config_from_hf(config_dict("vector_every_2nd_tied", **overrides))


def test_vision_config_values_are_named():
    config = config_dict("float_every_layer")
    config["vision_config"] = {**config["vision_config"], "num_channels": 1}
    with pytest.raises(ValueError, match=r"num_channels 1; only RGB \(3\)"):
        idefics_config_from_hf(config)


@pytest.mark.parametrize("override, message", [
    (dict(only_attend_immediate_media=False), r"only_attend_immediate_media=False \(HF: True\)"),
    (dict(cross_attention={"gate": "float", "skip_without_media": True}),
     r"skip_without_media=True \(HF: False"),
    (dict(cross_attn_every=3), r"cross_attn_every=3 \(HF: a divisor of the LM's depth 2\)"),
    (dict(end_of_chunk_id=5), r"end_of_chunk_id=5 \(HF: the eos, eos_id=2\)"),
    (dict(end_of_chunk_id=None), r"end_of_chunk_id=None \(HF: IdeficsProcessor ends chunks"),
    (dict(llm={"num_kv_heads": 2}), r"llm.num_kv_heads=2 \(HF: num_heads=4\)"),
    (dict(resampler={"num_latents": 3, "depth": 1, "num_heads": 2, "head_dim": 8,
                     "activation": "gelu"}), r"resampler.activation='gelu' \(HF: 'relu'\)"),
    (dict(vision_feature_select_strategy="default"), r"vision_feature_select_strategy="),
])
def test_export_refuses_what_hf_idefics_cannot_express(idefics, tmp_path, override, message):
    _, _, _, params, model_config = idefics("float_every_layer")
    llm = {**model_config["llm"], **override.get("llm", {})}  # `llm`: changes to the LM's
    with pytest.raises(ValueError, match=message):
        export_hf_idefics({**model_config, **override, "llm": llm}, params,
                          str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


@pytest.mark.parametrize("name", ["vector_every_2nd_tied"])  # one: decoding compiles slowly
def test_greedy_generation_matches_transformers(idefics, name):
    """HF's generate carries the prompt's last mask row to the new tokens, as ours does while
    no new token is an eos or an image token (checked: then ours would see no image)."""
    _, reference, model, params, _ = idefics(name)
    _, image_id, fake_id = CASES[name]
    tokens, images, new = interleaved(image_id, fake_id, seed=5), random_images(seed=5), 6
    reference.generation_config.eos_token_id = None  # all `new` tokens, as with eos_id=None
    with torch.no_grad():
        result = reference.generate(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            pixel_values=torch.as_tensor(images.transpose(0, 1, 4, 2, 3)),
            image_attention_mask=torch.as_tensor(processor_mask(tokens, image_id)),
            max_new_tokens=new, do_sample=False, pad_token_id=PAD, output_logits=True,
            return_dict_in_generate=True)
    expected = result.sequences.numpy()[:, tokens.shape[1]:]
    assert not np.isin(expected, [EOS, image_id]).any(), expected
    out = generate(model, params, jnp.asarray(tokens), images=jnp.asarray(images),
                   max_new_tokens=new, strategy="greedy")
    print(f"GENERATE idefics {name}: {expected.tolist()}")
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    # The random model repeats itself, so the tokens alone test little: the log-probabilities
    # of every step (cached decoding on both sides) agree too.
    logprobs = torch.stack(result.logits, 1).log_softmax(-1).numpy()
    hf_scores = np.take_along_axis(logprobs, expected[..., None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(np.asarray(out.scores), hf_scores, atol=1e-3)


def test_convert_cli_exports_an_hf_idefics_dir(idefics, tmp_path, capsys):
    """`python -m vlmjax.convert export` of an HF Idefics directory writes it again (transformers
    computes our logits from it); `import` of one says it needs none."""
    from vlmjax.convert.cli import main as cli_main

    directory, _, model, params, _ = idefics("float_every_layer")
    _, image_id, fake_id = CASES["float_every_layer"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["import", "--from", "hf", directory, "--out", str(tmp_path / "imported")])
    assert exit_info.value.code == 2 and "needs no import" in capsys.readouterr().err
    out = str(tmp_path / "exported")
    cli_main(["export", "--to", "hf", directory, out])
    assert "(idefics)" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))
    tokens, images = interleaved(image_id, fake_id, seed=4), random_images(seed=4)
    diff = np.abs(hf_logits(load_reference(out), tokens, images, processor_mask(tokens, image_id))
                  - ours_logits(model, params, tokens, images)).max()
    assert diff < TOL


def copied_checkpoint(directory, out, extra):
    """`directory`'s config, tokenizer config and tensors plus `extra` tensors in `out`."""
    os.makedirs(out, exist_ok=True)
    for name in ("config.json", "tokenizer_config.json"):
        hf_io.write_json(os.path.join(out, name), hf_io.read_json(os.path.join(directory, name)))
    state = {**hf_io.read_state_dict(directory), **extra}
    hf_io.write_safetensors_streaming(out, [(n, v.shape) for n, v in state.items()],
                                      state.__getitem__, "float32")
    return out


def test_old_buffers_load_and_a_tensor_the_model_lacks_is_named(idefics, tmp_path):
    directory, _, _, params, _ = idefics("float_every_layer")
    buffers = {"model.gated_cross_attn_layers.0.cross_attn.rotary_emb.inv_freq": np.ones(4),
               "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4),
               "model.vision_model.embeddings.position_ids": np.arange(5.0)[None]}
    _, again, _ = load_pretrained(copied_checkpoint(directory, str(tmp_path / "a"), buffers))
    assert set(flatten(again)) == set(flatten(params))
    extra = {"model.gated_cross_attn_layers.2.alpha_dense": np.zeros(1)}
    with pytest.raises(ValueError, match=r"unused \['model.gated_cross_attn_layers.2.alpha_d"):
        load_pretrained(copied_checkpoint(directory, str(tmp_path / "b"), extra))


def test_vision_width_under_either_name():
    config = config_dict("float_every_layer")
    vision = {k: v for k, v in config["vision_config"].items() if k != "embed_dim"}
    config["vision_config"] = {**vision, "hidden_size": 32}
    assert idefics_config_from_hf(config)["vision"]["width"] == 32


def test_export_of_a_model_instance_reading_an_earlier_vision_layer(idefics, tmp_path):
    """A FusionLM instance (no INFO_KEYS: the eos comes from end_of_chunk_id) reading the first
    of two vision blocks: the export has a one-block tower, whose last_hidden_state it reads."""
    from vlmjax.convert.hf_idefics import build_fusion_lm

    _, _, _, params, model_config = idefics("float_every_layer")
    model = build_fusion_lm({**model_config, "vision_feature_layer": 1})
    encoder = {k: v for k, v in params["vision"]["encoder"].items() if k != "block1"}
    params = {**params, "vision": {**params["vision"], "encoder": encoder}}
    out = str(tmp_path / "exported")
    config = export_hf_idefics(model, params, out)
    assert config["vision_config"]["num_hidden_layers"] == 1 and config["eos_token_id"] == EOS
    _, image_id, fake_id = CASES["float_every_layer"]
    tokens, images = interleaved(image_id, fake_id, seed=6), random_images(seed=6)
    diff = np.abs(hf_logits(load_reference(out), tokens, images, processor_mask(tokens, image_id))
                  - ours_logits(model, params, tokens, images)).max()
    assert diff < TOL
