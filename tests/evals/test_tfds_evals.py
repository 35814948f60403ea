"""The real-scale configs' evaluations (ImageNet zero-shot, COCO retrieval) through the TFDS path
on mocked TFDS data (tfds.testing.mock_data: nothing downloads), with a fake two-tower model whose
embeddings make the right answer known."""
import io
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vlmjax.data import pipeline_config
from vlmjax.data.tf_cpu import tf
from vlmjax.evals import embed, imagenet_classes, presets, registry
from vlmjax.sharding import make_mesh

GREY_STEP = 8  # image i is the constant grey level GREY_STEP * i


def png(index: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), GREY_STEP * index, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def word_tokenizer(path, texts) -> str:
    """A tokenizer.json with one id per whitespace/punctuation-split word of `texts`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = sorted({w for t in texts for w, _ in
                    pre_tokenizers.Whitespace().pre_tokenize_str(t)})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return str(path)


def mocked_tfds(data_dir, datasets: dict):
    """mock_data serving `datasets` {name: {split: [feature dicts]}}; their metadata (splits and
    sizes) is written to `data_dir` so that TFDS sees prepared datasets."""
    for name, splits in datasets.items():
        builder = tfds.builder(name, data_dir=str(data_dir))
        builder.info.set_splits(tfds.core.SplitDict([
            tfds.core.SplitInfo(name=split, shard_lengths=[len(rows)], num_bytes=0)
            for split, rows in splits.items()]))
        os.makedirs(builder.data_dir, exist_ok=True)
        builder.info.write_to_directory(builder.data_dir)

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        del decoders, shuffle_files
        rows = datasets[self.name][getattr(split, "split", split)]  # one process: all of it
        columns = {key: [row[key] for row in rows] for key in rows[0]}
        data = {k: (tf.ragged.constant(v).to_tensor() if isinstance(v[0], list) else v)
                for k, v in columns.items() if not isinstance(v[0], dict)}
        data.update({k: {field: tf.ragged.constant([r[field] for r in v]).to_tensor(
            default_value=b"") for field in v[0]} for k, v in columns.items()
            if isinstance(v[0], dict)})
        data["tfds_id"] = [f"{self.name}-{i}".encode() for i in range(len(rows))]
        return tf.data.Dataset.from_tensor_slices(data)

    return tfds.testing.mock_data(data_dir=str(data_dir), as_dataset_fn=as_dataset)


def bag_of_words(tokenizer_path, texts) -> np.ndarray:
    from vlmjax.data.tokenizers import load_tokenizer
    tokenizer = load_tokenizer(tokenizer_path)
    ids, mask = tokenizer.encode_batch(texts, 16)
    return np.array(bow(jnp.asarray(ids), jnp.asarray(mask), tokenizer.vocab_size))


def bow(ids, mask, vocab_size):
    z = jnp.sum(jax.nn.one_hot(ids, vocab_size) * mask[..., None], axis=-2)
    return np.asarray(z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-9))


def fake_two_towers(mesh, vocab_size):
    """Image -> params['table'][its grey index]; text -> its normalised bag of words."""
    def encode_image(params, batch):
        grey = (jnp.mean(batch["image"], axis=(1, 2, 3)) + 1) * 127.5  # value_range -> [0, 255]
        return params["table"][jnp.round(grey / GREY_STEP).astype(jnp.int32)]

    def encode_text(params, batch):
        del params
        z = jnp.sum(jax.nn.one_hot(batch["text"], vocab_size) * batch["text_mask"][..., None], 1)
        return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-9)
    return embed.TwoTowerEncoders(jax.jit(encode_image), jax.jit(encode_text), mesh)


def input_config(tokenizer):
    config = pipeline_config.default_input_config()
    config.update(dict(tokenizer=tokenizer, image_size=16, max_text_len=16, eos="none",
                       preprocess="caption_first|resize_crop|value_range"))
    return config


def real_scale_evals():
    return ml_collections.ConfigDict(presets.imagenet_and_coco(batch_size=4, every=0))


def run(entry_name, entry, tokenizer, params, data_dir):
    mesh = make_mesh({"data": -1})
    train = ml_collections.ConfigDict(dict(source="webdataset", paths="/never/read.tar"))
    with open(tokenizer) as f:
        vocab_size = len(json.load(f)["model"]["vocab"])
    context = registry.EvalContext(mesh, train, input_config(tokenizer),
                                   fake_two_towers(mesh, vocab_size))
    entry = ml_collections.ConfigDict(entry)
    entry.data.data_dir = str(data_dir)
    (evaluator,) = registry.build_evaluators(ml_collections.ConfigDict({entry_name: entry}),
                                             context)
    return evaluator, evaluator(params)


def test_imagenet_zero_shot_through_tfds(tmp_path):
    names = list(imagenet_classes.CLASS_NAMES)
    tokenizer = word_tokenizer(tmp_path / "tokenizer.json", names)
    labels = [0, 1, 2, 3, 4, 5]
    shown = [0, 1, 2, 3, 9, 10]  # the last two images look like classes 9 and 10: wrong
    rows = [{"image": png(i), "label": label} for i, label in enumerate(labels)]
    table = bag_of_words(tokenizer, [names[c] for c in shown])
    entry = real_scale_evals()["imagenet"]
    assert entry.data.name == "imagenet2012" and entry.data.split == "validation"
    assert entry.templates == "imagenet" and entry.class_names == "imagenet"
    entry.templates = "name"  # 1000 prompts, not 80k: the 80 are tested in test_metrics
    with mocked_tfds(tmp_path / "tfds", {"imagenet2012": {"validation": rows}}):
        _, metrics = run("imagenet", entry, tokenizer, {"table": jnp.asarray(table)},
                         tmp_path / "tfds")
    assert metrics["zero_shot/imagenet/top1"] == pytest.approx(4 / 6)
    assert 4 / 6 <= metrics["zero_shot/imagenet/top5"] <= 1.0


def coco_like(tmp_path):
    """(captions, tokenizer, rows, table): 5 images of 6 captions each; image 3 looks more like
    image 0 than like itself, so its own captions rank 6th to 10th."""
    captions = [[f"word{i} caption{j}" for j in range(6)] for i in range(5)]
    tokenizer = word_tokenizer(tmp_path / "tokenizer.json", sum(captions, []))
    rows = [{"image": png(i), "captions": {"text": [c.encode() for c in caps]}}
            for i, caps in enumerate(captions)]
    table = bag_of_words(tokenizer, [f"word{i}" for i in range(5)])
    table[3] = (2 * table[0] + table[3]) / np.sqrt(5)
    return captions, tokenizer, rows, table


def test_coco_retrieval_through_tfds(tmp_path):
    _, tokenizer, rows, table = coco_like(tmp_path)
    entry = real_scale_evals()["coco"]
    assert entry.data.name == "coco_captions" and entry.data.split == "test"
    assert entry.max_images == 5000 and entry.captions_per_image == 5
    entry.max_images = 4  # of the 5 images
    embedded = []
    with mocked_tfds(tmp_path / "tfds", {"coco_captions": {"test": rows}}):
        evaluator, metrics = run("coco", entry, tokenizer, {"table": jnp.asarray(table)},
                                 tmp_path / "tfds")
        texts = evaluator.context.model.texts
        evaluator.context.model.texts = lambda *a: embedded.append(len(a[1])) or texts(*a)
        assert evaluator({"table": jnp.asarray(table)}) == metrics  # a second run: the same
    assert embedded == [20]  # 4 images x their first 5 captions
    assert metrics == {"retrieval/coco/i2t_r1": 0.75, "retrieval/coco/i2t_r5": 0.75,
                       "retrieval/coco/i2t_r10": 1.0, "retrieval/coco/t2i_r1": 1.0,
                       "retrieval/coco/t2i_r5": 1.0, "retrieval/coco/t2i_r10": 1.0}


class FakeItmModel:
    """fake_two_towers plus an ITM head that knows the truth: 5 when the text's word{i} is the
    image's grey index i, else -5; records each pair it scores as (image, text index), text
    index = 5 * i + j for 'word{i} caption{j}'."""

    def __init__(self, towers, tokenizer_path):
        self.towers, self.pairs, self.calls = towers, [], []
        with open(tokenizer_path) as f:
            vocab = json.load(f)["model"]["vocab"]
        self.word_of, self.caption_of = np.full(len(vocab), -1), np.full(len(vocab), -1)
        for i in range(5):
            self.word_of[vocab[f"word{i}"]] = self.caption_of[vocab[f"caption{i}"]] = i

    def images(self, params, batches):
        return self.towers.images(params, batches)

    def texts(self, params, ids, mask, batch_size):
        return self.towers.texts(params, ids, mask, batch_size)

    def itm_scores(self, params, images, ids, mask):
        assert set(params) == {"table"} and images.dtype == np.float32
        image = np.round((images.mean(axis=(1, 2, 3)) + 1) * 127.5 / GREY_STEP).astype(int)
        word = np.where(mask, self.word_of[ids], -1).max(1)
        caption = np.where(mask, self.caption_of[ids], -1).max(1)
        self.calls.append(len(ids))
        self.pairs += list(zip(image.tolist(), (5 * word + caption).tolist()))
        return np.where(image == word, 5.0, -5.0).astype(np.float32)


def test_coco_retrieval_reranks_with_an_itm_head(tmp_path):
    from vlmjax.config import ConfigError
    from vlmjax.evals import retrieval
    captions, tokenizer, rows, table = coco_like(tmp_path)
    params = {"table": jnp.asarray(table)}
    texts = [c for caps in captions[:4] for c in caps[:5]]
    scores = table[:4] @ bag_of_words(tokenizer, texts).T  # ITC, as the fake towers compute it
    mesh = make_mesh({"data": -1})
    with open(tokenizer) as f:
        vocab_size = len(json.load(f)["model"]["vocab"])
    towers = fake_two_towers(mesh, vocab_size)
    itc = {"i2t_r1": 0.75, "i2t_r5": 0.75, "i2t_r10": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0,
           "t2i_r10": 1.0}

    def evaluate(rerank_k, model, **keys):
        entry = real_scale_evals()["coco"]
        entry.update(max_images=4, rerank_k=rerank_k, batch_size=4, **keys)
        entry.data.data_dir = str(tmp_path / "tfds")
        context = registry.EvalContext(mesh, ml_collections.ConfigDict(dict(
            source="webdataset", paths="/never/read.tar")), input_config(tokenizer), model)
        (evaluator,) = registry.build_evaluators(ml_collections.ConfigDict({"coco": entry}),
                                                 context)
        metrics = evaluator(params)
        return {k.removeprefix("retrieval/coco/"): v for k, v in metrics.items()}

    with mocked_tfds(tmp_path / "tfds", {"coco_captions": {"test": rows}}):
        # k=6: image 3's own first caption is among its candidates: the head lifts it to 1st.
        model = FakeItmModel(towers, tokenizer)
        metrics = evaluate(6, model)
        assert metrics == {**itc, **{f"{m}_rerank": 1.0 for m in itc}}
        # Each text's top 6 images are all 4: every (image, text) pair, once, 8 at most a call.
        assert sorted(model.pairs) == [(i, t) for i in range(4) for t in range(20)]
        assert max(model.calls) <= 8 and sum(model.calls) == 80
        # k=5: its top 5 are image 0's captions, its own stay 6th: unchanged.
        metrics = evaluate(5, FakeItmModel(towers, tokenizer))
        assert metrics == {**itc, **{f"{m}_rerank": itc[m] for m in itc}}
        # k=2: only the pairs of each query's top 2 by ITC are scored.
        model = FakeItmModel(towers, tokenizer)
        metrics = evaluate(2, model)
        image, text = retrieval.rerank_pairs(scores, 2)
        assert sorted(model.pairs) == list(zip(image.tolist(), text.tolist())) and len(image) < 80
        assert metrics["i2t_r1_rerank"] == 0.75 and metrics["t2i_r1_rerank"] == 1.0
        # rerank_itc "logit": ITM + ITC x the model's logit scale. At 1e3 the ITC differences
        # outweigh the head's +-5, so k=6 ranks as ITC alone; the scores are those of the
        # re-ranking formula on the scaled similarities.
        model = FakeItmModel(towers, tokenizer)
        model.itc_logit_scale = lambda params: 1e3
        metrics = evaluate(6, model, rerank_itc="logit")
        assert metrics == {**itc, **{f"{m}_rerank": itc[m] for m in itc}}
        text_to_image = np.repeat(np.arange(4), 5)
        image, text = retrieval.rerank_pairs(scores, 6)
        itm = np.where(image == text // 5, 5.0, -5.0)
        for scale in (1e3, 1.0):
            expected = retrieval.rerank_recall_at_k(scores * scale, text_to_image, 6, image, text,
                                                    itm)
            model.itc_logit_scale = lambda params, scale=scale: scale
            assert evaluate(6, model, rerank_itc="logit") == {**itc, **expected}
        with pytest.raises(ConfigError, match=r"rerank_itc='logit' needs a model with an ITC "
                                              r"temperature"):
            evaluate(6, FakeItmModel(towers, tokenizer), rerank_itc="logit")
        with pytest.raises(ConfigError, match=r"evals.coco.rerank_itc='cosine' is not one of"):
            evaluate(6, model, rerank_itc="cosine")
        assert evaluate(0, towers) == itc  # off: the ITC metrics alone, no ITM head needed
        with pytest.raises(ConfigError, match=r"evals.coco.rerank_k=2: re-ranking needs a model "
                                              r"with an ITM head"):
            evaluate(2, towers)
