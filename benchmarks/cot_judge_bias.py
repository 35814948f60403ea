"""Position bias of a LLaVA-CoT model's judge: each held-out judge pair (a stage's right text
and a plausibly wrong one, as the `cot` evaluator draws them) asked in both orders.

    python benchmarks/cot_judge_bias.py --workdir WD --data_dir D [--split validation] [--pairs 300]

Prints the judge's accuracy with the right text first and second, how often it names
"response 1", and how often the two orders agree, with the accuracy on the pairs where they
do (what `ModelCot(judging="model_both_orders")` keeps; a split goes to the candidates'
log-probability).
"""
from __future__ import annotations

import argparse

import numpy as np


def bias_summary(right_first: np.ndarray, right_second: np.ndarray) -> dict[str, float]:
    """From the choices (1, 2, or 0 when unparsed) of each pair asked with the right text first
    and second."""
    both = np.concatenate([right_first, right_second])
    agree = ((right_first == 1) & (right_second == 2)) | ((right_first == 2) & (right_second == 1))
    return {"accuracy_right_first": float(np.mean(right_first == 1)),
            "accuracy_right_second": float(np.mean(right_second == 2)),
            "accuracy": float(np.mean(both == np.repeat([1, 2], len(right_first)))),
            "names_response_1": float(np.mean(both == 1)),
            "unparsed": float(np.mean(both == 0)),
            "orders_agree": float(np.mean(agree)),
            "accuracy_when_orders_agree": float(np.mean((right_first == 1)[agree]))
            if agree.any() else float("nan")}


def judge_pairs(data_dir: str, split: str, count: int, model_config: dict):
    """Images and the judge prompts of the split's first `count` images, the right text first
    and second (the pair the `cot` evaluator asks of each image, evals.cot.cot_draw)."""
    import tensorflow_datasets as tfds

    from vlmjax.data import shapes, shapes_instruct
    from vlmjax.data.shapes_cot import pair_prompt
    from vlmjax.evals.cot import cot_draw
    from vlmjax.generate import prepare_image

    builder = shapes.make_builder("64px", data_dir)
    images, first, second = [], [], []
    for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)
                                 .take(count)):
        question, stage, right, wrong, _ = cot_draw(shapes_instruct.scene_facts(example))
        first.append(pair_prompt(question, stage, right, wrong, 1))
        second.append(pair_prompt(question, stage, right, wrong, 2))
        images.append(prepare_image(example["image"], model_config))
    return np.stack(images), first, second


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a LLaVA-CoT workdir")
    parser.add_argument("--data_dir", required=True, help="TFDS data dir of vlm_shapes")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--pairs", type=int, default=300)
    args = parser.parse_args(argv)

    from vlmjax.convert import load_pretrained
    from vlmjax.generate import llava_answerer
    from vlmjax.inference import cot

    model, params, model_config = load_pretrained(args.workdir)
    answerer = llava_answerer(model, model_config)
    budget = cot.judge_reply_tokens(answerer.tokenizer) + 8  # as the evaluator and ModelCot
    images, first, second = judge_pairs(args.data_dir, args.split, args.pairs, model_config)
    choices = [np.array([cot.parse_choice(reply) or 0
                         for reply in answerer.answer(params, images, prompts,
                                                      max_new_tokens=budget)])
               for prompts in (first, second)]
    summary = bias_summary(*choices)
    print(f"{args.workdir}: {len(first)} {args.split} judge pairs, each in both orders")
    print("| " + " | ".join(summary) + " |")
    print("|" + " --- |" * len(summary))
    print("| " + " | ".join(f"{100 * v:.1f}%" for v in summary.values()) + " |")
    return summary


if __name__ == "__main__":
    main()
