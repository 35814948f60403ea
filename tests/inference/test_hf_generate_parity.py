"""generate vs transformers' `generate` on tiny random Llama / Qwen2 models: greedy and beam search
token for token (EOS lists, length_penalty, early_stopping, left-padded prompts), and the beam
scores."""
import numpy as np
import pytest

from tests.convert.decoder_fixtures import PAD_ID, load_hf, random_tokens, tiny_llama_dir, torch
from vlmjax.convert import load_pretrained
from vlmjax.inference import generate

NEW = 10


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    directory = tiny_llama_dir(tmp_path_factory, request.param)
    model, params, _ = load_pretrained(directory)
    return model, params, load_hf(directory)


def prompt_batch():
    """Three prompts; the last two left-padded (HF's padding side for generation)."""
    tokens = random_tokens(batch=3, length=9, seed=4)
    mask = np.ones(tokens.shape, bool)
    mask[1, :3] = mask[2, :5] = False
    tokens[~mask] = PAD_ID
    return tokens, mask


def hf_generate(hf, tokens, mask, **kwargs):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                          attention_mask=torch.as_tensor(mask, dtype=torch.long),
                          max_new_tokens=NEW, do_sample=False, pad_token_id=PAD_ID,
                          return_dict_in_generate=True, output_scores=True, **kwargs)
    new = out.sequences[:, tokens.shape[1]:].numpy()
    scores = None if out.get("sequences_scores") is None else out.sequences_scores.numpy()
    return new, scores


def assert_same_tokens(ours, theirs):
    width = theirs.shape[1]
    np.testing.assert_array_equal(np.asarray(ours.tokens)[:, :width], theirs)
    assert np.all(np.asarray(ours.tokens)[:, width:] == PAD_ID)


def test_greedy_equals_transformers(pair):
    model, params, hf = pair
    tokens, mask = prompt_batch()
    free = generate(model, params, tokens, prompt_mask=mask, max_new_tokens=NEW, pad_id=PAD_ID)
    theirs, _ = hf_generate(hf, tokens, mask, eos_token_id=None)
    assert_same_tokens(free, theirs)
    eos = sorted({int(free.tokens[row, step]) for row, step in [(0, 3), (1, 6)]})
    ours = generate(model, params, tokens, prompt_mask=mask, max_new_tokens=NEW, eos_id=eos,
                    pad_id=PAD_ID)
    theirs, _ = hf_generate(hf, tokens, mask, eos_token_id=eos)
    assert_same_tokens(ours, theirs)
    assert int(np.asarray(ours.lengths).min()) < NEW  # some row stopped at an EOS


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping", [
    (3, 1.0, False), (2, 0.5, True), pytest.param(4, 2.0, "never", marks=pytest.mark.slow),
    pytest.param(3, -1.0, False, marks=pytest.mark.slow)])
def test_beam_search_equals_transformers(pair, num_beams, length_penalty, early_stopping):
    model, params, hf = pair
    tokens, mask = prompt_batch()
    kwargs = dict(num_beams=num_beams, length_penalty=length_penalty,
                  early_stopping=early_stopping)
    # EOS ids the beams actually produce (transformers' beams without EOS, cheap to run), so
    # that hypotheses finish at different lengths.
    free, _ = hf_generate(hf, tokens, mask, eos_token_id=None, **kwargs)
    eos = sorted({int(free[row, step]) for row, step in [(0, 2), (1, 5), (2, 4)]})
    ours = generate(model, params, tokens, prompt_mask=mask, max_new_tokens=NEW,
                    strategy="beam", eos_id=eos, pad_id=PAD_ID, **kwargs)
    theirs, hf_scores = hf_generate(hf, tokens, mask, eos_token_id=eos, **kwargs)
    assert_same_tokens(ours, theirs)
    # transformers' sequences_scores: the sum of log-probs / new length ** length_penalty.
    lengths = np.asarray(ours.lengths, np.float64)
    np.testing.assert_allclose(np.asarray(ours.scores) / lengths ** length_penalty, hf_scores,
                               rtol=1e-4, atol=1e-4)
    if length_penalty <= 1.0:  # (a strong length penalty prefers the full-length hypotheses)
        assert int(np.asarray(ours.lengths).min()) < NEW, "no hypothesis ended at an EOS"
