"""The task contract: what a learning strategy supplies to the shared trainer.

`Task` is the typed interface (a runtime-checkable Protocol: `isinstance(task, Task)` checks
that every member exists; tests/train/test_task_contract.py checks each registered task).
`TaskDefaults` gives the optional members their defaults; a task subclasses it and overrides
what it needs.

Trainer-side view of one training run:
  task = TaskClass(config, mesh)          # validates every section it reads, touches no disk
  params = task.init_params(rng)          # or task.pretrained_params(config.model_init, ...)
  step: task.loss_fn(params, extra, batch, rng), only `task.trainable` params differentiated;
        extra = task.update_extra(extra, params, aux) inside the jitted step
  data: task.train_input(state, shard, num_shards) (its pipeline ends in example_transform)
  evals: task.evaluators(config.evals), run on the raw (and EMA) params
  logs: task.summary_metrics in the progress line; MFU from task.flops_per_example
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

from vlmjax.config import ConfigError

@runtime_checkable
class Task(Protocol):
    config_keys: Mapping[str, str]
    """Top-level config keys the task reads -> one-line doc. With the trainer's TRAINER_KEYS
    they are the valid set; a key in neither is an error."""

    trainable: Any
    """Which params get gradients: None (all), a regex searched in each '/'-joined parameter
    path, or a bool pytree over the params. The rest are frozen (no gradient, no optimiser
    state); optim.freeze freezes more on top."""

    summary_metrics: Sequence[Any]
    """Train metrics (names, or (name, label) pairs) shown in the progress line and the final
    table beside loss and learning rate."""

    compute_dtype: str
    """'float32' | 'bfloat16': the dtype of the model's matmuls, for the MFU peak."""

    def __init__(self, config, mesh): ...

    def init_params(self, rng) -> Any:
        """Boxed params (nn.LogicallyPartitioned leaves) of a random init; jitted by the
        trainer straight into their shardings."""

    def pretrained_params(self, model_init, abstract_params, shardings) -> Any:
        """Params from `config.model_init` (one source, or a dict of sources per sub-model),
        checked against `abstract_params` and placed by `shardings`."""

    def extra_state(self, params) -> Any:
        """Initial task state that gradients do not train (may be boxed for logical-axis
        sharding; replicated otherwise). {} if none."""

    def update_extra(self, extra, params, batch_out) -> Any:
        """The next extra state, inside the jitted step, from the updated params and the loss
        function's aux outputs."""

    def loss_fn(self, params, extra, batch, rng) -> tuple[Any, dict]:
        """(scalar loss, aux dict); aux scalars are logged. Pure: jitted by the trainer."""

    def example_transform(self, training: bool) -> list[str]:
        """The task's part of the input pipeline: pp-op specs (vlmjax/data)."""

    def train_input(self, data_state, shard: int | None = None,
                    num_shards: int | None = None) -> Iterator[dict]:
        """Training batches of data shard `shard` of `num_shards`, resumed from `data_state`,
        with .get_state() and .skip_counts (see vlmjax/train/input_shards.py)."""

    def evaluators(self, eval_config) -> list:
        """Evaluators (each .name, .every, __call__(params) -> metrics), built lazily."""

    def flops_per_example(self, compiled_step, global_batch: int) -> float:
        """Training FLOPs per example (forward + backward + update) for MFU."""



@runtime_checkable
class ExactAccumTask(Protocol):
    """Optional hooks for exact gradient accumulation (optim.accum='exact', GradCache), for a
    loss that couples a batch's examples only through per-example embeddings (contrastive
    losses). The step embeds every micro-batch without gradients, takes the loss and its
    gradient on the full batch of embeddings, then backpropagates each micro-batch's share
    through its towers. Contract: loss_fn(p, e, b, r) == loss_from_embeddings(p, e,
    embed(p, e, b, r), b, r)."""

    def embed(self, params, extra, batch, rng) -> Any:
        """Per-example embeddings of `batch`: a pytree of arrays whose leading dim is the batch.
        Row i depends on row i of the batch only (it runs on micro-batches)."""

    def loss_from_embeddings(self, params, extra, embeddings, batch, rng) -> tuple[Any, dict]:
        """(scalar loss, aux dict) of the full batch from `embed`'s output; `params` for the
        loss's own parameters (temperature, bias)."""

class TaskDefaults:
    """Defaults of the optional members: everything trainable, no extra state, no summary
    metrics, float32 compute, FLOPs from XLA's cost analysis of the compiled step."""

    config_keys: Mapping[str, str] = {}
    trainable = None
    summary_metrics: Sequence[Any] = ()
    compute_dtype = "float32"

    def extra_state(self, params):
        return {}

    def update_extra(self, extra, params, batch_out):
        return extra

    def pretrained_params(self, model_init, abstract_params, shardings):
        raise ConfigError(f"task {type(self).__name__} cannot start from model_init "
                          f"{model_init!r}: leave config.model_init empty")

    def example_transform(self, training: bool) -> list[str]:
        return []

    def evaluators(self, eval_config) -> list:
        return []

    def flops_per_example(self, compiled_step, global_batch: int) -> float:
        from vlmjax.train import flops
        return flops.compiled_flops_per_example(compiled_step, global_batch)


def with_compute_dtype(kwargs: Mapping[str, Any]) -> dict:
    """config.model as a dict with `dtype` ('float32' | 'bfloat16', default float32) mapped to
    the jnp dtype the modules take."""
    from vlmjax.models.layers import DTYPES
    kwargs = dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs)
    dtype = kwargs.pop("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return {**kwargs, "dtype": DTYPES[dtype]}


def raise_architecture_diffs(diffs: Sequence[str], where: str, src: str) -> None:
    """A ConfigError listing (the first six of) the fields where config.model and the
    pretrained source `src` (`where`: e.g. model_init.image) compute different functions."""
    if diffs:
        raise ConfigError(f"config.model differs from the architecture of {where} {src}: "
                          + "; ".join(diffs[:6]))
