"""`python -m vlmjax.generate` on a tiny HF Llama directory: the printed text is the tokenizer's
decoding of `generate`'s tokens, streamed in pieces for greedy, at once for beam search."""
import io

import numpy as np
import pytest

from tests.convert.decoder_fixtures import EOS_ID, tiny_llama_dir
from vlmjax import generate as cli
from vlmjax.convert import load_pretrained
from vlmjax.inference import generate

PROMPT = "a photo of the red cat"


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.pieces = []

    def write(self, text):
        self.pieces.append(text)
        return super().write(text)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tiny_llama_dir(tmp_path_factory, "llama")
    model, params, _ = load_pretrained(directory)
    import tokenizers
    # The reference encoding: the tokenizer.json's own post-processor adds Llama's BOS.
    ids = tokenizers.Tokenizer.from_file(f"{directory}/tokenizer.json").encode(PROMPT).ids
    tokenizer, _ = cli.load_tokenizer(directory, None)
    return directory, model, params, np.asarray([ids], np.int32), tokenizer


@pytest.mark.parametrize("strategy,extra", [("greedy", ["--chunk", "2"]),
                                            ("beam", ["--num_beams", "3"])])
def test_cli_prints_the_decoding_of_generate(llama, strategy, extra, capsys):
    directory, model, params, ids, tokenizer = llama
    assert ids[0, 0] == 1  # BOS
    args = cli.parser().parse_args(["--model", directory, "--prompt", PROMPT, "--max_new_tokens",
                                    "8", "--strategy", strategy] + extra)
    out = Recorder()
    text, result = cli.run(args, out=out)
    expected = generate(model, params, ids, max_new_tokens=8, strategy=strategy, num_beams=3,
                        eos_id=EOS_ID, pad_id=tokenizer.pad_id)
    np.testing.assert_array_equal(result.tokens, expected.tokens)
    length = int(expected.lengths[0])
    decoded = tokenizer.decode(np.asarray(expected.tokens[0, :length]))
    assert decoded.strip() and text == decoded
    assert out.getvalue() == decoded + "\n"
    written = [p for p in out.pieces if p]
    if strategy == "greedy" and length > 2:
        assert len(written) > 2, "greedy output should be streamed in several pieces"
    if strategy == "beam":
        assert len(written) == 2  # the text, then the newline


def test_cli_main_parses_and_rejects_a_bad_model(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(["--model", str(tmp_path / "missing"), "--prompt", "hi"])
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["--model", "x", "--prompt", "y", "--early_stopping", "maybe"])


def test_new_token_budget_defaults_to_32_and_to_96_per_stage_with_cot():
    def parsed(*extra):
        return cli.new_token_budget(cli.parser().parse_args(["--model", "m", "--prompt", "p",
                                                             *extra]))
    assert parsed() == 32
    assert parsed("--cot", "stage_beam") == 96
    assert parsed("--cot", "stage_beam", "--max_new_tokens", "7") == 7


def test_judge_choices_are_the_model_judges():
    args = ["--model", "m", "--prompt", "p", "--cot", "stage_beam"]
    assert cli.parser().parse_args(args).judge == "model"  # LLaVA-CoT's, as the issue asks
    assert cli.parser().parse_args(args + ["--judge", "loglik"]).judge == "loglik"
    with pytest.raises(SystemExit):
        cli.parser().parse_args(args + ["--judge", "reference"])  # the oracle needs answers
