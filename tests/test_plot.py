import json

import pytest

from vlmjax import plot


def test_plot_writes_one_png_per_metric(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in (1, 2, 3):
            f.write(json.dumps({"step": step, "train/loss": 1.0 / step,
                                "train/data/skipped/corrupt_image": 0.0}) + "\n")
        f.write(json.dumps({"step": 3, "zero_shot/test/top1": 0.5}) + "\n")
    files = plot.plot_metrics(str(tmp_path))
    assert sorted(p.split("/")[-1] for p in files) == ["train_loss.png", "zero_shot_test_top1.png"]
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in files)


def test_plot_missing_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is .* a vlmjax workdir"):
        plot.plot_metrics(str(tmp_path / "nope"))
    assert plot.main([str(tmp_path / "nope")]) == 2
