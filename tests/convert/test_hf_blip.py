"""HF BlipForImageTextRetrieval / BlipForConditionalGeneration <-> vlmjax Blip: ITM logits, ITC
similarities, caption logits and greedy captions against transformers; export of each class (and
of a two-part model to both) back to transformers; missing tensors and unsupported config values
named."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.convert import hf_io, load_pretrained
from vlmjax.convert.hf_blip import blip_config_from_hf
from vlmjax.convert.hf_blip_export import export_hf_blip
from vlmjax.convert.params import flatten
from vlmjax.inference import generate
from vlmjax.models.blip import Blip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, BOS, SEP, PAD, EOS = 100, 97, 98, 0, 2
SIZE, PATCH = 32, 8
TOL = 1e-4
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=SIZE, patch_size=PATCH)
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=24, bos_token_id=BOS,
            sep_token_id=SEP, pad_token_id=PAD, eos_token_id=EOS)
CLASSES = {"retrieval": "BlipForImageTextRetrieval",
           "captioning": "BlipForConditionalGeneration"}


def hf_config(tie_word_embeddings=True, **text_overrides):
    text = {**TEXT, "tie_word_embeddings": tie_word_embeddings, **text_overrides}
    return transformers.BlipConfig(vision_config=VISION, text_config=text,
                                   image_text_hidden_size=16,
                                   tie_word_embeddings=tie_word_embeddings)


def redraw_weights(model, seed=0):
    """Matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1/4), norm scales ~ U(0.5, 1.5), biases
    ~ N(0, 0.3^2): HF's init gives near-uniform outputs that test little."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=generator) / np.sqrt(fan_in))
    return model.eval()


def load_reference(directory, name):
    return getattr(transformers, CLASSES[name]).from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    """name -> (directory, transformers reference, vlmjax model, params, model_config), each
    built once per module."""
    built = {}

    def get(name):
        if name not in built:
            directory = str(tmp_path_factory.mktemp(name))
            torch.manual_seed(0)
            reference = redraw_weights(getattr(transformers, CLASSES[name])(hf_config()))
            if name == "captioning":  # as a trained captioner: [PAD] is never the next token
                with torch.no_grad():
                    reference.text_decoder.cls.predictions.bias[PAD] = -10.0
            reference.save_pretrained(directory)
            hf_io.write_json(os.path.join(directory, "tokenizer_config.json"),
                             {"tokenizer_class": "BertTokenizer"})
            built[name] = (directory, load_reference(directory, name), *load_pretrained(directory))
        return built[name]
    return get


def random_images(batch=3, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32)


def pixels(images):
    return torch.as_tensor(images.transpose(0, 3, 1, 2))  # NHWC -> HF's NCHW


def texts(batch=3, length=10, lengths=(10, 6, 10), seed=0):
    """Random word ids (no special ids) and the mask; rows shorter than `length` are padded."""
    tokens = np.random.default_rng(seed).integers(3, BOS, (batch, length)).astype(np.int32)
    mask = np.arange(length)[None] < np.asarray(lengths)[:, None]
    return np.where(mask, tokens, PAD).astype(np.int32), mask


_JIT = {}


def ours(model, params, method, *args):
    """model.apply with `method` (a Blip method name), jitted once per model and method."""
    key = (id(model), method)
    if key not in _JIT:
        _JIT[key] = jax.jit(lambda p, *a: model.apply({"params": p}, *a,
                                                      method=getattr(Blip, method)))
    return np.asarray(_JIT[key](params, *[jnp.asarray(a) for a in args]))


def ours_itc(model, params, images, tokens, mask):
    return (ours(model, params, "encode_image", images)
            @ ours(model, params, "encode_text", tokens, mask).T)


def hf_retrieval(reference, images, tokens, mask, use_itm_head):
    with torch.no_grad():
        return reference(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                         pixel_values=pixels(images), use_itm_head=use_itm_head,
                         attention_mask=torch.as_tensor(mask, dtype=torch.long)
                         ).itm_score.numpy()


def hf_caption_logits(reference, images, tokens, mask):
    with torch.no_grad():
        return reference(pixel_values=pixels(images),
                         input_ids=torch.as_tensor(tokens, dtype=torch.long),
                         attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()


def check_retrieval(reference, model, params, seed, what):
    images, (tokens, mask) = random_images(seed=seed), texts(seed=seed)
    itm, itc = ours(model, params, "itm_logits", images, tokens, mask), ours_itc(
        model, params, images, tokens, mask)
    itm_diff = np.abs(itm - hf_retrieval(reference, images, tokens, mask, True)).max()
    itc_diff = np.abs(itc - hf_retrieval(reference, images, tokens, mask, False)).max()
    print(f"PARITY blip {what}: ITM {itm_diff:.2e} (|logits| max {np.abs(itm).max():.1f}), "
          f"ITC {itc_diff:.2e}")
    assert itm_diff < TOL and itc_diff < TOL
    return images, tokens, mask, itm, itc


def check_captioning(reference, model, params, seed, what):
    images, (tokens, mask) = random_images(2, seed), texts(2, 8, (8, 5), seed)
    tokens[:, 0] = BOS
    logits = ours(model, params, "caption_logits", images, tokens, mask)
    expected = hf_caption_logits(reference, images, tokens, mask)
    diff = np.abs(logits - expected)[mask].max()  # padded positions: no one reads them
    print(f"PARITY blip {what}: caption logits {diff:.2e} (|logits| max "
          f"{np.abs(expected).max():.1f})")
    assert diff < TOL
    return images, tokens, mask, logits


def test_retrieval_itm_and_itc_match_transformers(blip):
    _, reference, model, params, model_config = blip("retrieval")
    images, tokens, mask, itm, itc = check_retrieval(reference, model, params, 0, "retrieval")
    assert itc.shape == (3, 3) and itm.shape == (3, 2)
    # The padded row's mask matters, and so do the images (the parity covers both).
    assert np.abs(ours(model, params, "itm_logits", images, tokens, np.ones_like(mask))[1]
                  - itm[1]).max() > 1e-2
    assert np.abs(ours(model, params, "itm_logits", random_images(seed=5), tokens, mask)
                  - itm).max() > 1e-2
    assert model_config["parts"] == ["encoder"] and model.parts == ("encoder",)
    assert model_config["architecture"] == "BlipForImageTextRetrieval"
    assert (model_config["image_size"], model_config["embed_dim"]) == ([SIZE, SIZE], 16)
    assert (model_config["bos_id"], model_config["sep_id"], model_config["pad_id"]) == (
        BOS, SEP, PAD)
    assert model_config["image"]["norm_eps"] == 1e-5 and model_config["text"]["norm_eps"] == 1e-12
    assert float(params["temp"]) == pytest.approx(0.07)
    assert "self_attention_decoder" not in params["text_shared"]["layer_0"]
    assert "lm_bias" not in params["text_shared"]


def test_caption_logits_and_greedy_captions_match_transformers(blip):
    _, reference, model, params, model_config = blip("captioning")
    check_captioning(reference, model, params, 0, "captioning")
    assert model_config["parts"] == ["decoder"] and "itm_head" not in params
    assert model_config["text"]["tie_word_embeddings"] and "lm_out" not in params["text_shared"]

    # HF's generate sets input_ids[:, 0] to bos ([DEC]) and drops the last token (the
    # processor's [SEP]); the caption stops at sep_token_id.
    images, new = random_images(2, seed=1), 8
    input_ids = np.random.default_rng(1).integers(3, BOS, (2, 6)).astype(np.int32)
    prompt = input_ids[:, :-1].copy()
    prompt[:, 0] = BOS
    embeds = jnp.asarray(ours(model, params, "image_features", images))

    def ours_generate(eos):
        return generate(model, params, jnp.asarray(prompt), max_new_tokens=new, eos_id=eos,
                        image_embeds=embeds, decode_inputs={"image_embeds": embeds},
                        prompt_buckets=None)

    # A sep that row 0 reaches at its third token, so that stopping and padding are compared.
    free = np.asarray(ours_generate(None).tokens)
    sep = int(free[0, 2])
    assert sep not in free[0, :2].tolist()
    text_config = reference.config.text_config
    saved = text_config.sep_token_id
    text_config.sep_token_id = sep
    try:
        with torch.no_grad():
            expected = reference.generate(pixels(images), torch.as_tensor(input_ids).long(),
                                          do_sample=False, max_new_tokens=new, min_length=0
                                          ).numpy()[:, prompt.shape[1]:]
    finally:
        text_config.sep_token_id = saved
    expected = np.pad(expected, ((0, 0), (0, new - expected.shape[1])), constant_values=PAD)
    out = ours_generate(sep)
    print(f"GENERATE blip: {expected.tolist()} (sep {sep})")
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    assert int(out.lengths[0]) == 3 and len(set(expected[1].tolist())) > 2

    # Beam search (BLIP's captioning evaluation uses 3 beams) with the same stop token, the
    # image embeddings repeated per beam through decode_inputs, as BlipEvalModel.caption does.
    text_config.sep_token_id = sep
    try:
        with torch.no_grad():
            beams = reference.generate(pixels(images), torch.as_tensor(input_ids).long(),
                                       do_sample=False, num_beams=3, max_new_tokens=new,
                                       min_length=0).numpy()[:, prompt.shape[1]:]
    finally:
        text_config.sep_token_id = saved
    beams = np.pad(beams, ((0, 0), (0, new - beams.shape[1])), constant_values=PAD)
    beam_out = generate(model, params, jnp.asarray(prompt), max_new_tokens=new, eos_id=sep,
                        strategy="beam", num_beams=3, image_embeds=embeds,
                        decode_inputs={"image_embeds": embeds}, prompt_buckets=None)
    print(f"BEAM blip: {beams.tolist()}")
    np.testing.assert_array_equal(np.asarray(beam_out.tokens), beams)
    assert not np.array_equal(beams, expected)  # the beams found other texts than greedy


@pytest.mark.parametrize("name", list(CLASSES))
def test_export_gives_transformers_the_same_model(blip, tmp_path, capsys, name):
    directory, _, model, params, model_config = blip(name)
    out = str(tmp_path / "exported")
    config = export_hf_blip(model_config, params, out, tokenizer_dir=directory)
    exported, info = getattr(transformers, CLASSES[name]).from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    if name == "retrieval":
        check_retrieval(exported.eval(), model, params, 3, "retrieval export")
        assert "temp (the ITC temperature: HF BLIP has none)" in capsys.readouterr().err
    else:
        check_captioning(exported.eval(), model, params, 3, "captioning export")
    assert config["text_config"]["sep_token_id"] == SEP
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))
    assert os.path.exists(os.path.join(out, "preprocessor_config.json"))
    # Importing the export gives back the same params.
    _, again, again_config = load_pretrained(out)
    assert again_config == model_config
    flat, flat_again = flatten(params), flatten(again)
    assert set(flat) == set(flat_again)
    for key, value in flat.items():
        np.testing.assert_array_equal(np.asarray(flat_again[key]), np.asarray(value), key)


def test_an_untied_lm_head_imports_and_exports(tmp_path):
    """HF unties the head only when both tie_word_embeddings are false; its bias is then
    cls.predictions.decoder.bias."""
    directory = str(tmp_path / "untied")
    torch.manual_seed(0)
    reference = redraw_weights(transformers.BlipForConditionalGeneration(
        hf_config(tie_word_embeddings=False)), seed=1)
    reference.save_pretrained(directory)
    model, params, model_config = load_pretrained(directory)
    assert not model_config["text"]["tie_word_embeddings"]
    assert params["text_shared"]["lm_out"]["kernel"].shape == (32, VOCAB)
    check_captioning(load_reference(directory, "captioning"), model, params, 5, "untied")
    out = str(tmp_path / "exported")
    export_hf_blip(model_config, params, out)
    exported, info = transformers.BlipForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    check_captioning(exported.eval(), model, params, 6, "untied export")


def test_a_two_part_model_exports_to_both_classes(blip, tmp_path):
    """Shared layers: each class gets the shared tensors and its own self-attention."""
    _, _, _, _, model_config = blip("retrieval")
    both = Blip(image=model_config["image"], text=model_config["text"], embed_dim=16)
    shapes = jax.eval_shape(lambda: both.init(
        jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)), jnp.zeros((1, 4), jnp.int32),
        method=both.init_all))
    rng = np.random.default_rng(1)
    params = jax.tree.map(  # O(1) weights: outputs far from uniform
        lambda x: np.float32(0.07) if x.ndim == 0 else (
            rng.normal(size=x.shape) / np.sqrt(x.shape[0] if x.ndim > 1 else 4)
            + (x.ndim == 1)).astype(np.float32), nn.meta.unbox(shapes["params"]))
    ids = {"bos_id": BOS, "sep_id": SEP, "pad_id": PAD}
    with pytest.raises(ValueError, match="parts \\('encoder', 'decoder'\\): name the HF class"):
        export_hf_blip(both, params, str(tmp_path / "x"), token_ids=ids)
    for name, check in (("retrieval", check_retrieval), ("captioning", check_captioning)):
        out = str(tmp_path / name)
        export_hf_blip(both, params, out, architecture=CLASSES[name], token_ids=ids)
        check(load_reference(out, name), both, params, 4, f"two-part export {name}")


def test_a_missing_tensor_is_named(blip, tmp_path):
    directory, *_ = blip("retrieval")
    state = hf_io.read_state_dict(directory)
    del state["text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    state["text_encoder.extra.weight"] = np.zeros((2, 2), np.float32)
    hf_io.write_json(str(tmp_path / "config.json"),
                     hf_io.read_json(os.path.join(directory, "config.json")))
    hf_io.write_safetensors(str(tmp_path / "model.safetensors"), state)
    with pytest.raises(ValueError, match=r"missing \['text_encoder\.encoder\.layer\.1\."
                                         r"crossattention\.self\.key\.weight'\]; unused "
                                         r"\['text_encoder\.extra\.weight'\]"):
        load_pretrained(str(tmp_path))


def config_dict(architecture="BlipForConditionalGeneration", **text_overrides):
    return {**hf_config(**text_overrides).to_dict(), "architectures": [architecture]}


@pytest.mark.parametrize("config, message", [
    (config_dict(hidden_act="swish"),
     r"text_config: hidden_act 'swish' has no vlmjax equivalent; supported: \["),
    (config_dict(position_embedding_type="relative_key"),
     r"text_config.position_embedding_type 'relative_key' is not supported; supported: "
     r"\['absolute'\]"),
    (config_dict(is_decoder=False), r"text_config.is_decoder False .*needs is_decoder true"),
    (config_dict("BlipForQuestionAnswering"),
     r"architectures \['BlipForQuestionAnswering'\] are not supported; expected one of "
     r"\['BlipForImageTextRetrieval', 'BlipForConditionalGeneration'\]"),
])
def test_unsupported_config_values_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        blip_config_from_hf(config)


@pytest.mark.parametrize("name, change, message", [
    ("captioning", dict(image={"stem": "conv"}), r"image.stem='conv' \(HF: 'patch'\)"),
    ("captioning", dict(image={"pre_norm": True}), r"image.pre_norm=True \(HF: False\)"),
    ("retrieval", dict(text={"activation": "silu"}), r"text.activation='silu' \(HF: \["),
    ("captioning", dict(architecture="BlipForImageTextRetrieval"),
     r"BlipForImageTextRetrieval needs the BLIP encoder part; this model's parts are "
     r"\('decoder',\)"),
])
def test_export_refuses_what_hf_blip_cannot_express(blip, tmp_path, name, change, message):
    *_, params, model_config = blip(name)
    config = dict(model_config)
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ValueError, match=message):
        export_hf_blip(config, params, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_convert_cli_exports_an_hf_blip_dir_and_says_import_is_not_needed(blip, tmp_path,
                                                                          capsys):
    from vlmjax.convert.cli import main as cli_main

    directory, _, _, params, _ = blip("captioning")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["import", "--from", "hf", directory, "--out", str(tmp_path / "imported")])
    assert exit_info.value.code == 2 and "needs no import" in capsys.readouterr().err
    out = str(tmp_path / "exported")
    cli_main(["export", "--to", "hf", directory, out, "--dtype", "bfloat16"])
    assert "(blip)" in capsys.readouterr().out
    assert hf_io.read_json(os.path.join(out, "config.json"))["architectures"] == [
        "BlipForConditionalGeneration"]
    _, again, _ = load_pretrained(out)
    for key, value in flatten(params).items():  # bfloat16 weights: ~3 significant digits
        np.testing.assert_allclose(np.asarray(flatten(again)[key]), np.asarray(value),
                                   rtol=1e-2, atol=1e-2, err_msg=key)
