"""Text LM task: a decoder-only language model (Llama / Qwen2 family) trained on next tokens.

Implements the task contract of vlmjax/train/tasks/base.py. Config keys it owns
(`config_keys`; the trainer's are in trainer.TRAINER_KEYS):
  model   `Decoder` keyword arguments (vlmjax/models/decoder.py: vocab_size, width, depth,
          num_heads, num_kv_heads, head_dim, mlp_dim, rope_theta, tie_embeddings, remat,
          scan_layers, ...) plus `dtype` ('float32' | 'bfloat16': the compute dtype;
          parameters stay float32)
  loss    chunk_size (positions per chunk of the vocabulary projection), z_loss (PaLM's
          coefficient, 0 = off), label_smoothing (0 = off); see vlmjax/losses/lm.py
  data    the training data (vlmjax/data/pipeline.py sources, read without images:
          vlm_shapes, tfds text datasets, text_file, mixtures)
  input   tokenisation and rows (vlmjax/data/text_pipeline.py: global_batch_size, max_len, pack,
          add_bos, add_eos, documents, tokenizer, special_tokens, ...)
It also reads (trainer keys) model_init: '' or a decoder source for
vlmjax.convert.load_pretrained (an HF LlamaForCausalLM / Qwen2ForCausalLM / OPTForCausalLM
directory, a converted directory, an `lm` workdir), or {"llm": SRC} (with an optional prefix:
{"llm": {"source": SRC, "prefix": PATH}}); optim.accum_steps; and evals (type `perplexity`,
vlmjax/evals/perplexity.py).

Batches: tokens, targets int32 [B, L], loss_mask bool [B, L], segment_ids int32 [B, L]
(packed documents never attend to or predict each other). The loss is the mean next-token
cross-entropy over the counted tokens of the batch (losses.lm.next_token_loss on the
final-normed hidden state and the unembedding, never materialising [B, L, V] logits). Logged:
loss, nll, perplexity = exp(nll), accuracy, z_loss, num_tokens (counted tokens per step); the
progress line shows perplexity and the counted tokens per second.
"""
from __future__ import annotations

import dataclasses
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlmjax import sharding
from vlmjax.config import ConfigError, check_keys, plain
from vlmjax.losses import lm as lm_loss
from vlmjax.models.decoder import Decoder, output_kernel
from vlmjax.models.layers import DTYPES
from vlmjax.train.tasks.base import (TaskDefaults, raise_architecture_diffs,
                                     with_compute_dtype)

LOSS_DEFAULTS = {"chunk_size": 512, "z_loss": 0.0, "label_smoothing": 0.0}
# model_init sub-model: the Decoder is the whole model (a tied one has no lm_head).
SUB_MODELS = {"llm": ("embed", "layers", "final_norm", "lm_head")}
# Decoder fields that change how, not what, it computes (or only its random init):
# pretrained weights load under any.
NOT_ARCHITECTURE = ("dtype", "remat", "scan_layers", "fused_attention", "embed_init_std")


def decoder_fields() -> dict:
    """Decoder argument -> default (no default: required)."""
    return {f.name: f.default for f in dataclasses.fields(Decoder)
            if f.name not in ("parent", "name")}


def model_kwargs(model_config) -> dict:
    """config.model -> Decoder keyword arguments (`dtype` mapped through layers.DTYPES)."""
    kwargs = with_compute_dtype(model_config)
    fields = decoder_fields()
    check_keys(kwargs, [*fields, "dtype"], "model")
    missing = sorted(k for k, v in fields.items() if v is dataclasses.MISSING and k not in kwargs)
    if missing:
        raise ConfigError(f"config.model is missing {missing} (Decoder arguments, "
                          "vlmjax/models/decoder.py)")
    return kwargs


def source_model_config(src: str) -> dict:
    """The Decoder arguments a decoder source holds, from its config files only."""
    from vlmjax.convert import hf_io
    from vlmjax.convert.hf_decoder_config import decoder_config_from_hf
    from vlmjax.convert.pretrained import source_kind
    from vlmjax.convert.workdir import trainer_checkpoint

    kind = source_kind(src)
    if kind == "hf":
        path = os.path.join(src, "config.json")
        return decoder_config_from_hf(hf_io.read_json(path), path)
    if kind == "converted":
        return hf_io.read_json(os.path.join(src, "config.json"))["model"]
    if kind == "trainer":
        workdir, _ = trainer_checkpoint(src)
        return hf_io.read_json(os.path.join(workdir, "config.json"))["model"]
    raise ConfigError(f"model_init {src} is a {kind!r} source, not a decoder LM (an HF "
                      "LlamaForCausalLM / Qwen2ForCausalLM / OPTForCausalLM directory, a converted "
                      "one or an lm workdir)")


def check_architecture(src: str, model_config, where: str = "model_init") -> None:
    """Every Decoder field that defines the function the weights compute must agree."""
    theirs = source_model_config(src)
    ours = plain(model_config)
    diffs = []
    for key, default in decoder_fields().items():
        if key in NOT_ARCHITECTURE:
            continue
        mine, pretrained = plain(ours.get(key, default)), theirs.get(key, default)
        if isinstance(mine, (int, float)) and isinstance(pretrained, (int, float)):
            same = math.isclose(float(mine), float(pretrained), rel_tol=1e-9)
        else:
            same = mine == pretrained
        if not same:
            diffs.append(f"model.{key}: config {mine!r}, pretrained {pretrained!r}")
    raise_architecture_diffs(diffs, where, src)


def loss_settings(config) -> dict:
    """config.loss over LOSS_DEFAULTS, checked (the lm and llava tasks' next-token loss)."""
    loss = plain(config.get("loss")) or {}
    check_keys(loss, LOSS_DEFAULTS, "loss")
    settings = {**LOSS_DEFAULTS, **loss}
    if type(settings["chunk_size"]) is not int or settings["chunk_size"] < 1:
        raise ConfigError(f"loss.chunk_size must be a positive integer, got "
                          f"{settings['chunk_size']!r}")
    for key in ("z_loss", "label_smoothing"):
        if not 0.0 <= float(settings[key]) < 1.0:
            raise ConfigError(f"loss.{key} must be in [0, 1), got {settings[key]!r}")
    return settings


def step_metrics(loss, metrics, accum_steps: int):
    """(loss, metrics of next_token_loss + perplexity) as a train step's loss_fn returns them
    (the lm and llava tasks). The step averages aux over optim.accum_steps micro-batches:
    num_tokens is scaled to count per step."""
    metrics = dict(metrics, perplexity=jnp.exp(metrics["nll"]))
    metrics["num_tokens"] = metrics["num_tokens"] * accum_steps
    return loss, metrics


class LMTask(TaskDefaults):
    config_keys = {
        "model": "Decoder kwargs and dtype (see this module's docstring)",
        "loss": "chunk_size, z_loss, label_smoothing (vlmjax/losses/lm.py)",
        "data": "training text source (vlmjax.data.pipeline; read without images)",
        "input": "tokenizer, documents, max_len, pack, BOS/EOS and global_batch_size "
                 "(vlmjax/data/text_pipeline.py)",
    }
    summary_metrics = (("perplexity", "ppl"), ("num_tokens", "tok/s", "rate"))

    def __init__(self, config: ml_collections.ConfigDict, mesh):
        from vlmjax.data import pipeline_config, text_pipeline  # late: TensorFlow
        self.config, self.mesh = config, mesh
        self.model = Decoder(**model_kwargs(config.model))
        self.compute_dtype = config.model.get("dtype", "float32")
        self.loss_settings = loss_settings(config)
        try:
            text_pipeline.validate_lm_input(config.input)
            pipeline_config.validate_data_config(config.data)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.max_len = int(config.input.max_len)
        self.accum_steps = int((plain(config.get("optim")) or {}).get("accum_steps", 1))
        from vlmjax.convert import model_init as model_init_lib
        model_init_lib.parse_model_init(config.get("model_init"), SUB_MODELS)  # pure check
        from vlmjax.evals import registry  # late: TensorFlow is slow to import
        registry.check_evals(config.get("evals"), config.data,  # pure: evaluators read lazily
                             types=("perplexity",))

    # ------------------------------------------------------------------------------ model/loss
    def init_params(self, rng):
        tokens = jnp.zeros((1, self.max_len), jnp.int32)
        return self.model.init({"params": rng}, tokens)["params"]

    def token_sums(self, params, batch, mask_BL=None):
        """(loss, metrics) of losses.lm.next_token_loss on `batch`; `mask_BL` narrows the
        counted tokens (evaluation: the real rows)."""
        hidden = self.model.apply({"params": params}, batch["tokens"],
                                  segment_ids=batch["segment_ids"], return_hidden=True)
        loss_mask = batch["loss_mask"] if mask_BL is None else batch["loss_mask"] & mask_BL
        return lm_loss.next_token_loss(
            hidden, output_kernel(params), batch["targets"], loss_mask,
            chunk_size=int(self.loss_settings["chunk_size"]),
            z_loss=float(self.loss_settings["z_loss"]),
            label_smoothing=float(self.loss_settings["label_smoothing"]))

    def loss_fn(self, params, extra, batch, rng):
        del extra, rng  # no extra state; the Decoder has no dropout
        return step_metrics(*self.token_sums(params, batch), self.accum_steps)

    def pretrained_params(self, model_init, abstract_params, shardings):
        """Params of `config.model_init`, checked against config.model (every field that
        defines the function: vlmjax.convert decoder sources keep their architecture in their
        config files) and against `abstract_params` (shapes), placed by `shardings`: one
        source, or {"llm": SRC} / {"llm": {"source": SRC, "prefix": PATH}} (e.g. the language
        model inside another model's params)."""
        from vlmjax.convert import load_pretrained, model_init as model_init_lib
        entries = model_init_lib.parse_model_init(model_init, SUB_MODELS)
        for entry in entries:
            if entry.prefix is None:
                check_architecture(entry.source, self.config.model, entry.name)
        # One source without a prefix loads straight into the shardings (any layer layout).
        direct = len(entries) == 1 and not entries[0].prefix

        def load(src):
            return load_pretrained(src, shardings=shardings if direct else None)[1]

        def init_random():
            rng = jax.random.split(jax.random.PRNGKey(int(self.config.get("seed", 0))))[0]
            return jax.jit(lambda r: nn.meta.unbox(self.init_params(r)),
                           out_shardings=shardings)(rng)

        params = model_init_lib.assemble_params(entries, SUB_MODELS, abstract_params, load,
                                                init_random)
        return jax.device_put(params, shardings)

    # ------------------------------------------------------------------------------------ data
    def example_transform(self, training: bool) -> list[str]:
        """The per-record ops that make the record's documents (input.documents, ops_lm.py);
        tokenisation and rows follow in data/text_pipeline.py."""
        del training
        return [self.config.input.documents]

    def train_input(self, data_state: dict | None, shard: int | None = None,
                    num_shards: int | None = None):
        from vlmjax.data import text_pipeline
        return text_pipeline.TextPipeline(
            self.config.data, self.config.input, training=True, process_index=shard,
            process_count=num_shards, state=data_state or None,
            vocab_size=int(self.config.model.vocab_size))

    # ----------------------------------------------------------------------------------- evals
    def evaluators(self, eval_config) -> list:
        """The evaluators of `eval_config` (config.evals; type perplexity), built lazily."""
        from vlmjax.evals import perplexity, registry
        replicated = sharding.replicated(self.mesh)

        def sums(params, batch):
            _, metrics = self.token_sums(params, batch, batch["_mask"][:, None])
            count = metrics["num_tokens"]
            return {"nll": metrics["nll"] * count, "correct": metrics["accuracy"] * count,
                    "tokens": count}
        context = registry.EvalContext(
            mesh=self.mesh, train_data=self.config.data, input=self.config.input,
            model=perplexity.TokenScorer(jax.jit(sums, out_shardings=replicated), self.mesh,
                                         int(self.config.model.vocab_size)))
        return registry.build_evaluators(eval_config, context)
