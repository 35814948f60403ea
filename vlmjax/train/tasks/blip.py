"""BLIP task: ITC + ITM on cross-device hard negatives + LM (+ MLM), one model (models/blip.py).

Implements the task contract of vlmjax/train/tasks/base.py. Config keys it owns:
  model   Blip kwargs (image: ViT kwargs; text: BlipText kwargs; embed_dim, share, parts,
          temperature_init) plus `dtype`
  loss    weights itc, itm, lm, mlm (0 = off; BLIP: 1, 1, 1, 0); label_smoothing (LM, BLIP 0.1);
          momentum (0 = no momentum distillation; ALBEF/BLIP 0.995), alpha (0.4), queue_size
          (momentum features kept beside the batch; BLIP 57600; a multiple of the global
          batch); mlm_probability (0.15); itm_temperature (ITM negatives are drawn from
          softmax(sim / T): 0 = the ITC temperature, BLIP's; a larger T draws easier negatives,
          for captions that describe only part of an image, whose hardest "negative" is often
          true of it)
  model_init  '' (random), a BLIP source for the whole model, or {"image": SRC, "text": SRC}:
          image a ViT (e.g. {"source": WORKDIR, "prefix": "image_tower"} of a contrastive run),
          text an HF BERT directory (BLIP starts from bert-base-uncased; convert.hf_bert)
  data, input  image-text data and its preprocessing (vlmjax.data.pipeline); the tokenizer must
          have BOS (BLIP's [CLS]) and EOS, and input.special_tokens [ENC] and [DEC] ([MASK]
          too for MLM); input.hard_negatives (count K, vocabulary; as the contrastive task's)
          adds K word-swapped captions of each image as negatives of ITM and of ITC (the
          contrastive task's NegCLIP term); not BLIP's
Each caption is tokenised once, `[CLS] caption [SEP]`; the ITM encoder reads it with [ENC] in
place of [CLS], the decoder with [DEC] (targets: everything after it). Rows with the same
`image_id` (ops_blip.image_id: the record key) are positives of each other in ITC and never
ITM negatives. Logged: loss_itc, loss_itm, loss_lm (loss_mlm), itm_accuracy, lm_accuracy,
temperature; all parameters are trained.

Momentum distillation (loss.momentum > 0) keeps an EMA of the ITC parts (vision, vision_proj,
the text transformer, text_proj) and queues of their features in the task's extra state
(checkpointed and resumed like params); it needs optim.accum_steps = 1, since the queue takes
the whole global batch's features each step.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlmjax.config import ConfigError, check_keys, plain_dict
from vlmjax.losses import contrastive, lm as lm_loss, matching, mlm as mlm_lib
from vlmjax.models.blip import Blip
from vlmjax.train.tasks.base import TaskDefaults, with_compute_dtype

LOSS_DEFAULTS = dict(itc=1.0, itm=1.0, lm=1.0, mlm=0.0, label_smoothing=0.1, momentum=0.0,
                     alpha=0.4, queue_size=0, mlm_probability=0.15, itm_temperature=0.0)
EVAL_TYPES = ("zero_shot", "retrieval", "itm", "captioning")
# The parameter subtrees of the ITC features: what the momentum encoder copies.
ITC_PARTS = ("vision", "vision_proj", "text_shared", "text_encoder", "text_proj")
# model_init sub-models: the parameter subtrees each one owns (vlmjax/convert/model_init.py).
SUB_MODELS = {"image": ("vision", "vision_proj"),
              "text": ("text_shared", "text_encoder", "text_decoder", "text_proj")}


def loss_settings(config) -> dict:
    loss = plain_dict(config.get("loss"))
    check_keys(loss, tuple(LOSS_DEFAULTS), "loss")
    settings = {**LOSS_DEFAULTS, **loss}
    for key in ("itc", "itm", "lm", "mlm", "momentum", "label_smoothing", "alpha",
                "itm_temperature"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"loss.{key}={value!r} must be a number >= 0")
    if not any(settings[k] for k in ("itc", "itm", "lm", "mlm")):
        raise ConfigError("loss: every weight (itc, itm, lm, mlm) is 0; nothing would train")
    if settings["momentum"] >= 1.0 or settings["label_smoothing"] >= 1.0:
        raise ConfigError("loss.momentum and loss.label_smoothing must be below 1")
    if not 0.0 < settings["mlm_probability"] < 1.0:
        raise ConfigError(f"loss.mlm_probability={settings['mlm_probability']!r} must be in "
                          "(0, 1)")
    queue = settings["queue_size"]
    if isinstance(queue, bool) or not isinstance(queue, int) or queue < 0:
        raise ConfigError(f"loss.queue_size={queue!r} must be an integer >= 0")
    if queue and not settings["momentum"]:
        raise ConfigError("loss.queue_size needs momentum distillation (loss.momentum > 0): "
                          "the queue holds the momentum encoder's features")
    return settings


class BlipTask(TaskDefaults):
    config_keys = {
        "model": "Blip kwargs and dtype (see this module's docstring)",
        "loss": "weights itc, itm, lm, mlm; label_smoothing; momentum, alpha, queue_size; "
                "mlm_probability; itm_temperature",
        "data": "image-text training data (vlmjax.data.pipeline)",
        "input": "preprocessing, tokenizer (with [ENC], [DEC] special tokens), max_text_len and "
                 "global_batch_size",
    }
    summary_metrics = (("loss_itc", "itc"), ("loss_itm", "itm"), ("loss_lm", "lm"),
                       ("itm_accuracy", "itm acc"))

    def __init__(self, config: ml_collections.ConfigDict, mesh):
        self.config, self.mesh = config, mesh
        self.kwargs = with_compute_dtype(config.model)
        self.model = Blip(**self.kwargs)
        self.compute_dtype = config.model.get("dtype", "float32")
        self.loss = loss_settings(config)
        parts = tuple(self.kwargs.get("parts", ("encoder", "decoder")))
        needs = {"itc": "encoder", "itm": "encoder", "lm": "decoder", "mlm": "decoder"}
        for name, part in needs.items():
            if self.loss[name] and part not in parts:
                raise ConfigError(f"loss.{name}={self.loss[name]} needs the text {part}; "
                                  f"model.parts is {parts}")
        self.image_size = int(config.input.image_size)
        self.text_length = int(config.input.max_text_len)
        if not config.input.get("add_bos") or config.input.get("eos") != "sticky":
            raise ConfigError("the blip task needs input.add_bos=True ([CLS], replaced by [ENC] "
                              "/ [DEC]) and input.eos='sticky' ([SEP] ends every caption)")
        global_batch = int(config.input.global_batch_size)
        if self.loss["queue_size"] % global_batch:
            raise ConfigError(f"loss.queue_size={self.loss['queue_size']} must be a multiple of "
                              f"input.global_batch_size={global_batch}")
        accum = int(plain_dict(config.get("optim")).get("accum_steps", 1))
        if self.loss["momentum"] and accum != 1:
            raise ConfigError("momentum distillation (loss.momentum > 0) needs "
                              "optim.accum_steps=1: the queue takes the global batch each step")
        from vlmjax.evals import registry  # late: TensorFlow is slow to import
        registry.check_evals(config.get("evals"), config.data, types=EVAL_TYPES)

    @functools.cached_property
    def tokenizer(self):
        """The input tokenizer ("vlm_shapes": the one beside the training data's build)."""
        from vlmjax.data import pipeline_config
        built = []
        if self.config.input.tokenizer == "vlm_shapes":
            built = [pipeline_config.make_source(self.config.data, training=True)]
        return pipeline_config.resolve_tokenizer(self.config.input, built)

    @functools.cached_property
    def token_ids(self) -> dict:
        """bos ([CLS]), eos ([SEP]), pad, enc, dec (and mask) ids of the input tokenizer."""
        tokenizer = self.tokenizer
        ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
        wanted = {"enc": "[ENC]", "dec": "[DEC]"} | ({"mask": "[MASK]"} if self.loss["mlm"] else {})
        for name, text in wanted.items():
            try:
                ids[name] = tokenizer.token_id(text)
            except ValueError as error:
                raise ConfigError(f"the blip task needs {text} in input.special_tokens: "
                                  f"{error}") from None
        vocab = int(self.kwargs["text"]["vocab_size"])
        too_big = {k: v for k, v in ids.items() if v is not None and v >= vocab}
        if too_big:
            raise ConfigError(f"token ids {too_big} are outside model.text.vocab_size={vocab}")
        return ids

    # ------------------------------------------------------------------------------ model/loss
    def init_params(self, rng):
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        tokens = jnp.zeros((1, self.text_length), jnp.int32)
        return self.model.init({"params": rng}, images, tokens,
                               method=self.model.init_all)["params"]

    def pretrained_params(self, model_init, abstract_params, shardings):
        """Params of `config.model_init` (see the module docstring), shape-checked against this
        model's and placed by `shardings`; what no source names keeps the random init of
        config.seed (the cross-attention, [ENC] / [DEC] rows and heads under a BERT init)."""
        from vlmjax.convert import hf_bert, hf_blip, load_pretrained, model_init as model_init_lib
        from vlmjax.convert.pretrained import source_kind
        entries = model_init_lib.parse_model_init(model_init, SUB_MODELS)
        size = (self.image_size, self.image_size)

        @functools.cache
        def init_random():
            rng = jax.random.split(jax.random.PRNGKey(int(self.config.get("seed", 0))))[0]
            return jax.device_get(jax.jit(lambda r: nn.meta.unbox(self.init_params(r)))(rng))

        def load(src):
            if hf_bert.is_bert_source(src):
                return hf_bert.bert_into_blip(src, self.kwargs, init_random())
            blip = source_kind(src) == "hf" and hf_blip.is_blip_source(src)  # its own size
            return jax.device_get(load_pretrained(src, image_size=None if blip else size)[1])

        params = model_init_lib.assemble_params(entries, SUB_MODELS, abstract_params, load,
                                                init_random)
        return jax.device_put(params, shardings)

    def extra_state(self, params):
        if not self.loss["momentum"]:
            return {}
        extra = {"momentum": {k: v for k, v in params.items() if k in ITC_PARTS}}
        if self.loss["queue_size"]:
            dim = int(self.kwargs.get("embed_dim", 256))
            size = self.loss["queue_size"]
            extra.update(image_queue=jnp.zeros((size, dim), jnp.float32),
                         text_queue=jnp.zeros((size, dim), jnp.float32),
                         id_queue=jnp.full((size,), -1, jnp.int32),
                         queue_ptr=jnp.zeros((), jnp.int32))
        return extra

    def update_extra(self, extra, params, batch_out):
        if not extra:
            return extra
        momentum = matching.momentum_update(
            extra["momentum"], {k: params[k] for k in extra["momentum"]}, self.loss["momentum"])
        out = dict(extra, momentum=momentum)
        if "image_queue" in extra:
            ids = batch_out["image_id"]
            out["image_queue"], out["id_queue"], _ = matching.enqueue(
                extra["image_queue"], extra["id_queue"], extra["queue_ptr"],
                batch_out["image_feat_m"], ids)
            out["text_queue"], _, out["queue_ptr"] = matching.enqueue(
                extra["text_queue"], extra["id_queue"], extra["queue_ptr"],
                batch_out["text_feat_m"], ids)
        return out

    def _itc(self, params, extra, images, image_embeds, tokens, mask, ids, swapped=None):
        """(loss, aux): BLIP's ITC, with momentum distillation when loss.momentum > 0; with
        `swapped` (see _itm) plus each image's true caption against its swapped ones (the
        contrastive task's NegCLIP term)."""
        model = self.model
        image_feat = model.apply({"params": params}, None, image_embeds=image_embeds,
                                 method=model.encode_image)
        text_feat = model.apply({"params": params}, tokens, mask, train=True,
                                method=model.encode_text)
        temp = model.apply({"params": params}, method=model.temperature)
        aux = {"temperature": temp, "image_feat": image_feat, "text_feat": text_feat}
        swap_loss = 0.0
        if swapped is not None:
            neg_tokens, neg_mask, neg_valid = swapped
            flat = (-1, neg_tokens.shape[-1])
            neg_feat = model.apply({"params": params}, neg_tokens.reshape(flat),
                                   neg_mask.reshape(flat), train=True, method=model.encode_text)
            swap_loss = contrastive.hard_negative_loss(
                image_feat, text_feat, neg_feat.reshape(*neg_tokens.shape[:2], -1), neg_valid,
                1.0 / temp)
        if not self.loss["momentum"]:
            return swap_loss + contrastive.clip_loss(image_feat, text_feat, 1.0 / temp,
                                                     mesh=self.mesh), aux
        momentum = jax.lax.stop_gradient({**params, **extra["momentum"]})
        embeds_m = model.apply({"params": momentum}, images, method=model.image_features)
        image_feat_m = model.apply({"params": momentum}, None, image_embeds=embeds_m,
                                   method=model.encode_image)
        text_feat_m = model.apply({"params": momentum}, tokens, mask, method=model.encode_text)
        queues = {}
        if "image_queue" in extra:
            queues = {k: extra[k] for k in ("image_queue", "text_queue", "id_queue")}
        loss = matching.itc_distill_loss(image_feat, text_feat, image_feat_m, text_feat_m, ids,
                                         temp, alpha=self.loss["alpha"], mesh=self.mesh,
                                         **queues)
        return swap_loss + loss, {**aux, "image_feat_m": image_feat_m, "text_feat_m": text_feat_m}

    def _itm(self, params, rng, aux, image_embeds, tokens, mask, ids, swapped=None):
        """(loss, accuracy) of ITM on the true pairs and one hard negative per image and text;
        `swapped` (neg_text [B, K, L], its mask, valid [B, K]) adds K negatives per image."""
        model, ids_ = self.model, self.token_ids
        enc_tokens = tokens.at[:, 0].set(ids_["enc"])
        neg_text, neg_image, valid_text, valid_image = matching.hard_negative_indices(
            rng, jax.lax.stop_gradient(aux["image_feat"]), jax.lax.stop_gradient(aux["text_feat"]),
            ids, self.loss["itm_temperature"] or jax.lax.stop_gradient(aux["temperature"]),
            mesh=self.mesh)
        gather = functools.partial(matching.gather_rows, mesh=self.mesh)
        # Rows: (image i, its negative text), then (the negative image of text j, text j).
        pair_embeds = jnp.concatenate([image_embeds, gather(image_embeds, neg_image)])
        pair_tokens = jnp.concatenate([gather(enc_tokens, neg_text), enc_tokens])
        pair_mask = jnp.concatenate([gather(mask, neg_text), mask])
        valid = jnp.concatenate([valid_text, valid_image])
        if swapped is not None:  # input.hard_negatives: (image i, its caption word-swapped)
            neg_tokens, neg_mask, neg_valid = swapped
            count = neg_tokens.shape[1]
            pair_embeds = jnp.concatenate([pair_embeds, jnp.repeat(image_embeds, count, 0)])
            pair_tokens = jnp.concatenate([pair_tokens, neg_tokens.reshape(
                -1, neg_tokens.shape[-1]).at[:, 0].set(ids_["enc"])])
            pair_mask = jnp.concatenate([pair_mask, neg_mask.reshape(-1, neg_mask.shape[-1])])
            valid = jnp.concatenate([valid, neg_valid.reshape(-1)])
        itm = functools.partial(model.apply, {"params": params}, None, train=True,
                                method=model.itm_logits)
        logits_pos = itm(enc_tokens, mask, image_embeds=image_embeds)
        logits_neg = itm(pair_tokens, pair_mask, image_embeds=pair_embeds)
        return matching.itm_loss(logits_pos, logits_neg, valid)

    def _token_loss(self, params, hidden, targets, loss_mask):
        """losses.lm on the prediction head: its bias rides as an extra hidden unit of 1s."""
        transformed, kernel = self.model.apply({"params": params}, hidden,
                                               method=self.model.head_inputs)
        return lm_loss.naive_next_token_loss(
            transformed, kernel, targets, loss_mask,
            label_smoothing=float(self.loss["label_smoothing"]))

    def loss_fn(self, params, extra, batch, rng):
        images, tokens, mask = batch["image"], batch["text"], batch["text_mask"]
        ids = batch.get("image_id")
        if ids is None:  # no ids: every row its own image
            ids = jnp.arange(tokens.shape[0], dtype=jnp.int32)
        drop_rng, negative_rng, mlm_rng = jax.random.split(rng, 3)
        model, weights, token_ids = self.model, self.loss, self.token_ids
        image_embeds = model.apply({"params": params}, images, train=True,
                                   rngs={"dropout": drop_rng}, method=model.image_features)
        total, aux = 0.0, {"image_id": ids}
        swapped = None  # input.hard_negatives: K word-swapped captions per image
        if "neg_text" in batch:
            swapped = (batch["neg_text"], batch["neg_text_mask"], batch["neg_valid"])
        if weights["itc"] or weights["itm"]:
            loss_itc, itc_aux = self._itc(params, extra, images, image_embeds, tokens, mask, ids,
                                          swapped)
            aux.update(itc_aux, loss_itc=loss_itc)
            total += weights["itc"] * loss_itc
        if weights["itm"]:
            aux["loss_itm"], aux["itm_accuracy"] = self._itm(params, negative_rng, aux,
                                                             image_embeds, tokens, mask, ids,
                                                             swapped)
            total += weights["itm"] * aux["loss_itm"]
        if weights["lm"]:
            dec_tokens = tokens.at[:, 0].set(token_ids["dec"])
            hidden = model.apply({"params": params}, image_embeds, dec_tokens, mask, train=True,
                                 method=model.decoder_hidden)
            # Position t predicts token t + 1; padding (and the last position) never counts.
            loss_lm, lm_metrics = self._token_loss(
                params, hidden[:, :-1], dec_tokens[:, 1:], mask[:, 1:])
            aux.update(loss_lm=loss_lm, lm_accuracy=lm_metrics["accuracy"])
            total += weights["lm"] * loss_lm
        if weights["mlm"]:
            keep = [token_ids[k] for k in ("bos", "eos", "enc") if token_ids[k] is not None]
            corrupted, targets, chosen = mlm_lib.mask_tokens(
                mlm_rng, tokens.at[:, 0].set(token_ids["enc"]), mask,
                mask_id=token_ids["mask"], vocab_size=int(self.kwargs["text"]["vocab_size"]),
                probability=float(weights["mlm_probability"]), keep_ids=keep)
            hidden = model.apply({"params": params}, image_embeds, corrupted, mask, train=True,
                                 method=model.grounded_text)
            aux["loss_mlm"], _ = self._token_loss(params, hidden, targets, chosen)
            total += weights["mlm"] * aux["loss_mlm"]
        return total, aux

    # ------------------------------------------------------------------------------------ data
    def example_transform(self, training: bool) -> list[str]:
        """Caption choice (unless input.preprocess has one), `image_id`, tokenisation and, with
        input.hard_negatives, the word-swapped captions (`neg_text`, training only)."""
        from vlmjax.data import ops_blip, ops_contrastive  # noqa: F401  (registers image_id)
        return ["image_id"] + ops_contrastive.example_transform(self.config.input, training)

    def train_input(self, data_state: dict | None, shard: int | None = None,
                    num_shards: int | None = None):
        from vlmjax.data import pipeline
        return pipeline.make_pipeline(self.config.data, self.config.input, training=True,
                                      process_index=shard, process_count=num_shards,
                                      state=data_state or None,
                                      transform=self.example_transform(training=True))

    # ----------------------------------------------------------------------------------- evals
    def evaluators(self, eval_config) -> list:
        """The evaluators of `eval_config` (types zero_shot, retrieval (with ITM re-ranking),
        itm and captioning; vlmjax/evals/registry.py), around an evals.blip_model.BlipEvalModel
        of this model, built lazily: nothing is read until one runs."""
        from vlmjax.evals import registry
        if not registry.entries(eval_config):
            return []
        from vlmjax.evals.blip_model import BlipEvalModel
        model = BlipEvalModel(self.model, self.tokenizer, self.mesh, self.token_ids)
        context = registry.EvalContext(mesh=self.mesh, train_data=self.config.data,
                                       input=self.config.input, model=model)
        return registry.build_evaluators(eval_config, context)
