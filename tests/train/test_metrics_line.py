from vlmjax.train import metrics


def test_progress_line_shows_rates_eta_mfu_and_only_nonzero_skips():
    progress = metrics.Progress(total_steps=100, start_step=0, batch_size=10,
                                flops_per_example=1e9, peak_flops=1e12,
                                summary_metrics=(("temperature", "t"), "bias"))
    progress.last_time -= 2.0  # 10 steps in 2 s
    line, rates = progress.report(10, {"loss": 1.5, "learning_rate": 1e-3, "temperature": 10.0,
                                       "grad_norm": 7.0,
                                       "data/skipped/text_too_short": 3.0,
                                       "data/skipped/corrupt_image": 0.0})
    assert "step 10/100" in line and "loss 1.5000" in line and "t 10.00" in line
    assert "bias" not in line  # a summary metric the step did not report is left out
    assert "7.00" not in line  # grad_norm is no summary metric of this task
    assert 49 < rates["perf/examples_per_s"] <= 50  # 100 examples in ~2 s
    assert abs(rates["perf/mfu"] - rates["perf/examples_per_s"] * 1e9 / 1e12) < 1e-9
    assert "ETA 0:00:1" in line  # 90 steps at ~0.2 s
    assert "text_too_short=3" in line and "corrupt_image" not in line
    assert metrics.format_duration(3725) == "1:02:05"


def test_progress_line_shows_only_the_tasks_summary_metrics():
    values = {"loss": 1.0, "learning_rate": 1e-3, "temperature": 10.0, "bias": -3.0}
    plain, _ = metrics.Progress(10, 0, 4).report(1, values)
    assert "t 10.00" not in plain and "-3.00" not in plain
    shown, _ = metrics.Progress(10, 0, 4, summary_metrics=("bias",)).report(1, values)
    assert "bias -3.00" in shown and "10.00" not in shown


def test_a_rate_summary_metric_is_shown_and_logged_per_second():
    """The LM's counted tokens: per-step num_tokens over the step time (tasks/lm.py)."""
    progress = metrics.Progress(10, 0, 4, summary_metrics=(("perplexity", "ppl"),
                                                           ("num_tokens", "tok/s", "rate")))
    progress.last_time -= 2.0  # 10 steps of 1000 counted tokens in 2 s
    line, rates = progress.report(10, {"loss": 1.0, "learning_rate": 1e-3, "perplexity": 2.72,
                                       "num_tokens": 1000.0})
    assert 4900 < rates["perf/num_tokens_per_s"] <= 5000
    assert "ppl 2.72" in line and f"tok/s {rates['perf/num_tokens_per_s']:.0f}" in line
    assert "tok/s 1000" not in line
    assert metrics.summary_labels((("num_tokens", "tok/s", "rate"), "bias")) == [
        ("num_tokens", "tok/s"), ("bias", "bias")]
