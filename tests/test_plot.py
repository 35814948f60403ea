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


def test_together_draws_the_metrics_in_one_figure_and_names_missing_ones(tmp_path, monkeypatch):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in (1, 2, 3):
            f.write(json.dumps({"step": step, "train/loss_itc": 3.0 / step,
                                "train/loss_itm": 0.7, "train/loss_lm": 5.0 / step}) + "\n")
    drawn = []
    import matplotlib.axes
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, y, **kw: (
        drawn.append((kw.get("label"), list(y))), original(self, x, y, **kw))[1])
    out = str(tmp_path / "losses.png")
    assert plot.main([str(tmp_path), "--together", "train/loss_itc,train/loss_lm",
                      "--out", out]) == 0
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert drawn == [("train/loss_itc", [3.0, 1.5, 1.0]), ("train/loss_lm", [5.0, 2.5, 5.0 / 3])]
    with pytest.raises(ValueError, match=r"has no \['train/loss_mlm'\]"):
        plot.plot_together(str(tmp_path), ["train/loss_mlm"], out)
