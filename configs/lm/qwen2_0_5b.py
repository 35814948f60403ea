"""Continued pretraining of Qwen2-0.5B (or any HF Llama / Qwen2 causal LM) on your text.

    python -m vlmjax.train --workdir /ckpt/qwen2_cpt --config \
      'configs/lm/qwen2_0_5b.py:src=/ckpt/Qwen2-0.5B,data=tfds:c4/en,eval=validation'
    python -m vlmjax.convert export --to hf /ckpt/qwen2_cpt /ckpt/qwen2_cpt_hf

    # about a minute on a 2-core CPU: 2 steps of a tiny random HF model on vlm_shapes text
    python -m vlmjax.train --workdir /tmp/q --config \
      'configs/lm/qwen2_0_5b.py:runlocal,src=DIR' --config.data.data_dir=/tmp/tfds

src    an HF Qwen2ForCausalLM / LlamaForCausalLM directory (config.json, safetensors, tokenizer
       files) or a `python -m vlmjax.convert import` / `lm` workdir of one. config.model is its
       architecture (config files only: convert.hf_decoder_config), the tokenizer is its own
       (tokenizer.json; BOS as its tokenizer_config says: none for Qwen2), and model_init = src:
       the trainer streams the weights into the param shardings after checking every
       architecture field and shape.
data   'tfds:NAME' (a prepared TFDS text dataset, feature `text`; --config.data.text_key),
       paths / globs of .jsonl (field `text`) or plain-text files (one document a line), or ''
       = vlm_shapes' captions and question-answer pairs (built on first use). Evaluation:
       perplexity on vlm_shapes validation, or on held-out data named by eval=...: a TFDS split
       (data=tfds:c4/en,eval=validation) or held-out files (eval=/data/val-*.jsonl).
Presets: src=DIR, data=..., eval=..., steps=N, batch=N (rows), len=N (tokens a row), lr=X,
runlocal (2 steps on a tiny vlm_shapes build, float32).

Recipe (hyper-parameters, not measured here):
- rows of 4096 tokens, packed documents with an EOS each (Qwen2's <|endoftext|>, no BOS):
  Qwen2 was pretrained on 4,096-token sequences and only in its last phase on 32,768 (with the
  RoPE base raised to 1e6, which the imported config carries; Qwen2 technical report, Yang et
  al. 2024, arXiv:2407.10671), so 4096 keeps continued pretraining where most of its tokens
  were seen; raise len= for long-context data.
- 256 rows a step (about 1M tokens) and 10,000 steps (about 10B tokens).
- AdamW b1 0.9, b2 0.95, eps 1e-5, weight decay 0.1, gradient clipping 1.0, cosine decay to 10%
  of the peak: the Llama 2 pretraining settings (Touvron et al. 2023, arXiv:2307.09288,
  "Training Details"), common to Llama-family (continued) pretraining.
- peak lr 3e-5 after 500 warmup steps: continued pretraining re-warms to a fraction of the
  original peak (Gupta et al. 2023, arXiv:2308.04014; Ibrahim et al. 2024, arXiv:2403.08763);
  Qwen2 does not publish its 0.5B peak, so start here and check validation perplexity early
  (a rise over the first few hundred steps means lr too high for your data shift).
- bfloat16 compute, float32 parameters and optimiser state, full remat of the scanned layers.
Hardware: 8 accelerators of 16+ GB (one host of 8 A100/H100, a TPU v4-8 / v5e-8): FSDP over
all of them (mesh.fsdp=-1), 32 rows of 4096 tokens per device and step. Not run here: the
development machines of this repository have no released weights and no accelerators for this
size; the tiny runlocal preset (tests/train/test_lm_task.py) checks that step 0 is the imported
model exactly and that it trains.
"""
import os

import ml_collections
from ml_collections.config_dict import placeholder

from vlmjax.config import ConfigError, parse_preset_args


def _source(src: str) -> tuple[dict, dict]:
    """(Decoder arguments, tokenizer settings) of `src`, from its config files only."""
    from vlmjax.convert.decoder_pretrained import read_decoder_tokenizer_settings
    from vlmjax.convert.hf_decoder_config import INFO_KEYS
    from vlmjax.convert.pretrained import source_kind
    from vlmjax.train.tasks.lm import source_model_config

    if not src:
        raise ConfigError("configs/lm/qwen2_0_5b.py needs src=DIR: an HF Qwen2ForCausalLM / "
                          "LlamaForCausalLM directory or a `python -m vlmjax.convert import` "
                          "output, e.g. --config 'configs/lm/qwen2_0_5b.py:src=/ckpt/Qwen2-0.5B'")
    try:
        kind = source_kind(src)
        model = source_model_config(src)
        tokenizer = read_decoder_tokenizer_settings(src, kind)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"src={src}: {error}") from error
    if tokenizer is None:
        raise ConfigError(f"src={src} has no tokenizer file (tokenizer.json / tokenizer.model); "
                          "training needs the model's own tokenizer")
    model = {k: v for k, v in model.items() if k not in (*INFO_KEYS, "dtype", "scan_layers")}
    tokenizer = dict(tokenizer, path=os.path.join(src, tokenizer["file"]))
    return model, tokenizer


def _data(data: str, held_out: str, batch_size: int) -> tuple[dict, str, dict]:
    """(config.data, input.documents, config.evals) for the `data=` and `eval=` presets."""
    def perplexity(eval_data):
        return dict(type="perplexity", data=eval_data, batch_size=batch_size, every=1000)
    if data in ("", "vlm_shapes"):
        return (dict(source="vlm_shapes", split="train", config="64px", data_dir=placeholder(str)),
                "texts_as_documents|qa_documents",
                dict(validation=perplexity(dict(split="validation"))))
    if data.startswith("tfds:"):
        train = dict(source="tfds", name=data[len("tfds:"):], split="train",
                     data_dir=placeholder(str), text_key="text")
        eval_data = dict(split=held_out)
    else:
        train = dict(source="text_file", paths=data, text_field="text", format="auto")
        eval_data = dict(paths=held_out)
    return train, "texts_as_documents", ({"held_out": perplexity(eval_data)} if held_out else {})


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, src="", data="", eval="", steps=10_000,
                             batch=256, len=4096, lr=3e-5)
    model, tokenizer = _source(str(args.src))
    c = ml_collections.ConfigDict()
    c.task = "lm"
    c.seed = 0
    c.total_steps = args.steps
    c.model = dict(model, remat="full", scan_layers=True, dtype="bfloat16")
    c.model_init = str(args.src)
    c.loss = dict(chunk_size=512, z_loss=0.0, label_smoothing=0.0)
    c.data, documents, c.evals = _data(str(args.data), str(args.eval), batch_size=64)
    c.input = dict(global_batch_size=args.batch, max_len=args.len, pack=True,
                   add_bos=bool(tokenizer["add_bos"]), add_eos=True, documents=documents,
                   tokenizer=tokenizer["path"], special_tokens=[], shuffle_buffer=50_000,
                   seed=0, prefetch_batches=4)
    c.optim = dict(name="adamw", lr=args.lr, schedule="cosine",
                   warmup_steps=min(500, args.steps // 10), end_lr=args.lr / 10,
                   weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-5, clip_norm=1.0)
    c.data_shards = 0  # input streams; 0 = the process count of the first run (see README)
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.log_every = 50
    c.checkpoint = dict(every=1000, keep=2)
    c.nonfinite = "skip"
    c.peak_flops = 0.0
    if args.runlocal:
        c.total_steps = 2
        c.model.update(dtype="float32", remat="none", scan_layers=False)
        if c.data.source == "vlm_shapes":
            c.data.config = "32px"
            c.data.train_size, c.data.eval_size, c.data.novel_size = 64, 16, 8
            c.evals = dict(validation=dict(type="perplexity", data=dict(split="validation"),
                                           batch_size=8, max_batches=2))
        c.input.global_batch_size = 8
        c.input.max_len = 64
        c.input.shuffle_buffer = 64
        c.input.prefetch_batches = 1
        c.optim.warmup_steps = 1  # step 1 at lr 0: checkpoint 1 holds the imported params
        c.mesh = dict(data=-1, fsdp=1, tensor=1)
        c.log_every = 1
        c.checkpoint = dict(every=1, keep=3)
        c.peak_flops = 1e11  # skip the matmul measurement
    return c
