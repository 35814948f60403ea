"""Defaults and validation of the pipeline's `config.data` and `config.input` (keys documented in
pipeline.py), and construction of the sources they name.

A key that nothing reads is an error, as is a bad value: both name the key and what is valid.
"""
from __future__ import annotations

import ml_collections

from vlmjax.data import (filters, hard_negatives, preprocess, shapes, sources, text_files,
                         tokenizers)

SOURCE_KEYS = {  # the keys each source reads, besides `source`, `split` and `filters`
    "vlm_shapes": ("config", "data_dir", "train_size", "eval_size", "novel_size",
                   "noise_fraction"),
    "tfds": ("name", "data_dir", "image_key", "text_key", "label_key"),
    "webdataset": ("paths", "text_extension", "label_field"),
    "llava_json": ("json_path", "image_dir", "question_types"),
    "csv": ("csv_path", "image_dir", "image_column", "text_column", "label_column", "delimiter"),
    "text_file": ("paths", "text_field", "format"),
    "mixture": ("sources",),
}
REQUIRED_KEYS = {"tfds": ("name",), "webdataset": ("paths",), "llava_json": ("json_path",),
                 "csv": ("csv_path",), "text_file": ("paths",), "mixture": ("sources",)}
COMMON_KEYS = ("source", "split", "filters")
INPUT_DEFAULTS = dict(
    global_batch_size=256, image_size=64,
    preprocess="caption_random|resize_crop|flip_caption_aware|value_range", crop_area_min=0.05,
    shuffle_buffer=10_000, seed=0, tokenizer="vlm_shapes", max_text_len=32, add_bos=False,
    eos="sticky", prefetch_batches=2,
)
# May be absent (= off): hard_negatives = {count, vocabulary}, see data/hard_negatives.py;
# special_tokens = texts the tokenizer keeps whole (added to its vocabulary if new, see
# tokenizers.py; resolve_tokenizer).
OPTIONAL_INPUT_KEYS = ("hard_negatives", "special_tokens")


def default_data_config() -> ml_collections.ConfigDict:
    """vlm_shapes 64px train split, built on first use in the default TFDS data dir."""
    return ml_collections.ConfigDict(dict(
        source="vlm_shapes", split="train", config="64px", data_dir=None,
        filters=filters.online_default_config()))


def default_input_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(INPUT_DEFAULTS)


def _error(path: str, message: str) -> ValueError:
    return ValueError(f"{path}: {message}")


def validate_data_config(config, path: str = "data", allow_mixture: bool = True) -> None:
    source = config.get("source")
    valid_sources = [s for s in SOURCE_KEYS if allow_mixture or s != "mixture"]
    if source not in valid_sources:
        raise _error(f"{path}.source", f"{source!r} is not a source; valid: {valid_sources}")
    allowed = set(COMMON_KEYS) | set(SOURCE_KEYS[source])
    if not allow_mixture:  # a mixture member: weighted, filtered by the mixture's data.filters
        allowed = (allowed - {"filters"}) | {"weight"}
    unknown = sorted(set(config.keys()) - allowed)
    if unknown:
        raise _error(path, f"unknown key(s) {unknown} for source {source!r}; valid keys: "
                     f"{sorted(allowed)}")
    for key in REQUIRED_KEYS.get(source, ()):
        if config.get(key) in (None, ""):
            raise _error(f"{path}.{key}", f"required for source {source!r}")
    if "filters" in config:
        unknown = sorted(set(config.filters.keys()) - set(filters.ONLINE_KEYS))
        if unknown:
            raise _error(f"{path}.filters", f"unknown key(s) {unknown}; valid (per-example rules "
                         f"only; run python -m vlmjax.data.align_filter for the corpus rules): "
                         f"{list(filters.ONLINE_KEYS)}")
    if source == "vlm_shapes" and config.get("config", "64px") not in shapes.BASE_CONFIGS:
        raise _error(f"{path}.config", f"{config.config!r}; valid: {sorted(shapes.BASE_CONFIGS)}")
    if source == "text_file" and config.get("format", "auto") not in text_files.FORMATS:
        raise _error(f"{path}.format", f"{config.format!r}; valid: {list(text_files.FORMATS)}")
    if source == "text_file" and config.get("split") not in (None, "train"):
        # "train": everything it is given, as training data; any other split it cannot honour
        raise _error(f"{path}.split", f"{config.split!r}: source 'text_file' has no splits (it "
                     f"reads the files of {path}.paths); name held-out files in a data config "
                     "of their own")
    if source == "mixture":
        if not config.sources:
            raise _error(f"{path}.sources", "a mixture needs at least one source")
        for name, sub in config.sources.items():
            validate_data_config(sub, f"{path}.sources.{name}", allow_mixture=False)
            if not isinstance(sub.get("weight"), (int, float)) or sub.weight <= 0:
                raise _error(f"{path}.sources.{name}.weight", "needs a positive number")


def validate_input_config(config, images: bool = True) -> None:
    """`images=False` (text tasks): input.preprocess is not read, so not checked."""
    valid = set(INPUT_DEFAULTS) | set(OPTIONAL_INPUT_KEYS)
    unknown = sorted(set(config.keys()) - valid)
    if unknown:
        raise _error("input", f"unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    missing = sorted(set(INPUT_DEFAULTS) - set(config.keys()))
    if missing:
        raise _error("input", f"missing key(s) {missing} (start from default_input_config())")
    for key in ("global_batch_size", "image_size", "max_text_len", "shuffle_buffer",
                "prefetch_batches"):
        if not isinstance(config[key], int) or config[key] < (0 if key == "prefetch_batches"
                                                              else 1):
            raise _error(f"input.{key}", f"{config[key]!r} must be a positive integer")
    if config.eos not in tokenizers.EOS_MODES:
        raise _error("input.eos", f"{config.eos!r}; valid: {list(tokenizers.EOS_MODES)}")
    if not 0.0 < config.crop_area_min <= 1.0:
        raise _error("input.crop_area_min", f"{config.crop_area_min} must be in (0, 1]")
    if images:
        try:
            preprocess.parse_ops(config.preprocess)
        except ValueError as error:
            raise _error("input.preprocess", str(error)) from None
    special = config.get("special_tokens")
    if special is not None and (isinstance(special, str) or not all(
            isinstance(t, str) and t.strip() for t in special)):
        raise _error("input.special_tokens", f"{special!r} must be a list of non-empty strings")
    hard_negatives.make_swapper(config.get("hard_negatives"))  # raises on a bad value


def _get(config, key, default=None):
    value = config.get(key, default)
    return default if value is None else value


def make_source(config, training: bool, fields=(), images: bool = True) -> sources.Source:
    """The source a (validated, non-mixture) data config names; vlm_shapes is built if needed.
    `fields`: record fields beyond the base ones that the ops read (sources.py). `images=False`
    (text tasks): TFDS sources (vlm_shapes included) read no image feature, and text-only
    sources (text_file) are allowed.

    `training` is accepted for callers' clarity; sources shuffle (or not) in `records()`."""
    del training
    fields = tuple(f for f in fields if f not in sources.BASE_FIELDS)
    source, split = config.source, _get(config, "split", "train")
    if source == "vlm_shapes":
        builder = shapes.prepare(shapes.make_builder(
            _get(config, "config", "64px"), config.get("data_dir"),
            train_size=config.get("train_size"), eval_size=config.get("eval_size"),
            novel_size=config.get("novel_size"), noise_fraction=config.get("noise_fraction")))
        return sources.TfdsSource(name="vlm_shapes", split=split, text_key="captions",
                                  label_key="label", builder=builder, fields=fields,
                                  aliases=sources.VLM_SHAPES_FIELDS,
                                  image_key="image" if images else None)
    if source == "tfds":
        return sources.TfdsSource(name=config.name, data_dir=config.get("data_dir"), split=split,
                                  image_key=_get(config, "image_key", "image") if images else None,
                                  text_key=config.get("text_key"),
                                  label_key=config.get("label_key"), fields=fields)
    if source == "webdataset":
        built = sources.WebdatasetSource(paths=config.paths,
                                        text_extension=_get(config, "text_extension", "txt"),
                                        label_field=config.get("label_field"))
    elif source == "llava_json":
        question_types = config.get("question_types")
        if isinstance(question_types, str):  # "colour,shape" as a command line gives it
            question_types = [t.strip() for t in question_types.split(",") if t.strip()]
        built = sources.LlavaJsonSource(
            json_path=config.json_path, image_dir=_get(config, "image_dir", ""),
            question_types=None if question_types is None else tuple(question_types))
    elif source == "csv":
        built = sources.CsvSource(
            csv_path=config.csv_path, image_dir=_get(config, "image_dir", ""),
            image_column=_get(config, "image_column", "image"),
            text_column=_get(config, "text_column", "caption"),
            label_column=config.get("label_column"), delimiter=config.get("delimiter"))
    elif source == "text_file":
        if images:
            raise _error("data.source", "'text_file' holds text documents without images; it "
                         "is for text tasks (task 'lm'), use an image-text source here")
        built = text_files.TextFileSource(paths=config.paths,
                                          text_field=_get(config, "text_field", "text"),
                                          format=_get(config, "format", "auto"))
    else:
        built = None
    if built is not None:
        built.check_fields(fields)
        return built
    raise _error("data.source", f"{source!r} has no single source (mixtures are built by the "
                 "pipeline)")


def has_labels(config) -> bool:
    """Whether batches carry `label`: every source must provide one."""
    if config.source == "mixture":
        return all(has_labels(sub) for sub in config.sources.values())
    return (config.source == "vlm_shapes"
            or (config.source == "tfds" and config.get("label_key") is not None)
            or (config.source == "webdataset" and config.get("label_field") is not None)
            or (config.source == "csv" and config.get("label_column") is not None))


def resolve_tokenizer(input_config, built_sources: list[sources.Source]) -> tokenizers.Tokenizer:
    """`input.tokenizer`: a .model / tokenizer.json path, or "vlm_shapes" for the model stored
    beside the vlm_shapes data the pipeline reads. A file in a Hugging Face model directory gets
    the special tokens (pad, ...) that directory's tokenizer_config.json declares; then
    `input.special_tokens` (optional) are added: a text the vocabulary has keeps its id, a new
    one gets the next free id (tokenizers.py), and none of them is ever split."""
    tokenizer = _base_tokenizer(input_config, built_sources)
    special = list(input_config.get("special_tokens") or ())
    if special:
        tokenizer.add_special_tokens(special)
    return tokenizer


def _base_tokenizer(input_config, built_sources: list[sources.Source]) -> tokenizers.Tokenizer:
    if input_config.tokenizer == "vlm_shapes":
        for source in built_sources:
            if isinstance(source, sources.TfdsSource) and isinstance(source.builder,
                                                                     shapes.VlmShapes):
                return tokenizers.load_tokenizer(shapes.tokenizer_path(source.builder))
        raise _error("input.tokenizer", "'vlm_shapes' needs a vlm_shapes source; give the path "
                     "of a SentencePiece .model or a tokenizer.json instead")
    try:
        return tokenizers.load_model_tokenizer(input_config.tokenizer)
    except (ValueError, FileNotFoundError) as error:
        raise _error("input.tokenizer", str(error)) from None
