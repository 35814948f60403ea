"""The perplexity evaluator against a direct computation: every held-out document alone through
the model, its full logits, the log-probability of each next token."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.data.text_fixtures import lm_config, text_corpus
from vlmjax import sharding
from vlmjax.config import ConfigError
from vlmjax.data import tokenizers
from vlmjax.evals import registry
from vlmjax.train.tasks import get_task


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return text_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def task_and_params(corpus):
    config = lm_config(corpus)
    task = get_task("lm")(config, sharding.make_mesh({"data": -1}))
    params = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)))(jax.random.PRNGKey(3))
    return config, task, params


def direct_nll(task, params, documents, tokenizer, length=32):
    """(summed nll, tokens, correct) of each document alone, BOS/EOS around it. Right padding
    (no segment ids) leaves a causal model's logits at the real positions as they are."""
    sequences = [[tokenizer.bos_id, *ids, tokenizer.eos_id]
                 for ids in tokenizer.encode_raw(documents)]
    tokens = np.zeros((len(sequences), length), np.int32)
    for row, sequence in enumerate(sequences):
        tokens[row, :len(sequence)] = sequence
    logits = jax.jit(lambda p, t: task.model.apply({"params": p}, t))(params, tokens)
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
    total, count, correct = 0.0, 0, 0
    for row, sequence in enumerate(sequences):
        targets = np.array(sequence[1:])
        row_logp = logp[row, :len(targets)]
        total -= row_logp[np.arange(len(targets)), targets].sum()
        count += len(targets)
        correct += int((row_logp.argmax(-1) == targets).sum())
    return total, count, correct


def test_perplexity_is_token_weighted_over_every_document(corpus, task_and_params):
    config, task, params = task_and_params
    evaluator, = task.evaluators(config.evals)
    metrics = evaluator(params)
    tokenizer = tokenizers.load_tokenizer(corpus["tokenizer"])
    total, count, correct = direct_nll(task, params, corpus["documents"]["valid"], tokenizer)
    assert metrics["perplexity/valid/tokens"] == count
    np.testing.assert_allclose(metrics["perplexity/valid/nll"], total / count, rtol=1e-5)
    np.testing.assert_allclose(metrics["perplexity/valid/perplexity"], np.exp(total / count),
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["perplexity/valid/accuracy"], correct / count, atol=1e-6)
    # The held-out rows span 2+ batches, the last one padded (`_mask` False rows excluded).
    from vlmjax.data import text_pipeline
    with text_pipeline.TextPipeline(evaluator.data_config, evaluator.input_config(),
                                    training=False, process_index=0, process_count=1,
                                    tokenizer=evaluator.tokenizer()) as data:
        batches = list(data)
    assert len(batches) >= 2 and not batches[-1]["_mask"].all()
    first, = registry.build_evaluators(ml_collections.ConfigDict(dict(valid=dict(
        config.evals.valid.to_dict(), max_batches=1))), evaluator.context)
    assert 0 < first(params)["perplexity/valid/tokens"] < count


def test_perplexity_entries_are_checked_without_reading(corpus):
    config = lm_config(corpus)
    mesh = sharding.make_mesh({"data": -1})
    for entry, message in [
            (dict(type="perplexity", data=dict(paths=corpus["valid"]), max_batches=-1),
             r"evals.bad.max_batches must be an integer >= 0"),
            (dict(type="perplexity", data=dict(paths=corpus["valid"]), documents="caption_first"),
             r"evals.bad.documents='caption_first' names none of"),
            (dict(type="perplexity", data=dict(split="validation")),
             r"evals.bad.data.split='validation': source 'text_file' has no splits"),
            (dict(type="perplexity"), r"evals.bad.data.paths: this evaluation would read the "
                                      r"training files"),
            (dict(type="zero_shot", data=dict(paths=corpus["valid"])),
             r"evals.bad.type 'zero_shot' does not apply to this task's model; it runs "
             r"\['perplexity'\]")]:
        config.evals = ml_collections.ConfigDict(dict(bad=entry))
        with pytest.raises(ConfigError, match=message):
            get_task("lm")(config, mesh)
