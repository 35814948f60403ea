"""Tiny ALIGN on vlm_shapes/noisy: softmax contrastive loss with a learnable temperature, a
bidirectional text encoder pooled at its first (BOS) token, and ALIGN's caption filtering.

    python -m vlmjax.train --config configs/align/tiny.py --workdir /tmp/align_tiny
    python -m vlmjax.train --config configs/align/tiny.py:filter=False --workdir /tmp/align_nofilter

30% of vlm_shapes/noisy's train captions are web junk ("1920x1080", "alt_img", one caption
shared by many images, too short/long texts, rare-token gibberish). With `filter=True` the
input pipeline drops examples by ALIGN's per-example text-length rule (3 to 20 words, counted in
train/data/skipped/*); the corpus rules (shared captions, rare tokens) need a pass over the
whole corpus: `python -m vlmjax.data.align_filter` on webdataset shards (see README "Data").
The images are 64 px, so ALIGN's 200 px minimum image side is off. README quotes the zero-shot
accuracy with the filter on and off at the same number of steps.
Presets: runlocal, steps, batch and filter (default True). The towers, no hard negatives and
lr 1e-3 are fixed: the ViT / transformer preset of configs/siglip/tiny.py.
"""
import os

from ml_collections.config_dict import placeholder

from vlmjax.config import load_config, parse_preset_args


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, steps=500, batch=128, filter=True)
    here = os.path.dirname(os.path.abspath(__file__))
    # ALIGN's text encoder is a transformer; its figures were measured with the ViT recipe.
    base_args = (f"steps={args.steps},batch={args.batch},image=vit,text_depth=2,negatives=0,"
                 f"lr=1e-3" + (",runlocal" if args.runlocal else ""))
    c = load_config(os.path.join(here, "..", "siglip", "tiny.py") + ":" + base_args)
    c.loss = dict(name="clip")
    c.model.temperature_init = 1 / 0.07
    c.model.bias_init = placeholder(float)
    c.model.text.update(causal=False, pool="first")
    c.input.add_bos = True  # the first token, BOS, is the pooled one
    c.data.config = "noisy"
    c.data.filters = dict(filter_image_size=False, min_image_side=200,
                          filter_aspect_ratio=args.filter, max_aspect_ratio=3.0,
                          filter_text_length=args.filter, min_words=3, max_words=20)
    return c
