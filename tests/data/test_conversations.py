"""Chat templates and label masks: exact answer targets on both tokenizer backends, HF parity of
the rendered chat templates, image placement and expansion, truncation and skips counted."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vlmjax.data import conversations, tokenizers
from vlmjax.data.conversations import encode_conversation, encode_conversations, render_conversation

SPECIALS = ["<s>", "</s>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
            "<image>"]
# The tokenizer each template's model family has: (bos, eos) names for the tokenizer.json.
FRAMING = {"plain": ("<s>", "</s>"), "blip2": ("<s>", "</s>"), "vicuna_v1": ("<s>", "</s>"),
           "llama3": ("<|begin_of_text|>", "<|end_of_text|>"), "chatml": (None, "<|endoftext|>")}
CORPUS = ["What is in the image? Describe it briefly.", "A red star on the left of a blue square.",
          "How many shapes are there?", "There are two shapes: a star and a square.",
          "Is the star bigger than the square? No, it is smaller.",
          "A chat between a curious user and an artificial intelligence assistant.",
          "The assistant gives helpful, detailed, and polite answers to the user's questions.",
          "USER: ASSISTANT: system user assistant You are a helpful assistant."] * 20

TURNS = [
    {"from": "human", "value": "What is in the image?\n<image>"},
    {"from": "gpt", "value": "A red star on the left."},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "There are two shapes. "},
]
ANSWERS = ["A red star on the left.", "There are two shapes. "]
# What each template's answer targets decode to (answer text + end of turn); plain drops the
# user's text, so its answers (LLaVA's stage 1 has one) form one run.
EXPECTED_TARGETS = {
    "plain": ["".join(a + "\n" for a in ANSWERS)],
    "blip2": [a + "\n" for a in ANSWERS],  # plain with the questions kept between the answers
    "vicuna_v1": [" " + a + "</s>" for a in ANSWERS],
    "llama3": [a.strip() + "<|eot_id|>" for a in ANSWERS],
    "chatml": [a + "<|im_end|>" for a in ANSWERS],
}


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    """A byte-level BPE tokenizer.json (Llama 3 / Qwen2 style) with the templates' specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("conv_hf") / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


def hf_tokenizer(hf_json, template):
    bos, eos = FRAMING[template]
    return tokenizers.HuggingFaceTokenizer(hf_json, bos_token=bos, eos_token=eos)


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """A Llama-style SentencePiece model (identity normalisation, dummy prefix, byte fallback)
    with the templates' markers added as special tokens."""
    import sentencepiece

    path = tmp_path_factory.mktemp("conv_sp") / "tiny.model"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(path)[:-len(".model")], vocab_size=700,
        model_type="unigram", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, hard_vocab_limit=False,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=1, minloglevel=2)
    tokenizer = tokenizers.SentencePieceTokenizer(str(path))
    tokenizer.add_special_tokens(["<image>", "<|start_header_id|>", "<|end_header_id|>",
                                  "<|eot_id|>", "<|im_start|>", "<|im_end|>"])
    return tokenizer


def target_runs(enc):
    """The target ids of each contiguous run of counted positions."""
    runs, current = [], []
    for t in range(len(enc.tokens)):
        if enc.loss_mask[t]:
            current.append(int(enc.targets[t]))
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_template_strings_are_llavas():
    """plain and vicuna_v1 render as LLaVA's get_prompt (with the image moved to the start of
    the first user turn, as preprocess_multimodal does)."""
    assert render_conversation(TURNS[:2], "plain") == "<image>A red star on the left.\n"
    system = ("A chat between a curious user and an artificial intelligence assistant. The "
              "assistant gives helpful, detailed, and polite answers to the user's questions.")
    assert render_conversation(TURNS, "vicuna_v1") == (
        system + " USER: <image>\nWhat is in the image? ASSISTANT: A red star on the left.</s>"
        "USER: How many shapes are there? ASSISTANT: There are two shapes. </s>")
    assert render_conversation([{"role": "system", "content": "Be brief."}] + TURNS[2:],
                               "vicuna_v1") == (
        "Be brief. USER: How many shapes are there? ASSISTANT: There are two shapes. </s>")


LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif "
    "%}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
    "<|end_header_id|>\n\n' }}{% endif %}")
QWEN2_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if "
    "add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template,jinja", [("llama3", LLAMA3_JINJA), ("chatml", QWEN2_JINJA)])
@pytest.mark.parametrize("system", [None, "  You describe images. "])
def test_chat_templates_render_as_transformers(hf_json, tmp_path, template, jinja, system):
    import shutil

    from transformers import AutoTokenizer

    shutil.copy(hf_json, tmp_path / "tokenizer.json")
    bos, eos = FRAMING[template]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": jinja,
        "bos_token": bos, "eos_token": eos}))
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    # HF messages: the image already at the start of the first user turn, as ours puts it.
    messages = [{"role": "user", "content": "<image>\nWhat is in the image?"},
                {"role": "assistant", "content": ANSWERS[0]},
                {"role": "user", "content": "How many shapes are there?"},
                {"role": "assistant", "content": ANSWERS[1]}]
    turns = TURNS
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
        turns = [{"from": "system", "value": system}] + TURNS
    expected = reference.apply_chat_template(messages, tokenize=False)
    assert render_conversation(turns, template) == expected
    assert "<image>" in expected
    assert (ANSWERS[1] in expected) == (template == "chatml")  # Llama 3 trims the message


@pytest.mark.parametrize("template", sorted(conversations.TEMPLATES))
def test_targets_decode_to_exactly_the_assistant_texts(hf_json, template):
    tokenizer = hf_tokenizer(hf_json, template)
    enc = encode_conversation(TURNS, tokenizer, template, max_len=160, num_image_tokens=3)
    assert enc.skip_reason is None and not enc.truncated and enc.reasons == ()
    runs = target_runs(enc)
    assert [tokenizer.decode_raw(run) for run in runs] == EXPECTED_TARGETS[template]
    # The prompt never counts: the counted positions are exactly the answers' tokens.
    assert int(enc.loss_mask.sum()) == sum(len(run) for run in runs)
    prompt = [int(t) for t, counted in zip(enc.tokens[1:enc.length], enc.loss_mask) if not counted]
    for answer in ANSWERS:
        assert answer.strip() not in tokenizer.decode_raw(prompt)
    # Next-token alignment, padding and the last real position.
    n = enc.length
    np.testing.assert_array_equal(enc.targets[:n - 1], enc.tokens[1:n])
    assert not enc.loss_mask[n - 1:].any() and enc.mask[:n].all() and not enc.mask[n:].any()
    assert (enc.tokens[n:] == tokenizer.pad_id).all()
    bos = FRAMING[template][0]
    if template in ("plain", "blip2", "vicuna_v1", "llama3"):
        assert enc.tokens[0] == tokenizer._tokenizer.token_to_id(bos)
    else:
        assert enc.tokens[0] == tokenizer.token_id("<|im_start|>")  # Qwen2: no BOS


@pytest.mark.parametrize("template", sorted(conversations.TEMPLATES))
def test_targets_on_sentencepiece(sp_tokenizer, template):
    enc = encode_conversation(TURNS, sp_tokenizer, template, max_len=400, num_image_tokens=2)
    runs = target_runs(enc)
    if template == "plain":  # one run: "A\nB\n"
        assert sp_tokenizer.decode_raw(runs[0]) == "".join(a + "\n" for a in ANSWERS).lstrip()
        return
    assert len(runs) == len(ANSWERS)
    if template == "blip2":  # plain's "\n" ends each answer, the question between them
        assert [sp_tokenizer.decode_raw(run).strip() for run in runs] == [
            a.strip() for a in ANSWERS]
        return
    eot = {"vicuna_v1": [sp_tokenizer.eos_id],
           "llama3": [sp_tokenizer.token_id("<|eot_id|>")],
           "chatml": [sp_tokenizer.token_id("<|im_end|>")]}[template]
    for run, answer in zip(runs, ANSWERS):
        assert run[-len(eot):] == eot
        assert sp_tokenizer.decode_raw(run[:-len(eot)]).strip() == answer.strip()
    assert enc.tokens[0] == (2 if template != "chatml" else sp_tokenizer.token_id("<|im_start|>"))


@pytest.mark.parametrize("backend", ["hf", "sp"])
def test_vicuna_ids_equal_the_joint_tokenization(hf_json, sp_tokenizer, backend):
    """Segment boundaries sit at spaces, so the segment-wise ids are the joint text's ids (no
    'tokenization mismatch'): SentencePiece's dummy prefix writes the answer's leading space."""
    tokenizer = sp_tokenizer if backend == "sp" else hf_tokenizer(hf_json, "vicuna_v1")
    turns = [{"from": "human", "value": "What is in the image?"}] + TURNS[1:]
    enc = encode_conversation(turns, tokenizer, "vicuna_v1", max_len=400)
    text = render_conversation(turns, "vicuna_v1")
    first, second = text.split("</s>")[:2]
    joint = [tokenizer.bos_id, *tokenizer.encode_raw([first])[0], tokenizer.eos_id,
             *tokenizer.encode_raw([second])[0], tokenizer.eos_id]
    assert enc.tokens[:enc.length].tolist() == joint
    assert tokenizer.adds_prefix_space == (backend == "sp")


@pytest.mark.parametrize("template", sorted(conversations.TEMPLATES))
def test_image_moves_to_the_first_user_turn_and_expands(hf_json, template):
    tokenizer = hf_tokenizer(hf_json, template)
    image_id = tokenizer.token_id("<image>")
    # Two markers, one in the second user turn: both move to the start of the first.
    turns = [dict(TURNS[0]), TURNS[1], {"from": "human", "value": "And <image> this one?"},
             TURNS[3]]
    enc = encode_conversation(turns, tokenizer, template, max_len=400, num_image_tokens=4)
    ids = enc.tokens[:enc.length].tolist()
    positions = [i for i, t in enumerate(ids) if t == image_id]
    assert enc.num_images == 2 and len(positions) == 8
    start = positions[0]
    head = tokenizer.decode_raw(ids[1 if template != "chatml" else 0:start])
    expected_head = {
        "plain": "", "blip2": "",
        "vicuna_v1": conversations.TEMPLATES["vicuna_v1"].system + " USER: ",
        "llama3": "<|start_header_id|>user<|end_header_id|>\n\n",
        "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  "<|im_start|>user\n"}[template]
    assert head == expected_head
    if template == "plain":  # the user's text is dropped: images, then the answer
        assert positions == list(range(start, start + 8))
        assert not enc.loss_mask[start - 1:start + 7].any() and enc.loss_mask[start + 7]
    elif template == "blip2":  # the images, then the question right after them
        assert positions == list(range(start, start + 8))
        after = tokenizer.decode_raw(ids[start + 8:start + 8 + 6])
        assert after.startswith("What is in the image?"), after
    else:  # "<image>\n<image>\nQuestion"
        assert positions == [*range(start, start + 4), *range(start + 5, start + 9)]
        after = tokenizer.decode_raw(ids[start + 9:start + 9 + 8])
        assert after.startswith("\nWhat is in the image?"), after
    assert not enc.loss_mask[:positions[-1]].any()  # images and prompt never count
    # num_images overrides the markers (the sample's real images), also without markers.
    enc1 = encode_conversation(turns, tokenizer, template, max_len=400, num_image_tokens=4,
                               num_images=1)
    assert enc1.num_images == 1 and int((enc1.tokens == image_id).sum()) == 4
    plain_turns = [{"from": "human", "value": "What is in the image?"}, TURNS[1]]
    enc3 = encode_conversation(plain_turns, tokenizer, template, max_len=400, num_images=3)
    assert int((enc3.tokens == image_id).sum()) == 3
    # A sample without images has no image token.
    enc0 = encode_conversation(plain_turns, tokenizer, template, max_len=400, num_image_tokens=4)
    assert enc0.num_images == 0 and image_id not in enc0.tokens and enc0.skip_reason is None
    assert render_conversation(turns, template).count("<image>") == 2


def test_truncation_is_counted_and_no_target_samples_are_skipped(hf_json):
    tokenizer = hf_tokenizer(hf_json, "chatml")
    full = encode_conversation(TURNS, tokenizer, "chatml", max_len=400, num_image_tokens=2)
    runs = target_runs(full)
    # Cut inside the second answer: trained on what is left, and counted as truncated.
    first_answer_end = int(np.nonzero(full.loss_mask)[0][len(runs[0]) - 1]) + 1
    cut = full.length - 4
    enc = encode_conversation(TURNS, tokenizer, "chatml", max_len=cut, num_image_tokens=2)
    assert enc.truncated and enc.skip_reason is None and enc.reasons == ("truncated",)
    assert enc.length == cut and enc.tokens.shape == (cut,)
    np.testing.assert_array_equal(enc.tokens, full.tokens[:cut])
    np.testing.assert_array_equal(enc.loss_mask[:cut - 1], full.loss_mask[:cut - 1])
    assert not enc.loss_mask[cut - 1]  # nothing left to predict at the last kept position
    assert first_answer_end < cut
    # Cut before the first answer: no target left: skipped and counted, never trained on.
    enc = encode_conversation(TURNS, tokenizer, "chatml", max_len=12, num_image_tokens=2)
    assert enc.truncated and enc.skip_reason == "no_targets" and enc.skipped
    assert enc.reasons == ("truncated", "no_targets") and not enc.loss_mask.any()
    # No assistant turn at all; leading assistant turns are dropped (LLaVA).
    enc = encode_conversation([TURNS[0]], tokenizer, "chatml", max_len=64)
    assert enc.skip_reason == "no_targets" and not enc.truncated
    enc = encode_conversation([TURNS[1], TURNS[0]], tokenizer, "chatml", max_len=64)
    assert enc.skip_reason == "no_targets"
    lead = encode_conversation([TURNS[1]] + TURNS[:2], tokenizer, "chatml", max_len=64)
    assert [tokenizer.decode_raw(r) for r in target_runs(lead)] == [ANSWERS[0] + "<|im_end|>"]
    # Malformed turns are bad_json, JSON text works like the list.
    for bad in ("not json", [{"from": "robot", "value": "hi"}], [{"from": "human"}], {"a": 1},
                [TURNS[0], {"from": "system", "value": "late"}]):
        assert encode_conversation(bad, tokenizer, "chatml", max_len=64).skip_reason == "bad_json"
    as_text = encode_conversation(json.dumps(TURNS).encode(), tokenizer, "chatml", max_len=400,
                                  num_image_tokens=2)
    np.testing.assert_array_equal(as_text.tokens, full.tokens)


def test_batch_equals_single_and_errors(hf_json, sp_tokenizer):
    tokenizer = hf_tokenizer(hf_json, "llama3")
    batch = [TURNS, TURNS[:2], "bad", TURNS[2:]]
    many = encode_conversations(batch, tokenizer, "llama3", max_len=90, num_image_tokens=2,
                                num_images=[None, 1, None, 2])
    for turns, count, enc in zip(batch, [None, 1, None, 2], many):
        one = encode_conversation(turns, tokenizer, "llama3", max_len=90, num_image_tokens=2,
                                  num_images=count)
        for field in ("tokens", "targets", "loss_mask", "mask"):
            np.testing.assert_array_equal(getattr(one, field), getattr(enc, field))
        assert (one.skip_reason, one.truncated, one.num_images) == (
            enc.skip_reason, enc.truncated, enc.num_images)
    with pytest.raises(ValueError, match=r"'vicuna'.*chatml.*llama3.*plain.*vicuna_v1"):
        encode_conversation(TURNS, tokenizer, "vicuna", max_len=64)
    plain = tokenizers.SentencePieceTokenizer(sp_tokenizer.path)  # no markers added
    with pytest.raises(ValueError, match=r"'chatml' needs '<\|im_start\|>' as one token"):
        encode_conversation(TURNS, plain, "chatml", max_len=64)
    with pytest.raises(ValueError, match=r"'<image>' is not a special token"):
        encode_conversation(TURNS, plain, "plain", max_len=64)
    no_eos = tokenizers.HuggingFaceTokenizer(hf_json, bos_token="<s>")
    no_eos.eos_id = None
    with pytest.raises(ValueError, match="EOS"):
        encode_conversation(TURNS, no_eos, "vicuna_v1", max_len=64)


def test_plain_ends_answers_with_eos_when_the_newline_has_no_ids(sp_tokenizer):
    class NoNewlines:  # as the vlm_shapes SentencePiece model: "\n" folds away
        def __getattr__(self, name):
            return getattr(sp_tokenizer, name)

        def encode_raw(self, texts):
            return sp_tokenizer.encode_raw([t.replace("\n", "") for t in texts])

    enc = encode_conversation(TURNS, NoNewlines(), "plain", max_len=400, num_image_tokens=2)
    runs = target_runs(enc)
    assert len(runs) == 1 and runs[0].count(sp_tokenizer.eos_id) == len(ANSWERS)
    assert runs[0][-1] == sp_tokenizer.eos_id
    kept = encode_conversation(TURNS, sp_tokenizer, "plain", max_len=400, num_image_tokens=2)
    assert sp_tokenizer.eos_id not in target_runs(kept)[0]  # "\n" has ids: LLaVA's plain
