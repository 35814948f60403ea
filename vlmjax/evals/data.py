"""Evaluation data: a whole split as host arrays (images, labels, all captions), read straight
from the configured source in a fixed order, with the training input's tokenizer and image
size but without its random ops."""
from __future__ import annotations

import numpy as np

from vlmjax.data import pipeline_config, preprocess, sources
from vlmjax.data.tf_cpu import tf

DETERMINISTIC_SIZE_OP = {"inception_crop": "resize_crop", "random_resized_crop": "resize_crop"}


def eval_preprocess(train_spec: str) -> str:
    """The training op string without randomness: first caption, no flip, centre crop."""
    names = preprocess.parse_ops(train_spec)
    size = next(n for n in names if n in preprocess.SIZE_OPS)
    return "|".join(["caption_first", DETERMINISTIC_SIZE_OP.get(size, size), names[-1]])


class EvalData:
    def __init__(self, data_config, input_config):
        if data_config.source == "mixture":
            raise ValueError("evaluation reads one source; data.source='mixture' has several")
        self.data_config, self.input_config = data_config, input_config
        self.image_size = int(input_config.image_size)
        self.text_length = int(input_config.max_text_len)
        self._preprocess = preprocess.make_preprocess_fn(
            eval_preprocess(input_config.preprocess), self.image_size)
        self._splits: dict[str, dict] = {}
        self._tokenizer = None

    def source(self, split: str) -> sources.Source:
        config = self.data_config.copy_and_resolve_references()
        with config.unlocked():
            config.split = split
        return pipeline_config.make_source(config, training=False)

    # ------------------------------------------------------------------------------------ text
    def tokenize(self, texts) -> tuple[np.ndarray, np.ndarray]:
        if self._tokenizer is None:
            self._tokenizer = pipeline_config.resolve_tokenizer(
                self.input_config, [self.source(self.data_config.get("split") or "train")])
        return self._tokenizer.encode_batch(list(texts), self.text_length,
                                            add_bos=self.input_config.add_bos,
                                            eos=self.input_config.eos)

    # ---------------------------------------------------------------------------------- splits
    def split_arrays(self, split: str) -> dict:
        """{'image': f32 [N,S,S,3], 'label': i32 [N], 'captions': list of N caption lists}; bad
        records are skipped (counted in 'skipped')."""
        if split not in self._splits:
            source = self.source(split)
            records = source.records(0, 1, training=False, seed=0)
            total = source.num_records(0, 1)

            def prepare(record):
                example = self._preprocess({"image": preprocess.decode(record["image"]),
                                            "texts": record["texts"],
                                            "_seed": tf.zeros([2], tf.int64)})
                return {"image": example["image"], "label": record["label"],
                        "texts": record["texts"]}

            dataset = (records.filter(lambda r: r["_skip_reason"] == 0)
                       .map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
                       .ignore_errors()  # undecodable images: skipped, counted below
                       .prefetch(tf.data.AUTOTUNE))
            images, labels, captions = [], [], []
            for example in dataset.as_numpy_iterator():
                images.append(example["image"])
                labels.append(example["label"])
                captions.append([t.decode("utf-8", "replace") for t in example["texts"]])
            if not images:
                raise ValueError(f"evaluation split {split!r} of {self.data_config.source!r} "
                                 "has no usable examples")
            self._splits[split] = dict(
                image=np.stack(images).astype(np.float32), label=np.asarray(labels, np.int32),
                captions=captions, skipped=total - len(images), class_names=_class_names(source))
        return self._splits[split]

    def classification_split(self, split: str):
        """Images with a class label (>= 0), their labels and the class names."""
        arrays = self.split_arrays(split)
        if not arrays["class_names"]:
            raise ValueError(f"zero-shot evaluation of {split!r} needs class names; the source "
                             f"{self.data_config.source!r} has none (use a TFDS label feature)")
        keep = arrays["label"] >= 0
        return arrays["image"][keep], arrays["label"][keep], arrays["class_names"]

    def retrieval_split(self, split: str, max_images: int = 1000):
        """The first `max_images` images, all their captions, and each caption's image index."""
        arrays = self.split_arrays(split)
        images = arrays["image"][:max_images]
        texts, text_to_image = [], []
        for index, captions in enumerate(arrays["captions"][:max_images]):
            texts += captions
            text_to_image += [index] * len(captions)
        return images, texts, np.asarray(text_to_image, np.int32)


def _class_names(source) -> list[str]:
    if isinstance(source, sources.TfdsSource) and source.label_key:
        feature = source.builder.info.features[source.label_key]
        return list(getattr(feature, "names", []) or [])
    return []
