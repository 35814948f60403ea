"""`python -m vlmjax.generate`: text from a pretrained or trained decoder LM, printed as it comes.

  python -m vlmjax.generate --model SRC --prompt "a photo of" [--max_new_tokens 32]
      [--strategy greedy|sample|beam] [--num_beams 4] [--temperature 1.0] [--top_k 0]
      [--top_p 1.0] [--seed 0] [--length_penalty 1.0] [--early_stopping true|false|never]
      [--tokenizer PATH] [--add_bos | --no-add_bos] [--chunk 4]

SRC is anything `vlmjax.convert.load_pretrained` reads: an HF Llama / Qwen2 directory, a
directory written by `python -m vlmjax.convert import`, or a trainer workdir of an LM task. The
prompt is encoded with the model's own tokenizer (tokenizer.json or SentencePiece, with BOS as
the model's tokenizer config says, unless --add_bos / --no-add_bos); `--tokenizer` names a
tokenizer file for a source that has none. Generation stops at the tokenizer's EOS (and the
model config's / generation_config.json's EOS ids). Greedy and sampling print the text every
`--chunk` tokens; beam search prints it at the end. Only the generated text is printed
(stdout), followed by a newline.

A `llava` workdir (or WORKDIR/checkpoints/<step>) answers about an image:

  python -m vlmjax.generate --model WORKDIR --image PATH --prompt "What colour is the circle?"

The image (any format PIL reads) is resized and normalised as in the run's evaluations, the
prompt is the question as one user turn of the run's chat template (`--template` to change it)
with the image at its start, and the answer is greedy (or sampled) until the template's end of
turn. Without `--image` the question is asked with no image.

A LLaVA-CoT workdir (configs/llava_cot/tiny.py) can search its four-stage answer instead:

  python -m vlmjax.generate --model WORKDIR --image PATH --prompt "How many corners ...?" \
      --cot stage_beam --num_beams 4 --temperature 0.4 [--max_new_tokens 96 (per stage)] \
      [--judge model|model_both_orders|loglik]

prints the chosen <SUMMARY>, <CAPTION>, <REASONING> and <CONCLUSION> and the tokens the search
generated (inference.cot: stage_beam, best_of_n, sentence_beam).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from vlmjax.inference import cot


def early_stopping_arg(text: str):
    value = {"true": True, "false": False, "never": "never"}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"early_stopping {text!r}: expected true, false or never")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmjax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF dir, converted dir or trainer workdir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="default 32; with --cot, per stage, default 96 (a vlm_shapes SUMMARY "
                        "is ~50 tokens)")
    p.add_argument("--strategy", choices=["greedy", "sample", "beam"], default="greedy")
    p.add_argument("--num_beams", type=int, default=4,
                   help="beam search, and the candidates per step of a --cot search")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--length_penalty", type=float, default=1.0)
    p.add_argument("--early_stopping", type=early_stopping_arg, default=False)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json / .model to use instead of the model's own")
    p.add_argument("--add_bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start the prompt with BOS (default: as the model's tokenizer config)")
    p.add_argument("--chunk", type=int, default=4, help="tokens per streamed print")
    p.add_argument("--image", default=None, help="LLaVA workdirs: the image asked about")
    p.add_argument("--template", default=None,
                   help="LLaVA workdirs: chat template (default: the run's input.template)")
    p.add_argument("--cot", default=None, choices=("stage_beam", "best_of_n", "sentence_beam"),
                   help="LLaVA-CoT workdirs: search the four-stage answer (inference.cot) with "
                        "--num_beams candidates, sampled at --temperature, the model its own "
                        "judge; prints the chosen stages")
    p.add_argument("--judge", default="model", choices=cot.MODEL_JUDGES,
                   help="--cot: how the model judges two candidates: its judge prompt "
                        "(LLaVA-CoT's, the default), the prompt asked in both orders, or their "
                        "mean log-probability (the best on vlm_shapes validation)")
    return p


def load_image(path: str, model_config: dict) -> np.ndarray:
    """float32 [S, S, 3]: the image at `path` as the run's evaluations prepare an image."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image {path} does not exist")
    try:
        rgb = np.asarray(Image.open(path).convert("RGB"))
    except OSError as error:
        raise ValueError(f"--image {path} is not an image PIL can read: {error}") from None
    return prepare_image(rgb, model_config)


def prepare_image(rgb: np.ndarray, model_config: dict) -> np.ndarray:
    """float32 [S, S, 3]: uint8 RGB [H, W, 3] as the run's evaluations prepare an image."""
    from vlmjax.data import preprocess
    from vlmjax.data.tf_cpu import tf
    from vlmjax.evals.data import eval_preprocess

    prepare = preprocess.make_preprocess_fn(eval_preprocess(model_config["preprocess"]),
                                            int(model_config["image_size"][0]))
    example = prepare({"image": tf.constant(rgb), "texts": tf.constant([""]),
                       "_seed": tf.zeros([2], tf.int64)})
    return np.asarray(example["image"], np.float32)


def llava_answerer(model, model_config: dict, template: str | None = None,
                   tokenizer_path: str | None = None, max_new_tokens: int = 32):
    """An evals.generation.ImageQuestionAnswerer of a llava workdir's model, with the run's
    tokenizer (and special tokens) and chat template unless others are named."""
    import ml_collections

    from vlmjax.data import pipeline_config
    from vlmjax.evals.generation import ImageQuestionAnswerer

    tokenizer = pipeline_config.resolve_tokenizer(ml_collections.ConfigDict(dict(
        tokenizer=tokenizer_path or model_config["tokenizer"],
        special_tokens=[*model_config["special_tokens"], model_config["image_token"]])), [])
    return ImageQuestionAnswerer(model, tokenizer, template or model_config["template"],
                                 model_config["num_image_tokens"],
                                 max_new_tokens=max_new_tokens,
                                 image_token=model_config["image_token"])


def cot_answer(args: argparse.Namespace, answerer, params, images, out=None) -> str:
    """`--cot METHOD`: a LLaVA-CoT answer found by inference.cot's search, printed stage by
    stage with what the search cost."""
    searcher = cot.ModelCot(answerer, params, images, [args.prompt],
                            temperature=args.temperature, top_p=args.top_p,
                            max_stage_tokens=args.max_new_tokens, judging=args.judge)
    search = {"stage_beam": cot.stage_beam, "best_of_n": cot.best_of_n,
              "sentence_beam": cot.sentence_beam}[args.cot]
    text = search(searcher.sample, searcher.judge, keys=[0], num_beams=args.num_beams,
                  seed=args.seed)[0]
    out = out or sys.stdout
    stages = cot.parse_stages(text)
    for tag, stage_text in stages.items():
        out.write(f"{tag}: {stage_text}\n")
    if len(stages) < 4:
        out.write(f"(the answer is not four closed stages) {text}\n")
    out.write(f"[{args.cot}, {args.num_beams} beams: {searcher.generated_tokens} tokens "
              f"generated, judge prompts included]\n")
    out.flush()
    return text


def answer_about_image(args: argparse.Namespace, model, params, model_config, out=None) -> str:
    """A llava workdir's answer to `args.prompt` about `args.image` (None: no image)."""
    if args.strategy == "beam":
        raise ValueError("--strategy beam is not supported with a LLaVA model; use greedy or "
                         "sample")
    answerer = llava_answerer(model, model_config, args.template, args.tokenizer,
                              args.max_new_tokens)
    images = None if args.image is None else load_image(args.image, model_config)[None]
    if args.cot:
        return cot_answer(args, answerer, params, images, out)
    if args.strategy == "greedy":
        text = answerer.answer(params, images, [args.prompt])[0]
    else:
        text = answerer.answer(params, images, [args.prompt], strategy="sample",
                               temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, seed=args.seed)[0]
    out = out or sys.stdout
    out.write(text + "\n")
    out.flush()
    return text


def load_tokenizer(src: str, path: str | None):
    """(tokenizer, add_bos) of the model at `src`, or of the file `path`."""
    from vlmjax.data.tokenizers import load_model_tokenizer

    if path is not None:
        return load_model_tokenizer(path), False
    from vlmjax.convert import load_pretrained_tokenizer, read_pretrained
    from vlmjax.convert.tokenizer import open_tokenizer

    try:
        tokenizer, settings = load_pretrained_tokenizer(src)
        return tokenizer, bool(settings.get("add_bos"))
    except (FileNotFoundError, KeyError, TypeError, ValueError) as error:
        pretrained = read_pretrained(src)  # a trainer workdir: its data config's tokenizer
        settings, directory = pretrained.tokenizer, pretrained.tokenizer_dir
        if not settings or not settings.get("file") or directory is None:
            raise FileNotFoundError(f"{src} names no tokenizer ({error}); pass --tokenizer "
                                    "PATH (tokenizer.json or a SentencePiece .model)") from error
        return open_tokenizer(directory, settings), bool(settings.get("add_bos"))


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def stop_ids(src: str, tokenizer, model_config) -> list[int]:
    """EOS ids: the tokenizer's, the model config's and an HF generation_config.json's."""
    ids = _ids(tokenizer.eos_id) + _ids(model_config.get("eos_id"))
    path = os.path.join(src, "generation_config.json")
    if os.path.isfile(path):
        from vlmjax.convert import hf_io
        ids += _ids(hf_io.read_json(path).get("eos_token_id"))
    return sorted(set(ids))


class TextStream:
    """Prints the decoding of a growing token list, only ever appending."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out, self.printed = tokenizer, out or sys.stdout, ""

    def update(self, ids, final: bool = False) -> None:
        text = self.tokenizer.decode(np.asarray(ids))
        if not text.startswith(self.printed):  # a retokenised prefix: say it again, whole
            if final:
                self.out.write("\n" + text)
                self.printed = text
            return
        if text.endswith("\ufffd") and not final:  # an incomplete UTF-8 character
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def new_token_budget(args: argparse.Namespace) -> int:
    """--max_new_tokens, else 32 (96 per stage with --cot: a SUMMARY of vlm_shapes_cot is
    ~50 tokens, its longest stage ~67)."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    return 96 if args.cot else 32


def run(args: argparse.Namespace, out=None):
    """Generates for `args`, printing to `out` (stdout); returns (text, GenerateOutput)."""
    import jax

    args.max_new_tokens = new_token_budget(args)

    from vlmjax.convert import load_pretrained
    from vlmjax.inference import generate, generate_stream

    model, params, model_config = load_pretrained(args.model)
    if "num_image_tokens" in model_config:  # a llava workdir
        return answer_about_image(args, model, params, model_config, out), None
    if args.image is not None:
        raise ValueError(f"--image: {args.model} is not a `llava` workdir; only those answer "
                         "about an image here")
    if not hasattr(model, "init_cache"):
        raise ValueError(f"{args.model} holds a {type(model).__name__}, which does not generate "
                         "text; expected a decoder LM (HF Llama / Qwen2, or an `lm` workdir)")
    tokenizer, add_bos = load_tokenizer(args.model, args.tokenizer)
    add_bos = add_bos if args.add_bos is None else args.add_bos
    prompt = list(tokenizer.encode_raw([args.prompt])[0])
    if add_bos and tokenizer.bos_id is not None:
        prompt = [tokenizer.bos_id] + prompt
    if not prompt:
        raise ValueError("the prompt encodes to no tokens; give some text")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    kwargs = dict(max_new_tokens=args.max_new_tokens, strategy=args.strategy,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  eos_id=stop_ids(args.model, tokenizer, model_config) or None,
                  rng=jax.random.key(args.seed), pad_id=pad_id)
    tokens = np.asarray([prompt], np.int32)
    stream = TextStream(tokenizer, out)
    if args.strategy == "beam":
        result = generate(model, params, tokens, num_beams=args.num_beams,
                          length_penalty=args.length_penalty,
                          early_stopping=args.early_stopping, **kwargs)
    else:
        for result in generate_stream(model, params, tokens, chunk=args.chunk, **kwargs):
            stream.update(result.tokens[0, :int(result.lengths[0])])
    stream.update(result.tokens[0, :int(result.lengths[0])], final=True)
    stream.out.write("\n")
    stream.out.flush()
    return stream.printed, result


def main(argv: Sequence[str] | None = None) -> None:
    run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
