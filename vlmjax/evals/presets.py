"""The config.evals entries the shipped configs use (see evals/registry.py for the format)."""
from __future__ import annotations

from ml_collections.config_dict import placeholder


def vlm_shapes(batch_size: int, max_images: int) -> dict:
    """Zero-shot on vlm_shapes validation (recipes are chosen on it), test and test_novel (what
    is reported), and image-text retrieval on test; all read the training source's build."""
    def zero_shot(split):
        return dict(type="zero_shot", data=dict(split=split), templates="vlm_shapes",
                    batch_size=batch_size)
    return dict(validation=zero_shot("validation"), test=zero_shot("test"),
                test_novel=zero_shot("test_novel"),
                test_retrieval=dict(type="retrieval", data=dict(split="test"),
                                    max_images=max_images, batch_size=batch_size))


def imagenet_and_coco(batch_size: int, every: int, data_dir: str | None = None) -> dict:
    """What CLIP / SigLIP users report: ImageNet-1k zero-shot top-1/top-5 on TFDS imagenet2012
    validation (50k) and imagenet_v2 (10k), with CLIP's 1000 class names and 80 prompts, and
    COCO image-text retrieval on the 5k test images of TFDS coco_captions (Karpathy split), 5
    captions each. `data_dir`: where the prepared TFDS datasets are (None: TFDS's default)."""
    def tfds(name, split, **keys):
        return dict(source="tfds", name=name, split=split, image_key="image",
                    data_dir=data_dir or placeholder(str), **keys)

    def imagenet(name, split):
        return dict(type="zero_shot", data=tfds(name, split, label_key="label"),
                    templates="imagenet", class_names="imagenet", every=every,
                    batch_size=batch_size)
    return dict(
        imagenet=imagenet("imagenet2012", "validation"),
        imagenet_v2=imagenet("imagenet_v2", "test"),
        coco=dict(type="retrieval", data=tfds("coco_captions", "test", text_key="captions/text"),
                  max_images=5000, captions_per_image=5, every=every, batch_size=batch_size))
