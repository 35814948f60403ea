"""Reference side of the parity tests: tiny random HF CLIPModel / SiglipModel configs, their
tokenizers, transformers' outputs, and the same quantities computed by vlmjax."""
import io
import json
import os
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = ("a photo of the red blue green cat dog car tree house small big on in with two "
         "three").split()
VOCAB = 64
CLIP_BOS, CLIP_EOS = VOCAB - 2, VOCAB - 1   # as in CLIP: <|endoftext|> is the highest id
CLIP_LEN, SIGLIP_LEN = 16, 12
IMAGE, PATCH = 30, 6                         # a 5 x 5 patch grid
CLIP_CONFIG = dict(
    text_config=dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=CLIP_LEN,
                     bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=CLIP_EOS),
    vision_config=dict(hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                       num_attention_heads=4, image_size=IMAGE, patch_size=PATCH),
    projection_dim=20)
SIGLIP_CONFIG = dict(
    text_config=dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=SIGLIP_LEN,
                     projection_size=32, pad_token_id=1, eos_token_id=1, bos_token_id=None),
    vision_config=dict(hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                       num_attention_heads=4, image_size=IMAGE, patch_size=PATCH))
SIGLIP_LOGIT_SCALE, SIGLIP_LOGIT_BIAS = float(np.log(12.3)), -3.7
CLIP_LOGIT_SCALE = float(np.log(31.0))


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def perturb(model, seed):
    """HF init leaves LayerNorms at 1/0 and biases at 0; perturb every tensor so that a
    mis-mapped one shows up in the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def write_clip_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = ["<unk>"] + WORDS
    vocab += [f"filler{i}" for i in range(CLIP_BOS - len(vocab))]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", CLIP_BOS), ("<|endoftext|>", CLIP_EOS)])
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "unk_token": "<unk>",
                   "model_max_length": CLIP_LEN}, f)


def write_siglip_tokenizer(directory):
    """A SentencePiece model with SigLIP's (c4_en) layout: pad 0, eos 1, unk 2, no BOS."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, vocab_size=60, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
        num_threads=1)
    with open(os.path.join(directory, "spiece.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
                   "model_max_length": SIGLIP_LEN}, f)


def hf_outputs(model, images, ids, mask=None):
    """transformers' image/text embeddings and logits_per_image, as float32 numpy."""
    attention_mask = None if mask is None else torch.from_numpy(mask.astype(np.int64))
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids),
                    pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                    attention_mask=attention_mask)
    return {"image": out.image_embeds.numpy(), "text": out.text_embeds.numpy(),
            "logits": out.logits_per_image.numpy()}


def vlmjax_outputs(model, params, images, ids, mask=None):
    """The same quantities from a vlmjax TwoTowers model."""
    variables = {"params": params}
    zimg = np.asarray(model.apply(variables, images, method=model.encode_image))
    ztxt = np.asarray(model.apply(variables, ids.astype(np.int32), mask, method=model.encode_text))
    _, _, scalars = model.apply(variables)
    logits = zimg @ ztxt.T * float(scalars["temperature"]) + float(scalars.get("bias", 0.0))
    return {"image": zimg, "text": ztxt, "logits": logits}


def max_abs_diffs(ours, reference):
    return {k: float(np.max(np.abs(ours[k] - reference[k]))) for k in reference}
