"""Zero-shot and retrieval metrics on hand-built embeddings with known answers."""
import numpy as np
import pytest

from vlmjax.evals import retrieval, zero_shot


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_topk_accuracy_known_ranking():
    zclass = unit(np.eye(3))
    zimg = unit([[1, 0.5, 0.1], [0.1, 0.2, 1], [0.9, 1, 0]])
    labels = np.array([1, 2, 0])  # 2nd correct at top1; 1st and 3rd are second-ranked
    acc = zero_shot.topk_accuracy(zimg, labels, zclass, ks=(1, 2))
    assert acc == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(1.0)}


def test_class_embeddings_average_templates_and_renormalise():
    seen = []

    def encode(texts):
        seen.extend(texts)
        # "x" prompts point along axis 0, "y" prompts along axis 1, template 2 adds axis 2.
        return unit([[t.endswith("x") or "x." in t, "y" in t, t.startswith("b")] for t in texts])

    z = zero_shot.class_embeddings(encode, ["x", "y"], ["a {}", "b {}"])
    assert seen == ["a x", "b x", "a y", "b y"]
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-6)
    expected_x = unit([(1 + 1 / np.sqrt(2)) / 2, 0, (1 / np.sqrt(2)) / 2])
    np.testing.assert_allclose(z[0], expected_x, rtol=1e-5)


def test_zero_shot_accuracies_drop_k_above_the_class_count():
    out = zero_shot.accuracies(lambda t: unit([[1.0, "b" in s] for s in t]),
                               unit([[1, 0], [0, 1]]), np.array([0, 1]), ["a", "b"], ["{}"])
    assert out == {"top1": 1.0}  # top5 dropped: only 2 classes


def test_recall_with_several_captions_per_image():
    zimg = unit(np.eye(3))
    # texts 0,1 -> image 0; text 2 -> image 1; text 3 -> image 2 (but text 3 looks like image 0)
    ztxt = unit([[0.2, 1, 0], [1, 0.1, 0], [0, 1, 0.1], [1, 0, 0.5]])
    text_to_image = np.array([0, 0, 1, 2])
    r = retrieval.recall_at_k(zimg, ztxt, text_to_image, ks=(1, 2))
    # Each image's most similar text is one of its own: 0 -> text 1 (0.995 vs text 3's 0.894),
    # 1 -> text 2 (0.995 vs text 0's 0.981), 2 -> text 3.
    assert r["i2t_r1"] == pytest.approx(1.0)
    # Texts 1 and 2 rank their image first; texts 0 and 3 rank it second.
    assert r["t2i_r1"] == pytest.approx(0.5)
    assert r["t2i_r2"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="must map each"):
        retrieval.recall_at_k(zimg, ztxt, np.array([0, 1]))


def test_imagenet_data_is_clip_s():
    from vlmjax.evals import imagenet_classes
    names, templates = imagenet_classes.CLASS_NAMES, imagenet_classes.TEMPLATES
    assert len(names) == 1000 and len(templates) == 80 and len(set(templates)) == 80
    assert names[:3] == ("tench", "goldfish", "great white shark") and names[-1] == "toilet paper"
    assert [i for i, n in enumerate(names) if n == "missile"] == [657, 744]  # CLIP's duplicate
    assert all(t.count("{}") == 1 for t in templates)
    assert zero_shot.TEMPLATES["imagenet"] == templates
