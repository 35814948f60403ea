"""Prints import parity (max abs differences to transformers) for random CLIP and SigLIP models
of a given size; the README quotes its output.

    python -m tests.convert.measure_parity --size base    # ViT-B/16-sized towers, 224px
"""
import argparse
import tempfile
import time

import numpy as np

from tests.convert.reference import (CLIP_BOS, CLIP_CONFIG, CLIP_EOS, SIGLIP_CONFIG, hf_outputs,
                                     max_abs_diffs, perturb, torch, transformers, vlmjax_outputs)
from vlmjax.convert import load_pretrained

BASE_TOWER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12)
SIZES = {
    "tiny": (CLIP_CONFIG, SIGLIP_CONFIG),
    "base": (dict(CLIP_CONFIG, projection_dim=512,
                  text_config=dict(CLIP_CONFIG["text_config"], hidden_size=512,
                                   intermediate_size=2048, num_hidden_layers=12,
                                   num_attention_heads=8, max_position_embeddings=77),
                  vision_config=dict(BASE_TOWER, image_size=224, patch_size=16)),
             dict(SIGLIP_CONFIG,
                  text_config=dict(SIGLIP_CONFIG["text_config"], **BASE_TOWER, projection_size=768,
                                   max_position_embeddings=64),
                  vision_config=dict(BASE_TOWER, image_size=224, patch_size=16))),
}


def measure(family, config, batch=4):
    torch.manual_seed(0)
    if family == "clip":
        model = perturb(transformers.CLIPModel(transformers.CLIPConfig(**config)), 1)
    else:
        model = perturb(transformers.SiglipModel(transformers.SiglipConfig(**config)), 2)
    with torch.no_grad():  # released-model scales: CLIP t = 100, SigLIP B/16 t ~ 117, b ~ -12.9
        model.logit_scale.fill_(float(np.log(100.0 if family == "clip" else 117.0)))
        if family == "siglip":
            model.logit_bias.fill_(-12.9)
    vision, text = config["vision_config"], config["text_config"]
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, vision["image_size"], vision["image_size"], 3))
    length = text["max_position_embeddings"]
    ids = rng.integers(0, CLIP_BOS, (batch, length))
    if family == "clip":  # BOS ... EOS, rest EOS padding
        ids[:, 0] = CLIP_BOS
        ids[np.arange(batch), rng.integers(2, length, batch)] = CLIP_EOS
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        ours, params, _ = load_pretrained(directory)
    images = images.astype(np.float32)
    start = time.perf_counter()
    diffs = max_abs_diffs(vlmjax_outputs(ours, params, images, ids), hf_outputs(model, images, ids))
    print(f"{family}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
          + f"  ({time.perf_counter() - start:.0f}s)", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = parser.parse_args()
    for family, config in zip(("clip", "siglip"), SIZES[args.size]):
        measure(family, config)


if __name__ == "__main__":
    main()
