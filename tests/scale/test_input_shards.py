"""The global batch as fixed data shards: the same batches on any process count."""
import numpy as np
import pytest

from vlmjax.train import input_shards


class FakeStream:
    """Shard `shard` of `count`: batches of global_batch / count rows tagged with the shard."""

    def __init__(self, shard, count, state, global_batch=8):
        self.shard, self.rows = shard, global_batch // count
        self.position = (state or {}).get("position", 0)
        self.skip_counts = {"corrupt_image": shard}

    def __next__(self):
        self.position += 1
        return {"id": np.full(self.rows, 100 * self.shard + self.position)}

    def get_state(self):
        return {"position": self.position}

    def close(self):
        pass


def global_batches(num_shards, process_count, steps, states=None):
    """What all processes together feed to the mesh, in process order."""
    inputs = [input_shards.ShardedInput(FakeStream, num_shards, p, process_count, states)
              for p in range(process_count)]
    return [np.concatenate([next(i)["id"] for i in inputs]) for _ in range(steps)], inputs


def test_global_batches_do_not_depend_on_the_process_count():
    one, _ = global_batches(4, 1, 3)
    for processes in (2, 4):
        many, inputs = global_batches(4, processes, 3)
        np.testing.assert_array_equal(np.stack(many), np.stack(one))
        assert [len(i.shards) for i in inputs] == [4 // processes] * processes
    assert list(one[0]) == [1, 1, 101, 101, 201, 201, 301, 301]


def test_positions_saved_by_two_processes_resume_on_one():
    _, inputs = global_batches(2, 2, 5)
    saved = {k: v for i in inputs for k, v in i.get_state().items()}
    assert saved == {0: {"position": 5}, 1: {"position": 5}}
    resumed, (single,) = global_batches(2, 1, 1, saved)
    assert list(resumed[0]) == [6, 6, 6, 6, 106, 106, 106, 106]
    assert single.skip_counts == {"corrupt_image": 1}


def test_shard_count_choice():
    assert input_shards.choose_num_shards(0, None, 2) == (2, "")    # new run: one per process
    assert input_shards.choose_num_shards(0, 4, 2) == (4, "")       # resume keeps the saved
    assert input_shards.choose_num_shards(8, 4, 2) == (8, "")       # the config decides
    count, note = input_shards.choose_num_shards(0, 2, 3)          # 3 cannot split 2
    assert count == 3 and "restarts as 3 fresh streams" in note
    with pytest.raises(ValueError, match="data_shards=3 is not a multiple of the process count 2"):
        input_shards.choose_num_shards(3, None, 2)
    with pytest.raises(ValueError, match="not a positive multiple"):
        input_shards.ShardedInput(FakeStream, 3, 0, 2)
