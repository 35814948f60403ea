"""BERT initialisation of BLIP's text transformer and BLIP-2's Q-Former (convert.hf_bert): the
unimodal encoder of a BERT-initialised Blip, and the text-only pass of a BERT-initialised
Q-Former, compute transformers' BertModel (token types folded in) on a tiny random BERT; both
self-attentions (BLIP), both FFNs (the Q-Former), the MLM / ITG head and the extra vocabulary
rows; what BERT lacks keeps its init; mismatches named."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.config import ConfigError
from vlmjax.convert.hf_bert import bert_into_blip, bert_into_qformer
from vlmjax.convert.params import flatten, unflatten
from vlmjax.models.blip import Blip, _key_mask
from vlmjax.models.blip2 import Blip2Stage1
from vlmjax.models.qformer import QFormer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BERT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=24)
OURS = dict(vocab_size=62, max_len=16, width=32, depth=2, num_heads=4, mlp_dim=48)
# A stage-1 Q-Former of the BERT's sizes; one more row ([DEC]) than BERT's vocabulary.
QF = dict(num_query_tokens=4, width=32, depth=2, num_heads=4, mlp_dim=48, vocab_size=61,
          max_len=16)


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    """A BertForMaskedLM directory (bert. prefix + MLM head) and a bare BertModel one."""
    from tests.convert.test_hf_blip import redraw_weights
    torch.manual_seed(0)
    config = transformers.BertConfig(**BERT)
    mlm = redraw_weights(transformers.BertForMaskedLM(config))
    dirs = {}
    for name, model in (("mlm", mlm), ("bare", mlm.bert)):
        dirs[name] = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(dirs[name])
    return dirs, mlm


def blip_params(share="all_but_self_attention", text=OURS):
    model = Blip(image=dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64),
                 text=text, embed_dim=16, share=share)
    params = jax.jit(lambda r: nn.meta.unbox(model.init(
        r, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 4), jnp.int32),
        method=model.init_all)))(jax.random.PRNGKey(0))["params"]
    return model, jax.tree.map(np.asarray, params)


@pytest.mark.parametrize("share", ["all_but_self_attention", "nothing"])
def test_bert_init_encoder_computes_bert_model(bert_dirs, share):
    dirs, mlm = bert_dirs
    model, init = blip_params(share)
    config = {"text": OURS, "share": share, "parts": ("encoder", "decoder")}
    params = bert_into_blip(dirs["mlm"], config, init)
    tokens = np.random.default_rng(0).integers(1, 60, (2, 9))
    mask = np.ones((2, 9), bool)
    mask[1, 6:] = False
    tower = "text_shared" if share == "all_but_self_attention" else "text_encoder"
    hidden = model.apply({"params": params}, jnp.asarray(tokens), _key_mask(tokens, mask),
                         "encoder", method=lambda m, *a: getattr(m, tower)(*a))
    with torch.no_grad():
        want = mlm.bert(torch.tensor(tokens), attention_mask=torch.tensor(mask)
                        ).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(hidden)[mask], want[mask], atol=1e-4)
    flat, flat_init = flatten(params), flatten(init)
    decoder = "text_shared" if share == "all_but_self_attention" else "text_decoder"
    # BLIP starts its decoder from BERT too; the cross-attention is not BERT's.
    np.testing.assert_array_equal(
        flat[f"{decoder}/layer_1/self_attention_decoder/query/kernel"],
        flat[f"{tower}/layer_1/self_attention_encoder/query/kernel"])
    np.testing.assert_array_equal(flat[f"{decoder}/layer_0/cross_attention/key/kernel"],
                                  flat_init[f"{decoder}/layer_0/cross_attention/key/kernel"])
    # [DEC] and [ENC] (rows past BERT's vocabulary) keep their init; the MLM head is BERT's.
    embed = flat[f"{tower}/token_embed/embedding"]
    np.testing.assert_array_equal(embed[60:], flat_init[f"{tower}/token_embed/embedding"][60:])
    np.testing.assert_array_equal(embed[:60], mlm.bert.embeddings.word_embeddings.weight.detach())
    np.testing.assert_array_equal(flat[f"{decoder}/lm_bias"][:60],
                                  mlm.cls.predictions.bias.detach())


def test_bare_bert_model_keeps_the_head_init_and_mismatches_are_named(bert_dirs):
    dirs, _ = bert_dirs
    _, init = blip_params()
    config = {"text": OURS, "parts": ("encoder", "decoder")}
    flat = flatten(bert_into_blip(dirs["bare"], config, init))
    np.testing.assert_array_equal(flat["text_shared/head_transform/kernel"],
                                  flatten(init)["text_shared/head_transform/kernel"])
    assert not np.array_equal(flat["text_shared/layer_0/mlp/fc1/kernel"],
                              flatten(init)["text_shared/layer_0/mlp/fc1/kernel"])
    with pytest.raises(ConfigError, match=r"text.depth=3 vs num_hidden_layers=2"):
        bert_into_blip(dirs["bare"], {"text": {**OURS, "depth": 3}}, init)
    small = {**OURS, "vocab_size": 50}
    _, init_small = blip_params(text=small)
    with pytest.raises(ConfigError, match=r"vocabulary \(60\) is larger"):
        bert_into_blip(dirs["bare"], {"text": small}, init_small)
    with pytest.raises(ConfigError, match="not a Hugging Face BERT"):
        bert_into_blip(str(dirs["bare"]) + "_missing", config, init)


def test_blip_task_model_init_text_reads_bert_and_keeps_the_rest_random(tmp_path):
    """config.model_init = {"text": BERT_DIR}: the task's text transformer is BERT's, the
    vision tower and the cross-attention are the random init of config.seed."""
    from tests.train.test_blip_task import make_task, runlocal_config
    from vlmjax import sharding
    config = runlocal_config("runlocal,image=vit")
    text = config.model.text
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=400, hidden_size=text.width, num_hidden_layers=text.depth,
        num_attention_heads=text.num_heads, intermediate_size=text.mlp_dim,
        max_position_embeddings=64))
    bert.save_pretrained(str(tmp_path))
    task = make_task(config, sharding.make_mesh(config.mesh))
    abstract = jax.eval_shape(lambda: nn.meta.unbox(task.init_params(jax.random.PRNGKey(0))))
    params = flatten(jax.device_get(task.pretrained_params({"text": str(tmp_path)}, abstract,
                                                           None)))
    rng = jax.random.split(jax.random.PRNGKey(int(config.seed)))[0]
    init = flatten(jax.device_get(nn.meta.unbox(task.init_params(rng))))
    assert set(params) == set(init)
    np.testing.assert_array_equal(params["text_shared/layer_0/mlp/fc1/kernel"],
                                  bert.encoder.layer[0].intermediate.dense.weight.detach().T)
    for same in ("vision/cls", "text_shared/layer_0/cross_attention/key/kernel",
                 "itm_head/kernel"):
        np.testing.assert_allclose(params[same], init[same], rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="unknown sub-model"):
        task.pretrained_params({"texts": str(tmp_path)}, abstract, None)


@pytest.fixture(scope="module")
def stage1():
    """A tiny Blip2Stage1 whose Q-Former has the BERT's sizes, and random params of its shapes
    (numpy draws: compiling its init would take most of this file's time)."""
    model = Blip2Stage1(vision=dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64,
                                    pool="none", class_token=True), qformer=QF, embed_dim=16)
    shapes = jax.eval_shape(lambda r: nn.meta.unbox(model.init(
        r, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 4), jnp.int32),
        method=model.init_all)), jax.random.PRNGKey(0))["params"]
    rng = np.random.default_rng(0)
    return model, jax.tree.map(lambda a: rng.normal(0, 0.02, a.shape).astype(a.dtype), shapes)


def test_bert_init_qformer_computes_bert_model_and_copies_the_ffn_to_the_queries(bert_dirs,
                                                                                stage1):
    dirs, mlm = bert_dirs
    model, init = stage1
    params = bert_into_qformer(dirs["mlm"], QF, init)
    tokens = np.random.default_rng(1).integers(1, 60, (2, 9))
    mask = np.ones((2, 9), bool)
    mask[1, 5:] = False
    _, text = QFormer(**QF).apply({"params": params["projector"]["qformer"]}, None,
                                  jnp.asarray(tokens), jnp.asarray(mask), kind="unimodal")
    with torch.no_grad():
        want = mlm.bert(torch.tensor(tokens), attention_mask=torch.tensor(mask)
                        ).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(text)[mask], want[mask], atol=1e-5)
    flat, flat_init = flatten(params), flatten(init)
    q = "projector/qformer"
    # BLIP-2 copies BERT's FFN into the query FFN as well as the text FFN.
    bert_fc1 = mlm.bert.encoder.layer[1].intermediate.dense.weight.detach().numpy().T
    for ffn in ("query_ffn", "text_ffn"):
        np.testing.assert_array_equal(flat[f"{q}/layer_1/{ffn}/mlp/fc1/kernel"], bert_fc1)
        np.testing.assert_array_equal(flat[f"{q}/layer_0/{ffn}/norm/scale"],
                                      mlm.bert.encoder.layer[0].output.LayerNorm.weight.detach())
    # Not in BERT: the cross-attention, the query tokens, and [DEC]'s row keep their init.
    for same in (f"{q}/layer_0/cross_attention/key/kernel", f"{q}/query_tokens",
                 f"{q}/layer_0/cross_attention/norm/bias", "vision_proj/kernel"):
        np.testing.assert_array_equal(flat[same], flat_init[same])
    np.testing.assert_array_equal(flat[f"{q}/token_embed/embedding"][60:],
                                  flat_init[f"{q}/token_embed/embedding"][60:])
    # The ITG head is BertForMaskedLM's prediction head (logits over BERT's vocabulary).
    hidden = np.random.default_rng(2).normal(size=(2, 3, 32)).astype(np.float32)
    h, kernel = model.apply({"params": params}, jnp.asarray(hidden), method=model.head_inputs)
    with torch.no_grad():
        want = mlm.cls(torch.tensor(hidden)).numpy()
    np.testing.assert_allclose(np.asarray(h @ kernel)[..., :60], want, atol=1e-4)


def test_qformer_from_bare_bert_keeps_the_head_and_mismatches_are_named(bert_dirs, stage1):
    dirs, mlm = bert_dirs
    _, init = stage1
    flat, flat_init = flatten(bert_into_qformer(dirs["bare"], QF, init)), flatten(init)
    for same in ("head_transform/kernel", "head_norm/scale", "lm_bias"):
        np.testing.assert_array_equal(flat[same], flat_init[same])
    # A stage-2 Q-Former (no text input) at the root of its own params: layers and norm only.
    stage2 = {**QF, "text_input": False}
    bare = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), nn.meta.unbox(jax.eval_shape(
        QFormer(**stage2).init, jax.random.PRNGKey(0), jnp.zeros((1, 2, 8))))["params"])
    got = flatten(bert_into_qformer(dirs["bare"], stage2, bare, prefix=""))
    np.testing.assert_array_equal(got["layer_1/query_ffn/mlp/fc2/bias"],
                                  mlm.bert.encoder.layer[1].output.dense.bias.detach())
    np.testing.assert_array_equal(got["embed_norm/bias"],
                                  mlm.bert.embeddings.LayerNorm.bias.detach())
    with pytest.raises(ConfigError, match=r"qformer.num_heads=2 vs num_attention_heads=4; "
                                          r"qformer.mlp_dim=64 vs intermediate_size=48"):
        bert_into_qformer(dirs["bare"], {**QF, "num_heads": 2, "mlp_dim": 64}, init)
    with pytest.raises(ConfigError, match=r"qformer.activation='relu' vs hidden_act='gelu'"):
        bert_into_qformer(dirs["bare"], {**QF, "activation": "relu"}, init)
    longer = {**flat_init, "projector/qformer/pos_embedding": np.zeros((30, 32), np.float32)}
    with pytest.raises(ConfigError, match=r"BERT has 24 positions, config.model.qformer.max_len"):
        bert_into_qformer(dirs["bare"], {**QF, "max_len": 30}, unflatten(longer))
    with pytest.raises(ConfigError, match=r"no \['model/embed_norm"):
        bert_into_qformer(dirs["bare"], QF, init, prefix="model")
