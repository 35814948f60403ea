"""An evaluation of held-out files (CSV): it reads them, not the training files; bad records are
skipped and reported, the rest scored."""
import os

import jax.numpy as jnp
import ml_collections
import numpy as np

from tests.evals.test_tfds_evals import bag_of_words, fake_two_towers, input_config, png
from tests.evals.test_tfds_evals import word_tokenizer
from vlmjax.evals import registry
from vlmjax.sharding import make_mesh


def test_csv_retrieval_skips_and_reports_bad_records(tmp_path, capsys):
    captions = [f"word{i}" for i in range(4)]
    tokenizer = word_tokenizer(tmp_path / "tokenizer.json", captions)
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(png(i))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = ["image,caption"] + [f"{i}.png,{c}" for i, c in enumerate(captions[:2])] + [
        "broken.png,word9", "missing.png,word9"] + [f"{i}.png,{captions[i]}" for i in (2, 3)]
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    train = ml_collections.ConfigDict(dict(source="csv", csv_path="/never/train.csv"))
    evals = ml_collections.ConfigDict({"held_out": dict(
        type="retrieval", batch_size=8,
        data=dict(csv_path=str(tmp_path / "val.csv"), image_dir=str(tmp_path)))})
    mesh = make_mesh({"data": -1})
    context = registry.EvalContext(mesh, train, input_config(tokenizer),
                                   fake_two_towers(mesh, 6))
    (evaluator,) = registry.build_evaluators(evals, context)
    table = bag_of_words(tokenizer, captions)
    table[3] = table[0]  # image 3 looks like image 0
    metrics = evaluator({"table": jnp.asarray(table)})
    assert "skipped 2 bad record(s)" in capsys.readouterr().out
    assert evaluator.data.skipped == 2
    # Images 0-3, one caption each: image 3 finds image 0's caption first; its own caption
    # scores 0 with every image, a tie, which ranks its image first.
    assert metrics["retrieval/held_out/i2t_r1"] == 0.75
    assert metrics["retrieval/held_out/t2i_r1"] == 1.0
    assert np.isclose(metrics["retrieval/held_out/i2t_r5"], 1.0)
    assert not os.path.exists("/never")
