"""BERT initialisation of BLIP's text transformer (convert.hf_bert): the unimodal encoder of a
BERT-initialised Blip computes transformers' BertModel (token types folded in) on a tiny random
BERT; both self-attentions, the MLM head and the extra vocabulary rows; mismatches named."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.config import ConfigError
from vlmjax.convert.hf_bert import bert_into_blip
from vlmjax.convert.params import flatten
from vlmjax.models.blip import Blip, _key_mask

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BERT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=24)
OURS = dict(vocab_size=62, max_len=16, width=32, depth=2, num_heads=4, mlp_dim=48)


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
    config = runlocal_config()
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
