"""LLaVA task: a PrefixLM (vision tower -> projector -> decoder LLM) trained on conversations.

Implements the task contract of vlmjax/train/tasks/base.py. Config keys it owns
(`config_keys`; the trainer's are in trainer.TRAINER_KEYS):
  model        PrefixLM keyword arguments (vlmjax/models/prefix_lm.py): vision_arch ('vit' |
               'cnn'), vision (its tower's kwargs, e.g. a SigLIP / CLIP config's model.image), llm (Decoder kwargs, e.g. an lm
               config's model, without dtype), image_token_id, vision_feature_layer,
               vision_feature_select_strategy, projector, projector_bias,
               projector_posemb, projector_norm, prefix_attention, qformer (projector
               'qformer': BLIP-2's Q-Former kwargs, the blip2 task's stage 2); and
               `dtype` ('float32' | 'bfloat16': the compute dtype of every part; params stay
               float32)
  loss         chunk_size, z_loss, label_smoothing (as the lm task; vlmjax/losses/lm.py)
  data, input  LLaVA JSON sources and the conversation rows (vlmjax/data/llava_pipeline.py:
               image_size, preprocess, max_len, template, tokenizer, special_tokens, ...)
  stage        1: train the projector only (vision tower and LLM frozen; LLaVA's feature
               alignment); 2: train the projector and the LLM (the vision tower frozen)
  train_vision optional, stage 2 only: True also trains the vision tower (default False)
Frozen parts are the task's `trainable`: the trainer differentiates only the trained params (no
weight gradient, no optimiser state for the rest; optim.freeze freezes more on top).
It also reads (trainer keys) model_init (see `pretrained_params`) and evals (types vqa,
captioning and cot, run by vlmjax.evals.generation.ImageQuestionAnswerer).

Batches (llava_pipeline): tokens / targets int32 [B, L], loss_mask bool [B, L] (the answers),
segment_ids int32 [B, L], image float32 [B, S, S, 3]; the image tokens of `tokens` take the
image's projected visual tokens. Loss: the mean next-token cross-entropy over the answer tokens
(losses.lm.next_token_loss on the final-normed hidden state, never [B, L, V] logits). Logged:
loss, nll, perplexity, accuracy, z_loss, num_tokens; the progress line shows perplexity and
the answer tokens per second.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlmjax.config import ConfigError, check_keys, plain
from vlmjax.losses import lm as lm_loss
from vlmjax.models.decoder import output_kernel
from vlmjax.models.prefix_lm import PrefixLM
from vlmjax.models.two_towers import IMAGE_TOWERS, build_tower
from vlmjax.train.tasks import lm as lm_task
from vlmjax.train.tasks.base import TaskDefaults, with_compute_dtype

PREFIX_FIELDS = ("image_token_id", "vision_arch", "vision_feature_layer", "vision_feature_select_strategy",
                 "projector", "projector_bias", "projector_posemb", "projector_norm",
                 "prefix_attention", "qformer")
MODEL_KEYS = ("vision", "llm", *PREFIX_FIELDS, "dtype")
TRAINABLE = {1: r"^projector/", 2: r"^(projector|llm)/"}
EVAL_TYPES = ("vqa", "captioning", "cot")


def model_kwargs(model_config) -> dict:
    """config.model -> PrefixLM keyword arguments; ConfigError for a bad or unknown key."""
    kwargs = with_compute_dtype(model_config)
    check_keys(kwargs, MODEL_KEYS, "model")
    for key in ("vision", "llm", "image_token_id"):
        if key not in kwargs:
            raise ConfigError(f"config.model is missing {key!r} (PrefixLM arguments, "
                              "vlmjax/models/prefix_lm.py)")
    if kwargs.get("qformer") is not None:
        kwargs["qformer"] = dict(plain(kwargs["qformer"]))
    return {**kwargs, **vision_and_llm(kwargs)}


def vision_and_llm(kwargs) -> dict:
    """{"vision", "llm"} of config.model as plain dicts, checked: no per-part dtype, a known
    vision_arch whose tower takes the vision keys, Decoder keys for the llm (the llava and
    fusion tasks)."""
    vision, llm = dict(plain(kwargs["vision"])), dict(plain(kwargs["llm"]))
    for part, sub in (("vision", vision), ("llm", llm)):
        if "dtype" in sub:
            raise ConfigError(f"model.{part}.dtype: the compute dtype of every part is "
                              "model.dtype; leave it out")
    arch = kwargs.get("vision_arch", "vit")
    if arch not in IMAGE_TOWERS:
        raise ConfigError(f"config.model.vision_arch {arch!r} is not one of "
                          f"{sorted(IMAGE_TOWERS)}")
    try:
        build_tower(IMAGE_TOWERS[arch], vision, "model.vision")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    lm_task.model_kwargs(llm)  # Decoder keys: unknown / missing ones are ConfigErrors
    return {"vision": vision, "llm": llm}


def num_image_tokens(model: PrefixLM, image_size: int) -> int:
    """Visual tokens per image (after the select strategy), from shapes alone."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    features = jax.eval_shape(lambda x: model.init_with_output(
        jax.random.PRNGKey(0), x, method=PrefixLM.image_features)[0], images)
    return int(features.shape[1])


def init_prefix(model: PrefixLM) -> dict:
    """The prefix_mask argument an uncached call of `model` needs (prefix_attention 'full')."""
    return {"prefix_mask": jnp.ones((1, 1), bool)} if model.prefix_attention == "full" else {}


class LlavaTask(TaskDefaults):
    config_keys = {
        "model": "PrefixLM kwargs and dtype (see this module's docstring)",
        "loss": "chunk_size, z_loss, label_smoothing (vlmjax/losses/lm.py)",
        "data": "LLaVA JSON training data (llava_json sources or a mixture of them)",
        "input": "image preprocessing, chat template, tokenizer, max_len and global_batch_size "
                 "(vlmjax/data/llava_pipeline.py)",
        "stage": "1: train the projector only; 2: the projector and the LLM",
        "train_vision": "stage 2: also train the vision tower (default False)",
    }
    summary_metrics = (("perplexity", "ppl"), ("num_tokens", "tok/s", "rate"))

    def __init__(self, config: ml_collections.ConfigDict, mesh):
        from vlmjax.data import llava_pipeline, pipeline_config  # late: TensorFlow
        self.config, self.mesh = config, mesh
        self.kwargs = model_kwargs(config.model)
        self.model = PrefixLM(**self.kwargs)
        self.compute_dtype = config.model.get("dtype", "float32")
        self.stage = config.get("stage")
        if type(self.stage) is not int or self.stage not in TRAINABLE:
            raise ConfigError(f"config.stage must be 1 (projector only) or 2 (projector and "
                              f"LLM), got {self.stage!r}")
        self.train_vision = config.get("train_vision", False)
        if not isinstance(self.train_vision, bool) or (self.train_vision and self.stage != 2):
            raise ConfigError(f"config.train_vision={self.train_vision!r}: True or False, and "
                              "True only with stage=2 (stage 1 trains the projector alone)")
        self.trainable = None if self.train_vision else TRAINABLE[self.stage]
        self.loss_settings = lm_task.loss_settings(config)
        try:
            llava_pipeline.validate_llava_input(config.input)
            pipeline_config.validate_data_config(config.data)
            llava_pipeline.validate_llava_data(config.data)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if config.input.get("pack") and self.kwargs.get("prefix_attention") == "full":
            raise ConfigError("input.pack=True with model.prefix_attention='full': a packed row "
                              "holds several prefixes, and the prefix mask is one per row; "
                              "pack with 'causal' or leave pack off")
        self.image_size = int(config.input.image_size)
        self.num_image_tokens = self._num_image_tokens()
        if self.num_image_tokens >= int(config.input.max_len):
            raise ConfigError(f"input.max_len={config.input.max_len} leaves no room for text "
                              f"after an image's {self.num_image_tokens} tokens; raise it")
        self.accum_steps = int((plain(config.get("optim")) or {}).get("accum_steps", 1))
        from vlmjax.train.tasks import llava_init
        llava_init.parse(config.get("model_init"))  # pure check
        from vlmjax.evals import registry  # late: TensorFlow is slow to import
        registry.check_evals(config.get("evals"), config.data, types=EVAL_TYPES)

    def _num_image_tokens(self) -> int:
        try:
            return num_image_tokens(self.model, self.image_size)
        except ValueError as error:  # the PrefixLM's own checks (strategy, layers, ...)
            raise ConfigError(f"config.model: {error}") from None

    # ------------------------------------------------------------------------------ model/loss
    def init_params(self, rng):
        filler = 0 if self.kwargs["image_token_id"] != 0 else 1  # a text token: no image rows
        tokens = jnp.full((1, 1), filler, jnp.int32)
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        return self.model.init({"params": rng}, tokens, images=images,
                               **init_prefix(self.model))["params"]

    def _prefix_mask(self, batch):
        """prefix_attention 'full': the image and prompt before the first answer token."""
        answer = jnp.pad(batch["loss_mask"][:, :-1], ((0, 0), (1, 0)))  # token t is an answer
        return (batch["segment_ids"] > 0) & (jnp.cumsum(answer, axis=1) == 0)

    def token_sums(self, params, batch, mask_BL=None):
        """(loss, metrics) of losses.lm.next_token_loss on `batch`; `mask_BL` narrows the
        counted tokens (evaluation: the real rows)."""
        extra = ({"prefix_mask": self._prefix_mask(batch)}
                 if self.kwargs.get("prefix_attention") == "full" else {})
        hidden = self.model.apply({"params": params}, batch["tokens"], images=batch["image"],
                                  segment_ids=batch["segment_ids"], return_hidden=True, **extra)
        loss_mask = batch["loss_mask"] if mask_BL is None else batch["loss_mask"] & mask_BL
        return lm_loss.next_token_loss(
            hidden, output_kernel(params["llm"]), batch["targets"], loss_mask,
            chunk_size=int(self.loss_settings["chunk_size"]),
            z_loss=float(self.loss_settings["z_loss"]),
            label_smoothing=float(self.loss_settings["label_smoothing"]))

    def loss_fn(self, params, extra, batch, rng):
        del extra, rng  # no extra state, no dropout
        return lm_task.step_metrics(*self.token_sums(params, batch), self.accum_steps)

    def pretrained_params(self, model_init, abstract_params, shardings):
        """Params of `config.model_init`, placed by `shardings` (vlmjax/train/tasks/
        llava_init.py): one LLaVA source for the whole model (a `llava` workdir, e.g. stage
        1's, or an HF LlavaForConditionalGeneration directory), or {"vision": SRC, "llm": SRC,
        "projector": SRC} (any of them; the rest keeps the random init of config.seed):
        vision from a CLIP / SigLIP source (HF, converted, a contrastive workdir: its image
        tower) or a LLaVA one, llm from a decoder source (HF Llama / Qwen2, converted, an lm
        workdir) or a LLaVA one, projector from a LLaVA one. Every source's architecture is
        checked against config.model, then every shape."""
        from vlmjax.train.tasks import llava_init

        def init_random():  # the trainer's own init rng, so unnamed parts init as without
            rng = jax.random.split(jax.random.PRNGKey(int(self.config.get("seed", 0))))[0]
            return jax.jit(lambda r: nn.meta.unbox(self.init_params(r)),
                           out_shardings=shardings)(rng)

        params = llava_init.assemble(model_init, self.config.model, self.image_size,
                                     abstract_params, shardings, init_random)
        return jax.device_put(params, shardings)

    # ------------------------------------------------------------------------------------ data
    def example_transform(self, training: bool) -> list[str]:
        """The per-record op that passes the conversation on; the chat template, the label
        mask and the image tokens follow in data/llava_pipeline.py."""
        del training
        from vlmjax.data import llava_pipeline
        return [llava_pipeline.CONVERSATION_OP]

    def train_input(self, data_state: dict | None, shard: int | None = None,
                    num_shards: int | None = None):
        from vlmjax.data import llava_pipeline
        return llava_pipeline.LlavaPipeline(
            self.config.data, self.config.input, training=True,
            num_image_tokens=self.num_image_tokens,
            image_token_id=int(self.kwargs["image_token_id"]), process_index=shard,
            process_count=num_shards, state=data_state or None,
            vocab_size=int(self.kwargs["llm"]["vocab_size"]))

    # ----------------------------------------------------------------------------------- evals
    def eval_input(self) -> ml_collections.ConfigDict:
        """config.input with the image-text pipeline's keys beside it (image_size, preprocess,
        tokenizer, special_tokens with the image token, max_text_len, ...), for evaluators."""
        from vlmjax.data import llava_pipeline
        record = llava_pipeline.record_input_config(self.config.input).to_dict()
        return ml_collections.ConfigDict({**record, **plain(self.config.input),
                                          "special_tokens": record["special_tokens"]})

    def eval_template(self) -> str:
        """The chat template of the evaluators' prompts: training's."""
        return self.config.input.template

    def evaluators(self, eval_config) -> list:
        """The evaluators of `eval_config` (config.evals; types vqa, captioning and cot), built
        lazily around an evals.generation.ImageQuestionAnswerer of this model."""
        from vlmjax.evals import registry
        if not registry.entries(eval_config):
            return []
        from vlmjax.data import pipeline_config
        from vlmjax.evals.generation import ImageQuestionAnswerer
        eval_input = self.eval_input()
        tokenizer = pipeline_config.resolve_tokenizer(eval_input, [])
        answerer = ImageQuestionAnswerer(self.model, tokenizer, self.eval_template(),
                                         self.num_image_tokens, mesh=self.mesh,
                                         image_token=eval_input.get("image_token", "<image>"))
        context = registry.EvalContext(mesh=self.mesh, train_data=self.config.data,
                                       input=eval_input, model=answerer)
        return registry.build_evaluators(eval_config, context)
