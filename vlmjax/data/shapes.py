"""`vlm_shapes`: the synthetic vision-language dataset vlmjax builds for itself, offline.

Images of 1 to 3 anti-aliased shapes (8 shapes x 10 colours, small/large, in 5 regions) on
textured noisy backgrounds. Per image: 3 captions, the objects with normalised [x0, y0, x1, y1]
boxes (plus LLaVA "context type 2" text), a colour x shape class label for single-object images
(-1 otherwise; 80 classes), one question-answer pair per type (colour, shape, count, position,
existence, comparison) with a LLaVA-CoT answer `<SUMMARY>..<CAPTION>..<REASONING>..<CONCLUSION>`.

Splits: train (default 50,000), validation and test (2,000 each), and test_novel (1,000
single-object images of the 10 colour-shape pairs that never occur in any other split).

Configs: `32px`, `64px` (default), `224px`, and `noisy` (64 px, 30% of train captions replaced by
web junk or by another image's caption, see `shapes_noise`; `caption_noise` names each caption's
kind); `make_builder` derives configs with other sizes or noise levels, named e.g.
`64px_train2000`. A SentencePiece model trained on the clean train texts is stored beside the data
(`tokenizer_path`).

A build is a pure function of the config: the same seed gives the same bytes in every file
(records, dataset_info.json, tokenizer) on any machine, with any number of worker processes.

    builder = make_builder("64px", data_dir="/tmp/tfds")
    prepare(builder)  # builds once, with a progress bar
    ds = builder.as_dataset(split="train")
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from vlmjax.data import shapes_examples, shapes_noise, shapes_scene, shapes_text, tokenizers
# Hides GPUs from TensorFlow (importing tfds alone starts no TF device, so the order is free).
from vlmjax.data.tf_cpu import tf  # noqa: F401

TOKENIZER_FILENAME = "vlm_shapes_sp.model"
TOKENIZER_VOCAB_SIZE = 1000
IMAGE_SIZES = (32, 64, 224)
# Below this many examples, worker processes cost more to start than they save.
_MIN_EXAMPLES_FOR_WORKERS = 2000
# Tokenizer corpus: texts of every k-th train example (~100k sentences; the vocabulary is small).
_TOKENIZER_EXAMPLES = 5_000


@dataclasses.dataclass(eq=False)
class VlmShapesConfig(tfds.core.BuilderConfig):
    image_size: int = 64
    train_size: int = 50_000
    eval_size: int = 2_000  # validation and test each
    novel_size: int = 1_000
    noise_fraction: float = 0.0
    seed: int = 0

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.train_size, "validation": self.eval_size, "test": self.eval_size,
                "test_novel": self.novel_size}


BASE_CONFIGS = {
    "32px": VlmShapesConfig(name="32px", image_size=32, description="32x32 images"),
    "64px": VlmShapesConfig(name="64px", image_size=64, description="64x64 images (default)"),
    "224px": VlmShapesConfig(name="224px", image_size=224, description="224x224 images"),
    "noisy": VlmShapesConfig(name="noisy", image_size=64, noise_fraction=0.3,
                             description="64x64, 30% of train captions replaced by web junk "
                                         "or by another image's caption"),
}


class VlmShapes(tfds.core.GeneratorBasedBuilder):
    """The synthetic vlm_shapes dataset (see module docstring)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First version.",
                     "1.1.0": "noisy: swapped captions as a noise kind; builds are bit-identical "
                              "across processes and machines (count questions, tokenizer)."}
    BUILDER_CONFIGS = list(BASE_CONFIGS.values())
    DEFAULT_CONFIG_NAME = "64px"

    def __init__(self, *, num_workers: int | None = None, show_progress: bool = False, **kwargs):
        self._num_workers = os.cpu_count() if num_workers is None else num_workers
        self._show_progress = show_progress
        self._pool = None
        self._tokenizer_texts: list[str] = []
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        features = tfds.features
        return self.dataset_info_from_configs(
            features=features.FeaturesDict({
                "image": features.Image(shape=(size, size, 3), encoding_format="png"),
                "id": features.Text(),
                "captions": features.Sequence(features.Text()),
                "caption_noise": features.Sequence(
                    features.ClassLabel(names=shapes_noise.NOISE_KINDS)),
                "label": features.ClassLabel(names=shapes_scene.CLASS_NAMES),
                "objects": features.Sequence({
                    "shape": features.ClassLabel(names=shapes_scene.SHAPES),
                    "colour": features.ClassLabel(names=shapes_scene.COLOUR_NAMES),
                    "size": features.ClassLabel(names=shapes_scene.SIZES),
                    "position": features.ClassLabel(names=shapes_scene.POSITIONS),
                    "bbox_xyxy": features.Tensor(shape=(4,), dtype=np.float32),
                }),
                "boxes_context": features.Text(),
                "qa": features.Sequence({
                    "question": features.Text(),
                    "answer": features.Text(),
                    "type": features.ClassLabel(names=shapes_text.QA_TYPES),
                    "cot_answer": features.Text(),
                }),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/vlmjax (synthetic, generated locally)",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split, size)
                for split, size in self.builder_config.split_sizes().items()}

    def _generate_examples(self, split: str, size: int):
        config = self.builder_config
        spec = shapes_examples.ExampleSpec(split=split, image_size=config.image_size,
                                           seed=config.seed, noise_fraction=config.noise_fraction,
                                           split_size=size)
        work = ((spec, index) for index in range(size))
        if self._num_workers > 1 and size >= _MIN_EXAMPLES_FOR_WORKERS:
            if self._pool is None:
                # spawn, not fork: the parent may hold TensorFlow/JAX threads.
                self._pool = multiprocessing.get_context("spawn").Pool(self._num_workers)
            examples = self._pool.imap(shapes_examples.make_keyed_example, work, chunksize=64)
        else:
            examples = map(shapes_examples.make_keyed_example, work)
        tokenizer_stride = max(1, size // _TOKENIZER_EXAMPLES)
        progress = tqdm.tqdm(examples, total=size, desc=f"vlm_shapes/{config.name} {split}",
                             unit="img", disable=not self._show_progress, mininterval=1.0)
        for index, example in progress:
            if split == "train" and index % tokenizer_stride == 0:
                self._tokenizer_texts += shapes_examples.tokenizer_training_texts(example)
            yield index, example

    def _download_and_prepare(self, dl_manager, download_config):
        try:
            super()._download_and_prepare(dl_manager, download_config)
        finally:
            if self._pool is not None:
                self._pool.terminate()
                self._pool = None
        # self.data_dir is still the temporary directory here, which TFDS renames on success, so
        # a finished build always has its tokenizer.
        tokenizers.train_sentencepiece(self._tokenizer_texts,
                                       os.path.join(self.data_dir, TOKENIZER_FILENAME),
                                       vocab_size=TOKENIZER_VOCAB_SIZE)
        self._tokenizer_texts = []


def config_name(base: str, train_size: int | None = None, eval_size: int | None = None,
                novel_size: int | None = None, noise_fraction: float | None = None) -> str:
    """Name of the config derived from `base`: only non-default values appear in it."""
    if base not in BASE_CONFIGS:
        raise ValueError(f"unknown vlm_shapes config {base!r}; valid: {sorted(BASE_CONFIGS)}")
    default = BASE_CONFIGS[base]
    name = base
    for tag, value, default_value in (("train", train_size, default.train_size),
                                      ("eval", eval_size, default.eval_size),
                                      ("novel", novel_size, default.novel_size)):
        if value is not None and value != default_value:
            if value < 1:
                raise ValueError(f"vlm_shapes {tag} size must be >= 1, got {value}")
            name += f"_{tag}{value}"
    if noise_fraction is not None and noise_fraction != default.noise_fraction:
        if not 0.0 <= noise_fraction <= 1.0:
            raise ValueError(f"noise_fraction must be in [0, 1], got {noise_fraction}")
        name += f"_noise{round(noise_fraction * 100)}"
    return name


def make_builder(config: str = "64px", data_dir: str | None = None, *,
                 train_size: int | None = None, eval_size: int | None = None,
                 novel_size: int | None = None, noise_fraction: float | None = None,
                 num_workers: int | None = None, show_progress: bool = False) -> VlmShapes:
    """The vlm_shapes builder for a base config with optional split sizes / noise overrides."""
    name = config_name(config, train_size, eval_size, novel_size, noise_fraction)
    builder_config = BASE_CONFIGS[config]
    if name != config:
        overrides = {k: v for k, v in dict(train_size=train_size, eval_size=eval_size,
                                            novel_size=novel_size,
                                            noise_fraction=noise_fraction).items()
                     if v is not None}
        builder_config = dataclasses.replace(builder_config, name=name, **overrides)
    return VlmShapes(config=builder_config, data_dir=data_dir, num_workers=num_workers,
                     show_progress=show_progress)


def prepare(builder: VlmShapes) -> VlmShapes:
    """Builds the dataset unless it is already on disk (never downloads anything)."""
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def tokenizer_path(builder: VlmShapes) -> str:
    return os.path.join(builder.data_dir, TOKENIZER_FILENAME)
