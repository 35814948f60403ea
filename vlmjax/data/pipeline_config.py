"""Defaults and validation of the pipeline's `config.data` and `config.input` (keys documented in
pipeline.py), and construction of the sources they name.

A key that nothing reads is an error, as is a bad value: both name the key and what is valid.
"""
from __future__ import annotations

import ml_collections

from vlmjax.data import filters, hard_negatives, preprocess, shapes, sources, tokenizers

SOURCE_KEYS = {  # the keys each source reads, besides `source`, `split` and `filters`
    "vlm_shapes": ("config", "data_dir", "train_size", "eval_size", "novel_size",
                   "noise_fraction"),
    "tfds": ("name", "data_dir", "image_key", "text_key", "label_key"),
    "webdataset": ("paths", "text_extension", "label_field"),
    "llava_json": ("json_path", "image_dir"),
    "csv": ("csv_path", "image_dir", "image_column", "text_column", "label_column", "delimiter"),
    "mixture": ("sources",),
}
REQUIRED_KEYS = {"tfds": ("name",), "webdataset": ("paths",), "llava_json": ("json_path",),
                 "csv": ("csv_path",), "mixture": ("sources",)}
COMMON_KEYS = ("source", "split", "filters")
INPUT_DEFAULTS = dict(
    global_batch_size=256, image_size=64,
    preprocess="caption_random|resize_crop|flip_caption_aware|value_range", crop_area_min=0.05,
    shuffle_buffer=10_000, seed=0, tokenizer="vlm_shapes", max_text_len=32, add_bos=False,
    eos="sticky", prefetch_batches=2,
)
# May be absent (= off): hard_negatives = {count, vocabulary}, see data/hard_negatives.py.
OPTIONAL_INPUT_KEYS = ("hard_negatives",)


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
    if source == "mixture":
        if not config.sources:
            raise _error(f"{path}.sources", "a mixture needs at least one source")
        for name, sub in config.sources.items():
            validate_data_config(sub, f"{path}.sources.{name}", allow_mixture=False)
            if not isinstance(sub.get("weight"), (int, float)) or sub.weight <= 0:
                raise _error(f"{path}.sources.{name}.weight", "needs a positive number")


def validate_input_config(config) -> None:
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
    try:
        preprocess.parse_ops(config.preprocess)
    except ValueError as error:
        raise _error("input.preprocess", str(error)) from None
    hard_negatives.make_swapper(config.get("hard_negatives"))  # raises on a bad value


def _get(config, key, default=None):
    value = config.get(key, default)
    return default if value is None else value


def make_source(config, training: bool, fields=()) -> sources.Source:
    """The source a (validated, non-mixture) data config names; vlm_shapes is built if needed.
    `fields`: record fields beyond the base ones that the ops read (sources.py).

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
                                  aliases=sources.VLM_SHAPES_FIELDS)
    if source == "tfds":
        return sources.TfdsSource(name=config.name, data_dir=config.get("data_dir"), split=split,
                                  image_key=_get(config, "image_key", "image"),
                                  text_key=config.get("text_key"),
                                  label_key=config.get("label_key"), fields=fields)
    if source == "webdataset":
        built = sources.WebdatasetSource(paths=config.paths,
                                        text_extension=_get(config, "text_extension", "txt"),
                                        label_field=config.get("label_field"))
    elif source == "llava_json":
        built = sources.LlavaJsonSource(json_path=config.json_path,
                                        image_dir=_get(config, "image_dir", ""))
    elif source == "csv":
        built = sources.CsvSource(
            csv_path=config.csv_path, image_dir=_get(config, "image_dir", ""),
            image_column=_get(config, "image_column", "image"),
            text_column=_get(config, "text_column", "caption"),
            label_column=config.get("label_column"), delimiter=config.get("delimiter"))
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
    the special tokens (pad, ...) that directory's tokenizer_config.json declares."""
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
