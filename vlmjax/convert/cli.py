"""`python -m vlmjax.convert`: import pretrained checkpoints, export them to Hugging Face.

  python -m vlmjax.convert import --from hf HF_DIR --out DIR [--image-size 384] [--overwrite]
  python -m vlmjax.convert import --from big_vision X.npz --out DIR [--tokenizer spiece.model]
  python -m vlmjax.convert export --to hf SRC OUT     # SRC: converted DIR, HF dir, .npz,
                                                      # trainer WORKDIR (latest checkpoint) or
                                                      # WORKDIR/checkpoints/<step>
Decoder LMs (HF LlamaForCausalLM / Qwen2ForCausalLM / OPTForCausalLM, their converted DIRs, `lm`
workdirs) use the same commands; `export --dtype bfloat16` writes their weights in bfloat16.
LLaVA: `export` takes a `llava` trainer WORKDIR (a ViT vision tower: HF LLaVA holds CLIP or
SigLIP vision models, not the tiny CNN) or an HF LlavaForConditionalGeneration directory (e.g.
to bfloat16) and writes an HF LLaVA directory. HF LLaVA directories need no `import`: vlmjax
reads them as they are (load_pretrained, config.model_init, `python -m vlmjax.generate`).
BLIP: HF BlipForImageTextRetrieval / BlipForConditionalGeneration directories need no `import`
either; `export` of one writes the same HF class again (e.g. to bfloat16, convert.hf_blip_export).
BLIP-2: HF Blip2ForConditionalGeneration directories need no `import`; `export` of one writes it
again (convert.hf_blip2_export).
Idefics v1: HF IdeficsForVisionText2Text directories need no `import` either; `export` of one
writes it again (convert.hf_idefics_export).
`export` of a `blip` trainer WORKDIR writes each part the run has as its HF class: OUT itself for
one part, OUT/BlipForImageTextRetrieval and OUT/BlipForConditionalGeneration for both (HF splits
BLIP in two); the ViT must be HF's (a patch stem).
"""
from __future__ import annotations

import argparse
import os
import sys

from vlmjax.convert import (blip_workdir, decoder_pretrained as decoder_lib, hf_align, hf_blip,
                            hf_blip2, hf_idefics, hf_io, hf_llava, llava_workdir,
                            tokenizer as tok)
from vlmjax.convert.hf_align_export import export_hf_align
from vlmjax.convert.hf_blip2_export import export_hf_blip2
from vlmjax.convert.hf_blip_export import export_hf_blip
from vlmjax.convert.hf_decoder_export import EXPORT_DTYPES
from vlmjax.convert.hf_export import export_hf
from vlmjax.convert.hf_idefics_export import export_hf_idefics
from vlmjax.convert.hf_llava_export import export_hf_llava
from vlmjax.convert.pretrained import (import_pretrained, load_pretrained, read_pretrained,
                                       source_kind)
from vlmjax.convert.workdir import preprocessor_config


def is_llava(src: str, kind: str) -> bool:
    if kind == "hf":
        return hf_llava.is_llava_source(src)
    return kind == "trainer" and llava_workdir.is_llava_workdir(src)


def export_llava(src: str, kind: str, out_dir: str, dtype: str) -> str:
    """An HF LLaVA directory or a `llava` workdir -> HF LLaVA directory; returns 'llava'."""
    model, params, model_config = load_pretrained(src)
    if model.vision_arch != "vit":
        raise ValueError(f"{src}: its vision tower is vision_arch={model.vision_arch!r}; HF LLaVA "
                         "holds a CLIP or SigLIP ViT, so only runs with vision_arch 'vit' export "
                         "(this one loads with load_pretrained and python -m vlmjax.generate)")
    if kind == "hf":  # its tokenizer and processor files come along
        export_hf_llava(model_config, params, out_dir, dtype, tokenizer_dir=src)
    else:
        export_hf_llava(model, params, out_dir, dtype)
        print(f"note: {src} trains with the tokenizer {model_config['tokenizer']}; {out_dir} has "
              "no tokenizer files", file=sys.stderr)
    return "llava"


def is_blip(src: str, kind: str) -> bool:
    if kind == "trainer":
        return blip_workdir.is_blip_workdir(src)
    return kind == "hf" and hf_blip.is_blip_source(src)


def export_blip(src: str, kind: str, out_dir: str, dtype: str) -> str:
    """An HF BLIP directory -> the same HF class in `out_dir` (with its tokenizer and
    processor files); a `blip` workdir -> one HF class per part (see the module docstring);
    returns 'blip'."""
    if kind == "hf":
        _, params, model_config = load_pretrained(src)
        export_hf_blip(model_config, params, out_dir, dtype=dtype, tokenizer_dir=src)
        return "blip"
    run = blip_workdir.load_blip_workdir(src)
    parts = tuple(run.task.model.parts)
    for architecture, part in hf_blip.ARCHITECTURES.items():
        if part in parts:
            where = out_dir if len(parts) == 1 else os.path.join(out_dir, architecture)
            export_hf_blip(blip_workdir.model_config(run), run.params, where, architecture,
                           dtype, token_ids=blip_workdir.hf_token_ids(run.task.token_ids))
            print(f"wrote {architecture} -> {where}", file=sys.stderr)
    print(f"note: {src} trains with the tokenizer {run.config.input.tokenizer} (special tokens "
          f"{list(run.config.input.get('special_tokens', []))}); {out_dir} has no tokenizer "
          "files", file=sys.stderr)
    return "blip"


def export_pretrained(src: str, out_dir: str, dtype: str = "float32") -> str:
    """Any pretrained source (a trainer workdir or checkpoint directory too) -> HF directory
    with its tokenizer files and, for two towers, an image processor config; returns the
    family. `dtype` (float32 / bfloat16 / float16) applies to decoder LMs and LLaVA."""
    kind = source_kind(src)
    if is_llava(src, kind):
        return export_llava(src, kind, out_dir, dtype)
    if is_blip(src, kind):
        return export_blip(src, kind, out_dir, dtype)
    if kind == "hf" and hf_blip2.is_blip2_source(src):  # e.g. to bfloat16
        _, params, model_config = load_pretrained(src)
        export_hf_blip2(model_config, params, out_dir, dtype, tokenizer_dir=src)
        return "blip-2"
    if kind == "hf" and hf_idefics.is_idefics_source(src):  # e.g. to bfloat16
        _, params, model_config = load_pretrained(src)
        export_hf_idefics(model_config, params, out_dir, dtype, tokenizer_dir=src)
        return "idefics"
    if decoder_lib.is_decoder_source(src, kind):
        return decoder_lib.export_decoder(src, kind, out_dir, dtype)
    if dtype != "float32":
        raise ValueError(f"{src}: only decoder LMs export in {dtype}; CLIP / SigLIP export "
                         "float32")
    pretrained = read_pretrained(src)
    if hf_align.is_align_model(pretrained.model_config):  # writes its own image processor
        family = export_hf_align(pretrained.params, pretrained.model_config, out_dir,
                                 token_ids=pretrained.tokenizer, image=pretrained.image)
    else:
        family = export_hf(pretrained.params, pretrained.model_config, out_dir,
                           token_ids=pretrained.tokenizer)
    if pretrained.tokenizer_dir is not None:
        tok.copy_tokenizer_files(pretrained.tokenizer_dir, pretrained.tokenizer, out_dir)
    else:
        print(f"note: {src} names no tokenizer file that exists here; {out_dir} has none",
              file=sys.stderr)
    processor = os.path.join(out_dir, "preprocessor_config.json")
    if not os.path.exists(processor):
        hf_io.write_json(processor, preprocessor_config(family, pretrained.image))
    return family


def image_size_arg(text: str) -> list[int]:
    """'384' -> [384, 384]; '256x384' -> [256, 384] (H x W)."""
    try:
        sizes = [int(s) for s in text.lower().split("x")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"image size {text!r} is not N or HxW")
    return sizes * 2 if len(sizes) == 1 else sizes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmjax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="HF dir / big_vision .npz -> converted DIR")
    imp.add_argument("--from", dest="kind", choices=["hf", "big_vision"], required=True)
    imp.add_argument("src")
    imp.add_argument("--out", required=True)
    imp.add_argument("--image-size", type=image_size_arg, default=None,
                     help="resize the image position embedding for this resolution (N or HxW)")
    imp.add_argument("--tokenizer", default=None,
                     help="SentencePiece .model to go with a big_vision checkpoint")
    imp.add_argument("--overwrite", action="store_true")
    exp = commands.add_parser("export", help="trainer WORKDIR[/checkpoints/STEP], converted DIR "
                              "(or HF dir / .npz) -> HF dir")
    exp.add_argument("--to", choices=["hf"], required=True)
    exp.add_argument("src")
    exp.add_argument("out")
    exp.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32",
                     help="weight dtype of an exported decoder LM, LLaVA, BLIP, BLIP-2 or "
                     "Idefics")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        if args.command == "import":
            if args.kind == "hf" and os.path.isdir(args.src) and is_llava(args.src, "hf"):
                raise ValueError(f"{args.src} is an HF LLaVA model: it needs no import, vlmjax "
                                 "reads it as it is (load_pretrained, config.model_init=DIR, "
                                 "python -m vlmjax.generate --model DIR)")
            if args.kind == "hf" and os.path.isdir(args.src) and is_blip(args.src, "hf"):
                raise ValueError(f"{args.src} is an HF BLIP model: it needs no import, vlmjax "
                                 "reads it as it is (load_pretrained)")
            if args.kind == "hf" and os.path.isdir(args.src) and hf_blip2.is_blip2_source(
                    args.src):
                raise ValueError(f"{args.src} is an HF BLIP-2 model: it needs no import, vlmjax "
                                 "reads it as it is (load_pretrained)")
            if args.kind == "hf" and os.path.isdir(args.src) and hf_idefics.is_idefics_source(
                    args.src):
                raise ValueError(f"{args.src} is an HF Idefics model: it needs no import, "
                                 "vlmjax reads it as it is (load_pretrained)")
            config = import_pretrained(args.src, args.out, args.kind, args.image_size,
                                       args.tokenizer, args.overwrite)
            model = config["model"]
            if config.get("architecture") == decoder_lib.ARCHITECTURE:
                print(f"imported {args.src} ({model['model_type']}, {model['depth']} layers, "
                      f"width {model['width']}, vocab {model['vocab_size']}, tokenizer "
                      f"{(config['tokenizer'] or {}).get('file')}) -> {os.path.abspath(args.out)}")
                return
            print(f"imported {args.src} ({config['source']['family']}, image "
                  f"{config['image']['size']}, embed_dim {model['embed_dim']}, tokenizer "
                  f"{(config['tokenizer'] or {}).get('file')}) -> {os.path.abspath(args.out)}")
        else:
            family = export_pretrained(args.src, args.out, args.dtype)
            print(f"exported {args.src} -> {os.path.abspath(args.out)} ({family})")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
