"""The `make demo-llava` driver's own logic: which runs are complete, the commands of the
chain, the VQA table from metrics.jsonl and the questions of an entry (the training runs
themselves are tested in tests/train/test_llava_task.py)."""
import json
import os

import pytest

from vlmjax.data.shapes_instruct import IMAGE_TOKEN, SHORT_ANSWER_INSTRUCTION
from vlmjax.demos import llava as demo


def workdir_with(path, total_steps, checkpoints):
    os.makedirs(path / "checkpoints")
    (path / "config.json").write_text(json.dumps({"total_steps": total_steps}))
    for step in checkpoints:
        os.makedirs(path / "checkpoints" / str(step))
    return str(path)


def test_a_run_is_complete_only_with_its_last_steps_checkpoint(tmp_path):
    assert demo.is_complete(workdir_with(tmp_path / "done", 300, [200, 300]))
    assert not demo.is_complete(workdir_with(tmp_path / "interrupted", 300, [200]))
    assert not demo.is_complete(str(tmp_path / "missing"))


def test_chain_stages_read_the_earlier_runs():
    runs = {run.name: run.config.format(data_dir="/d", workdir="/w")
            for run in demo.chain(stage2_args=",steps=10")}
    assert list(runs) == ["siglip", "lm", "stage1", "shape", "stage2"]
    assert "vision_init=/w/siglip" in runs["stage1"] and "llm_init=/w/lm" in runs["stage1"]
    # the shape warm-up starts from stage 1, stage 2 from the warm-up
    assert "stage1=/w/stage1" in runs["shape"] and "vqa_only=shape" in runs["shape"]
    assert "stage1=/w/shape" in runs["stage2"] and runs["stage2"].endswith(",steps=10")
    assert "llava_dir=/w/llava_shapes" in runs["stage2"]


def test_vqa_table_reads_the_last_evaluation(tmp_path):
    records = [{"step": 100, "vqa/test_vqa/exact_match": 0.1},
               {"step": 200, "train/loss": 0.5},
               {"step": 400, "vqa/test_vqa/exact_match": 0.925, "vqa/test_vqa/colour": 0.9,
                "vqa/validation_vqa/exact_match": 0.95}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = demo.vqa_table(demo.final_metrics(str(tmp_path))).splitlines()
    assert table[0].startswith("| split | exact match | colour |")
    assert table[2].startswith("| validation | 95.0% | - |")
    assert table[3].startswith("| test | 92.5% | 90.0% | - |") and len(table) == 4
    (tmp_path / "metrics.jsonl").write_text(json.dumps(records[1]) + "\n")
    with pytest.raises(ValueError, match="no vqa/ results"):
        demo.final_metrics(str(tmp_path))


@pytest.mark.parametrize("human", [
    f"{IMAGE_TOKEN}\nWhat colour is the star?\n{SHORT_ANSWER_INSTRUCTION}",
    f"What colour is the star?\n{SHORT_ANSWER_INSTRUCTION}\n{IMAGE_TOKEN}"])
def test_questions_of_an_entry_drop_the_image_token_and_instruction(human):
    entry = {"conversations": [{"from": "human", "value": human},
                               {"from": "gpt", "value": "red"}]}
    assert demo.questions_of(entry) == ["What colour is the star?"]
