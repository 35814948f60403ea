"""Where a BLIP run's retrieval and captions go wrong on vlm_shapes: image -> text retrieval by
ITC alone against re-ranked by ITM + w * ITC, what the ITC misses are, and the captions' colour
and shape accuracy by the number of objects in the image, greedy and with beams.

For the first N images (all their captions; the `retrieval` evaluator's own pass,
evals/retrieval.py, with `rerank_k` K) it prints:
  - i2t / t2i R@1 by ITC, and re-ranked for each weight w of the ITC similarity beside the ITM
    score (w = 1 is BLIP's `score + topk_sim`; w = 1 / temperature puts ITC on the logit scale);
  - of the images whose ITC top caption is another image's: how many such captions name
    exactly the image's own (colour, shape) objects, i.e. are true of it as far as the scene's
    objects go (the caption parser of evals/captioning.py), with a few examples;
  - of the images ITC gets right and re-ranking loses: the same count;
  - the `captioning` evaluator's colour and shape accuracy (evals/captioning.py) on the same
    images, over all of them and by object count, for each of `--beams`.

    python benchmarks/blip_errors.py --model WORKDIR [--split validation] [--images 500]
"""
from __future__ import annotations

import argparse

import jax
import ml_collections
import numpy as np

from vlmjax.evals import captioning, retrieval
from vlmjax.evals.captioning import named_pairs, words_of

WEIGHTS = (1.0, 10.0, 30.0, 100.0)


def objects_named(texts: list[str]) -> list[frozenset]:
    return [frozenset(named_pairs(words_of(text))) for text in texts]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a blip trainer workdir")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--rerank_k", type=int, default=8)
    parser.add_argument("--examples", type=int, default=6, help="misses to print")
    parser.add_argument("--beams", default="1,3", help="caption decodings: 1 = greedy")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    args = parser.parse_args(argv)

    from vlmjax.convert.blip_workdir import load_blip_workdir
    run = load_blip_workdir(args.model)
    seen = {}
    score_pass = retrieval.rerank_recall_at_k

    def keep(*call, **options):  # the evaluator's own scores and ITM pass
        seen["call"] = call
        return score_pass(*call, **options)

    retrieval.rerank_recall_at_k = keep
    texts: list[str] = []
    entry = dict(type="retrieval", data=dict(split=args.split), max_images=args.images,
                 rerank_k=args.rerank_k, batch_size=64)
    with jax.set_mesh(run.mesh):
        (evaluator,) = run.task.evaluators(ml_collections.ConfigDict({"r": entry}))
        tokenize = evaluator.data.tokenize
        evaluator.data.tokenize = lambda batch: (texts.extend(batch), tokenize(batch))[1]
        metrics = evaluator(run.params)
    retrieval.rerank_recall_at_k = score_pass
    scores, text_to_image, k, pair_image, pair_text, pair_itm = seen["call"]
    temperature = float(np.asarray(run.params["temp"]))
    print(f"{run.workdir} step {run.step}, {args.split}: {scores.shape[0]} images, "
          f"{scores.shape[1]} captions, ITC temperature {temperature:.4f}")
    print("| score | i2t R@1 | t2i R@1 |\n| --- | --- | --- |")
    print(f"| ITC | {metrics['retrieval/r/i2t_r1']:.1%} | {metrics['retrieval/r/t2i_r1']:.1%} |")
    for weight in sorted({*WEIGHTS, round(1 / temperature, 1)}):
        rer = retrieval.rerank_recall_at_k(scores * weight, text_to_image, k, pair_image,
                                           pair_text, pair_itm)
        print(f"| ITM + {weight:g} x ITC (top {k}) | {rer['i2t_r1_rerank']:.1%} | "
              f"{rer['t2i_r1_rerank']:.1%} |")

    named = objects_named(texts)
    own = [frozenset().union(*[named[t] for t in np.flatnonzero(text_to_image == i)])
           for i in range(scores.shape[0])]
    itc_top = scores.argmax(axis=1)
    misses = [i for i in range(len(own)) if text_to_image[itc_top[i]] != i]
    same = [i for i in misses if named[itc_top[i]] == own[i]]
    print(f"\nITC i2t misses: {len(misses)}; the retrieved caption names exactly the image's "
          f"objects in {len(same)} ({len(same) / max(len(misses), 1):.0%})")
    itm = dict(zip(zip(pair_image.tolist(), pair_text.tolist()), pair_itm.tolist()))
    lost = []
    for i in range(len(own)):
        top = np.argsort(-scores[i], kind="stable")[:k]
        best = top[np.argmax([itm[(i, int(t))] + scores[i, t] for t in top])]
        if text_to_image[top[0]] == i and text_to_image[best] != i:
            lost.append((i, int(best)))
    lost_same = sum(named[best] == own[i] for i, best in lost)
    print(f"right by ITC, lost by re-ranking (w = 1): {len(lost)}; the caption re-ranking put "
          f"first names exactly the image's objects in {lost_same}")
    for i, best in lost[:args.examples]:
        first_own = texts[int(np.flatnonzero(text_to_image == i)[0])]
        print(f"  image {i}: own {first_own!r} | re-ranked first {texts[best]!r}")
    caption_accuracy(run, args)


def caption_accuracy(run, args):
    """Colour and shape accuracy of the captions, over all images and by object count."""
    checks = []
    check = captioning.check_description

    def keep(text, objects):
        checks.append(check(text, objects))
        return checks[-1]

    captioning.check_description = keep
    print("\n| decoding | objects | images | colour named | shape named |\n"
          "| --- | --- | --- | --- | --- |")
    for beams in map(int, args.beams.split(",")):
        checks.clear()
        entry = dict(type="captioning", data=dict(source="vlm_shapes", split=args.split),
                     max_examples=args.images, max_new_tokens=args.max_new_tokens,
                     batch_size=64, num_beams=beams)
        with jax.set_mesh(run.mesh):
            (evaluator,) = run.task.evaluators(ml_collections.ConfigDict({"c": entry}))
            evaluator(run.params)
        decoding = "greedy" if beams == 1 else f"{beams} beams"
        for count in [None, *sorted({c["objects"] for c in checks})]:
            rows = [c for c in checks if count in (None, c["objects"])]
            scores = captioning.caption_metrics(rows)
            print(f"| {decoding} | {'all' if count is None else count} | {len(rows)} | "
                  f"{scores['colour_acc']:.1%} | {scores['shape_acc']:.1%} |")
    captioning.check_description = check


if __name__ == "__main__":
    main()
