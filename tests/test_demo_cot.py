"""The `make demo-cot` driver: the CoT SFT run reads the LLaVA chain's stage 2 and the CoT
export, and a complete export is reused (the runs themselves: tests/train/test_llava_task.py)."""
import os

from vlmjax.demos import cot as demo


def test_cot_run_starts_from_stage2_and_reads_the_cot_export():
    config = demo.cot_run("/d", "/w", ",steps=5").config
    assert config.startswith("configs/llava_cot/tiny.py:")
    assert "llava=/w/stage2" in config and "llava_dir=/w/llava_cot" in config
    assert "shapes_dir=/d" in config and config.endswith(",steps=5")


def test_a_complete_export_is_reused(tmp_path, capsys):
    out = tmp_path / "llava_cot"
    os.makedirs(out)
    (out / ".complete").write_text("")
    assert demo.export_cot("/nowhere", str(tmp_path)) == str(out)
    assert "reusing" in capsys.readouterr().out
