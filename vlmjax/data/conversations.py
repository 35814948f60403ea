"""Chat templates and label masks for instruction data (LLaVA), tokenised segment by segment.

    enc = encode_conversation(turns, tokenizer, "vicuna_v1", max_len=2048, num_image_tokens=576)
    enc.tokens, enc.targets, enc.loss_mask, enc.mask    # [max_len] each (int32 / bool)
    enc.skip_reason                                     # None, or why the sample is not trained on
    enc.truncated                                       # True: tokens past max_len were cut
    text = render_conversation(turns, "chatml")         # the template's text (one <image> each)

`turns` are LLaVA JSON turns `[{"from": "human" | "gpt", "value": ...}]` (also "user" /
"assistant", `role` / `content` keys, a leading "system" turn that replaces the template's system
prompt, or the JSON text of such a list). Leading assistant turns are dropped (as LLaVA does).

Templates (`TEMPLATES`), written offline from their sources:
  plain      LLaVA stage 1 (`conv_llava_plain`, `preprocess_plain`): the images, then each answer
             and "\n"; the user's text is dropped. A tokenizer that encodes "\n" as no ids (the
             vlm_shapes SentencePiece model) ends answers with its EOS id instead.
  blip2      plain with the user's text kept, after the images: BLIP-2's zero-shot prompts
             ("<image>Question: ... Answer:") of a model trained with plain; an empty user
             text gives plain's prompt.
  vicuna_v1  LLaVA v1 / v1.5 (`conv_vicuna_v1`): "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: ..."
             where </s> is the tokenizer's EOS id.
  llama3     Meta Llama 3 Instruct's chat template: <|begin_of_text|> (BOS), then per message
             "<|start_header_id|>ROLE<|end_header_id|>\n\n" + content.strip() + "<|eot_id|>";
             no default system prompt.
  chatml     Qwen2 Instruct's chat template: "<|im_start|>ROLE\nCONTENT<|im_end|>\n", with the
             system prompt "You are a helpful assistant." unless the data gives one; no BOS.

Images. Every `image_token` marker in the turns is removed and the images are put at the start of
the first user turn, one `image_token` (+ "\n" for the chat templates) each, as LLaVA's
`preprocess_multimodal` does; `num_images` (the images the sample really has) overrides the
markers' count, so the tokens always hold as many images as the model gets. In the ids each
image is `num_image_tokens` copies of the image token's id (HF convention: one image token per
visual token; `model_config["image_token_id"]`). A sample without images has no image tokens.

Ids and labels. The rendered text is cut into segments (BOS, prompt text, images, answer text,
end of turn) and each maximal run of prompt or answer text is tokenised on its own, then the ids
are concatenated: where a prompt ends and an answer begins is exact by construction (no
re-tokenisation, no "tokenization mismatch"). Targets are next-token: `targets[t] = tokens[t+1]`
and `loss_mask[t]` is True when `tokens[t+1]` is an assistant token or its end-of-turn token
(vlmjax.losses.lm's convention: targets[b, t] is the token to predict at position t). The
separator between "ASSISTANT:" and the answer belongs to the answer (as LLaVA's masks count it);
a tokenizer that starts every text with a word boundary (SentencePiece's dummy prefix:
`tokenizer.adds_prefix_space`) writes such a leading space itself, so the ids equal those of the
joint text wherever a segment boundary is a space.

Counted outcomes (for the pipeline to count, never silent): `truncated` (ids past `max_len` are
cut; the sample is still used if a target remains) and the skip reasons `no_targets` (no target
token left: no assistant turn, or truncation cut them all) and `bad_json` (turns that are not a
list of {from/role, value/content} with known roles).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import numpy as np

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT,
         "system": SYSTEM}
SKIP_REASONS = ("no_targets", "bad_json")
TRUNCATED = "truncated"

# Segment kinds: text that is tokenised (prompt / target), or ids put in directly.
_BOS, _PROMPT, _IMAGE, _TARGET, _EOS = "bos", "prompt", "image", "target", "eos"


@dataclasses.dataclass(frozen=True)
class Template:
    """A chat template. `{content}` / `{system}` mark where the text goes; a format without
    `{content}` drops that text (plain drops the user's text)."""
    name: str
    system: str | None = None              # default system prompt; None: none rendered
    system_format: str = ""
    user_format: str = "{content}"
    assistant_prefix: str = ""             # prompt text before an answer
    answer_format: str = "{content}"       # the answer's target text
    end_of_turn: str = ""                  # after an answer; a target
    end_of_turn_is_eos: bool = False       # end_of_turn is the tokenizer's EOS id (e.g. "</s>")
    after_turn: str = ""                   # prompt text after end_of_turn
    bos: bool = False                      # start with the tokenizer's BOS id (if it has one)
    bos_text: str = ""                     # how BOS is rendered as text
    image_separator: str = "\n"            # after each image at the start of the first user turn
    strip_content: bool = False            # strip every message's text (Jinja's `| trim`)
    markers: tuple[str, ...] = ()          # strings that must be one token of the tokenizer


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("plain", user_format="", end_of_turn="\n", bos=True, image_separator=""),
    # plain with the user's text kept: BLIP-2's zero-shot prompts after plain (caption) training,
    # "<image tokens>Question: ... Answer:"; an empty user text is exactly plain's prompt.
    Template("blip2", end_of_turn="\n", bos=True, image_separator=""),
    Template(
        "vicuna_v1",
        system="A chat between a curious user and an artificial intelligence assistant. The "
               "assistant gives helpful, detailed, and polite answers to the user's questions.",
        system_format="{system} ", user_format="USER: {content} ", assistant_prefix="ASSISTANT:",
        answer_format=" {content}", end_of_turn="</s>", end_of_turn_is_eos=True, bos=True),
    Template(
        "llama3",
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user_format="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        end_of_turn="<|eot_id|>", bos=True, bos_text="<|begin_of_text|>", strip_content=True,
        markers=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    Template(
        "chatml", system="You are a helpful assistant.",
        system_format="<|im_start|>system\n{system}<|im_end|>\n",
        user_format="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n", end_of_turn="<|im_end|>", after_turn="\n",
        markers=("<|im_start|>", "<|im_end|>")),
)}


def get_template(template: str | Template) -> Template:
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"conversation template {template!r} is not one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


@dataclasses.dataclass
class EncodedConversation:
    """One sample's ids, padded to max_len. `skip_reason` not None: do not train on it."""
    tokens: np.ndarray        # int32 [max_len], pad_id after `length`
    targets: np.ndarray       # int32 [max_len]: tokens[t + 1] (pad_id where there is none)
    loss_mask: np.ndarray     # bool [max_len]: targets[t] is an answer / end-of-turn token
    mask: np.ndarray          # bool [max_len]: a real token
    length: int
    num_images: int           # images whose tokens the ids hold
    truncated: bool = False
    skip_reason: str | None = None

    @property
    def skipped(self) -> bool:
        return self.skip_reason is not None

    @property
    def reasons(self) -> tuple[str, ...]:
        """What to count for this sample: `truncated` and/or its skip reason."""
        return ((TRUNCATED,) if self.truncated else ()) + (
            (self.skip_reason,) if self.skip_reason else ())


class _BadConversation(Exception):
    pass


def _parse(turns) -> tuple[str | None, list[tuple[str, str]]]:
    """(system prompt from the data or None, [(role, text)]) without leading assistant turns."""
    if isinstance(turns, bytes):
        turns = turns.decode("utf-8", errors="replace")
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as e:
            raise _BadConversation(str(e)) from None
    if not isinstance(turns, (list, tuple)):
        raise _BadConversation(f"turns are a {type(turns).__name__}, not a list")
    system, messages = None, []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _BadConversation(f"turn {i} is not a dict")
        role = ROLES.get(str(turn.get("from", turn.get("role"))).lower())
        text = turn.get("value", turn.get("content"))
        if role is None or not isinstance(text, str):
            raise _BadConversation(f"turn {i}: role {turn.get('from', turn.get('role'))!r} / "
                                   f"text {type(text).__name__}")
        if role == SYSTEM:
            if i:
                raise _BadConversation(f"turn {i}: a system turn must come first")
            system = text
        elif messages or role == USER:  # leading assistant turns are dropped, as LLaVA does
            messages.append((role, text))
    return system, messages


def _fill(fmt: str, key: str, text: str) -> str:
    return fmt.replace("{" + key + "}", text)


def _segments(turns, template: Template, image_token: str, num_images: int | None):
    """[(kind, text)] of one conversation, and the number of images it holds."""
    system, messages = _parse(turns)
    markers = sum(text.count(image_token) for _, text in messages)
    images = markers if num_images is None else int(num_images)
    segments = []
    if template.bos:
        segments.append((_BOS, template.bos_text))
    system = template.system if system is None else system
    if system is not None and template.system_format:
        text = system.strip() if template.strip_content else system
        segments.append((_PROMPT, _fill(template.system_format, "system", text)))
    placed = False
    for role, text in messages:
        if image_token in text:  # LLaVA: remove the marker, strip, put the images first
            text = text.replace(image_token, "").strip()
        if template.strip_content:
            text = text.strip()
        if role == ASSISTANT:
            segments += [(_PROMPT, template.assistant_prefix),
                         (_TARGET, _fill(template.answer_format, "content", text)),
                         (_EOS if template.end_of_turn_is_eos else _TARGET, template.end_of_turn),
                         (_PROMPT, template.after_turn)]
            continue
        before, has_content, after = template.user_format.partition("{content}")
        segments.append((_PROMPT, before))
        if not placed:
            placed = True
            for i in range(images):
                last = i == images - 1
                segments += [(_IMAGE, image_token),
                             (_PROMPT, "" if last and not (text and has_content)
                              else template.image_separator)]
        segments += [(_PROMPT, text if has_content else ""), (_PROMPT, after)]
    return [(kind, text) for kind, text in segments if text or kind in (_BOS, _EOS)], (
        images if placed else 0)


def render_conversation(turns, template: str | Template = "vicuna_v1", *,
                        image_token: str = "<image>", num_images: int | None = None) -> str:
    """The template's text of a conversation, each image as one `image_token` (what HF's
    `apply_chat_template` renders before the processor expands the image tokens)."""
    template = get_template(template)
    segments, _ = _segments(turns, template, image_token, num_images)
    return "".join(template.bos_text if kind == _BOS else text for kind, text in segments)


def _check_markers(tokenizer, template: Template, encoded_markers) -> None:
    for marker, ids in zip(template.markers, encoded_markers):
        if len(ids) != 1:
            raise ValueError(f"conversation template {template.name!r} needs {marker!r} as one "
                             f"token, and this tokenizer splits it into {len(ids)}: add it with "
                             "tokenizer.add_special_tokens")


def _with_representable_end(template: Template, tokenizer) -> Template:
    """`template`, or, when the tokenizer writes its text end of turn as no ids at all (e.g.
    plain's "\n" under a SentencePiece model that folds whitespace), the template ending answers
    with EOS instead: an answer with no end token would teach the model never to stop."""
    end = template.end_of_turn
    if not end or template.end_of_turn_is_eos or tokenizer.eos_id is None:
        return template
    if list(tokenizer.encode_raw([end])[0]):
        return template
    return dataclasses.replace(template, end_of_turn="</s>", end_of_turn_is_eos=True)


def encode_conversations(conversations: Sequence[Any], tokenizer, template: str | Template, *,
                         max_len: int, image_token: str = "<image>", num_image_tokens: int = 1,
                         num_images: Sequence[int | None] | None = None,
                         ) -> list[EncodedConversation]:
    """`encode_conversation` over a batch, with one native `encode_raw` call for all texts."""
    template = _with_representable_end(get_template(template), tokenizer)
    if max_len < 2:
        raise ValueError(f"max_len={max_len} leaves no room for a token and its target")
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens={num_image_tokens} must be >= 1")
    num_images = [None] * len(conversations) if num_images is None else list(num_images)
    parsed = []
    for turns, count in zip(conversations, num_images, strict=True):
        try:
            parsed.append(_segments(turns, template, image_token, count))
        except _BadConversation:
            parsed.append(None)
    # Merge runs of the same text kind: each run is tokenised on its own. A tokenizer that
    # starts every text with a word boundary (SentencePiece) writes a run's separating space
    # itself: " A" after "ASSISTANT:" becomes "A" (one "\u2581A" token, as in the joint text).
    prefix_space = tokenizer.adds_prefix_space
    runs = []
    for item in parsed:
        merged = []
        for kind, text in item[0] if item else []:
            if merged and kind == merged[-1][0] and kind in (_PROMPT, _TARGET):
                merged[-1] = (kind, merged[-1][1] + text)
            else:
                merged.append((kind, text))
        runs.append([(kind, text[1:] if i and prefix_space and text.startswith(" ") else text)
                     for i, (kind, text) in enumerate(merged)])
    texts = list(template.markers) + [text for merged in runs for kind, text in merged
                                      if kind in (_PROMPT, _TARGET)]
    encoded = tokenizer.encode_raw(texts) if texts else []
    _check_markers(tokenizer, template, encoded[:len(template.markers)])
    encoded = iter(encoded[len(template.markers):])
    image_id = None
    out = []
    for item, merged in zip(parsed, runs):
        if item is None:
            out.append(_empty(tokenizer, max_len, "bad_json"))
            continue
        ids, is_target = [], []
        for kind, text in merged:
            if kind == _BOS:
                piece = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
            elif kind == _EOS:
                if tokenizer.eos_id is None:
                    raise ValueError(f"conversation template {template.name!r} ends answers "
                                     "with the tokenizer's EOS, and this tokenizer has none")
                piece = [tokenizer.eos_id]
            elif kind == _IMAGE:
                if image_id is None:
                    image_id = tokenizer.token_id(image_token)
                piece = [image_id] * num_image_tokens
            else:
                piece = list(next(encoded))
            ids += piece
            is_target += [kind in (_TARGET, _EOS)] * len(piece)
        out.append(_finish(tokenizer, ids, is_target, max_len, item[1], image_id,
                           num_image_tokens))
    return out


def encode_conversation(turns, tokenizer, template: str | Template = "vicuna_v1", *,
                        max_len: int, image_token: str = "<image>", num_image_tokens: int = 1,
                        num_images: int | None = None) -> EncodedConversation:
    """Ids, next-token targets and the loss mask of one conversation (see the module docstring).

    `tokenizer`: a vlmjax.data.tokenizers.Tokenizer whose special tokens include `image_token`
    (if the sample has images) and the template's markers. `num_images`: the sample's images
    (default: the markers in the text)."""
    return encode_conversations([turns], tokenizer, template, max_len=max_len,
                                image_token=image_token, num_image_tokens=num_image_tokens,
                                num_images=[num_images])[0]


def _empty(tokenizer, max_len: int, reason: str) -> EncodedConversation:
    pad = np.full(max_len, tokenizer.pad_id, np.int32)
    none = np.zeros(max_len, bool)
    return EncodedConversation(pad, pad.copy(), none, none.copy(), 0, 0, skip_reason=reason)


def _finish(tokenizer, ids, is_target, max_len, images, image_id, num_image_tokens):
    truncated = len(ids) > max_len
    ids, is_target = ids[:max_len], np.asarray(is_target[:max_len], bool)
    length = len(ids)
    tokens = np.full(max_len, tokenizer.pad_id, np.int32)
    tokens[:length] = ids
    targets = np.full(max_len, tokenizer.pad_id, np.int32)
    targets[:length - 1] = tokens[1:length]
    loss_mask = np.zeros(max_len, bool)
    loss_mask[:length - 1] = is_target[1:]
    mask = np.zeros(max_len, bool)
    mask[:length] = True
    kept_images = 0 if image_id is None else int(np.sum(tokens[:length] == image_id))
    reason = None
    if not loss_mask.any():
        reason = "no_targets"
    elif kept_images != images * num_image_tokens:
        # Images come before every answer, so cutting into them leaves no target.
        raise AssertionError(f"{kept_images} image tokens kept of {images * num_image_tokens}")
    return EncodedConversation(tokens, targets, loss_mask, mask, length,
                               images if reason is None else 0, truncated, reason)


def encode_prompts(prompts: Sequence[Any], tokenizer, template: str | Template = "vicuna_v1", *,
                   image_token: str = "<image>", num_image_tokens: int = 1,
                   num_images: Sequence[int | None] | int | None = None) -> list[list[int]]:
    """The ids a model is given to generate each prompt's next answer: the conversation up to
    and including the assistant prefix (vicuna_v1: "SYSTEM USER: <image>\\nQ ASSISTANT:").

    `prompts`: a question (str: one user turn) or turns that end with a user turn. The ids are
    exactly those `encode_conversations` writes before that answer's first target token in
    training (the conversation is encoded with an empty final answer and cut there), so train and
    eval prompts cannot drift apart. `num_images`: per prompt, or one count for all (default:
    the `image_token` markers in the text)."""
    turns = []
    for prompt in prompts:
        if isinstance(prompt, str):
            prompt = [{"from": "human", "value": prompt}]
        try:
            _, messages = _parse(prompt)
        except _BadConversation as error:
            raise ValueError(f"prompt {prompt!r} is not a question or a list of {{from, value}} "
                             f"turns: {error}") from None
        if not messages or messages[-1][0] != USER:
            raise ValueError(f"prompt {prompt!r} must end with a user turn (its answer is what "
                             "is generated)")
        turns.append(list(prompt))
    if not turns:
        return []
    if num_images is None or isinstance(num_images, int):
        num_images = [num_images] * len(turns)
    template = get_template(template)
    conversations = [item + [{"from": "gpt", "value": ""}] for item in turns]
    # A text id stands for at least one byte of the rendered text (SentencePiece's word-boundary
    # piece may add one per run: x2), images for num_image_tokens ids, plus BOS / EOS.
    rendered = [render_conversation(c, template, image_token=image_token, num_images=n)
                for c, n in zip(conversations, num_images, strict=True)]
    max_len = 8 + max(2 * len(text.encode()) + text.count(image_token) * num_image_tokens
                      for text in rendered)
    encoded = encode_conversations(conversations, tokenizer, template, max_len=max_len,
                                   image_token=image_token, num_image_tokens=num_image_tokens,
                                   num_images=num_images)
    out = []
    for enc in encoded:
        # loss_mask[t]: tokens[t + 1] is a target. The last run of targets is the empty answer's
        # (its end-of-turn, and a leading separator token where the tokenizer makes one).
        targets = np.flatnonzero(enc.loss_mask)
        if targets.size:
            runs = np.flatnonzero(np.diff(targets) > 1)
            start = targets[runs[-1] + 1] if runs.size else targets[0]
            out.append(enc.tokens[:start + 1].tolist())
        else:  # a template that marks no target (no end of turn): the whole text is prompt
            out.append(enc.tokens[:enc.length].tolist())
    return out
