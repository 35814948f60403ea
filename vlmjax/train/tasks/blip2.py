"""BLIP-2 task: a Q-Former between a frozen image encoder and a frozen LLM, in BLIP-2's two stages
(`config.stage`).

Stage 1 (`Blip2Stage1Task`, model models/blip2.Blip2Stage1): representation learning on a frozen
image tower, with three objectives on one Q-Former and three attention masks:
  ITC  each query's feature against the text's [CLS] feature; a pair's similarity is the max
       over the queries; global over devices; rows of one image (`image_id`) are positives
  ITM  the bidirectional pass on the true pairs and on one hard negative per image and per text,
       mined across devices from the ITC similarities (losses.matching, as the blip task);
       logits averaged over the query outputs
  ITG  the multimodal-causal pass: text after [DEC] predicts its next token from the queries
       (label smoothing, BLIP-2: 0.1)
Config keys: model (Blip2Stage1 kwargs: vision_arch, vision, vision_feature_layer,
vision_feature_select_strategy, projector_norm, qformer, embed_dim, temperature_init; dtype;
vision_dtype, the frozen tower's compute dtype, e.g. 'bfloat16' as BLIP-2 runs it in fp16),
loss (weights itc, itm, lm (ITG); label_smoothing; itm_temperature as the blip task's), data and
input (the image-text pipeline; the tokenizer needs BOS ([CLS]), EOS ([SEP]) and the special
token [DEC]), model_init ({"vision": SRC, "text": BERT_DIR}: SRC a contrastive workdir or an
HF / converted CLIP / SigLIP, as the llava task's vision; BERT a Q-Former init,
convert.hf_bert). Trained: everything but `vision/` (the frozen tower runs without gradients).
Evals: retrieval (ITC, with ITM re-ranking) and itm.

Stage 2 (`Blip2Stage2Task`): the llava task (vlmjax/train/tasks/llava.py: LLaVA JSON data, chat
templates, packing, the vqa / captioning evaluators) on a PrefixLM with projector "qformer", of
which only `projector/` (ln_vision, the Q-Former, the language projection) is trained: the
vision tower and the LLM stay frozen. BLIP-2 trains it on captions (template plain: the image's
query tokens, then the caption); model_init {"stage1": WORKDIR, "llm": SRC} starts the tower,
ln_vision and the Q-Former from a stage-1 run and the LLM from a decoder source (the language
projection is new), or one blip2 stage-2 source for the whole model. `train_llm=True` also
trains the LLM: not BLIP-2, a diagnostic (does the frozen LLM limit what the soft prompt says?).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlmjax.config import ConfigError, check_keys, plain, plain_dict
from vlmjax.losses import matching
from vlmjax.models.blip2 import Blip2Stage1
from vlmjax.train.tasks.base import with_compute_dtype
from vlmjax.train.tasks.blip import BlipTask
from vlmjax.train.tasks.llava import LlavaTask

STAGES = (1, 2)
LOSS_DEFAULTS = dict(itc=1.0, itm=1.0, lm=1.0, label_smoothing=0.1, itm_temperature=0.0)
STAGE1_MODEL_KEYS = ("vision", "qformer", "vision_arch", "vision_feature_layer",
                     "vision_feature_select_strategy", "projector_norm", "embed_dim",
                     "temperature_init", "dtype", "vision_dtype")
STAGE1_EVAL_TYPES = ("retrieval", "itm")
FROZEN = r"^vision/"
STAGE2_TRAINABLE = r"^projector/"
STAGE2_TRAINABLE_WITH_LLM = r"^(projector|llm)/"
STAGE1_PARTS = ("vision", "projector/ln_vision", "projector/qformer")


def _stage(config) -> int:
    stage = config.get("stage")
    if type(stage) is not int or stage not in STAGES:
        raise ConfigError(f"config.stage must be 1 (Q-Former on a frozen image encoder: ITC, "
                          f"ITM, ITG) or 2 (Q-Former into a frozen LLM), got {stage!r}")
    return stage


class Blip2Task:
    """`task: "blip2"`: the stage's task (module docstring)."""
    config_keys = {
        "model": "stage 1: Blip2Stage1 kwargs; stage 2: PrefixLM kwargs with projector "
                 "'qformer' (see vlmjax/train/tasks/blip2.py)",
        "loss": "stage 1: weights itc, itm, lm; label_smoothing; itm_temperature. stage 2: "
                "the llava task's (chunk_size, z_loss, label_smoothing)",
        "data": "stage 1: image-text data; stage 2: LLaVA JSON data",
        "input": "stage 1: the image-text pipeline (tokenizer with [DEC]); stage 2: the llava "
                 "task's",
        "stage": "1 (ITC / ITM / ITG on a frozen image encoder) or 2 (soft visual prompt of a "
                 "frozen LLM)",
        "train_llm": "stage 2: also train the LLM (default False; not BLIP-2: a diagnostic of "
                     "what the frozen LLM cannot read)",
    }

    def __new__(cls, config, mesh):
        task = Blip2Stage1Task if _stage(config) == 1 else Blip2Stage2Task
        return task(config, mesh)


def loss_settings(config) -> dict:
    loss = plain_dict(config.get("loss"))
    check_keys(loss, tuple(LOSS_DEFAULTS), "loss")
    settings = {**LOSS_DEFAULTS, **loss}
    for key, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"loss.{key}={value!r} must be a number >= 0")
    if not any(settings[k] for k in ("itc", "itm", "lm")):
        raise ConfigError("loss: every weight (itc, itm, lm) is 0; nothing would train")
    if settings["label_smoothing"] >= 1.0:
        raise ConfigError("loss.label_smoothing must be below 1")
    return settings


class Blip2Stage1Task(BlipTask):
    """Stage 1 (module docstring). Shares the blip task's data, ITM mining and token loss."""
    config_keys = Blip2Task.config_keys
    summary_metrics = (("loss_itc", "itc"), ("loss_itm", "itm"), ("loss_lm", "itg"),
                       ("itm_accuracy", "itm acc"))
    trainable = r"^(?!vision/)"

    def __init__(self, config: ml_collections.ConfigDict, mesh):
        self.config, self.mesh = config, mesh
        self.stage = _stage(config)
        self.kwargs = with_compute_dtype(config.model)
        check_keys(self.kwargs, STAGE1_MODEL_KEYS, "model")
        vision_dtype = self.kwargs.get("vision_dtype")
        if vision_dtype is not None:
            self.kwargs["vision_dtype"] = with_compute_dtype({"dtype": vision_dtype})["dtype"]
        for key in ("vision", "qformer"):
            if key not in self.kwargs:
                raise ConfigError(f"config.model is missing {key!r} (Blip2Stage1 arguments, "
                                  "vlmjax/models/blip2.py)")
        self.kwargs.update(vision=dict(plain(self.kwargs["vision"])),
                           qformer=dict(plain(self.kwargs["qformer"])))
        self.model = Blip2Stage1(**self.kwargs)
        self.compute_dtype = config.model.get("dtype", "float32")
        self.loss = loss_settings(config)
        self.image_size = int(config.input.image_size)
        self.text_length = int(config.input.max_text_len)
        if not config.input.get("add_bos") or config.input.get("eos") != "sticky":
            raise ConfigError("the blip2 task needs input.add_bos=True ([CLS]; [DEC] for ITG) "
                              "and input.eos='sticky' ([SEP] ends every caption)")
        if config.input.get("hard_negatives"):
            raise ConfigError("input.hard_negatives: the blip2 task mines its ITM negatives "
                              "from the batch (BLIP-2); leave it out")
        max_len = int(self.kwargs["qformer"].get("max_len", 512))
        if self.text_length > max_len:
            raise ConfigError(f"input.max_text_len={self.text_length} exceeds "
                              f"model.qformer.max_len={max_len}")
        from vlmjax.evals import registry  # late: TensorFlow is slow to import
        registry.check_evals(config.get("evals"), config.data, types=STAGE1_EVAL_TYPES)

    @functools.cached_property
    def token_ids(self) -> dict:
        """bos ([CLS], also what ITM reads first: `enc`), eos ([SEP]), pad and dec ([DEC])."""
        tokenizer = self.tokenizer
        try:
            dec = tokenizer.token_id("[DEC]")
        except ValueError as error:
            raise ConfigError(f"the blip2 task needs [DEC] in input.special_tokens: "
                              f"{error}") from None
        ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id,
               "enc": tokenizer.bos_id, "dec": dec}
        vocab = int(self.kwargs["qformer"].get("vocab_size", 30522))
        too_big = {k: v for k, v in ids.items() if v is not None and v >= vocab}
        if too_big:
            raise ConfigError(f"token ids {too_big} are outside model.qformer.vocab_size={vocab}")
        return ids

    # ------------------------------------------------------------------------------ model/loss
    def pretrained_params(self, model_init, abstract_params, shardings):
        """`vision` from a CLIP / SigLIP source (as the llava task reads one), `text` from an
        HF BERT directory (the Q-Former and the ITG head, convert.hf_bert); the rest keeps the
        random init of config.seed."""
        from vlmjax.convert import model_init as model_init_lib
        entries = model_init_lib.parse_model_init(model_init, {"vision": ("vision",),
                                                               "text": ("projector",)})
        rng = jax.random.split(jax.random.PRNGKey(int(self.config.get("seed", 0))))[0]
        params = jax.device_get(jax.jit(lambda r: nn.meta.unbox(self.init_params(r)))(rng))
        for entry in entries:
            if entry.name.endswith("text"):
                from vlmjax.convert import hf_bert
                params = hf_bert.bert_into_qformer(entry.source, self.kwargs["qformer"], params)
            else:
                from vlmjax.train.tasks import llava_init
                vision = llava_init.assemble({"vision": entry.source}, self.config.model,
                                             self.image_size, {"vision": abstract_params["vision"]},
                                             None, lambda: {"vision": params["vision"]})
                params = {**params, "vision": jax.device_get(vision["vision"])}
        return jax.device_put(params, shardings)

    def _itc(self, params, extra, images, image_embeds, tokens, mask, ids, swapped=None):
        """(loss, aux): BLIP-2's ITC over the query features (max over queries)."""
        del extra, images, swapped
        model = self.model
        image_feat = model.apply({"params": params}, None, image_embeds=image_embeds, train=True,
                                 method=model.encode_image)
        text_feat = model.apply({"params": params}, tokens, mask, train=True,
                                method=model.encode_text)
        temp = model.apply({"params": params}, method=model.temperature)
        loss = matching.itc_loss(image_feat, text_feat, ids, temp, mesh=self.mesh)
        return loss, {"temperature": temp, "image_feat": image_feat, "text_feat": text_feat}

    def loss_fn(self, params, extra, batch, rng):
        images, tokens, mask = batch["image"], batch["text"], batch["text_mask"]
        ids = batch.get("image_id")
        if ids is None:  # no ids: every row its own image
            ids = jnp.arange(tokens.shape[0], dtype=jnp.int32)
        drop_rng, negative_rng = jax.random.split(rng)
        model, weights = self.model, self.loss
        # The frozen tower: computed once per batch, no gradient.
        image_embeds = jax.lax.stop_gradient(model.apply({"params": params}, images,
                                                         method=model.image_features))
        total, aux = 0.0, {"image_id": ids}
        if weights["itc"] or weights["itm"]:
            aux["loss_itc"], itc_aux = self._itc(params, extra, images, image_embeds, tokens,
                                                 mask, ids)
            aux.update(itc_aux)
            total += weights["itc"] * aux["loss_itc"]
        if weights["itm"]:
            aux["loss_itm"], aux["itm_accuracy"] = self._itm(params, negative_rng, aux,
                                                             image_embeds, tokens, mask, ids)
            total += weights["itm"] * aux["loss_itm"]
        if weights["lm"]:
            dec_tokens = tokens.at[:, 0].set(self.token_ids["dec"])
            hidden = model.apply({"params": params}, image_embeds, dec_tokens, mask, train=True,
                                 rngs={"dropout": drop_rng}, method=model.itg_hidden)
            loss_lm, lm_metrics = self._token_loss(params, hidden[:, :-1], dec_tokens[:, 1:],
                                                   mask[:, 1:])
            aux.update(loss_lm=loss_lm, lm_accuracy=lm_metrics["accuracy"])
            total += weights["lm"] * loss_lm
        for key in ("image_feat", "text_feat", "image_id"):
            aux.pop(key)
        return total, aux

    def extra_state(self, params):
        return {}

    def update_extra(self, extra, params, batch_out):
        return extra


class Blip2Stage2Task(LlavaTask):
    """Stage 2 (module docstring): the llava task with the Q-Former projector trained alone."""
    config_keys = Blip2Task.config_keys
    trainable = STAGE2_TRAINABLE

    def __init__(self, config: ml_collections.ConfigDict, mesh):
        if plain_dict(config.model).get("projector") != "qformer":
            raise ConfigError("blip2 stage 2 needs model.projector='qformer' (and model.qformer: "
                              "the Q-Former's kwargs)")
        settings = config.to_dict()
        # The llava task's own model_init check knows no "stage1".
        settings["model_init"] = split_stage1(config.get("model_init"))[1]
        train_llm = settings.pop("train_llm", False)
        if not isinstance(train_llm, bool):
            raise ConfigError(f"config.train_llm={train_llm!r} must be True or False")
        settings["stage"] = 1  # the llava task's stage 1 trains the projector alone
        stage2 = ml_collections.ConfigDict(settings)
        super().__init__(stage2, mesh)
        self.stage = 2
        self.trainable = STAGE2_TRAINABLE_WITH_LLM if train_llm else STAGE2_TRAINABLE

    def eval_template(self) -> str:
        """Training's template, but after plain (captions) "blip2": plain with the question
        kept, BLIP-2's zero-shot prompts."""
        template = self.config.input.template
        return "blip2" if template == "plain" else template

    def pretrained_params(self, model_init, abstract_params, shardings):
        """The llava task's model_init, plus `stage1`: the tower, ln_vision and the Q-Former of
        a blip2 stage-1 workdir (its text embeddings and text FFNs are left behind)."""
        stage1, rest = split_stage1(model_init)
        params = super().pretrained_params(rest, abstract_params, shardings)  # rest '': random
        if stage1:
            params = stage1_into_stage2(stage1, jax.device_get(params), abstract_params)
        return jax.device_put(params, shardings)


def split_stage1(model_init):
    """(the `stage1` workdir or None, the rest of model_init for the llava task, '' if none)."""
    if not isinstance(model_init, (dict, ml_collections.ConfigDict)):
        return None, model_init
    entries = plain_dict(model_init)
    return entries.pop("stage1", None), entries or ""


def stage1_into_stage2(workdir: str, params: dict, abstract_params) -> dict:
    """`params` (a stage-2 PrefixLM's) with vision/, projector/ln_vision and projector/qformer
    from the blip2 stage-1 run at `workdir`; a shape that differs is a ConfigError."""
    from vlmjax.convert import blip_workdir
    from vlmjax.convert.params import flatten, unflatten
    run = blip_workdir.load_blip_workdir(workdir, task="blip2")
    source = flatten(jax.device_get(run.params))
    want = flatten(abstract_params)
    out = flatten(params)
    for name, shape_of in want.items():
        if not name.startswith(STAGE1_PARTS):
            continue
        if name not in source:
            raise ConfigError(f"model_init.stage1 {workdir} has no {name}: is it a blip2 "
                              "stage-1 run of this model?")
        if tuple(source[name].shape) != tuple(shape_of.shape):
            raise ConfigError(f"model_init.stage1 {workdir}: {name} is "
                              f"{tuple(source[name].shape)}, config.model wants "
                              f"{tuple(shape_of.shape)}")
        out[name] = source[name]
    return unflatten(out)
