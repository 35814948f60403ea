"""What the evaluators need of a BLIP model (models/blip.py), as the `blip` task's
`EvalContext.model`: ITC features (zero_shot, retrieval), ITM scores (itm, retrieval's
re-ranking) and captions (captioning).

    model = BlipEvalModel(blip, tokenizer, mesh, token_ids={"enc": .., "dec": ..})
    model.images(params, batches) / model.texts(params, ids, mask, batch_size)   # ITC, [N, D]
    model.itm_scores(params, images, ids, mask)          # [N]: logit(match) - logit(no match)
    model.itc_logit_scale(params)                        # 1 / the ITC temperature
    model.answer(params, images, prompts, max_new_tokens)  # greedy captions (prompts ignored;
                                                           # strategy="beam", num_beams=N: beams)
    model.caption(params, images, prompt=None, top_p=0.9, rng=key)  # nucleus-sampled captions

Texts arrive tokenised as in training (`[CLS] caption [SEP]`); ITM reads them with [ENC] first.
Captions are greedy from `[DEC] + caption_prompt` (BLIP's captioner: "a picture of"; "" = none,
the vlmjax tiny recipe's) and stop at EOS ([SEP]); the prompt is not part of the returned text.
`caption` is the same with another prompt and, given `top_p` and `rng`, nucleus sampling (BLIP's
CapFilt captioner: top_p 0.9); a batch draws with fold_in(rng, batch number).
Batches are padded to a fixed multiple of the devices so that a new count does not recompile.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax import sharding
from vlmjax.evals import embed
from vlmjax.inference import generate

DEFAULT_BATCH = 64


class BlipEvalModel(embed.TwoTowerEncoders):
    def __init__(self, model, tokenizer, mesh, token_ids: dict, *, caption_prompt: str = "",
                 batch_size: int = DEFAULT_BATCH):
        replicated = sharding.replicated(mesh)
        encode_image = jax.jit(lambda params, b: model.apply(
            {"params": params}, b["image"], method=model.encode_image), out_shardings=replicated)
        encode_text = jax.jit(lambda params, b: model.apply(
            {"params": params}, b["text"], b["text_mask"], method=model.encode_text),
            out_shardings=replicated)
        super().__init__(encode_image, encode_text, mesh)
        self.model, self.tokenizer, self.token_ids = model, tokenizer, dict(token_ids)
        self.caption_prompt = caption_prompt
        self.batch_size = embed.device_multiple(batch_size, mesh)

        def itm(params, b):
            tokens = b["text"].at[:, 0].set(self.token_ids["enc"])
            logits = model.apply({"params": params}, b["image"], tokens, b["text_mask"],
                                 method=model.itm_logits)
            return logits[:, 1] - logits[:, 0]
        self._itm = jax.jit(itm, out_shardings=replicated)
        self._features = jax.jit(lambda params, images: model.apply(
            {"params": params}, images, method=model.image_features))

    def itm_scores(self, params, images: np.ndarray, ids: np.ndarray,
                   mask: np.ndarray) -> np.ndarray:
        """[N] ITM score of each (image, text) row: > 0 means 'match'."""
        arrays = {"image": np.asarray(images, np.float32), "text": np.asarray(ids, np.int32),
                  "text_mask": np.asarray(mask, bool)}
        return embed.embed_all(lambda b: self._itm(params, b), arrays, self.batch_size,
                               self.mesh).reshape(-1)

    def itc_logit_scale(self, params) -> float:
        """1 / the model's (clamped) ITC temperature: an ITC similarity times it is the
        contrastive loss's logit (retrieval's `rerank_itc="logit"`)."""
        return 1.0 / float(self.model.apply({"params": params}, method=self.model.temperature))

    def _prompt(self, prompt: str | None = None) -> list[int]:
        prompt = self.caption_prompt if prompt is None else prompt
        words = self.tokenizer.encode_raw([prompt])[0] if prompt else []
        return [int(self.token_ids["dec"]), *map(int, words)]

    def answer(self, params, images, prompts: Sequence[str] = (),
               max_new_tokens: int = 32, strategy: str = "greedy",
               num_beams: int = 1) -> list[str]:
        """Captions of `images` [N, H, W, 3], greedy or (strategy "beam") by beam search;
        `prompts` are ignored (BLIP's captioner has one prompt, `caption_prompt`)."""
        del prompts
        if strategy not in ("greedy", "beam"):
            raise ValueError(f"BlipEvalModel.answer: strategy {strategy!r} is not 'greedy' or "
                             "'beam' (caption() samples)")
        return self.caption(params, images, max_new_tokens=max_new_tokens,
                            num_beams=num_beams if strategy == "beam" else 1)

    def caption(self, params, images, *, prompt: str | None = None, max_new_tokens: int = 32,
                top_p: float | None = None, temperature: float = 1.0, rng=None,
                num_beams: int = 1) -> list[str]:
        """Captions of `images` [N, H, W, 3] after `[DEC] + prompt` (None: `caption_prompt`),
        without the prompt. Greedy unless `top_p` is given: then sampled at `temperature` from
        the nucleus `top_p`, batch b (of `batch_size` rows) with fold_in(rng, b), so the same
        rng, images and batch size give the same captions; or `num_beams` > 1: beam search
        (transformers' semantics, vlmjax.inference.beam)."""
        if top_p is not None and rng is None:
            raise ValueError("caption: nucleus sampling (top_p) needs an rng")
        if top_p is not None and num_beams > 1:
            raise ValueError("caption: give top_p (sampling) or num_beams > 1 (beam search), "
                             "not both")
        sampling = ({} if top_p is None else
                    dict(strategy="sample", top_p=float(top_p), temperature=float(temperature)))
        if num_beams > 1:
            sampling = dict(strategy="beam", num_beams=int(num_beams))
        images = np.asarray(images, np.float32)
        prompt_ids = np.asarray([self._prompt(prompt)], np.int32)
        eos = self.tokenizer.eos_id
        texts = []
        for number, start in enumerate(range(0, len(images), self.batch_size)):
            chunk = embed.pad_batch({"image": images[start:start + self.batch_size]},
                                    self.batch_size)
            embeds = self._features(params, jnp.asarray(chunk["image"]))
            if top_p is not None:
                sampling["rng"] = jax.random.fold_in(rng, number)
            out = generate(self.model, params, np.repeat(prompt_ids, self.batch_size, axis=0),
                           max_new_tokens=max_new_tokens, eos_id=eos, image_embeds=embeds,
                           decode_inputs={"image_embeds": embeds}, prompt_buckets=None,
                           **sampling)
            tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
            for row in np.flatnonzero(chunk["_mask"]):
                # Ids past the tokenizer's (a model vocabulary rounded up) name no text.
                ids = [int(t) for t in tokens[row, :lengths[row]]
                       if int(t) != eos and 0 <= int(t) < self.tokenizer.vocab_size]
                texts.append(self.tokenizer.decode(ids).strip())
        return texts
