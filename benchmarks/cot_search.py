"""LLaVA-CoT inference-time search on vlm_shapes: greedy, stage-level beam search at 1-4 beams,
best-of-N over whole answers and sentence-level beam search, by CONCLUSION exact match and the
tokens each method generates (judge replies included), as the LLaVA-CoT paper's Tables 5 and 6.

    python benchmarks/cot_search.py --workdir WD --data_dir D --out results.json \
        [--split test] [--questions 500] [--seeds 0] [--temperature 0.4] [--best_of_n N] \
        [--methods greedy,stage_beam:4] [--judge model,loglik] (also model_both_orders, reference)

WD is a LLaVA-CoT workdir (configs/llava_cot/tiny.py). Each of the first --questions images of
the split gets the reasoning question the `cot` evaluator asks of it (evals.cot.cot_items).
Writes a JSON list of rows {"method", "beams", "seed", "judge", "accuracy", "generated_tokens"}
(mean new tokens per question) and prints the tables. Choose --temperature and the judge on
--split validation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

BEAMS = (1, 2, 3, 4)
# --judge: the model's (inference.cot.MODEL_JUDGES: its judge prompt, asked once or in both
# orders, or its mean log-probability), or an oracle that knows the reference answer (what
# selection alone can give: an upper bound for the search)
JUDGES = ("model", "model_both_orders", "loglik", "reference")
# best_of_n's N by judge, near stage_beam-4's generated tokens with that judge: the model's
# judge replies cost ~50 tokens each, loglik and the oracle none (4 answers = 4 x 4 stages)
BEST_OF_N = {"model": 6, "model_both_orders": 6, "loglik": 4, "reference": 4}


def methods(best_of_n: int) -> list[tuple[str, int]]:
    """(method, beams) rows: greedy, stage_beam at 1-4, best_of_n near stage_beam-4's
    compute, sentence_beam at 2."""
    return ([("greedy", 1)] + [("stage_beam", n) for n in BEAMS]
            + [("best_of_n", best_of_n), ("sentence_beam", 2)])


def chosen(rows: list[tuple[str, int]], spec: str) -> list[tuple[str, int]]:
    """The rows named by `spec` ("greedy,stage_beam:4": a method alone names all its rows);
    an empty spec keeps every row."""
    if not spec:
        return rows
    names = [part.strip() for part in spec.split(",") if part.strip()]
    known = {m for m, _ in rows} | {f"{m}:{n}" for m, n in rows}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--methods {unknown} not among {sorted(known)}")
    return [(m, n) for m, n in rows if m in names or f"{m}:{n}" in names]


def plan(seeds: list[int], judges: list[str], spec: str = "",
         best_of_n: int | None = None) -> list[tuple[int, str, str, int]]:
    """(seed, judge, method, beams) of every row to run: greedy once (it depends on neither),
    stage_beam at 1 beam once per seed (it never judges), the rest per seed and judge."""
    rows = []
    for seed in seeds:
        for judge in judges:
            for method, beams in chosen(methods(best_of_n or BEST_OF_N[judge]), spec):
                once_per_seed = method == "greedy" or (method == "stage_beam" and beams == 1)
                if (once_per_seed and judge != judges[0]) or (method == "greedy"
                                                              and seed != seeds[0]):
                    continue
                rows.append((seed, judge, method, beams))
    return rows


def load_questions(data_dir: str, split: str, count: int, model_config: dict):
    """(images f32 [N, S, S, 3], CotQuestions) of the split's first `count` images."""
    import tensorflow_datasets as tfds

    from vlmjax.data import shapes, shapes_instruct
    from vlmjax.evals.cot import cot_items
    from vlmjax.generate import prepare_image

    builder = shapes.make_builder("64px", data_dir)
    dataset = builder.as_dataset(split=split, shuffle_files=False).take(count)
    images, questions = [], []
    for example in tfds.as_numpy(dataset):
        facts = shapes_instruct.scene_facts(example)
        questions.append(cot_items(facts)[0])
        images.append(prepare_image(example["image"], model_config))
    return np.stack(images), questions


def run_method(method: str, beams: int, seed: int, answerer, params, images, questions,
               temperature: float, batch: int, judge: str = "model") -> dict:
    from vlmjax.evals.vqa import exact_match
    from vlmjax.inference import cot

    texts, tokens = [], 0
    for start in range(0, len(questions), batch):
        chunk = slice(start, start + batch)
        asked = [q.question for q in questions[chunk]]
        if method == "greedy":  # its tokens: the answers' texts encoded again
            out = answerer.answer(params, images[chunk], asked, max_new_tokens=4 * 96)
            texts += out
            tokens += sum(len(answerer.tokenizer.encode_raw([t])[0]) for t in out)
            continue
        searcher = cot.ModelCot(answerer, params, images[chunk], asked,
                                temperature=temperature,
                                judging=judge if judge in cot.MODEL_JUDGES else "model")
        search = {"stage_beam": cot.stage_beam, "best_of_n": cot.best_of_n,
                  "sentence_beam": cot.sentence_beam}[method]
        judging = searcher.judge
        if judge == "reference":  # the keys index the chunk's questions
            judging = cot.reference_judge({i: q.stages() for i, q in enumerate(questions[chunk])})
        texts += search(searcher.sample, judging, keys=list(range(len(asked))),
                        num_beams=beams, seed=seed)
        tokens += searcher.generated_tokens
    correct = [exact_match(cot.conclusion(t), q.answer) for t, q in zip(texts, questions)]
    return {"method": method, "beams": beams, "seed": seed, "judge": judge,
            "accuracy": float(np.mean(correct)), "generated_tokens": tokens / len(questions)}


def label(row: dict) -> str:
    """The judge beside the method, unless it is the model's own (the default)."""
    judge = row.get("judge", "model")
    return "" if judge == "model" or row["method"] == "greedy" else f" ({judge} judge)"


def table(rows: list[dict]) -> str:
    lines = ["| method | beams | seed | accuracy | generated tokens / question |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['method']}{label(r)} | {r['beams']} | {r['seed']} | "
              f"{100 * r['accuracy']:.1f}% | {r['generated_tokens']:.0f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a LLaVA-CoT workdir")
    parser.add_argument("--data_dir", required=True, help="TFDS data dir of vlm_shapes")
    parser.add_argument("--out", required=True, help="the JSON list of rows")
    parser.add_argument("--split", default="test")
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--seeds", default="0", help="comma-separated")
    parser.add_argument("--temperature", type=float, default=0.4,
                        help="0.4: chosen on validation (docs/experiments.md, LLaVA-CoT)")
    parser.add_argument("--best_of_n", type=int, default=None,
                        help=f"N of best_of_n (default by judge, near stage_beam-4's generated "
                             f"tokens: {BEST_OF_N})")
    parser.add_argument("--batch", type=int, default=128, help="questions searched at once")
    parser.add_argument("--judge", default="model,loglik",
                        help=f"comma-separated, of {JUDGES}. model: its own judge prompt "
                             "(LLaVA-CoT); model_both_orders: asked with the texts in both "
                             "orders, a split decided by loglik; loglik: the candidates' mean "
                             "log-probability; reference: an oracle that knows the answer (an "
                             "upper bound of the search)")
    parser.add_argument("--methods", default="",
                        help="only these rows, e.g. 'greedy,stage_beam:4' (default: all)")
    args = parser.parse_args(argv)

    from vlmjax.convert import load_pretrained
    from vlmjax.generate import llava_answerer

    model, params, model_config = load_pretrained(args.workdir)
    if "num_image_tokens" not in model_config:
        sys.exit(f"{args.workdir} is not a llava workdir")
    answerer = llava_answerer(model, model_config)
    images, questions = load_questions(args.data_dir, args.split, args.questions, model_config)
    judges = [j.strip() for j in args.judge.split(",") if j.strip()]
    unknown = [j for j in judges if j not in JUDGES]
    if unknown or not judges:
        sys.exit(f"--judge {args.judge!r}: each must be one of {JUDGES}")
    rows = []
    for seed, judge, method, beams in plan([int(s) for s in args.seeds.split(",")], judges,
                                           args.methods, args.best_of_n):
        start = time.time()
        rows.append(run_method(method, beams, seed, answerer, params, images, questions,
                               args.temperature, args.batch, judge))
        print(f"{method} x{beams} seed {seed}{label(rows[-1])}: "
              f"{100 * rows[-1]['accuracy']:.1f}% ({rows[-1]['generated_tokens']:.0f} "
              f"tokens/question, {time.time() - start:.0f} s)", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as file:
            json.dump(rows, file, indent=1)
    print(f"{args.workdir}: {len(questions)} {args.split} questions, temperature "
          f"{args.temperature}")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
