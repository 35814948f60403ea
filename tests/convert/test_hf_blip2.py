"""HF Blip2ForConditionalGeneration -> PrefixLM (Q-Former projector): logits and greedy
generation against transformers (OPT and Llama text models), image-token counts, export back to
HF, a vision tower without q/k/v bias, and errors for configs PrefixLM cannot express."""
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlmjax.config import ConfigError
from vlmjax.convert import hf_io, load_pretrained
from vlmjax.convert.hf_blip2 import blip2_config_from_hf, load_hf_blip2
from vlmjax.convert.hf_blip2_export import export_hf_blip2
from vlmjax.convert.params import flatten
from vlmjax.inference import generate

from tests.convert.test_hf_llava import hf_logits, ours_logits  # a PrefixLM either way

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, IMAGE_ID, SIZE, PATCH, QUERIES = 100, 99, 32, 8, 4
TOL = 1e-4
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=SIZE, patch_size=PATCH)
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               vocab_size=50, max_position_embeddings=32)
SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES = {  # name -> Blip2Config arguments
    # blip2-opt-style: every other Q-Former layer cross-attends, a tied OPT (width 64: narrower,
    # its tied head maps the last token back onto itself and greedy decoding repeats it).
    "opt": dict(qformer_config=dict(QFORMER, cross_attention_frequency=2),
                text_config=dict(model_type="opt", vocab_size=VOCAB, hidden_size=64,
                                 num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                 max_position_embeddings=64, **SPECIAL)),
    # Every layer cross-attends; the Q-Former's text FFNs (use_qformer_text_input) are in the
    # file and unused by generation; an untied GQA Llama.
    "llama": dict(qformer_config=dict(QFORMER, cross_attention_frequency=1,
                                      use_qformer_text_input=True),
                  text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=48,
                                   intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=False, **SPECIAL)),
}


def hf_config(name):
    return transformers.Blip2Config(vision_config=VISION, num_query_tokens=QUERIES,
                                    image_token_index=IMAGE_ID, **CASES[name])


def redraw_weights(model, seed=0):
    """Matrices ~ N(0, 1/fan_in) (lm_head 6.25/fan_in), embeddings and queries ~ N(0, 1/4)
    (OPT's positions N(0, 1): smaller, its tied head repeats the last token), norm scales
    ~ U(0.5, 1.5), biases ~ N(0, 0.3^2): HF's init gives near-uniform logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
            elif "embed_positions" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
            elif any(k in name for k in ("embed_tokens", "position_embedding", "class_embedding",
                                         "query_tokens")):
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            elif "lm_head" in name:
                p.copy_(2.5 * torch.randn(p.shape, generator=generator) / np.sqrt(p.shape[1]))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=generator) / np.sqrt(fan_in))
    return model.eval()


def load_reference(directory):
    return transformers.Blip2ForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager").eval()


def prompts(batch=2, length=10, starts=(0, 2), seed=0):
    """Random text ids (no special or image ids) with one image's QUERIES tokens at
    `starts[row]` (Blip2Processor puts them first; the rows differ here)."""
    tokens = np.random.default_rng(seed).integers(3, IMAGE_ID, (batch, length)).astype(np.int32)
    for row, start in enumerate(starts):
        tokens[row, start:start + QUERIES] = IMAGE_ID
    return tokens


def random_images(batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    """name -> (directory, transformers reference, vlmjax model, params, model_config), each
    built once per module."""
    built = {}

    def get(name):
        if name not in built:
            directory = str(tmp_path_factory.mktemp(f"blip2_{name}"))
            torch.manual_seed(0)
            redraw_weights(transformers.Blip2ForConditionalGeneration(hf_config(name))
                           ).save_pretrained(directory)
            hf_io.write_json(os.path.join(directory, "tokenizer_config.json"), {"bos": "</s>"})
            model, params, model_config = load_pretrained(directory)
            built[name] = directory, load_reference(directory), model, params, model_config
        return built[name]
    return get


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(blip2, name):
    _, reference, model, params, model_config = blip2(name)
    tokens, images = prompts(), random_images()
    expected = hf_logits(reference, tokens, images)
    ours = ours_logits(model, params, tokens, images)
    diff = np.abs(ours - expected).max()
    print(f"PARITY blip2 {name}: max |logits diff| {diff:.2e} (|logits| max "
          f"{np.abs(expected).max():.1f})")
    assert diff < TOL
    # The images matter, so the parity covers the vision tower, ln_vision and the Q-Former.
    assert np.abs(ours_logits(model, params, tokens, random_images(seed=1)) - ours).max() > 0.1
    assert (model_config["model_type"], model_config["text_model_type"]) == ("blip-2", name)
    assert model_config["image_token_id"] == IMAGE_ID and model_config["image_size"] == [32, 32]
    assert model_config["qformer"]["num_query_tokens"] == QUERIES
    assert "text_ffn" not in params["projector"]["qformer"]["layer_0"]
    assert ("lm_head" in params["llm"]) == (name == "llama")  # OPT ties it


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_generation_matches_transformers(blip2, name):
    _, reference, model, params, _ = blip2(name)
    images, new = random_images(seed=2), 5
    tokens = prompts(length=7, starts=(0, 0), seed=2)  # image tokens first, as Blip2Processor
    tokens[:, QUERIES] = 1  # then BOS
    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2)), max_new_tokens=new,
            do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    expected = out[:, -new:]
    np.testing.assert_array_equal(out[:, :tokens.shape[1]], tokens)  # the prompt, then new
    ours = generate(model, params, jnp.asarray(tokens), images=jnp.asarray(images),
                    max_new_tokens=new, strategy="greedy")
    print(f"GENERATE blip2 {name}: {expected.tolist()}")
    np.testing.assert_array_equal(np.asarray(ours.tokens), expected)
    assert len(set(expected.ravel().tolist())) > 2  # not one token over and over


def test_too_few_image_tokens_are_an_error(blip2):
    """transformers fills a row's image tokens from the batch's flattened query outputs, so a
    row one token short silently shifts every later row's image; vlmjax names the counts."""
    _, reference, model, params, _ = blip2("opt")
    tokens, images = prompts(), random_images()
    tokens[0, QUERIES - 1] = 5  # row 0: 3 image tokens of 4
    hf_logits(reference, tokens, images)  # no error from transformers
    with pytest.raises(ValueError, match=r"row 0 holds 3 image tokens .* give 4 visual tokens "
                                         r"\(1 image\(s\) x 4\)"):
        model.apply({"params": params}, jnp.asarray(tokens), images=jnp.asarray(images))


@pytest.mark.parametrize("name", list(CASES))
def test_export_gives_transformers_the_same_model(blip2, tmp_path, name):
    directory, reference, _, params, model_config = blip2(name)
    out = str(tmp_path / "exported")
    config = export_hf_blip2(model_config, params, out, tokenizer_dir=directory)
    exported, info = transformers.Blip2ForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info
    # Every tensor HF computes with comes back bit for bit (the vision q/k/v packed into qkv,
    # ln_vision as post_layernorm); the text FFNs of use_qformer_text_input are not written.
    original, state = reference.state_dict(), exported.state_dict()
    text_ffn = {k for k in original
                if re.match(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.", k)}
    assert bool(text_ffn) == (name == "llama")
    assert set(state) == set(original) - text_ffn
    for key, tensor in state.items():
        assert torch.equal(tensor, original[key]), key
    tokens, images = prompts(seed=3), random_images(seed=3)
    diff = np.abs(hf_logits(exported.eval(), tokens, images)
                  - hf_logits(reference, tokens, images)).max()
    print(f"PARITY blip2 export {name}: {diff:.2e}")
    assert diff < 1e-5
    assert config["qformer_config"]["use_qformer_text_input"] is False
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))
    # Importing the export gives back the same params.
    _, again, _ = load_hf_blip2(out)
    flat, flat_again = flatten(params), flatten(again)
    assert set(flat) == set(flat_again)
    for key, value in flat.items():
        np.testing.assert_array_equal(np.asarray(flat_again[key]), np.asarray(value), key)


def test_a_vision_tower_without_qkv_bias_loads_with_zero_biases(tmp_path):
    config = hf_config("opt")
    config.vision_config.qkv_bias = False
    torch.manual_seed(0)
    reference = redraw_weights(transformers.Blip2ForConditionalGeneration(config))
    reference.save_pretrained(str(tmp_path))
    assert "vision_model.encoder.layers.0.self_attn.qkv.bias" not in reference.state_dict()
    _, params, _ = load_hf_blip2(str(tmp_path))
    attention = params["vision"]["encoder"]["block1"]["attn"]
    for proj in ("query", "key", "value"):
        assert not np.any(np.asarray(attention[proj]["bias"])), proj
    weight = reference.vision_model.encoder.layers[1].self_attn.qkv.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(attention["value"]["kernel"]).reshape(32, 32),
                                  weight[64:].T)  # v rows of qkv -> [D, heads, head_dim]


def test_convert_cli_exports_an_hf_blip2_dir(blip2, tmp_path, capsys):
    from vlmjax.convert.cli import main as cli_main

    directory, reference, *_ = blip2("opt")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["import", "--from", "hf", directory, "--out", str(tmp_path / "imported")])
    assert exit_info.value.code == 2 and "needs no import" in capsys.readouterr().err
    out = str(tmp_path / "exported")
    cli_main(["export", "--to", "hf", directory, out])
    assert "(blip-2)" in capsys.readouterr().out
    exported = transformers.Blip2ForConditionalGeneration.from_pretrained(out)
    original = reference.state_dict()
    for key, tensor in exported.state_dict().items():
        assert torch.equal(tensor, original[key]), key


def config_dict(**overrides):
    return {**hf_config("opt").to_dict(), **overrides}


@pytest.mark.parametrize("overrides, message", [
    (dict(text_config={"model_type": "t5", "vocab_size": VOCAB}),
     r"text_config.model_type 't5' is not supported; supported: \['llama', 'opt', 'qwen2'\] "
     r"\(decoder-only LMs"),
    (dict(image_token_index=None), r"image_token_index is not set"),
    (dict(image_token_index=VOCAB), r"image_token_index 100 .*\[0, 100\)"),
    (dict(architectures=["Blip2ForImageTextRetrieval"]),
     r"architectures \['Blip2ForImageTextRetrieval'\] are not supported"),
    (dict(vision_config=dict(VISION, hidden_act="swish")), r"hidden_act 'swish' has no vlmjax"),
    (dict(vision_config=dict(VISION, model_type="clip_vision_model")),
     r"vision_config.model_type 'clip_vision_model' is not supported"),
])
def test_unsupported_configs_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        blip2_config_from_hf(config_dict(**overrides))


@pytest.mark.parametrize("override, message", [
    (dict(vision_feature_select_strategy="default"),
     r"vision_feature_select_strategy='default' \(HF: 'full'\)"),
    (dict(projector="mlp2x_gelu", qformer=None), r"projector='mlp2x_gelu' \(HF: 'qformer'\)"),
    (dict(vision_feature_layer=[-1, -2]), r"vision_feature_layer=\[-1, -2\]"),
])
def test_export_refuses_what_hf_blip2_cannot_express(blip2, tmp_path, override, message):
    _, _, _, params, model_config = blip2("opt")
    with pytest.raises(ValueError, match=message):
        export_hf_blip2({**model_config, **override}, params, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_a_whole_hf_blip2_is_a_model_init_source(blip2):
    """The llava task's (and blip2 stage 2's) model_init reads an HF BLIP-2 directory as the
    whole PrefixLM, after checking its architecture against config.model."""
    from vlmjax.convert import hf_blip2
    from vlmjax.train.tasks import llava_init
    directory, _, _, params, model_config = blip2("opt")
    info = llava_init.source_info(directory, "model_init")
    assert info.holds == "llava" and info.image_size == [SIZE, SIZE]
    model = ml_collections.ConfigDict(hf_blip2.prefix_lm_kwargs(model_config))
    abstract = jax.eval_shape(lambda: params)
    got = llava_init.assemble(directory, model, SIZE, abstract, None, lambda: None)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model.qformer.num_query_tokens += 1
    with pytest.raises(ConfigError, match="num_query_tokens"):
        llava_init.assemble(directory, model, SIZE, abstract, None, lambda: None)
