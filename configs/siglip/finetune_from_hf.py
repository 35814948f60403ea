"""Fine-tune a pretrained SigLIP (or CLIP) checkpoint, then export it back to Hugging Face.

    python -m vlmjax.train --workdir /ckpt/ft --config \
      'configs/siglip/finetune_from_hf.py:src=/ckpt/siglip-base-patch16-224,data=/data/shards/{00000..00331}.tar'
    python -m vlmjax.convert export --to hf /ckpt/ft /ckpt/ft_hf   # SiglipModel.from_pretrained

    # about a minute on a 2-core CPU: 2 steps of any (e.g. tiny random) model on vlm_shapes
    python -m vlmjax.train --workdir /tmp/ft --config \
      'configs/siglip/finetune_from_hf.py:runlocal,src=DIR' --config.data.data_dir=/tmp/tfds

src    an HF SiglipModel / CLIPModel directory (config.json, model.safetensors, tokenizer files)
       or a directory written by `python -m vlmjax.convert import` (e.g. from a big_vision .npz).
       Everything model-specific is read from it (`vlmjax.convert.pretrained_recipe`, config
       files only): config.model, the image size and normalisation (value_range for SigLIP's
       mean/std 0.5, normalize_clip for CLIP's), the tokenizer file with its length, BOS/EOS and
       padding, whether the text tower sees the padding mask (SigLIP: no, it reads the padding),
       and the loss (SigLIP: sigmoid, ppermute; CLIP: softmax). model_init = src: the trainer
       loads the weights into the param shardings and checks them against config.model.
data   webdataset / img2dataset shards ('/data/{00000..00099}.tar' or globs; for a
       comma-separated list use --config.data.paths), 'tfds:NAME' (a prepared TFDS dataset;
       --config.data.text_key / image_key / data_dir), or '' = vlm_shapes (built on first use).
       Evaluation: zero-shot + retrieval on vlm_shapes; for other data, retrieval on held-out
       data named by eval=...: a TFDS split of the same dataset (data=tfds:NAME,eval=validation)
       or held-out shards (data=/data/train-{...}.tar,eval=/data/val-{...}.tar); without it,
       no evaluation (evaluate the checkpoint later with python -m vlmjax.eval).
Presets: src=DIR, data=..., eval=..., steps=N, batch=N (global), res=N (fine-tune at N x N; the
learned position embedding is resized bilinearly on load), runlocal (2 steps on a tiny
vlm_shapes).

Hardware: SigLIP B/16 at 224 px, global batch 1024, bfloat16 compute: one host of 8 GPUs
(A100/H100) or a TPU v4-8 / v5e-8, data parallel; for So400m add FSDP
(--config.mesh.data=1 --config.mesh.fsdp=-1). Not timed here.
Expected: step 0 is the imported model exactly (tests/convert/test_finetune_recipe.py: bit-equal
params, and the export gives transformers' embeddings to 1e-5), so the first loss is the released
model's on your data and then falls; with lr 1e-5, 500 warmup steps and cosine decay there is no
early loss spike. Fine-tuned accuracies are not measured in this repository (no released weights
or web data on its development machines).
"""
import ml_collections
from ml_collections.config_dict import placeholder

from vlmjax.config import ConfigError, parse_preset_args
from vlmjax.evals import presets as evals_presets


def _recipe(src: str):
    from vlmjax.convert import pretrained_recipe

    if not src:
        raise ConfigError("configs/siglip/finetune_from_hf.py needs src=DIR: an HF SiglipModel / "
                          "CLIPModel directory or a `python -m vlmjax.convert import` output, e.g. "
                          "--config 'configs/siglip/finetune_from_hf.py:src=/ckpt/siglip-base-"
                          "patch16-224'")
    try:
        recipe = pretrained_recipe(src)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"src={src}: {error}") from error
    if recipe.tokenizer is None:
        raise ConfigError(f"src={src} has no tokenizer file (tokenizer.json / spiece.model); "
                          "fine-tuning needs the model's own tokenizer")
    return recipe


def _data(data: str, held_out: str, image_size: int, batch_size: int) -> tuple[dict, dict]:
    """(config.data, config.evals) for the `data=` and `eval=` presets."""
    if data in ("", "vlm_shapes"):
        return (dict(source="vlm_shapes", split="train",
                     config="224px" if image_size > 64 else "64px", data_dir=placeholder(str)),
                evals_presets.vlm_shapes(batch_size=batch_size, max_images=1000))
    if data.startswith("tfds:"):
        train = dict(source="tfds", name=data[len("tfds:"):], split="train",
                     data_dir=placeholder(str), image_key="image", text_key="caption",
                     label_key=placeholder(str))
        eval_data = dict(split=held_out)
    else:
        train = dict(source="webdataset", paths=data, text_extension="txt")
        eval_data = dict(paths=held_out)
    evals = {} if not held_out else {"held_out": dict(
        type="retrieval", data=eval_data, max_images=5000, batch_size=batch_size)}
    return train, evals


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, src="", data="", eval="", steps=5000,
                             batch=1024, res=0)
    recipe = _recipe(str(args.src))
    tokenizer = recipe.tokenizer
    image_size = int(args.res) or recipe.square_image_size()

    c = ml_collections.ConfigDict()
    c.task = "contrastive"
    c.seed = 0
    c.total_steps = args.steps
    c.model = dict(recipe.model_config, use_text_mask=tokenizer["text_mask"], dtype="bfloat16")
    if c.model.bias_init is None:  # CLIP: no logit bias (typed, so that overrides can set one)
        c.model.bias_init = placeholder(float)
    c.model_init = str(args.src)
    c.loss = dict(name=recipe.loss, impl="ppermute")
    c.data, c.evals = _data(str(args.data), str(args.eval), image_size, batch_size=512)
    c.input = dict(global_batch_size=args.batch, image_size=image_size,
                   preprocess=f"caption_random|inception_crop|flip_caption_aware|"
                              f"{recipe.value_op()}",
                   crop_area_min=0.5,  # mild augmentation: the model has seen the domain's scale
                   shuffle_buffer=50_000, seed=0, tokenizer=tokenizer["path"],
                   max_text_len=tokenizer["max_len"], add_bos=tokenizer["add_bos"],
                   eos=tokenizer["eos"], prefetch_batches=4)
    c.optim = dict(name="adamw", lr=1e-5, schedule="cosine",
                   warmup_steps=min(500, args.steps // 10), end_lr=0.0, weight_decay=1e-4, b1=0.9, b2=0.95, clip_norm=1.0)
    c.data_shards = 0  # input streams; 0 = the process count of the first run (see README)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.log_every = 50
    c.checkpoint = dict(every=1000, keep=2)
    c.nonfinite = "skip"
    c.peak_flops = 0.0
    if args.runlocal:
        c.total_steps = 2
        c.model.dtype = "float32"
        if c.data.source == "vlm_shapes":
            c.data.config = "32px"
            c.data.train_size, c.data.eval_size, c.data.novel_size = 64, 32, 16
            c.evals = dict(test=dict(type="zero_shot", data=dict(split="test"),
                                     templates="vlm_shapes", batch_size=32),
                           test_retrieval=dict(type="retrieval", data=dict(split="test"),
                                               max_images=32, batch_size=32))
        c.input.global_batch_size = 16
        c.input.shuffle_buffer = 64
        c.input.prefetch_batches = 1
        c.optim.warmup_steps = 1  # step 1 at lr 0: checkpoint 1 holds the imported params
        c.log_every = 1
        c.checkpoint = dict(every=1, keep=3)
        c.peak_flops = 1e11  # skip the matmul measurement
    return c
