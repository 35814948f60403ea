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


# ------------------------------------------------------------------------- ITM re-ranking
# 3 images, one caption each (text t is image t's). By ITC, image 1 ranks text 0 first and
# text 2 ranks image 1 first.
SCORES = np.array([[0.9, 0.8, 0.1],
                   [0.7, 0.6, 0.5],
                   [0.2, 0.3, 0.4]], np.float32)
# ITM scores of the pairs re-ranking with k=2 needs, and no others.
ITM = {(0, 0): 0.0, (0, 1): 0.5, (1, 0): -1.0, (1, 1): 0.2, (1, 2): 0.3, (2, 1): 1.0,
       (2, 2): 0.0}


def itm_arrays(itm):
    pairs = sorted(itm)
    return (np.array([i for i, _ in pairs]), np.array([t for _, t in pairs]),
            np.array([itm[p] for p in pairs], np.float32))


def test_rerank_pairs_are_each_querys_top_k():
    # Image tops: 0 -> {0, 1}, 1 -> {0, 1}, 2 -> {2, 1}; text tops: 0 -> {0, 1}, 1 -> {0, 1},
    # 2 -> {1, 2}.
    image, text = retrieval.rerank_pairs(SCORES, 2)
    assert list(zip(image.tolist(), text.tolist())) == sorted(ITM)
    image, text = retrieval.rerank_pairs(SCORES, 9)  # k beyond the sizes: every pair
    assert len(set(zip(image.tolist(), text.tolist()))) == len(image) == 9


def test_rerank_recall_by_hand():
    text_to_image = np.arange(3)
    itc = retrieval.recall_of_scores(SCORES, text_to_image, ks=(1, 2))
    assert itc == pytest.approx(dict(i2t_r1=2 / 3, t2i_r1=1 / 3, i2t_r2=1.0, t2i_r2=1.0))
    out = retrieval.rerank_recall_at_k(SCORES, text_to_image, 2, *itm_arrays(ITM), ks=(1, 2))
    # ITM + ITC.  Image 0: t0 0.9, t1 1.3 -> own rank 1.  Image 1: t0 -0.3, t1 0.8 -> rank 0.
    # Image 2: t2 0.4, t1 1.3 -> rank 1.  Text 0: i0 0.9, i1 -0.3 -> rank 0.  Text 1: i0 1.3,
    # i1 0.8 -> rank 1.  Text 2: i1 0.8, i2 0.4 -> rank 1.
    assert out == pytest.approx(dict(i2t_r1_rerank=1 / 3, t2i_r1_rerank=1 / 3,
                                     i2t_r2_rerank=1.0, t2i_r2_rerank=1.0))
    # k=1: text 2's candidate is image 1 alone; its own image 2 comes after it whatever ITM
    # says. Image 1's candidate is text 0: text 1 stays second.
    itm = {(0, 0): 5.0, (1, 0): 5.0, (2, 2): 5.0, (0, 1): 5.0, (1, 2): -5.0}
    out = retrieval.rerank_recall_at_k(SCORES, text_to_image, 1, *itm_arrays(itm), ks=(1, 2))
    assert out == pytest.approx(dict(i2t_r1_rerank=2 / 3, t2i_r1_rerank=1 / 3,
                                     i2t_r2_rerank=1.0, t2i_r2_rerank=1.0))
    # Ties go to the lower index: text 0's top 1 is image 0, not its own image 1 (which ITC
    # alone ranks first, ties favouring the truth), and no ITM score brings image 1 back.
    tied = np.array([[0.5], [0.5]], np.float32)
    assert retrieval.recall_of_scores(tied, np.array([1]), ks=(1,))["t2i_r1"] == 1.0
    out = retrieval.rerank_recall_at_k(tied, np.array([1]), 1, *itm_arrays({(0, 0): -5.0,
                                                                            (1, 0): 5.0}), ks=(1,))
    assert out == dict(i2t_r1_rerank=0.5, t2i_r1_rerank=0.0)  # image 0 has no caption
    with pytest.raises(ValueError, match=r"no ITM score for the pair \(image 2, text 1\)"):
        retrieval.rerank_recall_at_k(SCORES, text_to_image, 2,
                                     *itm_arrays({p: v for p, v in ITM.items() if p != (2, 1)}))


def test_a_perfect_itm_lifts_r1_to_the_itc_recall_at_k_and_leaves_the_rest():
    rng = np.random.default_rng(0)
    zimg, ztxt = unit(rng.normal(size=(30, 8))), unit(rng.normal(size=(60, 8)))
    text_to_image = np.repeat(np.arange(30), 2)
    scores = zimg @ ztxt.T
    itc = retrieval.recall_at_k(zimg, ztxt, text_to_image, ks=(1, 4, 5, 10, 20))
    assert 0 < itc["i2t_r1"] < itc["i2t_r5"] < 1 and 0 < itc["t2i_r1"] < itc["t2i_r5"] < 1
    image, text = retrieval.rerank_pairs(scores, 5)
    assert len(image) < scores.size  # sparse: not every pair
    for sign in (1, -1):  # a perfect head, then one that is always wrong
        out = retrieval.rerank_recall_at_k(scores, text_to_image, 5, image, text,
                                           sign * np.where(text_to_image[text] == image, 9, -9),
                                           ks=(1, 4, 5, 10, 20))
        for d in ("i2t", "t2i"):
            # Past the top 5 nothing moves: recall at 5 or more is ITC's.
            assert out[f"{d}_r10_rerank"] == itc[f"{d}_r10"]
            assert out[f"{d}_r20_rerank"] == itc[f"{d}_r20"]
            assert out[f"{d}_r5_rerank"] == itc[f"{d}_r5"]
        if sign == 1:  # the truth, when in the top 5, comes first
            assert out["i2t_r1_rerank"] == itc["i2t_r5"]
            assert out["t2i_r1_rerank"] == itc["t2i_r5"]
        else:  # own images and captions come last among the top 5 (2 captions an image)
            assert out["t2i_r4_rerank"] == 0.0
            assert out["i2t_r1_rerank"] == 0.0
