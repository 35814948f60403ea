"""The `make demo-blip2` driver's own logic: the chain's commands (reusing the LLaVA demo's
SigLIP and LM runs) and its tables from metrics.jsonl (the training runs are tested in
tests/train/test_blip2_task.py)."""
import json

from vlmjax.demos import blip2 as demo


def test_chain_reuses_the_llava_demos_parts_and_chains_the_stages():
    runs = {run.name: run.config.format(data_dir="/d", workdir="/w")
            for run in demo.chain(stage1_args=",steps=10")}
    assert list(runs) == ["siglip", "lm", "blip2_stage1", "blip2_stage2"]
    assert "stage=1" in runs["blip2_stage1"] and "vision_init=/w/siglip" in runs["blip2_stage1"]
    assert runs["blip2_stage1"].endswith(",steps=10")
    assert "stage1=/w/blip2_stage1" in runs["blip2_stage2"]
    assert "llm_init=/w/lm" in runs["blip2_stage2"]
    assert "llava_dir=/w/llava_shapes" in runs["blip2_stage2"]


def test_tables_read_the_last_evaluation_of_each_metric(tmp_path):
    records = [{"step": 10, "itm/itm_test/accuracy": 0.5, "train/loss_itc": 3.0},
               {"step": 20, "itm/itm_test/accuracy": 0.875,
                "retrieval/retrieval_test/i2t_r1": 0.25,
                "retrieval/retrieval_validation/t2i_r1_rerank": 0.5,
                "captioning/test_captions/colour_acc": 0.9, "vqa/test_vqa/exact_match": 0.8,
                "vqa/test_vqa/shape": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = demo.evaluations(str(tmp_path))
    assert "train/loss_itc" not in metrics and metrics["itm/itm_test/accuracy"] == 0.875
    stage1 = demo.stage1_table(metrics).splitlines()
    assert stage1[2] == "| validation | - | - | - | - | 50.0% |"
    assert stage1[3].startswith("| test | 87.5% | 25.0% | - |")
    stage2 = demo.stage2_table(metrics).splitlines()
    assert stage2[3].startswith("| test | 90.0% | - | - | - | 80.0% | - | 70.0% |")


def test_blip_demo_starts_blip_from_the_siglip_run_and_tables_its_evaluations(tmp_path):
    from vlmjax.demos import blip
    runs = blip.chain(",steps=10")
    assert [run.name for run in runs] == ["siglip_2000", "blip"]
    assert all(run.sets_data_dir for run in runs)
    assert runs[0].config == "configs/siglip/tiny.py:steps=2000"
    config = runs[1].config.format(data_dir="/d", workdir="/w")
    assert config == "configs/blip/tiny.py:vision_init=/w/siglip_2000,steps=10"
    assert blip.chain("", siglip_steps=800)[1].config.format(data_dir="/d", workdir="/w") == (
        "configs/blip/tiny.py:vision_init=/w/siglip_800")
    metrics = {"itm/itm_test/accuracy": 0.95, "retrieval/retrieval_test/i2t_r1_rerank": 0.5,
               "captioning/captioning_test/cider_d": 2.25}
    rows = blip.table(metrics).splitlines()
    assert "| itm test accuracy | 95.0% |" in rows
    assert "| retrieval test i2t_r1_rerank | 50.0% |" in rows
    assert "| captions test cider_d | 2.250 |" in rows and "| itm validation accuracy | - |" in rows
