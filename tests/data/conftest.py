"""Small data the data tests share, built once per session in temporary directories."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlmjax.data import shapes, webdataset

TINY_SIZES = dict(train_size=48, eval_size=16, novel_size=10)


def image_bytes(width: int, height: int, colour=(200, 30, 30), fmt: str = "JPEG") -> bytes:
    array = np.zeros((height, width, 3), np.uint8)
    array[...] = colour
    array[height // 4: height // 2, width // 4: width // 2] = 255 - np.array(colour)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def truncated_jpeg(width: int = 96, height: int = 64) -> bytes:
    """Passes a header check (PIL opens it) but fails to decode: noise makes the entropy-coded
    data long, so cutting it in half leaves the header intact."""
    noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    return data[: len(data) // 2]


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def shapes_builder(tfds_dir):
    """A tiny vlm_shapes 64px build (48 train images) with its tokenizer."""
    return shapes.prepare(shapes.make_builder("64px", tfds_dir, **TINY_SIZES, num_workers=0))


@pytest.fixture(scope="session")
def good_shards(tmp_path_factory):
    """Two clean webdataset shards of 10 samples each; label = sample number, in KEY.json."""
    directory = tmp_path_factory.mktemp("wds_good")
    for shard in range(2):
        with webdataset.ShardWriter(str(directory), prefix=f"part{shard}",
                                    max_samples=100) as writer:
            for i in range(10):
                number = shard * 10 + i
                writer.write(f"sample{number:04d}", {
                    "jpg": image_bytes(40 + number, 30 + number),
                    "txt": f"a photo of thing number {number}".encode(),
                    "json": json.dumps({"label": number}).encode()})
    return directory


BAD_SAMPLES = {  # key -> files, and the skip reason each must be counted under
    "bad_corrupt": ({"jpg": truncated_jpeg(), "txt": b"a truncated jpeg file"}, "corrupt_image"),
    "bad_garbage": ({"jpg": b"this is not an image", "txt": b"not an image at all"},
                    "undecodable_image"),
    "bad_noimage": ({"txt": b"a caption without its image"}, "missing_image"),
    "bad_notext": ({"jpg": image_bytes(20, 20)}, "missing_text"),
    "bad_empty": ({"jpg": image_bytes(20, 20), "txt": b"   "}, "empty_text"),
    "bad_latin1": ({"jpg": image_bytes(20, 20), "txt": "caf\xe9 au lait".encode("latin-1")},
                   "bad_text_encoding"),
    "bad_json": ({"jpg": image_bytes(20, 20), "txt": b"fine text here", "json": b"{oops"},
                 "bad_json"),
}


@pytest.fixture(scope="session")
def bad_shards(tmp_path_factory):
    """One shard of 6 good samples interleaved with one of each bad kind, plus a shard truncated
    in the middle of its 4th sample (3 good samples before it)."""
    directory = tmp_path_factory.mktemp("wds_bad")
    with webdataset.ShardWriter(str(directory), prefix="mixed", max_samples=100) as writer:
        bad = list(BAD_SAMPLES.items())
        for i in range(6):
            writer.write(f"good{i:02d}", {"png": image_bytes(32, 24, fmt="PNG"),
                                          "txt": f"good sample {i} is fine".encode()})
            if i < len(bad):
                writer.write(bad[i][0], bad[i][1][0])
        writer.write(bad[6][0], bad[6][1][0])
    with webdataset.ShardWriter(str(directory), prefix="truncated", max_samples=100) as writer:
        for i in range(5):
            writer.write(f"tail{i:02d}", {"jpg": image_bytes(64, 64),
                                          "txt": f"tail sample {i} here".encode()})
    path = directory / "truncated-000000.tar"
    with tarfile.open(path) as archive:
        fourth_image = archive.getmembers()[6]  # tail03.jpg
    data = path.read_bytes()
    path.write_bytes(data[: fourth_image.offset_data + fourth_image.size // 2])
    return directory
