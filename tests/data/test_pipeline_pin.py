"""Pins the contrastive configs' batches (token ids, pixel checksums) as measured before the
pp-op registry refactor: the refactor must not change what the contrastive tasks train on.

The constants were printed by `_digest` on the pre-refactor pipeline. The tokenizer is trained
here on fixed texts with one thread (deterministic), not the vlm_shapes one, so that the pins
depend only on the pipeline and the vlm_shapes images and captions; a change to those changes
them too, and then they must be re-measured."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest

from tests.data.conftest import TINY_SIZES
from vlmjax.data import pipeline

SIGLIP_TINY = dict(image_size=32, max_text_len=24, add_bos=False, eos="sticky",
                   preprocess="caption_random|resize_crop|flip_caption_aware|value_range")
CLIP_B16 = dict(image_size=32, max_text_len=16, add_bos=True, eos="sticky", crop_area_min=0.9,
                preprocess="caption_first|inception_crop|normalize_clip")
CASES = {  # name -> (input overrides, training)
    "siglip_tiny_train": (SIGLIP_TINY, True),
    "siglip_tiny_negatives_train": ({**SIGLIP_TINY, "hard_negatives": dict(
        count=3, vocabulary="vlm_shapes")}, True),
    "siglip_tiny_eval": (SIGLIP_TINY, False),
    "clip_b16_train": (CLIP_B16, True),
    "clip_b16_negatives_eval": ({**CLIP_B16, "hard_negatives": dict(count=2)}, False),
}


_WORDS = ("a small big red blue green yellow circle square triangle star disk left right "
          "above below of the on image photo with and two three").split()


@pytest.fixture(scope="module")
def pin_tokenizer(tmp_path_factory):
    """A SentencePiece model trained deterministically (one thread, no sampling)."""
    import sentencepiece

    texts = [" ".join(_WORDS[(7 * i + 3 * j) % len(_WORDS)] for j in range(3 + i % 6))
             for i in range(400)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=320, model_type="unigram",
        character_coverage=1.0, byte_fallback=True, hard_vocab_limit=False, pad_id=0, unk_id=1,
        bos_id=2, eos_id=3, num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    path = tmp_path_factory.mktemp("pin_tokenizer") / "pin.model"
    path.write_bytes(model.getvalue())
    return str(path)


def _sha(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _digest(batches) -> dict:
    """Exact hashes of the integer/bool arrays; per-example pixel sums, plain and weighted by
    column (a flip or crop shift changes the latter), to float32 rounding."""
    out = {"keys": sorted(batches[0])}
    for key in out["keys"]:
        if key != "image":
            out[key] = _sha(np.stack([b[key] for b in batches]))
    images = np.concatenate([b["image"] for b in batches]).astype(np.float64)
    ramp = np.arange(images.shape[2], dtype=np.float64)[None, None, :, None]
    out["pixel_sum"] = images.sum(axis=(1, 2, 3)).round(3).tolist()
    out["pixel_ramp"] = (images * ramp).sum(axis=(1, 2, 3)).round(2).tolist()
    out["text_0"] = batches[0]["text"][0].tolist()
    return out


def _batches(tfds_dir, tokenizer, overrides, training, count=2):
    data_config = pipeline.default_data_config()
    data_config.data_dir = tfds_dir
    data_config.update(TINY_SIZES)
    if not training:
        data_config.split = "validation"
    input_config = pipeline.default_input_config()
    input_config.update(dict(global_batch_size=8, shuffle_buffer=64, tokenizer=tokenizer,
                             **overrides))
    with pipeline.make_pipeline(data_config, input_config, training=training, process_index=0,
                                process_count=1) as data:
        return [next(data) for _ in range(count)]


PINNED = {'clip_b16_negatives_eval': {'_mask': 'cc8cd41cef907c4d',
                             'keys': ['_mask', 'image', 'label', 'text', 'text_mask'],
                             'label': 'f0f060459e2a0372',
                             'pixel_ramp': [4575.22, 17082.38, 6676.78, 15898.85, 17950.69,
                                            15972.57, 16356.51, 19187.23, 5222.65, 15863.11,
                                            6981.33, 19361.06, 2831.38, 4935.64, 3767.67,
                                            10032.24],
                             'pixel_sum': [92.282, 1100.303, 419.006, 1025.563, 1159.673, 1036.187,
                                           1062.512, 1198.779, 262.609, 1026.732, 462.555, 1242.8,
                                           184.198, 322.339, 323.358, 632.131],
                             'text': '3c50060679819dac',
                             'text_0': [2, 278, 289, 307, 298, 297, 296, 289, 293, 304, 307, 288,
                                        295, 296, 284, 3],
                             'text_mask': '2661920f2409dd6c'},
 'clip_b16_train': {'keys': ['image', 'label', 'text', 'text_mask'],
                    'label': '8591ece5cfe64417',
                    'pixel_ramp': [15108.44, 11350.76, 5473.26, 7733.57, 4934.87, 7273.54,
                                   23543.65, 3994.84, 16187.1, 4871.53, 20322.37, 22706.49,
                                   20440.51, 21429.53, 7316.76, 12585.72],
                    'pixel_sum': [975.271, 789.387, 323.713, 497.46, 398.45, 703.032, 1513.93,
                                  546.352, 959.39, 316.6, 1333.507, 1458.761, 1342.078, 1408.17,
                                  299.205, 768.9],
                    'text': '31b3a1aa11fead3a',
                    'text_0': [2, 278, 264, 307, 294, 304, 296, 297, 300, 48, 263, 304, 307, 300,
                               295, 3],
                    'text_mask': '2661920f2409dd6c'},
 'siglip_tiny_eval': {'_mask': 'cc8cd41cef907c4d',
                      'keys': ['_mask', 'image', 'label', 'text', 'text_mask'],
                      'label': 'f0f060459e2a0372',
                      'pixel_ramp': [-5177.12, 4354.23, -1408.52, 3710.44, 4773.15, 4098.63,
                                     3983.96, 5414.58, -2056.42, 3670.6, -1022.88, 5451.02,
                                     -3253.16, -2083.94, -2675.45, 328.91],
                      'pixel_sum': [-251.018, 277.825, -94.597, 237.685, 305.818, 251.772, 254.284,
                                    328.037, -166.415, 237.21, -60.114, 348.679, -210.67, -137.042,
                                    -131.695, 30.038],
                      'text': 'cf0a9ab0a325ec73',
                      'text_0': [278, 289, 307, 298, 297, 296, 289, 293, 304, 307, 288, 295, 296,
                                 284, 298, 289, 288, 48, 278, 307, 290, 299, 296, 3],
                      'text_mask': '1d65ca7807ee930a'},
 'siglip_tiny_negatives_train': {'keys': ['image', 'label', 'neg_text', 'neg_text_mask',
                                          'neg_valid', 'text', 'text_mask'],
                                 'label': '8591ece5cfe64417',
                                 'neg_text': '46b49070b076d2e8',
                                 'neg_text_mask': '0c430f3a6f06ffa8',
                                 'neg_valid': '5bf90435cd45d047',
                                 'pixel_ramp': [3170.52, 1006.19, -2054.83, -698.08, -885.33,
                                                -1003.58, 7640.1, 2104.28, 3943.22, -2228.3,
                                                6113.97, 7403.32, 5917.67, 6999.2, -625.29,
                                                1232.12],
                                 'pixel_sum': [205.333, 103.096, -145.359, -48.256, -87.348,
                                               62.861, 492.749, -17.77, 209.174, -144.196, 402.576,
                                               473.975, 395.707, 440.784, -135.081, 101.318],
                                 'text': '8a0edd0943e0e44c',
                                 'text_0': [278, 264, 307, 294, 304, 296, 297, 300, 48, 263, 304,
                                            307, 300, 295, 289, 280, 307, 287, 280, 296, 289, 269,
                                            301, 3],
                                 'text_mask': 'ed6a2c7733e97511'},
 'siglip_tiny_train': {'keys': ['image', 'label', 'text', 'text_mask'],
                       'label': '8591ece5cfe64417',
                       'pixel_ramp': [3170.52, 1006.19, -2054.83, -698.08, -885.33, -1003.58,
                                      7640.1, 2104.28, 3943.22, -2228.3, 6113.97, 7403.32, 5917.67,
                                      6999.2, -625.29, 1232.12],
                       'pixel_sum': [205.333, 103.096, -145.359, -48.256, -87.348, 62.861, 492.749,
                                     -17.77, 209.174, -144.196, 402.576, 473.975, 395.707, 440.784,
                                     -135.081, 101.318],
                       'text': '8a0edd0943e0e44c',
                       'text_0': [278, 264, 307, 294, 304, 296, 297, 300, 48, 263, 304, 307, 300,
                                  295, 289, 280, 307, 287, 280, 296, 289, 269, 301, 3],
                       'text_mask': 'ed6a2c7733e97511'}}


@pytest.mark.parametrize("case", sorted(CASES))
def test_contrastive_batches_match_the_pinned_ones(shapes_builder, tfds_dir, pin_tokenizer, case):
    overrides, training = CASES[case]
    got = _digest(_batches(tfds_dir, pin_tokenizer, overrides, training))
    want = PINNED[case]
    assert got["keys"] == want["keys"]
    for key in want["keys"]:
        if key != "image":
            assert got[key] == want[key], key
    assert got["text_0"] == want["text_0"]
    np.testing.assert_allclose(got["pixel_sum"], want["pixel_sum"], rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(got["pixel_ramp"], want["pixel_ramp"], rtol=1e-5, atol=1e-1)
