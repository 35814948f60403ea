"""big_vision `.npz` import: a checkpoint written here in big_vision's naming (from the tiny
torch SigLIP, independently of vlmjax's own name table) must reproduce transformers' outputs."""
import os

import numpy as np
import pytest

from tests.convert.reference import SIGLIP_CONFIG, hf_outputs, vlmjax_outputs
from tests.convert.test_hf_parity import assert_parity
from vlmjax.convert import load_pretrained, read_pretrained


def _dense(w):          # torch Linear [out, in] -> flax Dense [in, out]
    return w.T


def _heads_in(w, heads):  # [D, D] -> flax attention kernel [D, heads, head_dim]
    return w.T.reshape(w.shape[1], heads, -1)


def _attention(out, prefix, q, k, v, o, heads):
    for name, (weight, bias) in (("query", q), ("key", k), ("value", v)):
        out[f"{prefix}/{name}/kernel"] = _heads_in(weight, heads)
        out[f"{prefix}/{name}/bias"] = bias.reshape(heads, -1)
    out[f"{prefix}/out/kernel"] = o[0].T.reshape(heads, -1, o[0].shape[0])
    out[f"{prefix}/out/bias"] = o[1]


def _block(out, sd, prefix, hf, heads):
    out[f"{prefix}/LayerNorm_0/scale"] = sd[f"{hf}.layer_norm1.weight"]
    out[f"{prefix}/LayerNorm_0/bias"] = sd[f"{hf}.layer_norm1.bias"]
    out[f"{prefix}/LayerNorm_1/scale"] = sd[f"{hf}.layer_norm2.weight"]
    out[f"{prefix}/LayerNorm_1/bias"] = sd[f"{hf}.layer_norm2.bias"]
    attn = lambda n: (sd[f"{hf}.self_attn.{n}.weight"], sd[f"{hf}.self_attn.{n}.bias"])  # noqa
    _attention(out, f"{prefix}/MultiHeadDotProductAttention_0", attn("q_proj"), attn("k_proj"),
               attn("v_proj"), attn("out_proj"), heads)
    for i, fc in enumerate(("fc1", "fc2")):
        out[f"{prefix}/MlpBlock_0/Dense_{i}/kernel"] = _dense(sd[f"{hf}.mlp.{fc}.weight"])
        out[f"{prefix}/MlpBlock_0/Dense_{i}/bias"] = sd[f"{hf}.mlp.{fc}.bias"]


def big_vision_params(torch_model, scan=False):
    """big_vision two_towers param names (as in its SigLIP .npz releases) from a SiglipModel."""
    sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    vh = SIGLIP_CONFIG["vision_config"]["num_attention_heads"]
    th = SIGLIP_CONFIG["text_config"]["num_attention_heads"]
    out = {"params/img/embedding/kernel":
           sd["vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
           "params/img/embedding/bias": sd["vision_model.embeddings.patch_embedding.bias"],
           "params/img/pos_embedding":
           sd["vision_model.embeddings.position_embedding.weight"][None],
           "params/img/Transformer/encoder_norm/scale": sd["vision_model.post_layernorm.weight"],
           "params/img/Transformer/encoder_norm/bias": sd["vision_model.post_layernorm.bias"],
           "params/img/MAPHead_0/probe": sd["vision_model.head.probe"],
           "params/img/MAPHead_0/LayerNorm_0/scale": sd["vision_model.head.layernorm.weight"],
           "params/img/MAPHead_0/LayerNorm_0/bias": sd["vision_model.head.layernorm.bias"],
           "params/txt/Embed_0/embedding": sd["text_model.embeddings.token_embedding.weight"],
           "params/txt/pos_embedding": sd["text_model.embeddings.position_embedding.weight"][None],
           "params/txt/Encoder_0/encoder_norm/scale": sd["text_model.final_layer_norm.weight"],
           "params/txt/Encoder_0/encoder_norm/bias": sd["text_model.final_layer_norm.bias"],
           "params/txt/head/kernel": _dense(sd["text_model.head.weight"]),
           "params/txt/head/bias": sd["text_model.head.bias"],
           "params/t": sd["logit_scale"], "params/b": sd["logit_bias"]}
    packed_w = np.split(sd["vision_model.head.attention.in_proj_weight"], 3)
    packed_b = np.split(sd["vision_model.head.attention.in_proj_bias"], 3)
    _attention(out, "params/img/MAPHead_0/MultiHeadDotProductAttention_0",
               (packed_w[0], packed_b[0]), (packed_w[1], packed_b[1]), (packed_w[2], packed_b[2]),
               (sd["vision_model.head.attention.out_proj.weight"],
                sd["vision_model.head.attention.out_proj.bias"]), vh)
    for i, fc in enumerate(("fc1", "fc2")):
        out[f"params/img/MAPHead_0/MlpBlock_0/Dense_{i}/kernel"] = _dense(
            sd[f"vision_model.head.mlp.{fc}.weight"])
        out[f"params/img/MAPHead_0/MlpBlock_0/Dense_{i}/bias"] = sd[
            f"vision_model.head.mlp.{fc}.bias"]
    for tower, hf, heads in (("img/Transformer", "vision_model", vh),
                             ("txt/Encoder_0", "text_model", th)):
        depth = SIGLIP_CONFIG["vision_config" if hf == "vision_model" else "text_config"][
            "num_hidden_layers"]
        blocks = []
        for i in range(depth):
            block = {}
            _block(block, sd, "", f"{hf}.encoder.layers.{i}", heads)
            blocks.append(block)
        for name in blocks[0]:
            if scan:  # big_vision's scan=True: one block, params stacked on a leading depth axis
                out[f"params/{tower}/encoderblock{name}"] = np.stack([b[name] for b in blocks])
            else:
                for i, block in enumerate(blocks):
                    out[f"params/{tower}/encoderblock_{i}{name}"] = block[name]
    return out


@pytest.fixture(scope="module")
def npz_path(siglip_hf, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("big_vision") / "siglip_tiny.npz")
    np.savez(path, **big_vision_params(siglip_hf[1]))
    return path


def test_big_vision_npz_matches_transformers(npz_path, siglip_hf, images, siglip_tokens):
    model, params, config = load_pretrained(npz_path)
    assert config["image"]["pool"] == "map" and config["text"]["pool"] == "last"
    assert config["embed_dim"] == 32 and config["image"]["patch_size"] == 6
    assert_parity("big_vision npz", vlmjax_outputs(model, params, images, siglip_tokens),
                  hf_outputs(siglip_hf[1], images, siglip_tokens))


def test_big_vision_npz_gives_the_same_params_as_the_hf_directory(npz_path, siglip_hf, tmp_path):
    from_npz, from_hf = read_pretrained(npz_path), read_pretrained(siglip_hf[0])
    assert set(from_npz.params) == set(from_hf.params)
    for name, value in from_hf.params.items():
        np.testing.assert_array_equal(from_npz.params[name], value, err_msg=name)
    assert from_npz.image["size"] == from_hf.image["size"] == [30, 30]
    # The scanned layout (scan=True checkpoints) unstacks to the same params.
    scanned = str(tmp_path / "scanned.npz")
    np.savez(scanned, **big_vision_params(siglip_hf[1], scan=True))
    from_scanned = read_pretrained(scanned)
    assert set(from_scanned.params) == set(from_hf.params)
    for name, value in from_hf.params.items():
        np.testing.assert_array_equal(from_scanned.params[name], value, err_msg=name)


def test_big_vision_unknown_parameter_is_named(siglip_hf, tmp_path):
    params = big_vision_params(siglip_hf[1])
    params["params/img/Transformer/encoderblock_0/Extra_0/kernel"] = np.zeros(3)
    path = str(tmp_path / "extra.npz")
    np.savez(path, **params)
    with pytest.raises(ValueError, match="encoderblock_0/Extra_0/kernel"):
        load_pretrained(path)


def test_big_vision_import_cli_with_a_sentencepiece_tokenizer(npz_path, siglip_hf, tmp_path):
    from vlmjax.convert import load_pretrained_tokenizer
    from vlmjax.convert.cli import main as cli_main

    out = str(tmp_path / "converted")
    cli_main(["import", "--from", "big_vision", npz_path, "--out", out, "--tokenizer",
              os.path.join(siglip_hf[0], "spiece.model")])
    tokenizer, settings = load_pretrained_tokenizer(out)
    assert os.path.exists(os.path.join(out, "spiece.model"))
    assert (settings["pad_id"], settings["eos_id"], settings["text_mask"]) == (1, 1, False)
    ids, _ = tokenizer.encode_batch(["a photo of a cat"], settings["max_len"],
                                    settings["add_bos"], settings["eos"])
    assert ids.shape == (1, 12) and ids[0, -1] == 1  # padded with 1 (big_vision pad_value=1)
    # The data pipeline (input.tokenizer = out/spiece.model) pads the same way: the converted
    # dir declares the padding in a tokenizer_config.json, as HF SigLIP directories do.
    from vlmjax.data.tokenizers import load_model_tokenizer
    assert "tokenizer_config.json" in settings["files"]
    assert load_model_tokenizer(os.path.join(out, "spiece.model")).pad_id == 1
    with pytest.raises(SystemExit):  # an .npz is not an HF directory
        cli_main(["import", "--from", "hf", npz_path, "--out", str(tmp_path / "x")])
