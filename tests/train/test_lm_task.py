"""The `lm` task through the real trainer: it trains on text files with decreasing loss, logs
perplexity, tokens/s and the per-document skip counts, resumes exactly; its config is checked
key by key; configs/lm/qwen2_0_5b.py starts from an HF Qwen2 directory exactly."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from tests.data.text_fixtures import lm_config, text_corpus
from vlmjax import config as config_lib, sharding
from vlmjax.config import ConfigError
from vlmjax.train import trainer
from vlmjax.train.tasks import get_task


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return text_corpus(tmp_path_factory)


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_lm_trains_evaluates_and_resumes_exactly(corpus, tmp_path):
    config = lm_config(corpus, steps=6)
    result = trainer.train(config, str(tmp_path / "full"))
    records = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5  # log_every=2: it learns
    first = records[0]
    assert {"train/perplexity", "train/nll", "train/accuracy", "train/num_tokens",
            "perf/num_tokens_per_s", "train/data/skipped/no_targets",
            "train/data/skipped/truncated_document"} <= set(first)
    np.testing.assert_allclose(first["train/perplexity"], np.exp(first["train/nll"]), rtol=0.2)
    assert 0 < first["train/num_tokens"] <= 8 * 32
    assert {"perplexity/valid/nll", "perplexity/valid/perplexity"} <= set(result.metrics)
    assert result.metrics["perplexity/valid/perplexity"] < 320  # better than uniform over V
    # Stop after 3 steps (inside the text stream), resume: the same params as without a stop.
    trainer.train(config, str(tmp_path / "split"), stop_after=3)
    resumed = trainer.train(config, str(tmp_path / "split"))
    assert_same_params(result.state.params, resumed.state.params)
    assert_same_params(result.state.opt_state, resumed.state.opt_state)
    # The workdir is a pretrained source: model_init {"llm": WORKDIR} reads its params back.
    mesh = sharding.make_mesh({"data": -1})
    task = get_task("lm")(config, mesh)
    boxed = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
    shardings = sharding.param_shardings(boxed, mesh, sharding.logical_rules(None))
    loaded = task.pretrained_params({"llm": str(tmp_path / "full")}, nn.meta.unbox(boxed),
                                    shardings)
    assert_same_params(result.state.params, loaded)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.model.update(widht=8), r"config key model.widht is not used.*'width'"),
    (lambda c: c.model.update(dtype="float16"), r"model.dtype 'float16' is not one of"),
    (lambda c: c.loss.update(chunk=4), r"config key loss.chunk is not used.*'chunk_size'"),
    (lambda c: c.loss.update(label_smoothing=1.5), r"loss.label_smoothing must be in \[0, 1\)"),
    (lambda c: c.input.update(max_length=4), r"input: unknown key\(s\) \['max_length'\]"),
    (lambda c: c.data.update(split="test"), r"data.split: 'test': source 'text_file' has no"),
    (lambda c: c.update(model_init={"vision": "/x"}), r"model_init names unknown sub-model\(s\) "
                                                      r"\['vision'\]; .*\['llm'\]"),
])
def test_a_mistyped_or_bad_key_is_an_error(corpus, tmp_path, edit, message):
    config = lm_config(corpus)
    with config.unlocked(), config.ignore_type():
        edit(config)
    with pytest.raises(ConfigError, match=message):
        trainer.train(config, str(tmp_path))
    assert not tmp_path.joinpath("config.json").exists()  # checked before anything is written


def test_a_vocabulary_smaller_than_the_tokenizer_is_an_error(corpus):
    config = lm_config(corpus, vocab_size=100)  # the corpus tokenizer has ~300 ids
    task = get_task("lm")(config, sharding.make_mesh({"data": -1}))
    with pytest.raises(ValueError, match=r"has 3\d\d ids, more than model.vocab_size=100"):
        task.train_input(None, 0, 1)


def test_the_loss_counts_tokens_of_packed_documents_only(corpus):
    """loss_fn = next_token_loss over loss_mask; perplexity = exp(nll); num_tokens per step
    (times optim.accum_steps: the step averages the micro-batches' aux)."""
    config = lm_config(corpus)
    config.optim.accum_steps = 2
    task = get_task("lm")(config, sharding.make_mesh({"data": -1}))
    params = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)))(jax.random.PRNGKey(0))
    with task.train_input(None, 0, 1) as data:
        batch = next(data)
    loss, metrics = jax.jit(task.loss_fn)(params, {}, batch, jax.random.PRNGKey(0))
    assert float(metrics["num_tokens"]) == 2 * batch["loss_mask"].sum()
    np.testing.assert_allclose(float(metrics["perplexity"]), np.exp(float(metrics["nll"])),
                               rtol=1e-6)
    np.testing.assert_allclose(float(loss), float(metrics["nll"]), rtol=1e-6)


@pytest.mark.slow
def test_qwen2_config_runlocal_starts_from_the_hf_model_exactly(tmp_path_factory):
    from tests.convert.decoder_fixtures import tiny_llama_dir
    from vlmjax.convert import load_pretrained
    from vlmjax.train import checkpoint
    src = tiny_llama_dir(tmp_path_factory, "qwen2")
    config = config_lib.load_config(f"configs/lm/qwen2_0_5b.py:runlocal,src={src}")
    assert (config.model.tie_embeddings, config.model.qkv_bias, config.input.add_bos) == (
        True, True, False)
    data_dir = str(tmp_path_factory.getbasetemp() / "runlocal_tfds")
    config_lib.apply_overrides(config, [f"data.data_dir={data_dir}"])
    workdir = str(tmp_path_factory.mktemp("qwen2_run"))
    result = trainer.train(config, workdir)
    assert int(result.state.step) == 2
    assert np.isfinite(result.metrics["perplexity/validation/perplexity"])
    _, imported, _ = load_pretrained(src)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), imported)
    step1 = checkpoint.restore_params(workdir, abstract, step=1)  # step 1 ran at lr 0
    assert_same_params(imported, step1)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
    with pytest.raises(ConfigError, match="model.depth: config 3, pretrained 2"):
        config_lib.apply_overrides(config, ["model.depth=3"])
        get_task("lm")(config, sharding.make_mesh({"data": -1})).pretrained_params(
            src, None, None)


@pytest.mark.slow
def test_tiny_config_runlocal_trains_on_vlm_shapes_text(tmp_path_factory):
    config = config_lib.load_config("configs/lm/tiny.py:runlocal")
    data_dir = str(tmp_path_factory.getbasetemp() / "runlocal_tfds")
    config_lib.apply_overrides(config, [f"data.data_dir={data_dir}"])
    result = trainer.train(config, str(tmp_path_factory.mktemp("lm_tiny")))
    assert int(result.state.step) == config.total_steps
    for split in ("validation", "test"):
        assert 1.0 < result.metrics[f"perplexity/{split}/perplexity"] < 512
        assert result.metrics[f"perplexity/{split}/tokens"] > 1000
    assert result.train_metrics["perplexity"] < 512
