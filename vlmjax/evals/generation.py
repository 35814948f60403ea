"""Answers to questions about images from a LLaVA-style model (PrefixLM): what the `vqa` and
`captioning` evaluators need of a generative model, and what the `llava` task puts in
`EvalContext.model`.

    answerer = ImageQuestionAnswerer(model, tokenizer, "vicuna_v1", num_image_tokens=576,
                                     mesh=mesh, max_new_tokens=16)
    answerer.answer(params, images, ["What colour is the circle?", ...])   # -> ["red", ...]

Prompts are the training prompts (vlmjax.data.conversations.encode_prompts: one user turn with
the image at its start, then the assistant prefix, tokenised segment by segment as in training).
Decoding is greedy and stops at the tokenizer's EOS and at the template's end-of-turn token
where that is one token of the tokenizer (`<|im_end|>`, `<|eot_id|>`); a text end of turn
(plain's "\\n") cuts the decoded text. Every generate call has the same batch size (`batch_size`,
or the first call's, rounded up to a multiple of the mesh's devices): short calls are padded
with copies of their first row and long ones are split, so that a new number of questions never
recompiles; prompts are left-padded and generate buckets their length.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import jax
import numpy as np

from vlmjax.data import conversations
from vlmjax.inference import generate


def stop_ids(tokenizer, template) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS and the template's end-of-turn token when
    the tokenizer has it as one token."""
    template = conversations.get_template(template)
    ids = [] if tokenizer.eos_id is None else [int(tokenizer.eos_id)]
    end = template.end_of_turn
    if not template.end_of_turn_is_eos and end in tokenizer.special_tokens:
        ids.append(int(tokenizer.special_tokens[end]))
    return sorted(set(ids))


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [B, L], prompt mask bool [B, L]) with every prompt ending at the last
    column, so that the new tokens of all rows start at the same column."""
    length = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, ids in enumerate(prompts):
        tokens[row, length - len(ids):] = ids
        mask[row, length - len(ids):] = True
    return tokens, mask


class ImageQuestionAnswerer:
    """Greedy answers of `model` (anything `vlmjax.inference.generate` runs, taking `images`) to
    questions about images; see the module docstring.

    Args:
      model, tokenizer: the PrefixLM and the tokenizer it was trained with (its special tokens
        include `image_token` when there are images).
      template: the chat template of training (conversations.TEMPLATES name or Template).
      num_image_tokens: visual tokens per image (the model's `image_token_id` repeated so often).
      mesh: generate under this mesh (params placed on it); None: the default device.
      max_new_tokens: the longest answer, unless a call asks otherwise.
      batch_size: rows per generate call (None: the first call's number of questions).
      image_token: the image marker text of the tokenizer and the template.
    """

    def __init__(self, model, tokenizer, template, num_image_tokens: int, mesh=None,
                 max_new_tokens: int = 16, batch_size: int | None = None,
                 image_token: str = "<image>"):
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.template = conversations.get_template(template)
        self.num_image_tokens, self.image_token = int(num_image_tokens), image_token
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = None if batch_size is None else self._device_multiple(batch_size)
        self.eos_ids = stop_ids(tokenizer, self.template)
        self.pad_id = 0 if tokenizer.pad_id is None else int(tokenizer.pad_id)

    def _device_multiple(self, rows: int) -> int:
        devices = 1 if self.mesh is None else self.mesh.size
        return -(-max(int(rows), 1) // devices) * devices

    def prompts(self, questions: Sequence[str], with_images: bool) -> list[list[int]]:
        """The prompt ids of each question (one image each when `with_images`)."""
        return conversations.encode_prompts(
            list(questions), self.tokenizer, self.template, image_token=self.image_token,
            num_image_tokens=self.num_image_tokens, num_images=1 if with_images else 0)

    def answer(self, params, images, questions: Sequence[str],
               max_new_tokens: int | None = None, strategy: str = "greedy", seed: int = 0,
               **sampling) -> list[str]:
        """The answer text to each question, about the image of the same row.

        images: float32 [B, H, W, 3], preprocessed as the model's training input, or None (no
        image). questions: B strings. strategy 'sample' takes generate's temperature, top_k and
        top_p (`sampling`) and `seed`."""
        questions = list(questions)
        if images is not None and len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions; give one "
                             "image per question")
        if not questions:
            return []
        if self.batch_size is None:
            self.batch_size = self._device_multiple(len(questions))
        prompts = self.prompts(questions, images is not None)
        new_tokens = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        answers = []
        for start in range(0, len(questions), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            answers += self._generate(params, None if images is None else images[chunk],
                                      prompts[chunk], new_tokens, strategy=strategy,
                                      rng=jax.random.key(seed + start), **sampling)
        return answers

    def _generate(self, params, images, prompts: list[list[int]], new_tokens: int,
                  **options) -> list[str]:
        real, rows = len(prompts), self.batch_size
        prompts = prompts + [prompts[0]] * (rows - real)  # padding rows: copies of the first
        tokens, mask = left_padded(prompts, self.pad_id)
        if images is not None:
            images = np.asarray(images, np.float32)
            images = np.concatenate([images, np.repeat(images[:1], rows - real, axis=0)])
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            out = generate(self.model, params, tokens, images=images, prompt_mask=mask,
                           max_new_tokens=new_tokens, **options,
                           eos_id=self.eos_ids or None, pad_id=self.pad_id)
        new, lengths = jax.device_get((out.tokens, out.lengths))
        return [self.decode(new[row, :int(lengths[row])]) for row in range(real)]

    def decode(self, ids) -> str:
        """The text of generated ids: up to the first stop id, cut at a text end of turn,
        stripped."""
        ids = [int(i) for i in ids]
        stops = [n for n, i in enumerate(ids) if i in self.eos_ids]
        ids = ids[:stops[0]] if stops else ids
        # The model's vocabulary may be padded past the tokenizer's (a multiple of 64, say): a
        # padding id has no text, and an undertrained model can still emit one.
        text = self.tokenizer.decode([i for i in ids if 0 <= i < self.tokenizer.vocab_size])
        end = self.template.end_of_turn
        if end and not self.template.end_of_turn_is_eos:  # e.g. plain's "\n": one line
            text = text.split(end)[0]
        return text.strip()
