"""Perplexity of a language model on held-out text.

Metrics `perplexity/{name}/nll` (mean negative log-likelihood in nats per counted token),
`perplexity/{name}/perplexity` (exp of it), `perplexity/{name}/accuracy` (argmax = next token)
and `perplexity/{name}/tokens` (how many were counted), for the entry `name` of config.evals.
Every counted token weighs the same (sums over all batches divided by the token count, not a
mean of batch means); padding rows (`_mask` False) and positions outside `loss_mask` never
count. The data is made exactly as for training (data/text_pipeline.py: the same documents,
tokenizer, BOS/EOS, max_len and packing; with packing, documents never see each other), read
once in order, in every process. Entry keys beside the common ones (evals/registry.py):
  documents    the op string making each record's documents (default: input.documents), e.g.
               "qa_documents" to score vlm_shapes' question-answer pairs alone
  max_batches  the first N batches (0 = all, the default)
"""
from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np

from vlmjax import sharding
from vlmjax.config import ConfigError
from vlmjax.evals import embed, registry

SUM_KEYS = ("nll", "correct", "tokens")


class TokenScorer:
    """What the perplexity evaluator needs of a decoder LM: `sums(params, batch)` -> {nll,
    correct, tokens} summed over the counted tokens of the batch's real rows (jitted, output
    replicated over `mesh`), and the model's `vocab_size`."""

    def __init__(self, sums, mesh, vocab_size: int):
        self.sums, self.mesh, self.vocab_size = sums, mesh, vocab_size

    def score(self, params, batches, max_batches: int = 0) -> dict[str, float]:
        totals = dict.fromkeys(SUM_KEYS, 0.0)
        batch_sharding = sharding.batch_sharding(self.mesh)
        for number, batch in enumerate(batches):
            if max_batches and number >= max_batches:
                break
            out = jax.device_get(self.sums(params, jax.device_put(batch, batch_sharding)))
            for key in SUM_KEYS:
                totals[key] += float(out[key])
        return totals


class PerplexityEvaluator(registry.Evaluator):
    KEYS = {"documents": "op string making each record's documents (default: input.documents)",
            "max_batches": "the first N batches (0 = all, the default)"}

    @classmethod
    def check(cls, entry, where):
        registry.check_counts(entry, ("max_batches",), where)
        documents = entry.get("documents")
        if documents is not None:
            from vlmjax.data import ops, text_pipeline
            try:
                parsed = ops.parse(documents)
            except ValueError as error:
                raise ConfigError(f"{where}.documents: {error}") from None
            if not any(op.name in text_pipeline.DOCUMENT_OPS for op in parsed):
                raise ConfigError(f"{where}.documents={documents!r} names none of "
                                  f"{list(text_pipeline.DOCUMENT_OPS)}")

    def __init__(self, name, entry, context):  # noqa: D107  (no EvalData: text, no images)
        from vlmjax.evals.data import resolve_data_config
        self.name, self.type, self.context = name, entry["type"], context
        self.every = int(entry.get("every", 0))
        self.batch_size = int(entry.get("batch_size", registry.DEFAULT_BATCH_SIZE))
        self.max_batches = int(entry.get("max_batches", 0))
        self.data_config = resolve_data_config(entry.get("data"), context.train_data,
                                               f"evals.{name}.data")
        self.documents = entry.get("documents") or context.input.documents
        self.skipped: dict[str, int] = {}
        self._tokenizer = None

    def describe(self) -> str:
        config = self.data_config
        return " ".join(str(part) for part in (config.source, config.get("name"),
                                               config.get("split"), config.get("paths")) if part)

    def input_config(self) -> ml_collections.ConfigDict:
        """The training input with this evaluation's batch size and documents."""
        config = ml_collections.ConfigDict(self.context.input.to_dict())
        config.global_batch_size = embed.device_multiple(self.batch_size, self.context.mesh)
        config.documents = self.documents
        return config

    def tokenizer(self):
        """The training input's tokenizer ('vlm_shapes': of the training data's build, which
        the model was trained with)."""
        if self._tokenizer is None:
            from vlmjax.data import pipeline_config, text_pipeline
            train = self.context.train_data
            configs = list(train.sources.values()) if train.source == "mixture" else [train]
            built = []
            if self.context.input.tokenizer == "vlm_shapes":
                for config in [*configs, self.data_config]:
                    if config.source == "vlm_shapes":
                        config = {k: v for k, v in config.to_dict().items() if k != "weight"}
                        built.append(pipeline_config.make_source(
                            ml_collections.ConfigDict(config), training=False, images=False))
            self._tokenizer = pipeline_config.resolve_tokenizer(
                text_pipeline.record_input_config(self.context.input), built)
        return self._tokenizer

    def __call__(self, params) -> dict:
        from vlmjax.data import text_pipeline
        model = self.context.model
        with text_pipeline.TextPipeline(self.data_config, self.input_config(), training=False,
                                        process_index=0, process_count=1,
                                        vocab_size=model.vocab_size,
                                        tokenizer=self.tokenizer()) as data:
            totals = model.score(params, data, self.max_batches)
            self.skipped = {k: v for k, v in data.skip_counts.items() if v}
        if not totals["tokens"]:
            raise ValueError(f"evals.{self.name}: {self.describe()} gave no token to score")
        nll = totals["nll"] / totals["tokens"]
        return self.metric_names({"nll": nll, "perplexity": math.exp(nll),
                                  "accuracy": totals["correct"] / totals["tokens"],
                                  "tokens": totals["tokens"]})

    def metric_names(self, metrics: dict) -> dict:
        if self.skipped and jax.process_index() == 0:
            print(f"warning: evals.{self.name}: skipped {self.skipped} in {self.describe()}",
                  flush=True)
        return {f"{self.type}/{self.name}/{k}": float(np.asarray(v)) for k, v in
                metrics.items()}
