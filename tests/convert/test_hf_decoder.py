"""HF Llama / Qwen2 -> Decoder import (parity with transformers, streaming, shardings, KV cache),
export back to HF, and the per-tensor safetensors reader."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.convert.decoder_fixtures import (LINEAR_ROPE, hf_logits, load_hf, random_tokens,
                                            tiny_llama_dir, torch)
from vlmjax import sharding
from vlmjax.convert import hf_decoder, load_pretrained
from vlmjax.convert.hf_decoder_config import decoder_config_from_hf
from vlmjax.convert.hf_decoder_export import export_hf_decoder
from vlmjax.convert.hf_io import SafetensorsTensors

SLIDING = dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)
CASES = {  # name -> (fixture kind, config overrides)
    "llama": ("llama", {}),
    "llama3": ("llama3", {}),
    "linear_rope": ("llama", {"rope_parameters": LINEAR_ROPE}),
    "qwen2": ("qwen2", {}),
    "mqa": ("llama", {"num_key_value_heads": 1}),
    "llama_attention_bias": ("llama", {"attention_bias": True}),
    "qwen2_sliding": ("qwen2", SLIDING),
}
TOL = 1e-4


def case_dir(tmp_path_factory, name, **kwargs):
    kind, overrides = CASES[name]
    return tiny_llama_dir(tmp_path_factory, kind, **overrides, **kwargs)


def vlmjax_logits(model, params, tokens, **kwargs):
    return np.asarray(model.apply({"params": params}, jnp.asarray(tokens), **kwargs))


def left_padded(batch=3, length=14, pads=(0, 5, 2), seed=1):
    """Tokens with row r left-padded by pads[r] (pad id 3), its mask, positions cumsum(mask)-1."""
    tokens = random_tokens(batch, length, seed)
    mask = np.ones((batch, length), np.int32)
    for row, pad in enumerate(pads):
        tokens[row, pad:] = tokens[row, :length - pad].copy()
        tokens[row, :pad], mask[row, :pad] = 3, 0
    return tokens, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def hf_masked_logits(model, tokens, mask, positions):
    """transformers with an attention mask and HF generate's position ids (cumsum - 1)."""
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                     attention_mask=torch.as_tensor(mask),
                     position_ids=torch.as_tensor(positions, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(tmp_path_factory, name):
    directory = case_dir(tmp_path_factory, name)
    model, params, model_config = load_pretrained(directory)
    tokens = random_tokens(2, 12)
    reference = hf_logits(load_hf(directory), tokens)
    diff = np.abs(vlmjax_logits(model, params, tokens) - reference).max()
    print(f"PARITY decoder {name}: max |logits diff| {diff:.2e} (|logits| max "
          f"{np.abs(reference).max():.1f})")
    assert diff < TOL
    kind = CASES[name][0]
    assert model_config["model_type"] == ("qwen2" if kind == "qwen2" else "llama")
    assert (model_config["bos_id"], model_config["eos_id"], model_config["pad_id"]) == (1, 2, 3)
    assert model_config["qkv_bias"] == (kind == "qwen2" or name == "llama_attention_bias")
    assert model_config["tie_embeddings"] == (kind == "qwen2")
    if name == "qwen2_sliding":  # 12 tokens > the window of 4: the window must matter
        assert model_config["sliding_window"] == 4
        full = model.clone(sliding_window=None)
        assert np.abs(vlmjax_logits(full, params, tokens) - reference).max() > 100 * TOL
    if name == "llama3":
        assert model_config["rope_scaling"]["rope_type"] == "llama3"


def test_left_padded_batch_with_attention_mask(tmp_path_factory):
    directory = case_dir(tmp_path_factory, "llama3")
    model, params, _ = load_pretrained(directory)
    tokens, mask, positions = left_padded()
    reference = hf_masked_logits(load_hf(directory), tokens, mask, positions)
    ours = vlmjax_logits(model, params, tokens, segment_ids=mask, positions=positions)
    real = mask.astype(bool)
    diff = np.abs(ours[real] - reference[real]).max()
    print(f"PARITY decoder left-padded llama3: {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("name", ["llama", "qwen2_sliding"])
def test_kv_cached_decoding_matches_transformers_on_left_padded_prompts(tmp_path_factory, name):
    directory = case_dir(tmp_path_factory, name)
    model, params, _ = load_pretrained(directory)
    prompt_len, new = 8, 6
    tokens, mask, positions = left_padded(length=prompt_len + new)
    reference = hf_masked_logits(load_hf(directory), tokens, mask, positions)
    cache = model.init_cache(tokens.shape[0], prompt_len + new)
    step = jax.jit(lambda p, t, s, pos, c: model.apply({"params": p}, t, segment_ids=s,
                                                       positions=pos, cache=c))
    logits, cache = step(params, tokens[:, :prompt_len], mask[:, :prompt_len],
                         positions[:, :prompt_len], cache)
    real = mask[:, :prompt_len].astype(bool)
    diffs = [np.abs(np.asarray(logits)[real] - reference[:, :prompt_len][real]).max()]
    for i in range(prompt_len, prompt_len + new):  # one token at a time
        logits, cache = step(params, tokens[:, i:i + 1], mask[:, i:i + 1], positions[:, i:i + 1],
                             cache)
        diffs.append(np.abs(np.asarray(logits)[:, 0] - reference[:, i]).max())
    print(f"PARITY decoder KV cache {name}: {max(diffs):.2e}")
    assert max(diffs) < TOL
    assert int(cache["index"]) == prompt_len + new


def test_bf16_sharded_checkpoint_loads(tmp_path_factory):
    directory = case_dir(tmp_path_factory, "qwen2", dtype=torch.bfloat16, max_shard_size="40KB")
    assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
    model, params, _ = load_pretrained(directory)
    reference_model = load_hf(directory)  # the bf16 weights cast to float32
    embedding = reference_model.state_dict()["model.embed_tokens.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]), embedding)
    tokens = random_tokens(2, 10)
    diff = np.abs(vlmjax_logits(model, params, tokens) - hf_logits(reference_model, tokens)).max()
    assert diff < TOL


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen2_sliding", "llama_attention_bias"])
def test_export_gives_transformers_the_same_model(tmp_path_factory, tmp_path, name):
    directory = case_dir(tmp_path_factory, name)
    model, params, model_config = load_pretrained(directory)
    out = str(tmp_path / "exported")
    assert export_hf_decoder(params, model_config, out, tokenizer_dir=directory) == CASES[name][0]
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(out, file)), file
    with open(os.path.join(out, "config.json")) as f:
        assert decoder_config_from_hf(json.load(f)) == model_config  # the config round-trips
    original, exported = load_hf(directory).state_dict(), load_hf(out).state_dict()
    assert set(exported) == set(original)
    for key, tensor in original.items():  # float32 export: bit for bit
        assert torch.equal(tensor, exported[key]), key
    tokens = random_tokens(2, 12, seed=3)
    np.testing.assert_allclose(hf_logits(load_hf(out), tokens),
                               vlmjax_logits(model, params, tokens), atol=TOL)


def test_export_bf16_in_shards(tmp_path_factory, tmp_path):
    directory = case_dir(tmp_path_factory, "llama")
    _, params, model_config = load_pretrained(directory)
    out = str(tmp_path / "bf16")
    export_hf_decoder(params, model_config, out, dtype="bfloat16", max_shard_bytes=20_000)
    tensors = SafetensorsTensors(out)
    assert len({path for path, _, _ in tensors.entries.values()}) > 1
    assert {tensors.dtype(n) for n in tensors.names()} == {"BF16"}
    original = load_hf(directory).state_dict()
    exported = load_hf(out).state_dict()
    for key, tensor in original.items():
        assert torch.equal(tensor.to(torch.bfloat16).float(), exported[key]), key


@pytest.mark.parametrize("scan_layers", [False, True])
def test_loads_into_tensor_fsdp_shardings_on_8_devices(tmp_path_factory, scan_layers):
    directory = case_dir(tmp_path_factory, "llama")
    model, plain, model_config = load_pretrained(directory)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    scanned = model.clone(scan_layers=scan_layers)
    boxed = jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 3), jnp.int32))["params"])
    shardings = sharding.param_shardings(boxed, mesh, sharding.LOGICAL_RULES)
    model2, params, config2 = load_pretrained(directory, shardings=shardings)
    assert config2.get("scan_layers", False) == scan_layers == model2.scan_layers
    layers = params["layers"]["blocks" if scan_layers else "block0"]
    kernel = layers["query"]["kernel"]  # [(depth,) 64, 4, 16]: embed over fsdp, heads over tensor
    assert kernel.sharding == (shardings["layers"]["blocks" if scan_layers else "block0"]
                               ["query"]["kernel"])
    assert kernel.addressable_shards[0].data.shape == ((2,) if scan_layers else ()) + (32, 1, 16)
    tokens = random_tokens(2, 12)
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda p, t: model2.apply({"params": p}, t))(params, jnp.asarray(tokens))
    np.testing.assert_allclose(logits, vlmjax_logits(model, plain, tokens), atol=1e-5)


def test_streaming_holds_one_tensor_at_a_time(tmp_path_factory, monkeypatch):
    """Every tensor read is placed on device before the next read (one parameter's layers
    under scan_layers): the loader never gathers the checkpoint on the host."""
    directory = case_dir(tmp_path_factory, "qwen2", dtype=torch.bfloat16, max_shard_size="40KB")
    events = []
    read, place = SafetensorsTensors.read, hf_decoder._place
    monkeypatch.setattr(SafetensorsTensors, "read",
                        lambda self, name, dtype=np.float32: events.append("read") or read(
                            self, name, dtype))
    monkeypatch.setattr(hf_decoder, "_place", lambda x, s: events.append("place") or place(x, s))
    for scan_layers, most in ((False, 1), (True, 2)):  # 2 layers
        events.clear()
        params, _ = hf_decoder.load_hf_decoder(directory, scan_layers=scan_layers)
        pending, peak = 0, 0
        for event in events:
            pending = pending + 1 if event == "read" else 0
            peak = max(peak, pending)
        assert peak == most
        assert events.count("place") == len(jax.tree.leaves(params))
        assert events.count("read") == len(SafetensorsTensors(directory).names())


def test_benchmark_checkpoint_writer_gives_a_loadable_llama(tmp_path):
    """benchmarks/load_memory.py's torch-free writer (its multi-GB runs are not tests)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "load_memory.py")
    spec = importlib.util.spec_from_file_location("load_memory", path)
    load_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_memory)
    config = load_memory.model_config("tiny")
    count = load_memory.write_checkpoint(str(tmp_path), config, max_shard_bytes=100_000)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    model, params, model_config = load_pretrained(str(tmp_path))
    assert sum(x.size for x in jax.tree.leaves(params)) == count
    assert model_config == config
    reference = load_hf(str(tmp_path))
    tokens = random_tokens(1, 6)
    np.testing.assert_allclose(vlmjax_logits(model, params, tokens), hf_logits(reference, tokens),
                               atol=TOL)


def test_workdir_of_an_lm_run_loads_and_exports(tmp_path_factory, tmp_path):
    """A trainer workdir of task `lm` (config.model: Decoder arguments + dtype), scanned."""
    from vlmjax.convert.cli import main as cli_main
    from vlmjax.convert.hf_decoder_config import decoder_kwargs
    from vlmjax.models import scan_layout
    from vlmjax.train.checkpoint import Checkpointer

    directory = case_dir(tmp_path_factory, "qwen2")
    model, params, model_config = load_pretrained(directory)
    workdir = tmp_path / "lm_run"
    checkpointer = Checkpointer(str(workdir), every=1, async_save=False)
    checkpointer.save(3, {"params": scan_layout.to_scanned(params), "step": 3}, {})
    checkpointer.close()
    run_model = {**decoder_kwargs(model_config), "scan_layers": True, "dtype": "bfloat16"}
    (workdir / "config.json").write_text(json.dumps({
        "task": "lm", "model": run_model,
        "input": {"tokenizer": os.path.join(directory, "tokenizer.json")}}))
    loaded_model, loaded, loaded_config = load_pretrained(str(workdir))
    assert loaded_model.scan_layers and "blocks" in loaded["layers"]  # the run's layout
    tokens = random_tokens(2, 9)
    expected = vlmjax_logits(model, params, tokens)
    np.testing.assert_allclose(vlmjax_logits(loaded_model, loaded, tokens), expected, atol=1e-5)
    unrolled_model, unrolled, _ = load_pretrained(str(workdir), scan_layers=False)
    assert not unrolled_model.scan_layers and "block1" in unrolled["layers"]
    np.testing.assert_allclose(vlmjax_logits(unrolled_model, unrolled, tokens), expected,
                               atol=1e-5)
    out = str(tmp_path / "hf_out")
    cli_main(["export", "--to", "hf", os.path.join(str(workdir), "checkpoints", "3"), out])
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    np.testing.assert_allclose(hf_logits(load_hf(out), tokens),
                               vlmjax_logits(model, params, tokens), atol=TOL)


def test_cli_import_converted_dir_and_export(tmp_path_factory, tmp_path, capsys):
    from vlmjax.convert import load_pretrained_tokenizer
    from vlmjax.convert.cli import main as cli_main

    directory = case_dir(tmp_path_factory, "llama3")
    converted = str(tmp_path / "converted")
    cli_main(["import", "--from", "hf", directory, "--out", converted])
    assert "llama, 2 layers" in capsys.readouterr().out
    with open(os.path.join(converted, "config.json")) as f:
        config = json.load(f)
    assert (config["architecture"], config["tokenizer"]["file"]) == ("decoder", "tokenizer.json")
    model, params, model_config = load_pretrained(converted)
    _, from_hf, hf_config = load_pretrained(directory)
    assert model_config == hf_config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(from_hf)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    scanned_model, scanned, _ = load_pretrained(converted, scan_layers=True)  # stored unrolled
    assert scanned["layers"]["blocks"]["up"]["kernel"].shape == (2, 64, 96)
    tokens = random_tokens(2, 12)
    np.testing.assert_allclose(vlmjax_logits(scanned_model, scanned, tokens),
                               vlmjax_logits(model, params, tokens), atol=1e-5)
    tokenizer, settings = load_pretrained_tokenizer(converted)
    assert (settings["add_bos"], tokenizer.bos_id, tokenizer.eos_id) == (True, 1, 2)
    out = str(tmp_path / "exported")
    cli_main(["export", "--to", "hf", converted, out])
    np.testing.assert_allclose(hf_logits(load_hf(out), tokens), hf_logits(load_hf(directory),
                                                                          tokens), atol=TOL)


def write_config(tmp_path, name, **config):
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


BASE = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2)


@pytest.mark.parametrize("config, message", [
    (dict(model_type="mistral", architectures=["MistralForCausalLM"]),
     r"model_type 'mistral' is not supported.*'llama', 'opt', 'qwen2'.*LlamaForCausalLM"),
    (dict(model_type="llama", architectures=["LlamaForSequenceClassification"]),
     r"LlamaForSequenceClassification.*expected LlamaForCausalLM"),
    (dict(model_type="llama", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                               "factor": 4.0}),
     r"rope_type 'yarn' is not supported.*'default', 'linear', 'llama3'"),
    (dict(model_type="llama", rope_theta=1e4, rope_scaling={"type": "dynamic", "factor": 2.0}),
     r"rope_type 'dynamic' is not supported"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1),
     r"layers \[1\] of 2 use sliding-window attention.*only all-sliding or no-sliding"),
    (dict(model_type="llama", mlp_bias=True), r"mlp_bias=True is not supported"),
])
def test_unsupported_configs_are_clear_errors(tmp_path, config, message):
    directory = write_config(tmp_path, "model", **BASE, **config)
    with pytest.raises(ValueError, match=message):
        load_pretrained(directory)


def test_per_tensor_reader_matches_torch_state_dict_sharded_bf16(tmp_path_factory):
    directory = tiny_llama_dir(tmp_path_factory, "qwen2", dtype=torch.bfloat16,
                               max_shard_size="40KB")
    tensors = SafetensorsTensors(directory)
    files = {path for path, _, _ in tensors.entries.values()}
    assert len(files) > 1, "the fixture should have written several shards"
    state = load_hf(directory).state_dict()
    # Tied qwen2 saves no lm_head; neither side has rotary buffers in the file.
    assert set(tensors.names()) == set(state) - {"lm_head.weight"}
    for name in tensors.names():
        assert tensors.dtype(name) == "BF16"
        np.testing.assert_array_equal(tensors.read(name), state[name].float().numpy(), err_msg=name)


def test_reader_names_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SafetensorsTensors(str(tmp_path))
