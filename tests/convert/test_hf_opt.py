"""HF OPTForCausalLM -> Decoder import (logits parity with left padding, greedy generation),
export back to HF, and the OPT configs that are refused."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from tests.convert.decoder_fixtures import (BOS_ID, EOS_ID, PAD_ID, VOCAB, hf_logits, load_hf,
                                            random_tokens, redraw_weights, torch, transformers)
from vlmjax.convert import load_pretrained
from vlmjax.convert.hf_decoder_config import decoder_config_from_hf
from vlmjax.convert.hf_decoder_export import export_hf_decoder
from vlmjax.inference import generate

TOL = 1e-4
NEW = 10
OPT_CONFIG = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=96,
                  num_attention_heads=4, max_position_embeddings=64,
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    """A tiny random OPTForCausalLM (tied lm_head, ReLU, biases) saved with save_pretrained.
    The position table is redrawn at the tokens' scale and above: with small positions, the
    tied head maps each token back onto itself and greedy decoding repeats one token."""
    config = transformers.OPTConfig(**OPT_CONFIG)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = redraw_weights(transformers.OPTForCausalLM(config))
    with torch.no_grad():
        table = model.model.decoder.embed_positions.weight
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(1)))
    directory = str(tmp_path_factory.mktemp("opt_hf"))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pair(opt_dir):
    model, params, model_config = load_pretrained(opt_dir)
    return model, params, model_config, load_hf(opt_dir)


def vlmjax_logits(model, params, tokens, **kwargs):
    return np.asarray(model.apply({"params": params}, jnp.asarray(tokens), **kwargs))


def left_padded_prompts(batch=3, length=9, pads=(0, 3, 5), seed=4):
    tokens = random_tokens(batch, length, seed)
    mask = np.ones(tokens.shape, bool)
    for row, pad in enumerate(pads):
        mask[row, :pad] = False
    tokens[~mask] = PAD_ID
    return tokens, mask


def test_logits_match_transformers_with_left_padding(pair):
    model, params, model_config, hf = pair
    assert (model_config["model_type"], model_config["num_positions"],
            model_config["position_offset"]) == ("opt", 64 + 2, 2)
    tokens = random_tokens(2, 12)
    reference = hf_logits(hf, tokens)
    diff = np.abs(vlmjax_logits(model, params, tokens) - reference).max()
    print(f"PARITY decoder opt: max |logits diff| {diff:.2e} (|logits| max "
          f"{np.abs(reference).max():.1f})")
    assert diff < TOL
    # Left padding: HF derives the positions from the attention mask (first real token: 0).
    tokens, mask = left_padded_prompts(length=12)
    reference = hf_logits(hf, tokens, attention_mask=mask.astype(np.int64))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours = vlmjax_logits(model, params, tokens, segment_ids=mask, positions=positions)
    diff = np.abs(ours[mask] - reference[mask]).max()
    print(f"PARITY decoder opt left-padded: {diff:.2e}")
    assert diff < TOL
    slots = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)  # ignoring the padding
    unshifted = vlmjax_logits(model, params, tokens, segment_ids=mask, positions=slots)
    assert np.abs(unshifted[mask] - reference[mask]).max() > 100 * TOL  # positions matter


def test_greedy_generation_equals_transformers(pair):
    model, params, _, hf = pair
    tokens, mask = left_padded_prompts()
    ours = generate(model, params, tokens, prompt_mask=mask, max_new_tokens=NEW, pad_id=PAD_ID)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                          attention_mask=torch.as_tensor(mask, dtype=torch.long),
                          max_new_tokens=NEW, do_sample=False, pad_token_id=PAD_ID,
                          eos_token_id=None)
    theirs = out[:, tokens.shape[1]:].numpy()
    assert theirs.shape == (3, NEW)
    np.testing.assert_array_equal(np.asarray(ours.tokens), theirs)
    assert len(np.unique(theirs)) > 3  # not a degenerate repeat of one token


def test_export_gives_transformers_the_same_model(pair, opt_dir, tmp_path):
    model, params, model_config, hf = pair
    out = str(tmp_path / "exported")
    assert export_hf_decoder(params, model_config, out) == "opt"
    with open(os.path.join(out, "config.json")) as f:
        assert decoder_config_from_hf(json.load(f)) == model_config  # the config round-trips
    exported = load_hf(out)
    assert type(exported).__name__ == "OPTForCausalLM"
    original, state = hf.state_dict(), exported.state_dict()
    assert set(state) == set(original)
    for key, tensor in original.items():  # float32 export: bit for bit
        assert torch.equal(tensor, state[key]), key
    tokens = random_tokens(2, 12, seed=3)
    np.testing.assert_allclose(hf_logits(exported, tokens), vlmjax_logits(model, params, tokens),
                               atol=TOL)


def test_base_model_tensor_names_load(pair, tmp_path):
    """facebook/opt-* files are saved from OPTModel: `decoder.…`, no `model.` prefix."""
    from safetensors.numpy import save_file

    _, params, _, hf = pair
    state = {k.removeprefix("model."): v.numpy() for k, v in hf.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    config = {**OPT_CONFIG, "model_type": "opt", "architectures": ["OPTForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, loaded, _ = load_pretrained(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(loaded["position_embed"]["embedding"]),
                                  np.asarray(params["position_embed"]["embedding"]))


@pytest.mark.parametrize("override, message", [
    (dict(do_layer_norm_before=False), r"do_layer_norm_before=False .*not supported"),
    (dict(word_embed_proj_dim=32), r"word_embed_proj_dim 32 != hidden_size 64"),
    (dict(layer_norm_elementwise_affine=False), r"layer_norm_elementwise_affine=False"),
    (dict(activation_function="swish"), r"activation_function 'swish' is not supported"),
])
def test_unsupported_configs_are_clear_errors(tmp_path, override, message):
    config = {**OPT_CONFIG, "model_type": "opt", **override}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_pretrained(str(tmp_path))
