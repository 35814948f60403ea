"""Fusion task (Flamingo / OpenFlamingo): a frozen vision tower and a frozen decoder LM joined by
a Perceiver resampler and tanh-gated cross-attention blocks, trained on interleaved sequences.

Implements the task contract of vlmjax/train/tasks/base.py. Config keys it owns:
  model            FusionLM keyword arguments (vlmjax/models/fusion.py): vision_arch, vision,
                   llm (Decoder kwargs), image_token_id, end_of_chunk_id, vision_feature_layer,
                   vision_feature_select_strategy, resampler, cross_attention, cross_attn_every,
                   only_attend_immediate_media, additional_vocab_size; and `dtype`
  loss             chunk_size, z_loss, label_smoothing (as the lm task; vlmjax/losses/lm.py)
  data             MMC4-style documents: source='mmc4', json_path, image_dir, sim_threshold
  input            global_batch_size, image_size, max_len, max_images, tokenizer, seed,
                   value_range, special_tokens (vlmjax/data/interleaved.py)
  train_embeddings train the added tokens' rows (additional_embed / additional_head: <image>
                   and <|endofchunk|> beyond the LM's vocabulary; default True)
Trained: the resampler (`perceiver/`), feature_posemb's `media_posemb/`, the gated blocks (`llm/layers/xattn*`) and, with
train_embeddings, the added tokens; the vision tower and the LM get no gradient and no
optimiser state. It reads model_init = {"vision": SRC, "llm": SRC} (either or both; see
`pretrained_params`) and evals (type vqa, with `shots`, run by evals.interleaved's
InterleavedAnswerer).

Batches (data/interleaved.py): tokens / targets int32 [B, L], loss_mask bool [B, L], images
float32 [B, N, S, S, 3], image_mask bool [B, L, N]. Loss: the mean next-token cross-entropy over
the loss mask (losses.lm.next_token_loss on the final-normed hidden state, with the LM's and the
added tokens' output kernels side by side). Logged: loss, nll, perplexity, accuracy, z_loss,
num_tokens.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlmjax.config import ConfigError, check_keys, plain
from vlmjax.losses import lm as lm_loss
from vlmjax.models.decoder import output_kernel
from vlmjax.models.fusion import FusionLM
from vlmjax.train.tasks import lm as lm_task
from vlmjax.train.tasks.llava import vision_and_llm
from vlmjax.train.tasks.base import TaskDefaults, with_compute_dtype

MODEL_KEYS = ("vision", "llm", "image_token_id", "end_of_chunk_id", "vision_arch",
              "vision_feature_layer", "vision_feature_select_strategy", "resampler",
              "cross_attention", "cross_attn_every", "only_attend_immediate_media",
              "additional_vocab_size", "feature_posemb", "dtype")
TRAINED = r"^(perceiver|media_posemb|llm/layers/xattn\d+)/"
TRAINED_WITH_EMBEDDINGS = (r"^(perceiver/|media_posemb/|llm/layers/xattn\d+/|additional_embed$|"
                           r"additional_head/)")
EVAL_TYPES = ("vqa",)


def model_kwargs(model_config) -> dict:
    """config.model -> FusionLM keyword arguments; ConfigError for a bad or unknown key."""
    kwargs = with_compute_dtype(model_config)
    check_keys(kwargs, MODEL_KEYS, "model")
    for key in ("vision", "llm", "image_token_id", "end_of_chunk_id"):
        if key not in kwargs:
            raise ConfigError(f"config.model is missing {key!r} (FusionLM arguments, "
                              "vlmjax/models/fusion.py)")
    kwargs = {k: plain(v) for k, v in kwargs.items()}
    kwargs.update(vision_and_llm(kwargs))
    if kwargs["llm"].get("scan_layers"):
        raise ConfigError("model.llm.scan_layers=True: the gated cross-attention blocks sit "
                          "between the LM's layers, which therefore run unrolled; leave it out")
    vocab = int(kwargs["llm"]["vocab_size"]) + int(kwargs.get("additional_vocab_size", 0))
    for key in ("image_token_id", "end_of_chunk_id"):
        if not 0 <= int(kwargs[key]) < vocab:
            raise ConfigError(f"model.{key}={kwargs[key]} is not an id of the model's "
                              f"{vocab} tokens (llm.vocab_size + additional_vocab_size)")
    return kwargs


class FusionTask(TaskDefaults):
    config_keys = {
        "model": "FusionLM kwargs and dtype (see this module's docstring)",
        "loss": "chunk_size, z_loss, label_smoothing (vlmjax/losses/lm.py)",
        "data": "MMC4-style documents: source='mmc4', json_path, image_dir",
        "input": "global_batch_size, image_size, max_len, max_images, tokenizer, ... "
                 "(vlmjax/data/interleaved.py)",
        "train_embeddings": "train the added tokens' embeddings and head (default True)",
    }
    summary_metrics = (("perplexity", "ppl"), ("num_tokens", "tok/s", "rate"))

    def __init__(self, config: ml_collections.ConfigDict, mesh):
        from vlmjax.data import interleaved
        self.config, self.mesh = config, mesh
        self.kwargs = model_kwargs(config.model)
        self.model = FusionLM(**self.kwargs)
        self.compute_dtype = config.model.get("dtype", "float32")
        train_embeddings = config.get("train_embeddings", True)
        if not isinstance(train_embeddings, bool):
            raise ConfigError(f"config.train_embeddings must be True or False, got "
                              f"{train_embeddings!r}")
        with_embeddings = train_embeddings and self.kwargs.get("additional_vocab_size", 0)
        self.trainable = TRAINED_WITH_EMBEDDINGS if with_embeddings else TRAINED
        self.loss_settings = lm_task.loss_settings(config)
        interleaved.validate_data(config.data)
        interleaved.validate_input(config.input)
        self.image_size = int(config.input.image_size)
        self.accum_steps = int((plain(config.get("optim")) or {}).get("accum_steps", 1))
        from vlmjax.train.tasks import fusion_init
        fusion_init.parse(config.get("model_init"))  # pure check: sources are read later
        from vlmjax.evals import registry  # late: TensorFlow is slow to import
        registry.check_evals(config.get("evals"), config.data, types=EVAL_TYPES)

    # ------------------------------------------------------------------------------ model/loss
    def init_params(self, rng):
        tokens = jnp.full((1, 1), self.kwargs["image_token_id"], jnp.int32)
        images = jnp.zeros((1, 1, self.image_size, self.image_size, 3), jnp.float32)
        return self.model.init({"params": rng}, tokens, images=images)["params"]

    def output_kernel(self, params):
        """[D, V + A]: the LM's unembedding and the added tokens' head."""
        kernel = output_kernel(params["llm"])
        if self.kwargs.get("additional_vocab_size"):
            head = nn.meta.unbox(params["additional_head"])["kernel"]
            kernel = jnp.concatenate([kernel, head.astype(kernel.dtype)], axis=1)
        return kernel

    def token_sums(self, params, batch, mask_BL=None):
        hidden = self.model.apply({"params": params}, batch["tokens"], images=batch["images"],
                                  image_mask=batch["image_mask"], return_hidden=True)
        loss_mask = batch["loss_mask"] if mask_BL is None else batch["loss_mask"] & mask_BL
        return lm_loss.next_token_loss(
            hidden, self.output_kernel(params), batch["targets"], loss_mask,
            chunk_size=int(self.loss_settings["chunk_size"]),
            z_loss=float(self.loss_settings["z_loss"]),
            label_smoothing=float(self.loss_settings["label_smoothing"]))

    def loss_fn(self, params, extra, batch, rng):
        del extra, rng  # no extra state, no dropout
        return lm_task.step_metrics(*self.token_sums(params, batch), self.accum_steps)

    def pretrained_params(self, model_init, abstract_params, shardings):
        """Params with `model_init`'s parts read (vlmjax/train/tasks/fusion_init.py): {"vision":
        SRC} a CLIP / SigLIP source's image tower (HF, converted, a contrastive workdir), {"llm":
        SRC} a decoder source (HF Llama / Qwen2 / OPT, converted, an lm workdir); the gated
        blocks, the resampler and every part not named keep the random init of config.seed."""
        from vlmjax.train.tasks import fusion_init

        def init_random():
            rng = jax.random.split(jax.random.PRNGKey(int(self.config.get("seed", 0))))[0]
            return jax.jit(lambda r: nn.meta.unbox(self.init_params(r)))(rng)

        params = fusion_init.assemble(model_init, self.config.model, self.image_size,
                                      init_random)
        return jax.device_put(params, shardings)

    # ------------------------------------------------------------------------------------ data
    def example_transform(self, training: bool) -> list[str]:
        del training
        return []  # documents become rows in data/interleaved.py

    def train_input(self, data_state: dict | None, shard: int | None = None,
                    num_shards: int | None = None):
        from vlmjax.data import interleaved
        return interleaved.InterleavedPipeline(
            self.config.data, self.config.input, image_token_id=self.kwargs["image_token_id"],
            end_of_chunk_id=self.kwargs["end_of_chunk_id"], process_index=shard,
            process_count=num_shards, state=data_state or None,
            only_immediate=self.kwargs.get("only_attend_immediate_media", True))

    # ----------------------------------------------------------------------------------- evals
    def eval_input(self) -> ml_collections.ConfigDict:
        """What the vqa evaluator reads images with: resized and value-ranged as in training."""
        value_range = tuple(self.config.input.get("value_range", (-1.0, 1.0)))
        return ml_collections.ConfigDict(dict(
            image_size=self.image_size, preprocess=f"resize|value_range{value_range}",
            tokenizer=self.config.input.tokenizer, max_text_len=int(self.config.input.max_len),
            special_tokens=list(self.config.input.get("special_tokens") or []), add_bos=False,
            eos="none"))

    def evaluators(self, eval_config) -> list:
        from vlmjax.evals import registry
        if not registry.entries(eval_config):
            return []
        from vlmjax.data import pipeline_config
        from vlmjax.evals.interleaved import InterleavedAnswerer
        eval_input = self.eval_input()
        tokenizer = pipeline_config.resolve_tokenizer(eval_input, [])
        answerer = InterleavedAnswerer(self.model, tokenizer, mesh=self.mesh)
        context = registry.EvalContext(mesh=self.mesh, train_data=self.config.data,
                                       input=eval_input, model=answerer)
        return registry.build_evaluators(eval_config, context)
