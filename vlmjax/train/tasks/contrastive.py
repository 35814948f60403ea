"""Contrastive task (CLIP, ALIGN, SigLIP, LiT): a TwoTowers model and a contrastive loss.

Implements the task contract of vlmjax/train/tasks/base.py. Config keys it owns
(`config_keys`; the trainer's are in trainer.TRAINER_KEYS):
  model        TwoTowers keyword arguments (image_arch: 'vit' | 'cnn'; image: ViT or ConvNet
               kwargs; text: TextTransformer kwargs; embed_dim, *_projection[_bias],
               temperature_init, bias_init) plus `dtype`
               ('float32' | 'bfloat16': the compute dtype; parameters stay float32)
  loss         name: 'clip' | 'siglip'; impl (siglip only): 'dense' | 'all_gather' | 'ppermute'
  data, input  the training data and its preprocessing (vlmjax.data.pipeline);
               input.hard_negatives adds word-swapped negative captions to the loss
               (losses.contrastive.hard_negative_loss)
It also reads (trainer keys) model_init, '' or a pretrained source for
vlmjax.convert.load_pretrained (HF dir, .npz, converted dir) or one per tower, {"image": SRC,
"text": SRC} (see `pretrained_params`), and evals (see `evaluators`).
Everything is trainable; LiT freezes the image tower with optim.freeze='^image_tower/'. No extra
state; the progress line shows the temperature t and (SigLIP) the bias b.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlmjax import sharding
from vlmjax.config import ConfigError, check_keys
from vlmjax.losses import contrastive
from vlmjax.models import scan_layout
from vlmjax.models.two_towers import IMAGE_TOWERS, TEXT_TOWERS, TwoTowers, with_defaults
from vlmjax.train.tasks.base import TaskDefaults, raise_architecture_diffs, with_compute_dtype

LOSSES = ("clip", "siglip")
# model_init sub-models: the parameter subtrees each one owns (vlmjax/convert/model_init.py).
SUB_MODELS = {"image": ("image_tower", "image_proj"), "text": ("text_tower", "text_proj")}


def model_kwargs(model_config) -> dict:
    return with_compute_dtype(model_config)


IGNORED_IN_ARCHITECTURE = ("temperature_init", "bias_init", "dtype", "use_text_mask")
# Tower fields that change how, not what, a tower computes: pretrained weights load under any.
COMPUTE_SWITCHES = ("dtype", "remat", "scan_layers", "fused_attention", "dropout",
                    "attention_dropout", "attention_layout")


def _check_architecture(src: str, model_config, sub_model: str | None = None):
    """Shapes alone miss e.g. another activation or pooling: compare every field that defines
    the function the pretrained weights compute (of `sub_model`'s tower only, when given)."""
    from vlmjax.convert.recipe import pretrained_recipe
    pretrained = pretrained_recipe(src).model_config
    ours = model_kwargs(model_config)
    towers = ("image", "text") if sub_model is None else (sub_model,)
    name = "model_init" if sub_model is None else f"model_init.{sub_model}"
    arch, their_arch = ours.get("image_arch", "vit"), pretrained.get("image_arch", "vit")
    if "image" in towers and arch != their_arch:
        raise ConfigError(f"config.model.image_arch {arch!r} differs from the image tower of "
                          f"{name} {src} ({their_arch!r})")
    text_arch, their_text_arch = (ours.get("text_arch", "transformer"),
                                  pretrained.get("text_arch", "transformer"))
    if "text" in towers and text_arch != their_text_arch:
        raise ConfigError(f"config.model.text_arch {text_arch!r} differs from the text tower of "
                          f"{name} {src} ({their_text_arch!r})")
    diffs = []
    modules = {"image": IMAGE_TOWERS[arch], "text": TEXT_TOWERS[text_arch]}
    for tower in towers:
        theirs, mine = with_defaults(modules[tower], pretrained.get(tower)), with_defaults(
            modules[tower], ours.get(tower))
        for key in sorted(set(theirs) - set(COMPUTE_SWITCHES)):
            if theirs[key] != mine[key]:
                diffs.append(f"model.{tower}.{key}: config {mine[key]!r}, pretrained "
                             f"{theirs[key]!r}")
    theirs, mine = with_defaults(TwoTowers, pretrained), with_defaults(TwoTowers, ours)
    for key in sorted(set(theirs) - {"image", "text"} - set(IGNORED_IN_ARCHITECTURE)):
        # A sub-model's own fields: its projection (image_projection, ...) and embed_dim.
        if sub_model is not None and not (key.startswith(f"{sub_model}_") or key == "embed_dim"):
            continue
        if theirs[key] != mine[key]:
            diffs.append(f"model.{key}: config {mine[key]!r}, pretrained {theirs[key]!r}")
    raise_architecture_diffs(diffs, name, src)


class ContrastiveTask(TaskDefaults):
    config_keys = {
        "model": "TwoTowers kwargs and dtype (see this module's docstring)",
        "loss": "name: clip | siglip; impl (siglip): dense | all_gather | ppermute",
        "data": "training data source (vlmjax.data.pipeline)",
        "input": "preprocessing, tokenizer, hard_negatives and global_batch_size",
    }
    summary_metrics = (("temperature", "t"), ("bias", "b"))

    def __init__(self, config: ml_collections.ConfigDict, mesh):
        self.config, self.mesh = config, mesh
        self.model = TwoTowers(**model_kwargs(config.model))
        self.compute_dtype = config.model.get("dtype", "float32")
        self.loss_name = config.loss.get("name")
        if self.loss_name not in LOSSES:
            raise ConfigError(f"loss.name {self.loss_name!r} is not one of {LOSSES}")
        # impl picks how the sigmoid loss is sharded; CLIP's softmax has one implementation.
        check_keys(config.loss, ("name", "impl") if self.loss_name == "siglip" else ("name",),
                   "loss")
        self.impl = config.loss.get("impl", "ppermute")
        if self.impl not in contrastive.SIGLIP_IMPLS:
            raise ConfigError(f"loss.impl {self.impl!r} is not one of {contrastive.SIGLIP_IMPLS}")
        if self.loss_name == "siglip" and config.model.get("bias_init") is None:
            raise ConfigError("loss.name='siglip' needs a learnable bias: set model.bias_init "
                              "(SigLIP: -10)")
        self.image_size = int(config.input.image_size)
        self.text_length = int(config.input.max_text_len)
        from vlmjax.evals import registry  # late: TensorFlow is slow to import
        registry.check_evals(config.get("evals"), config.data,  # pure: evaluators read lazily
                             types=("zero_shot", "retrieval"))

    # ------------------------------------------------------------------------------ model/loss
    def init_params(self, rng):
        image = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        text = jnp.zeros((1, self.text_length), jnp.int32)
        return self.model.init({"params": rng}, image, text)["params"]

    def loss_fn(self, params, extra, batch, rng):
        return self.loss_from_embeddings(params, extra, self.embed(params, extra, batch, rng),
                                         batch, rng)

    # The two halves of loss_fn are the ExactAccumTask hooks (tasks/base.py): optim.accum=
    # 'exact' embeds micro-batches and takes the loss on the full batch of embeddings.
    def embed(self, params, extra, batch, rng) -> dict:
        """Per-example L2-normalised embeddings: image, text [B, D] and (input.hard_negatives)
        neg_text [B, K, D]."""
        del extra  # no extra state
        zimg, ztxt, _ = self.model.apply(
            {"params": params}, batch["image"], batch["text"], batch["text_mask"], train=True,
            rngs={"dropout": rng})
        embeddings = {"image": zimg, "text": ztxt}
        if "neg_text" in batch:  # input.hard_negatives: K swapped captions per image
            embeddings["neg_text"] = self.model.apply(  # [B, K, D]
                {"params": params}, batch["neg_text"], batch["neg_text_mask"], train=True,
                rngs={"dropout": jax.random.fold_in(rng, 1)},  # not the captions' dropout
                method=self.model.encode_text)
        return embeddings

    def loss_from_embeddings(self, params, extra, embeddings, batch, rng):
        """The contrastive loss of the batch's embeddings; aux: temperature and (SigLIP) bias."""
        del extra, rng  # no extra state; the loss itself draws nothing
        _, _, out = self.model.apply({"params": params})  # t and b only: no tower runs
        zimg, ztxt = embeddings["image"], embeddings["text"]
        if self.loss_name == "clip":
            loss = contrastive.clip_loss(zimg, ztxt, out["temperature"], mesh=self.mesh)
        else:
            loss = contrastive.siglip_loss(zimg, ztxt, out["temperature"], out["bias"],
                                           mesh=self.mesh, impl=self.impl)
        if "neg_text" in embeddings:
            loss += contrastive.hard_negative_loss(
                zimg, ztxt, embeddings["neg_text"], batch["neg_valid"], out["temperature"],
                out["bias"] if self.loss_name == "siglip" else None)
        return loss, dict(out)

    def pretrained_params(self, model_init, abstract_params, shardings):
        """Params of `config.model_init`, checked against this model's, placed by `shardings`:
        one source for the whole model, or {"image": SRC, "text": SRC} (either alone; each SRC
        may be {"source": SRC, "prefix": PATH}), see vlmjax/convert/model_init.py. A tower not
        named keeps the random init of config.seed, as do t and b."""
        from vlmjax.convert import load_pretrained, model_init as model_init_lib
        from vlmjax.convert.pretrained import source_kind
        entries = model_init_lib.parse_model_init(model_init, SUB_MODELS)
        for entry in entries:  # a prefix reads another model's subtree: shapes are checked
            if entry.prefix is None and source_kind(entry.source) != "big_vision":  # no config
                _check_architecture(entry.source, self.config.model, entry.sub_model)
        # One whole-model source in the layout we want loads straight into the shardings.
        direct = (len(entries) == 1 and entries[0].sub_model is None and not entries[0].prefix
                  and not scan_layout.is_scanned(abstract_params))
        size = (self.image_size, self.image_size)

        def load(src):
            return load_pretrained(src, image_size=size,
                                   shardings=shardings if direct else None)[1]

        def init_random():  # the trainer's own init rng, so unnamed towers init as without
            rng = jax.random.split(jax.random.PRNGKey(int(self.config.get("seed", 0))))[0]
            return jax.jit(lambda r: nn.meta.unbox(self.init_params(r)),
                           out_shardings=shardings)(rng)

        params = model_init_lib.assemble_params(entries, SUB_MODELS, abstract_params, load,
                                                init_random)
        return jax.device_put(params, shardings)

    # ------------------------------------------------------------------------------------ data
    def example_transform(self, training: bool) -> list[str]:
        """The ops after input.preprocess: caption choice (unless input.preprocess has one),
        the hard negatives (training, input.hard_negatives) and tokenisation; see
        vlmjax/data/ops_contrastive.py."""
        from vlmjax.data import ops_contrastive  # late: TensorFlow is slow to import
        return ops_contrastive.example_transform(self.config.input, training)

    def train_input(self, data_state: dict | None, shard: int | None = None,
                    num_shards: int | None = None):
        """Training batches of data shard `shard` of `num_shards` (default: this process of
        all), resumed from `data_state` (its saved position)."""
        from vlmjax.data import pipeline
        return pipeline.make_pipeline(self.config.data, self.config.input, training=True,
                                      process_index=shard, process_count=num_shards,
                                      state=data_state or None,
                                      transform=self.example_transform(training=True))

    # ----------------------------------------------------------------------------------- evals
    def evaluators(self, eval_config) -> list:
        """The evaluators of `eval_config` (config.evals; types zero_shot and retrieval, see
        vlmjax/evals/registry.py), built lazily: nothing is read until one runs."""
        from vlmjax.evals import embed, registry
        replicated = sharding.replicated(self.mesh)
        encode_image = jax.jit(lambda params, b: self.model.apply(
            {"params": params}, b["image"], method=self.model.encode_image),
            out_shardings=replicated)
        encode_text = jax.jit(lambda params, b: self.model.apply(
            {"params": params}, b["text"], b["text_mask"], method=self.model.encode_text),
            out_shardings=replicated)
        context = registry.EvalContext(
            mesh=self.mesh, train_data=self.config.data, input=self.config.input,
            model=embed.TwoTowerEncoders(encode_image, encode_text, self.mesh))
        return registry.build_evaluators(eval_config, context)
