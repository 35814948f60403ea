"""BLIP-2 Q-Former: parity with transformers' Blip2QFormerModel (queries only, and with text
under each stage-1 mask), the masks' exact patterns and what they let interact, cross-attention
placement and the separate query / text FFNs, and the HF loader."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.convert import hf
from vlmjax.convert.hf_qformer import (build_qformer, load_hf_qformer, qformer_config_from_hf,
                                       weight_entries)
from vlmjax.convert.params import flatten, unflatten
from vlmjax.models.qformer import QFormer, stage1_mask

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tests.convert.test_hf_blip import redraw_weights  # noqa: E402 (needs torch)

VOCAB, QUERIES, IMAGE_TOKENS, IMAGE_WIDTH, LENGTH = 50, 4, 5, 24, 6
TOL = 1e-4
CONFIG = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=16, cross_attention_frequency=2,
              encoder_hidden_size=IMAGE_WIDTH, use_qformer_text_input=True)


@pytest.fixture(scope="module")
def qformer(tmp_path_factory):
    """(HF Blip2QFormerModel, HF Blip2TextEmbeddings, query tokens [1, Q, D], our QFormer, its
    params read through the Blip2 table, the model config and params of load_hf_qformer): one
    tiny random model with the text input."""
    config = transformers.Blip2QFormerConfig(**CONFIG)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = redraw_weights(transformers.Blip2QFormerModel(config))
    embeddings = redraw_weights(
        transformers.models.blip_2.modeling_blip_2.Blip2TextEmbeddings(config), seed=1)
    query_tokens = 0.5 * torch.randn(1, QUERIES, CONFIG["hidden_size"],
                                     generator=torch.Generator().manual_seed(2))
    directory = str(tmp_path_factory.mktemp("qformer"))
    reference.save_pretrained(directory)
    _, loaded, model_config = load_hf_qformer(directory)
    model_config["num_query_tokens"] = QUERIES
    # As in a whole Blip2 checkpoint: the Q-Former, its query tokens and text embeddings.
    state = {**{f"qformer.{k}": v for k, v in reference.state_dict().items()},
             **{f"embeddings.{k}": v for k, v in embeddings.state_dict().items()
                if k != "position_ids"},
             "query_tokens": query_tokens}
    state = {k: v.numpy() for k, v in state.items()}
    flat = hf.params_from_entries(state, weight_entries(model_config, "qformer", "query_tokens",
                                                        "embeddings"), "Blip2", "test")
    params = unflatten(flat)
    model = build_qformer(model_config)
    return reference, embeddings, query_tokens, model, params, model_config, loaded


def run(model, params, images, tokens=None, text_mask=None, kind="bidirectional"):
    """Our (query states, text states) as numpy (None where absent); jitted per signature."""
    key = (id(model), tokens is None, kind)
    if key not in _JIT:
        _JIT[key] = jax.jit(lambda p, i, t, m: model.apply({"params": p}, i, t, m, kind=kind))
    out = _JIT[key](params, images, tokens, text_mask)
    return tuple(None if x is None else np.asarray(x) for x in out)


_JIT = {}


def inputs(seed=0, lengths=(LENGTH, 4)):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(len(lengths), IMAGE_TOKENS, IMAGE_WIDTH)).astype(np.float32)
    mask = np.arange(LENGTH)[None] < np.asarray(lengths)[:, None]
    tokens = np.where(mask, rng.integers(1, VOCAB, (len(lengths), LENGTH)), 0).astype(np.int32)
    return images, tokens, mask


def hf_run(reference, embeddings, query_tokens, images, tokens=None, attention_mask=None,
           with_queries=True):
    """HF's last hidden states; `attention_mask` 2D (key padding) or 4D bool."""
    batch = images.shape[0]
    queries = query_tokens.expand(batch, -1, -1) if with_queries else None
    embeds = queries if tokens is None else embeddings(
        input_ids=torch.as_tensor(tokens, dtype=torch.long), query_embeds=queries)
    if attention_mask is not None:
        attention_mask = torch.as_tensor(np.array(attention_mask))
        if attention_mask.ndim == 4:  # eager attention adds a 4D mask as given
            attention_mask = torch.where(attention_mask, 0.0, torch.finfo(torch.float32).min)
        else:
            attention_mask = attention_mask.long()
    with torch.no_grad():
        return reference(query_embeds=embeds, query_length=QUERIES if with_queries else 0,
                         attention_mask=attention_mask,
                         encoder_hidden_states=torch.as_tensor(images) if with_queries else None,
                         ).last_hidden_state.numpy()


def itg_mask(text_mask):
    """LAVIS's ITG pattern over [queries; text] (built here, not by stage1_mask): queries see
    queries, text sees the queries and the real text up to itself."""
    batch, length = text_mask.shape
    allowed = np.zeros((QUERIES + length,) * 2, bool)
    allowed[:, :QUERIES] = True
    allowed[QUERIES:, QUERIES:] = np.tril(np.ones((length, length), bool))
    keys = np.concatenate([np.ones((batch, QUERIES), bool), text_mask], axis=1)
    return allowed[None, None] & keys[:, None, None, :]


def expected_mask(kind, rows_by_sample):
    return np.array([[[[c == "1" for c in row] for row in rows.split()]]
                     for rows in rows_by_sample])


# Q = 2 queries, L = 3 text tokens; sample 1's last token is padding. Columns: q0 q1 t0 t1 t2.
SMALL_TEXT_MASK = np.array([[True, True, True], [True, True, False]])
EXPECTED = {
    "unimodal": ("11000 11000 00111 00111 00111", "11000 11000 00110 00110 00110"),
    "bidirectional": ("11111 11111 11111 11111 11111", "11110 11110 11110 11110 11110"),
    "multimodal_causal": ("11000 11000 11100 11110 11111", "11000 11000 11100 11110 11110"),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_stage1_masks_are_the_expected_patterns(kind):
    mask = np.asarray(stage1_mask(kind, 2, jnp.asarray(SMALL_TEXT_MASK)))
    np.testing.assert_array_equal(mask, expected_mask(kind, EXPECTED[kind]))
    with pytest.raises(ValueError, match="is not one of"):
        stage1_mask("causal", 2, jnp.asarray(SMALL_TEXT_MASK))


def test_query_outputs_match_transformers(qformer):
    reference, embeddings, query_tokens, model, params, *_ = qformer
    images, _, _ = inputs()
    queries, text = run(model, params, images)
    expected = hf_run(reference, embeddings, query_tokens, images)
    diff = np.abs(queries - expected).max()
    print(f"PARITY qformer queries: {diff:.2e} (|out| max {np.abs(expected).max():.1f})")
    assert queries.shape == (2, QUERIES, 32) and text is None and diff < TOL
    # The image features matter, and differently per sample.
    assert np.abs(run(model, params, inputs(seed=1)[0])[0] - queries).max() > 1e-2


def test_text_passes_match_transformers_under_each_mask(qformer):
    """bidirectional = HF's ITM pass (2D key mask); unimodal = HF's separate query and text
    passes (ITC); multimodal_causal = HF with the ITG pattern as a 4D mask."""
    reference, embeddings, query_tokens, model, params, *_ = qformer
    images, tokens, mask = inputs()
    hf_args = (reference, embeddings, query_tokens, images)
    key_mask = np.concatenate([np.ones((2, QUERIES), bool), mask], axis=1)
    expected = {
        "bidirectional": hf_run(*hf_args, tokens, key_mask),
        "unimodal": np.concatenate([hf_run(*hf_args),
                                    hf_run(*hf_args, tokens, mask, with_queries=False)], axis=1),
        "multimodal_causal": hf_run(*hf_args, tokens, itg_mask(mask)),
    }
    for kind, want in expected.items():
        queries, text = run(model, params, images, tokens, mask, kind)
        got = np.concatenate([queries, text], axis=1)
        diff = np.abs(got - want).max()
        print(f"PARITY qformer {kind}: {diff:.2e}")
        assert diff < TOL, kind
    # Text only (HF's query_length=0).
    _, text = run(model, params, None, tokens, mask, "unimodal")
    assert np.abs(text - expected["unimodal"][:, QUERIES:]).max() < TOL


def test_what_each_mask_lets_interact(qformer):
    _, _, _, model, params, *_ = qformer
    images, tokens, mask = inputs(lengths=(LENGTH, LENGTH))
    other_images = inputs(seed=1)[0]
    last_changed = tokens.copy()
    last_changed[:, -1] = (tokens[:, -1] % (VOCAB - 1)) + 1

    def moved(a, b):
        return np.abs(a - b).max(axis=-1)  # per position

    base = {kind: run(model, params, images, tokens, mask, kind) for kind in EXPECTED}
    for kind, (queries, text) in base.items():
        q_text, t_text = run(model, params, images, last_changed, mask, kind)
        q_image, t_image = run(model, params, other_images, tokens, mask, kind)
        if kind == "unimodal":  # queries and text never meet
            assert moved(q_text, queries).max() < 1e-6 and moved(t_image, text).max() < 1e-6
            assert moved(t_text, text).min() > 1e-3
        elif kind == "multimodal_causal":  # text reads the queries and earlier text only
            assert moved(q_text, queries).max() < 1e-6
            assert moved(t_text, text)[:, :-1].max() < 1e-6 and moved(t_text, text)[:, -1].min(
            ) > 1e-3
            assert moved(t_image, text).min() > 1e-3
        else:  # everything interacts
            assert moved(q_text, queries).min() > 1e-4 and moved(t_text, text).min() > 1e-4
            assert moved(t_image, text).min() > 1e-3
    # A padded token is never read.
    padded = np.array([[True] * (LENGTH - 1) + [False]] * 2)
    for kind in EXPECTED:
        queries, text = run(model, params, images, tokens, padded, kind)
        queries2, text2 = run(model, params, images, last_changed, padded, kind)
        assert moved(queries2, queries).max() < 1e-6
        assert moved(text2, text)[:, :-1].max() < 1e-6


def test_cross_attention_placement_and_separate_ffns(qformer):
    _, _, _, model, params, *_ = qformer
    layers = [params[f"layer_{i}"] for i in range(3)]
    assert ["cross_attention" in layer for layer in layers] == [True, False, True]
    assert all({"self_attention", "query_ffn", "text_ffn"} <= set(layer) for layer in layers)
    assert params["layer_0"]["cross_attention"]["key"]["kernel"].shape == (IMAGE_WIDTH, 4, 8)

    images, tokens, mask = inputs()
    queries, text = run(model, params, images, tokens, mask, "unimodal")
    bumped = flatten(params)
    for key in bumped:  # not a constant: the FFN's LayerNorm would remove it
        if "/text_ffn/mlp/fc2/bias" in key:
            bumped[key] = bumped[key] + np.linspace(-1.0, 1.0, bumped[key].shape[0])
    bumped = unflatten(bumped)
    assert np.abs(run(model, bumped, images)[0] - run(model, params, images)[0]).max() == 0
    bumped_queries, bumped_text = run(model, bumped, images, tokens, mask, "unimodal")
    assert np.abs(bumped_queries - queries).max() == 0
    assert np.abs(bumped_text - text).max(axis=-1).min() > 1e-2

    no_text = QFormer(num_query_tokens=2, width=16, depth=2, num_heads=2, mlp_dim=24,
                      text_input=False)
    images = jnp.zeros((1, 3, IMAGE_WIDTH))
    shapes = jax.eval_shape(no_text.init, jax.random.PRNGKey(0), images)["params"]
    assert "token_embed" not in shapes and "text_ffn" not in shapes["layer_0"]
    with pytest.raises(ValueError, match="has no text input"):
        jax.eval_shape(no_text.apply, {"params": shapes}, images, jnp.zeros((1, 2), jnp.int32))


def test_loader_reads_the_checkpoint_and_names_what_it_lacks(qformer):
    *_, params, model_config, loaded = qformer
    assert model_config["not_in_checkpoint"] == ["pos_embedding", "query_tokens",
                                                 "token_embed/embedding"]
    assert model_config["encoder_width"] == IMAGE_WIDTH and model_config["text_input"]
    ours, theirs = flatten(params), flatten(loaded)
    assert set(ours) == set(theirs)
    for key in set(ours) - set(model_config["not_in_checkpoint"]):
        np.testing.assert_array_equal(np.asarray(theirs[key]), ours[key], key)
    # A Blip2Config's qformer_config and num_query_tokens.
    blip2 = {"model_type": "blip-2", "num_query_tokens": 7,
             "qformer_config": {**CONFIG, "model_type": "blip_2_qformer"}}
    config = qformer_config_from_hf(blip2)
    assert config["num_query_tokens"] == 7 and config["cross_attention_freq"] == 2
    with pytest.raises(ValueError, match="hidden_act 'swish' has no vlmjax equivalent"):
        qformer_config_from_hf({**CONFIG, "hidden_act": "swish"})
