"""Few-shot answers of a Flamingo-style model (FusionLM): each question about an image comes
after k in-context examples, as interleaved chunks (as data/interleaved.vqa_text writes them):

    <image>Q: q1 A: a1<|endofchunk|> ... <image>Q: q A:

    answerer = InterleavedAnswerer(model, tokenizer, mesh=mesh, max_new_tokens=8)
    answerer.answer(params, images, questions)                          # 0-shot
    answerer.answer(params, images, questions, context=[[(img, q, a), ...], ...])  # k-shot

What the `vqa` evaluator's `shots` need of `context.model` (evals/vqa.py). Ids are built as in
training (data/interleaved.py: text runs tokenised one by one, the model's marker ids between);
decoding is greedy and stops at the end-of-chunk token and at EOS. Batching, padding rows and
left padding are ImageQuestionAnswerer's.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from vlmjax.data import interleaved
from vlmjax.evals.generation import ImageQuestionAnswerer


class InterleavedAnswerer(ImageQuestionAnswerer):
    supports_context = True  # the vqa evaluator's `shots`

    def __init__(self, model, tokenizer, mesh=None, max_new_tokens: int = 16,
                 batch_size: int | None = None):
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = None if batch_size is None else self._device_multiple(batch_size)
        self.image_id, self.end_id = int(model.image_token_id), int(model.end_of_chunk_id)
        self.eos_ids = sorted({self.end_id} | ({int(tokenizer.eos_id)}
                                               if tokenizer.eos_id is not None else set()))
        self.pad_id = 0 if tokenizer.pad_id is None else int(tokenizer.pad_id)

    def prompt(self, question: str, shots: Sequence[tuple]) -> list[int]:
        """The ids of one query after its (image, question, answer) examples."""
        image, end = interleaved.Marker(interleaved.IMAGE), interleaved.Marker(
            interleaved.END_OF_CHUNK)
        segments = []
        for _, shot_question, shot_answer in shots:
            segments += [image, interleaved.vqa_text(shot_question, shot_answer), end]
        segments += [image, interleaved.vqa_text(question)]
        return interleaved.encode_segments(segments, self.tokenizer, self.image_id, self.end_id,
                                           add_eos=False)[0]

    def answer(self, params, images, questions: Sequence[str], max_new_tokens: int | None = None,
               context: Sequence[Sequence[tuple]] | None = None, **options) -> list[str]:
        """The answer to each question about the image of its row (float32 [B, S, S, 3],
        preprocessed as in training), after its row's `context` examples (every row the same
        number; None: 0-shot). `options` go to generate (greedy unless they give a strategy,
        e.g. strategy="beam", num_beams=3)."""
        questions = list(questions)
        context = [[] for _ in questions] if context is None else [list(c) for c in context]
        if len(images) != len(questions) or len(context) != len(questions):
            raise ValueError(f"{len(images)} images and {len(context)} contexts for "
                             f"{len(questions)} questions: give one of each per question")
        if len({len(c) for c in context}) > 1:
            raise ValueError("every question needs the same number of in-context examples")
        if not questions:
            return []
        if self.batch_size is None:
            self.batch_size = self._device_multiple(len(questions))
        prompts = [self.prompt(q, shots) for q, shots in zip(questions, context)]
        all_images = np.stack([np.stack([shot[0] for shot in shots] + [image]) for image, shots
                               in zip(np.asarray(images, np.float32), context)])
        new_tokens = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        answers = []
        for start in range(0, len(questions), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            answers += self._generate(params, all_images[chunk], prompts[chunk], new_tokens,
                                      rng=jax.random.key(start),
                                      **{"strategy": "greedy", **options})
        return answers

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        stops = [n for n, i in enumerate(ids) if i in self.eos_ids]
        ids = ids[:stops[0]] if stops else ids
        return self.tokenizer.decode([i for i in ids if 0 <= i < self.tokenizer.vocab_size
                                      and i not in (self.image_id, self.end_id)]).strip()
