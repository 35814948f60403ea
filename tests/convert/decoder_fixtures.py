"""Tiny random HF LlamaForCausalLM / Qwen2ForCausalLM directories, built offline, for parity tests.

    path = tiny_llama_dir(tmp_path_factory, kind="llama" | "llama3" | "qwen2", **config_overrides)

The weights are redrawn at O(1) scale (HF's init gives near-uniform logits that test little), the
model is saved with save_pretrained (float32 safetensors unless `dtype` / `max_shard_size` ask
otherwise) and a small word-piece BPE tokenizer.json + tokenizer_config.json go beside it.
Directories are cached per session and arguments, so tests may call this freely.
"""
import json
import os
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 256
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
WORDS = ("a photo of the red blue green cat dog car tree house small big on in with two three "
         "what is shape color square circle triangle left right above below yes no").split()
BASE_CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=128, rms_norm_eps=1e-6,
                   bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
# A short original context, so that llama3's smoothing touches several of the 8 frequencies.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
KINDS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(tie_word_embeddings=False, attention_bias=False,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(tie_word_embeddings=False, attention_bias=False,
                    rope_parameters=LLAMA3_ROPE)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(tie_word_embeddings=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}
_CACHE = {}


def hf_config(kind="llama", **overrides):
    """The transformers config of a tiny model of `kind`, with `overrides` applied."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {sorted(KINDS)}")
    config_cls, _, defaults = KINDS[kind]
    return config_cls(**{**BASE_CONFIG, **defaults, **overrides})


def redraw_weights(model, seed=0):
    """Matrices ~ N(0, 1/fan_in) (lm_head 6.25/fan_in), embeddings ~ N(0, 1/4), norm scales ~ U(0.5, 1.5), biases
    ~ N(0, 0.3^2): every tensor matters to the logits, and the logits are far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            elif "lm_head" in name:   # logits std ~2.5, as peaked as the tied qwen2 ones
                p.copy_(2.5 * torch.randn(p.shape, generator=generator) / np.sqrt(p.shape[1]))
            else:   # nn.Linear weight [out, in]
                p.copy_(torch.randn(p.shape, generator=generator) / np.sqrt(p.shape[1]))
    return model.eval()


def tiny_hf_model(kind="llama", seed=0, **overrides):
    """A fresh tiny random torch model (float32, eager attention) of `kind`."""
    _, model_cls, _ = KINDS[kind] if kind in KINDS else (None, None, None)
    config = hf_config(kind, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return redraw_weights(model_cls(config), seed)


def corpus(n=200, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def write_tokenizer(directory, add_bos=True):
    """A BPE tokenizer.json (ids: <unk> 0, <s> 1, </s> 2, <pad> 3) and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                   "unk_token": "<unk>", "add_bos_token": add_bos,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f)


def tiny_llama_dir(tmp_path_factory, kind="llama", *, seed=0, dtype=None, max_shard_size=None,
                   **overrides):
    """Path of a saved tiny random HF model of `kind` ("llama", "llama3" = llama with llama3
    RoPE scaling, "qwen2" = tied embeddings + q/k/v bias) with config `overrides`; `dtype`
    (e.g. torch.bfloat16) and `max_shard_size` (e.g. "20KB") change how the weights are saved."""
    key = (id(tmp_path_factory), kind, seed, str(dtype), max_shard_size,
           json.dumps(overrides, sort_keys=True, default=str))
    if key not in _CACHE:
        model = tiny_hf_model(kind, seed, **overrides)
        if dtype is not None:
            model = model.to(dtype)
        directory = str(tmp_path_factory.mktemp(f"{kind}_hf"))
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(directory, **kwargs)
        write_tokenizer(directory, add_bos=kind != "qwen2")
        _CACHE[key] = directory
    return _CACHE[key]


def load_hf(directory):
    """The saved model back in torch, float32, eager attention (the parity reference)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_logits(model, tokens, attention_mask=None):
    """transformers' float32 logits [B, L, V] as numpy for int tokens [B, L]."""
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def random_tokens(batch=2, length=12, seed=0):
    """Random ids [batch, length] int32 starting with BOS, avoiding the special ids."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(PAD_ID + 1, VOCAB, (batch, length)).astype(np.int32)
    tokens[:, 0] = BOS_ID
    return tokens
