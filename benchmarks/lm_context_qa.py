"""Can a decoder LM read a fact from its context? vlm_shapes questions answered from the caption
before them, text only: the skill a LLaVA's LLM needs to answer from its visual tokens. An LM
that answers at chance here answers from its prior, and a LLaVA built on it must learn to read
its context from scratch in stage 2.

For the first N images of a vlm_shapes split, each question's prompt is the image's scene
document (the lm task's `scene_documents`: the first caption (`--scene_text description`: the
scene description of the LLaVA-CoT answer), then " Q: <question> A: <answer>"
for every question in a fixed order) up to that question's answer, the earlier answers the true
ones; greedy decoding up to the next " Q:"; normalised exact match (vlmjax.evals.vqa) overall
and per question type.

    python benchmarks/lm_context_qa.py --model LM_WORKDIR --data_dir D [--images 300]
        [--scene_text caption|description]
"""
from __future__ import annotations

import argparse
import collections

import numpy as np

BATCH = 64


def scene_text(example, kind: str) -> str:
    """The text a scene document starts with (ops_lm.scene_documents' `scene_text`)."""
    if kind == "caption":
        return example["captions"][0].decode()
    cot = example["qa"]["cot_answer"][0].decode()
    return cot.split("<CAPTION>", 1)[1].split("</CAPTION>", 1)[0]


def prompts_of(examples, kind: str = "caption") -> list[tuple[str, str, str]]:
    """(prompt, answer, type) for every question of every example (vlm_shapes records)."""
    from vlmjax.data import shapes_text
    out = []
    for example in examples:
        context = scene_text(example, kind)
        qa = example["qa"]
        for question, answer, qa_type in zip(qa["question"], qa["answer"], qa["type"]):
            prompt = f"{context} Q: {question.decode()} A:"
            out.append((prompt, answer.decode(), shapes_text.QA_TYPES[int(qa_type)]))
            context = f"{prompt} {answer.decode()}"  # the next question sees this one answered
    return out


def answer_of(text: str) -> str:
    return text.split(" Q:")[0].split("Q:")[0].strip()


def score(predictions, answers, qa_types) -> dict[str, float]:
    from vlmjax.evals.vqa import exact_match
    hits = collections.defaultdict(list)
    for prediction, answer, qa_type in zip(predictions, answers, qa_types):
        hit = exact_match(prediction, answer)
        hits["overall"].append(hit)
        hits[qa_type].append(hit)
    return {key: float(np.mean(value)) for key, value in hits.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an lm workdir (or an HF decoder dir)")
    parser.add_argument("--data_dir", required=True, help="TFDS data dir of vlm_shapes")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--max_new_tokens", type=int, default=6)
    parser.add_argument("--scene_text", choices=("caption", "description"), default="caption",
                        help="what the document starts with (the LM's scene_documents)")
    args = parser.parse_args(argv)

    import jax
    import tensorflow_datasets as tfds
    from tqdm import tqdm

    from vlmjax.convert import load_pretrained
    from vlmjax.data import shapes
    from vlmjax.inference.generate import generate

    builder = shapes.make_builder("64px", args.data_dir)
    examples = list(tfds.as_numpy(builder.as_dataset(split=args.split).take(args.images)))
    items = prompts_of(examples, args.scene_text)
    tokenizer = tokenizer_of(builder)
    model, params, _ = load_pretrained(args.model)
    predictions = []
    for start in tqdm(range(0, len(items), BATCH), desc="context QA", unit="batch"):
        chunk = items[start:start + BATCH]
        ids = [[tokenizer.bos_id] + row for row in tokenizer.encode_raw([p for p, _, _ in chunk])]
        length = max(map(len, ids))
        tokens = np.zeros((len(ids), length), np.int32)
        mask = np.zeros((len(ids), length), bool)
        for row, row_ids in enumerate(ids):  # left-padded: every prompt ends at the last column
            tokens[row, length - len(row_ids):] = row_ids
            mask[row, length - len(row_ids):] = True
        out = generate(model, params, tokens, max_new_tokens=args.max_new_tokens,
                       prompt_mask=mask, eos_id=tokenizer.eos_id)
        for row_tokens in np.asarray(jax.device_get(out.tokens)):
            predictions.append(answer_of(tokenizer.decode_raw([int(t) for t in row_tokens])))
    result = score(predictions, [a for _, a, _ in items], [t for _, _, t in items])
    print(f"{args.model}: {len(items)} questions about {len(examples)} {args.split} images, "
          "answered from the caption in the context")
    print("| " + " | ".join(result) + " |")
    print("|" + " --- |" * len(result))
    print("| " + " | ".join(f"{100 * v:.1f}%" for v in result.values()) + " |")
    for (prompt, answer, _), prediction in list(zip(items, predictions))[:6]:
        print(f"  {prompt!r} -> {prediction!r} (want {answer!r})")
    return result


def tokenizer_of(builder):
    """The vlm_shapes SentencePiece model with the LM's special tokens (as the lm task)."""
    from vlmjax.data import shapes
    from vlmjax.data.tokenizers import VLM_SHAPES_LM_TOKENS, load_tokenizer
    tokenizer = load_tokenizer(shapes.tokenizer_path(builder))
    tokenizer.add_special_tokens(list(VLM_SHAPES_LM_TOKENS))
    return tokenizer


if __name__ == "__main__":
    main()
