"""Pretrained weights: import CLIP / SigLIP checkpoints (Hugging Face directories, big_vision
`.npz`) as vlmjax TwoTowers params + model config, and HF LlamaForCausalLM / Qwen2ForCausalLM /
OPTForCausalLM as a `Decoder`; export them back to Hugging Face.

    model, params, model_config = load_pretrained("path/to/hf_dir" | "x.npz" | "converted_dir")
    export_hf(params, model_config, "out_dir")
    export_hf_decoder(params, model_config, "out_dir", dtype="bfloat16")  # decoder LMs
    recipe = pretrained_recipe("path/to/hf_dir")   # configs only: model config, image, tokenizer

CLI: `python -m vlmjax.convert import --from hf|big_vision SRC --out DIR`,
     `python -m vlmjax.convert export --to hf SRC OUT [--dtype bfloat16]`.
"""
from vlmjax.convert.cli import export_pretrained
from vlmjax.convert.hf_decoder_export import export_hf_decoder
from vlmjax.convert.hf_export import export_hf, hf_family
from vlmjax.convert.posemb import resize_posemb
from vlmjax.convert.recipe import Recipe, pretrained_recipe
from vlmjax.convert.pretrained import (import_pretrained, load_pretrained,
                                       load_pretrained_tokenizer, read_pretrained)

__all__ = ["export_hf", "export_hf_decoder", "export_pretrained", "hf_family",
           "import_pretrained", "load_pretrained", "load_pretrained_tokenizer",
           "pretrained_recipe", "read_pretrained", "Recipe", "resize_posemb"]
