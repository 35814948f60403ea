"""Remote (gs://-style) workdir code paths, exercised through TensorFlow's file:// scheme."""
import json

from vlmjax import gfile
from vlmjax.train import metrics


def test_gfile_helpers_on_a_url(tmp_path):
    url = f"file://{tmp_path}/run/sub"
    assert gfile.is_remote(url) and not gfile.is_remote(str(tmp_path))
    assert gfile.absolute(url) == url  # os.path.abspath would mangle it
    gfile.makedirs(url)
    gfile.write_text(gfile.join(url, "config.json"), '{"a": 1}')
    assert gfile.exists(gfile.join(url, "config.json"))
    assert json.loads(gfile.read_text(gfile.join(url, "config.json"))) == {"a": 1}
    assert (tmp_path / "run" / "sub" / "config.json").exists()


def test_metrics_writer_appends_on_a_url(tmp_path):
    url = f"file://{tmp_path}"
    for first in (1, 3):  # a resumed run keeps the earlier lines
        writer = metrics.MetricsWriter(url, tensorboard=False)
        writer.write(first, {"train/loss": 2.0})
        writer.write(first + 1, {"train/loss": 1.0})
        writer.close()
    assert [r["step"] for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3, 4]
