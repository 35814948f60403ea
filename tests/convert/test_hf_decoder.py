"""HF Llama / Qwen2 directories: the fixtures and the per-tensor safetensors reader."""
import numpy as np
import pytest

from tests.convert.decoder_fixtures import load_hf, tiny_llama_dir, torch
from vlmjax.convert.hf_io import SafetensorsTensors


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_per_tensor_reader_matches_torch_state_dict_sharded_bf16(tmp_path_factory, kind):
    directory = tiny_llama_dir(tmp_path_factory, kind, dtype=torch.bfloat16, max_shard_size="40KB")
    tensors = SafetensorsTensors(directory)
    files = {path for path, _, _ in tensors.entries.values()}
    assert len(files) > 1, "the fixture should have written several shards"
    state = load_hf(directory).state_dict()
    # Tied qwen2 saves no lm_head; neither side has rotary buffers in the file.
    assert set(tensors.names()) == set(state) - ({"lm_head.weight"} if kind == "qwen2" else set())
    for name in tensors.names():
        assert tensors.dtype(name) == "BF16"
        np.testing.assert_array_equal(tensors.read(name), state[name].float().numpy(), err_msg=name)


def test_reader_names_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SafetensorsTensors(str(tmp_path))
