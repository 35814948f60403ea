"""config.evals entries: validation without reading data, per-evaluator data, the schedule."""
import ml_collections
import pytest

from vlmjax import config as config_lib
from vlmjax.config import ConfigError
from vlmjax.evals import registry
from vlmjax.evals.data import resolve_data_config
from vlmjax.evals.schedule import Schedule

SHAPES = ml_collections.ConfigDict(dict(source="vlm_shapes", split="train", config="64px",
                                        data_dir="/nonexistent/tfds"))
SHARDS = ml_collections.ConfigDict(dict(source="webdataset", split="train",
                                        paths="/data/train-{000..009}.tar"))


def check(evals, train=SHAPES):
    registry.check_evals(ml_collections.ConfigDict(evals), train)


def zero_shot(**keys):
    return dict(type="zero_shot", data=dict(split="test"), **keys)


def test_valid_entries_pass_and_read_nothing(tmp_path):
    train = ml_collections.ConfigDict(dict(SHAPES, data_dir=str(tmp_path / "tfds")))
    check(dict(test=zero_shot(templates="vlm_shapes", every=100, batch_size=8),
               coco=dict(type="retrieval", max_images=5000, captions_per_image=5,
                         data=dict(source="tfds", name="coco_captions", split="test",
                                   text_key="captions/text")),
               use_ema=False), train)
    assert not (tmp_path / "tfds").exists()  # pure: nothing built, nothing read


@pytest.mark.parametrize("evals, message", [
    (dict(test=dict(type="nope")), r"evals.test.type 'nope' is not one of \['captioning', 'cot', 'itm', 'perplexity', "),
    (dict(test=zero_shot(splits=["test"])), r"evals.test.splits is not used by anything"),
    (dict(test=zero_shot(templates="nope")), r"evals.test.templates 'nope' is not one of"),
    (dict(test=zero_shot(every=-1)), r"evals.test.every must be an integer >= 0"),
    (dict(test=zero_shot(batch_size=0)), r"evals.test.batch_size must be an integer >= 1"),
    (dict(test=dict(type="retrieval", data=dict(split="test"), max_images=1.5)),
     r"evals.test.max_images must be an integer >= 0"),
    (dict(every=100), r"evals.every is not an evaluator entry"),  # the old global key
    (dict(test=dict(type="zero_shot")), r"evals.test.data.split is needed"),
    (dict(test=dict(type="zero_shot", data=dict(split="test", confg="64px"))),
     r"evals.test.data: unknown key\(s\) \['confg'\]"),
    (dict(test=zero_shot(), use_ema="yes"), r"evals.use_ema must be True or False"),
])
def test_bad_entries_name_the_key_and_what_is_valid(evals, message):
    with pytest.raises(ConfigError, match=message):
        check(evals)


def test_data_defaults_to_the_training_source_at_the_given_split():
    config = resolve_data_config({"split": "validation"}, SHAPES, "evals.v.data")
    assert config.to_dict() == dict(SHAPES.to_dict(), split="validation")
    own = resolve_data_config({"source": "tfds", "name": "imagenet2012", "split": "validation",
                               "label_key": "label"}, SHAPES, "evals.i.data")
    assert own.to_dict() == {"source": "tfds", "name": "imagenet2012", "split": "validation",
                             "label_key": "label"}  # nothing of the training source


def test_training_filters_are_not_applied_to_evaluations():
    train = ml_collections.ConfigDict(dict(SHAPES.to_dict(), filters=dict(filter_text_length=True)))
    assert "filters" not in resolve_data_config({"split": "test"}, train, "evals.t.data")


def test_a_file_source_cannot_honour_a_split():
    # Today's bug: this evaluation silently scored the training shards.
    with pytest.raises(ConfigError, match=r"evals.test.data.split='test': source 'webdataset' "
                                          r"has no splits .* evals.test.data.paths"):
        check(dict(test=zero_shot()), SHARDS)
    with pytest.raises(ConfigError, match=r"would read the training files"):
        check(dict(test=dict(type="retrieval", data={})), SHARDS)
    held_out = resolve_data_config({"paths": "/data/val-000.tar"}, SHARDS, "evals.v.data")
    assert held_out.paths == "/data/val-000.tar" and "split" not in held_out
    with pytest.raises(ConfigError, match=r"source 'csv' has no splits"):
        resolve_data_config({"source": "csv", "csv_path": "/v.csv", "split": "test"}, SHARDS,
                            "evals.v.data")


def test_training_on_a_mixture_needs_evaluations_with_their_own_source():
    mixture = ml_collections.ConfigDict(dict(source="mixture", sources=dict(
        a=dict(SHAPES.to_dict(), weight=1.0), b=dict(SHARDS.to_dict(), weight=1.0))))
    with pytest.raises(ConfigError, match=r"training reads a mixture"):
        check(dict(test=zero_shot()), mixture)
    check(dict(test=dict(type="zero_shot", data=dict(SHAPES.to_dict(), split="test"))), mixture)


def test_task_construction_validates_evals_eagerly(tmp_path):
    from vlmjax.sharding import make_mesh
    from vlmjax.train.tasks.contrastive import ContrastiveTask
    config = config_lib.load_config("configs/siglip/tiny.py:runlocal")
    config_lib.apply_overrides(config, [f"data.data_dir={tmp_path / 'tfds'}",
                                        "evals.test.templates='vlm_shape'"])
    with pytest.raises(ConfigError, match=r"evals.test.templates 'vlm_shape' is not one of"):
        ContrastiveTask(config, make_mesh(config.mesh))
    assert not (tmp_path / "tfds").exists()


class FakeEvaluator:
    def __init__(self, name, every):
        self.name, self.every, self.calls = name, every, []

    def __call__(self, params):
        self.calls.append(params)
        return {f"fake/{self.name}/x": float(params)}


def test_schedule_runs_each_evaluator_at_its_own_every_and_all_at_the_end():
    often, final = FakeEvaluator("often", 2), FakeEvaluator("final", 0)
    schedule = Schedule([often, final])
    assert [schedule.due(step, last=False) for step in (1, 2, 3, 4)] == [False, True, False, True]
    results = schedule.run(2.0, step=2)
    assert set(results) == {"fake/often/x", "eval/seconds"} and final.calls == []
    results = schedule.run(3.0, step=5, last=True, prefix="ema/")
    assert {k: v for k, v in results.items() if "seconds" not in k} == {
        "ema/fake/often/x": 3.0, "ema/fake/final/x": 3.0}
    assert "ema/eval/seconds" in results
    assert not Schedule([]).due(10, last=True)
