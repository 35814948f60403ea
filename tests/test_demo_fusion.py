"""The `make demo-fusion` driver's own logic: the chain's commands (reusing the LLaVA demo's
SigLIP and LM runs) and its few-shot table (the training run is tested in
tests/train/test_fusion_task.py)."""
from vlmjax.demos import fusion as demo


def test_chain_reuses_the_llava_demos_parts():
    runs = {run.name: run.config.format(data_dir="/d", workdir="/w")
            for run in demo.chain(",steps=10")}
    assert list(runs) == ["siglip", "lm", "fusion"]
    assert runs["fusion"] == ("configs/fusion/tiny.py:shapes_dir=/d,mmc4_dir=/w/mmc4_shapes,"
                              "vision_init=/w/siglip,llm_init=/w/lm,steps=10")


def test_table_has_a_row_per_split_and_shot_count():
    metrics = {"vqa/test/0shot/exact_match": 0.5, "vqa/test/0shot/colour": 0.75,
               "vqa/test/4shot/exact_match": 0.625, "vqa/validation/2shot/exact_match": 0.25}
    rows = demo.vqa_table(metrics).splitlines()
    assert rows[2] == "| validation | 2 | 25.0% | - | - | - | - | - | - |"
    assert rows[3] == "| test | 0 | 50.0% | 75.0% | - | - | - | - | - |"
    assert rows[4].startswith("| test | 4 | 62.5% |") and len(rows) == 5
