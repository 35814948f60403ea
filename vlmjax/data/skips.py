"""Why an example (or, for the text LM, a document or its tail) was skipped. Bad data is skipped and counted, never fatal and never silent.

Sources that read files in Python (webdataset, LLaVA JSON, CSV) do not drop bad examples: they emit
a placeholder carrying a reason code, which travels through shuffling like any example and is
counted where the pipeline drops it. Counting at that one place makes the counts exact at every
batch and consistent with the saved iterator position.
"""
from __future__ import annotations

SKIP_REASONS = (
    "ok",                   # 0: not skipped
    "corrupt_image",        # the image bytes failed to decode (truncated or damaged data)
    "undecodable_image",    # not an image file at all (unknown or broken header)
    "missing_image",        # the example names no image (no KEY.jpg in a tar, no "image" field)
    "missing_image_file",   # the named image file does not exist or cannot be read
    "missing_text",         # the example has no caption field / column / conversation
    "empty_text",           # every caption is empty or whitespace
    "bad_text_encoding",    # caption bytes are not UTF-8
    "bad_json",             # a JSON line or KEY.json that does not parse, or lacks the fields
    "bad_row",              # a CSV/TSV row with the wrong number of columns
    "truncated_tar",        # a tar shard ended inside a member (the rest of the shard is lost)
    "unreadable_file",      # a shard or annotation file that cannot be opened
    "image_too_small",      # online ALIGN rule: shorter side <= min_image_side
    "bad_aspect_ratio",     # online ALIGN rule: aspect ratio >= max_aspect_ratio
    "text_too_short",       # online ALIGN rule: fewer than min_words unigrams
    "text_too_long",        # online ALIGN rule: more than max_words unigrams
    # Per document of the text LM's rows (data/lm_rows.py), not per record:
    "no_targets",           # a document with no token to predict (one token after BOS/EOS)
    "truncated_document",   # a document longer than a row: its tail beyond max_len is dropped
    # Per LLaVA conversation (data/llava_pipeline.py; no_targets and bad_json count them too):
    "truncated_conversation",  # longer than input.max_len: cut, trained if a target remains
)
REASON_IDS = {name: i for i, name in enumerate(SKIP_REASONS)}
NUM_REASONS = len(SKIP_REASONS)


def reason_id(name: str) -> int:
    return REASON_IDS[name]


def counts_dict(counts) -> dict[str, int]:
    """Named counts (reason 'ok' left out) from a vector indexed by reason id."""
    return {name: int(counts[i]) for i, name in enumerate(SKIP_REASONS) if i > 0}
