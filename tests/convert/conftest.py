"""Tiny random HF CLIPModel / SiglipModel directories, built offline once per session."""
import numpy as np
import pytest

from tests.convert.reference import (CLIP_BOS, CLIP_CONFIG, CLIP_EOS, CLIP_LEN, CLIP_LOGIT_SCALE,
                                     IMAGE, SIGLIP_CONFIG, SIGLIP_LEN, SIGLIP_LOGIT_BIAS,
                                     SIGLIP_LOGIT_SCALE, VOCAB, perturb, torch, transformers,
                                     write_clip_tokenizer, write_siglip_tokenizer)


@pytest.fixture(scope="session")
def clip_hf(tmp_path_factory):
    """(directory, torch model) of a tiny random CLIPModel saved with save_pretrained."""
    torch.manual_seed(0)
    model = perturb(transformers.CLIPModel(transformers.CLIPConfig(**CLIP_CONFIG)), 1)
    with torch.no_grad():
        model.logit_scale.fill_(CLIP_LOGIT_SCALE)
    directory = str(tmp_path_factory.mktemp("clip_hf"))
    model.save_pretrained(directory)
    write_clip_tokenizer(directory)
    return directory, model


@pytest.fixture(scope="session")
def siglip_hf(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb(transformers.SiglipModel(transformers.SiglipConfig(**SIGLIP_CONFIG)), 2)
    with torch.no_grad():
        model.logit_scale.fill_(SIGLIP_LOGIT_SCALE)
        model.logit_bias.fill_(SIGLIP_LOGIT_BIAS)
    directory = str(tmp_path_factory.mktemp("siglip_hf"))
    model.save_pretrained(directory)
    write_siglip_tokenizer(directory)
    return directory, model


@pytest.fixture(scope="session")
def images():
    """Random images, NHWC float32 (vlmjax layout); torch gets them as NCHW."""
    return np.random.default_rng(0).normal(size=(3, IMAGE, IMAGE, 3)).astype(np.float32)


@pytest.fixture(scope="session")
def clip_tokens():
    """BOS, random words, EOS at different positions, then padding (with EOS, as OpenAI's)."""
    rng = np.random.default_rng(1)
    ids = np.full((3, CLIP_LEN), CLIP_EOS, np.int64)
    mask = np.zeros((3, CLIP_LEN), bool)
    for row, length in enumerate((5, CLIP_LEN, 9)):
        ids[row, 0] = CLIP_BOS
        ids[row, 1:length - 1] = rng.integers(0, CLIP_BOS, length - 2)
        mask[row, :length] = True
    return ids, mask


@pytest.fixture(scope="session")
def siglip_tokens():
    """Full-length random ids: SigLIP reads padded sequences without a mask."""
    return np.random.default_rng(2).integers(0, VOCAB, (3, SIGLIP_LEN)).astype(np.int64)


