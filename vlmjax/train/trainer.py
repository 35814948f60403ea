"""The trainer: one loop for every task.

It owns the mesh, sharded state initialisation, the jitted step, checkpoints and resumption,
logging and evaluation scheduling. A task (the contract: `vlmjax/train/tasks/base.py`) supplies
the model, the loss, the input transform and the evaluators; nothing here knows what a
contrastive loss is.

Top-level config keys read here are listed in `TRAINER_KEYS`; each task lists its own in
`config_keys`; a top-level key in neither is an error. The whole config is validated (the task
is built, which checks its sections) before anything is written to the workdir. Resuming
compares the config with the workdir's config.json only when a checkpoint exists, ignoring the
keys in `RESULT_NEUTRAL_KEYS`.
"""
from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from vlmjax import config as config_lib
from vlmjax import distributed, gfile, sharding
from vlmjax.train import checkpoint, input_shards, metrics as metrics_lib, optim, step as step_lib
from vlmjax.train import prefetch
from vlmjax.train.tasks import get_task

TRAINER_KEYS = {
    "task": "task name (see vlmjax/train/tasks)",
    "seed": "seed of parameter init, dropout and data order",
    "total_steps": "number of optimiser updates",
    "model_init": "pretrained weights to start from ('' = random init), passed to the task's "
                  "pretrained_params",
    "evals": "use_ema (also evaluate the EMA params) and named evaluators, built by the task",
    "optim": "optimiser config (vlmjax.train.optim)",
    "mesh": "mesh axis sizes: data, fsdp, tensor (-1 = the rest)",
    "sharding_rules": "logical axis -> mesh axis overrides",
    "log_every": "steps between progress lines",
    "checkpoint": "every, keep, keep_period, async",
    "nonfinite": "'skip' (count and skip the update) or 'stop' on non-finite loss/gradient",
    "peak_flops": "per-device peak FLOP/s for MFU (0 = measure a float32 matmul at start)",
    "data_shards": "training input streams the global batch is made of, split over the "
                   "processes (0 = the checkpoint's, else the process count); see "
                   "vlmjax/train/input_shards.py",
}
CHECKPOINT_KEYS = ("every", "keep", "keep_period", "async_save")
# Keys (and sections) that cannot change the trained params: a resumed run may change them
# freely. Evaluators only read params, so all of `evals` is here.
RESULT_NEUTRAL_KEYS = ("data.data_dir", "log_every", "checkpoint", "peak_flops",
                       "input.prefetch_batches", "evals")


class ConfigMismatchError(ValueError):
    pass


class NonFiniteError(FloatingPointError):
    pass


def check_config(config: ml_collections.ConfigDict, mesh=None):
    """Validate the whole config: the trainer's keys, the task's keys and (by building the
    task, which checks its sections) every section. Returns the task. Pure: touches no disk."""
    if "task" not in config:
        raise config_lib.ConfigError("config.task is missing: name one of the tasks in "
                                     "vlmjax/train/tasks/__init__.py")
    task_class = get_task(config.task)
    config_lib.check_keys(config, {**TRAINER_KEYS, **task_class.config_keys}, "config")
    config_lib.check_keys(config.get("checkpoint", {}), CHECKPOINT_KEYS, "checkpoint")
    if config.get("nonfinite", "skip") not in step_lib.NONFINITE_POLICIES:
        raise config_lib.ConfigError(f"config.nonfinite {config.nonfinite!r} is not one of "
                                     f"{step_lib.NONFINITE_POLICIES}")
    if int(config.get("data_shards", 0)) < 0:
        raise config_lib.ConfigError(f"config.data_shards must be >= 0 (0 = the default), got "
                                     f"{config.get('data_shards')}")
    if int(config.get("total_steps", 0)) < 1:
        raise config_lib.ConfigError(f"config.total_steps must be >= 1, got "
                                     f"{config.get('total_steps')}")
    use_ema = config.get("evals", {}).get("use_ema", False)
    if not isinstance(use_ema, bool):
        raise config_lib.ConfigError(f"config.evals.use_ema must be True or False, got "
                                     f"{use_ema!r}")
    settings = optim.settings(config.get("optim", {}))
    if use_ema and not settings["ema_decay"]:
        raise config_lib.ConfigError("config.evals.use_ema needs an EMA: set optim.ema_decay "
                                     "(e.g. 0.999)")
    mesh = mesh or sharding.make_mesh(config.get("mesh", {"data": -1}))
    return task_class(config, mesh)


def _changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ, leaving out RESULT_NEUTRAL_KEYS."""
    def neutral(key):
        return any(key == n or key.startswith(n + ".") for n in RESULT_NEUTRAL_KEYS)
    return sorted(k for k in set(config_lib.flat_keys(old)) | set(config_lib.flat_keys(new))
                  if not neutral(k) and _lookup(old, k) != _lookup(new, k))


def _check_saved_config(workdir: str, config, allow_config_change: bool, has_checkpoint: bool):
    """Refuse to resume a checkpoint written with a different config unless told to. A
    workdir without a checkpoint (e.g. a first run that failed) holds no run to protect."""
    path = gfile.join(workdir, "config.json")
    new = json.loads(config_lib.to_json(config))
    if has_checkpoint and gfile.exists(path) and not allow_config_change:
        changed = _changed_keys(json.loads(gfile.read_text(path)), new)
        if changed:
            raise ConfigMismatchError(
                f"workdir {workdir} holds a run with a different config (changed: "
                f"{', '.join(changed[:10])}); use another workdir or pass "
                "--allow_config_change to resume with the new config")
    if jax.process_count() > 1:  # every process has read it before process 0 rewrites it
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("vlmjax: config checked")
    if jax.process_index() == 0:
        gfile.write_text(path, json.dumps(new, indent=2, sort_keys=True))


def _lookup(tree, dotted):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree if not isinstance(tree, dict) else "<dict>"


@dataclasses.dataclass
class TrainResult:
    metrics: dict           # the last evaluation's metrics
    state: step_lib.TrainState
    train_metrics: dict = dataclasses.field(default_factory=dict)  # the last logged interval's
    summary_metrics: tuple = ()  # the task's (see tasks/base.py), for the final table


def train(config: ml_collections.ConfigDict, workdir: str, *,
          allow_config_change: bool = False, stop_after: int | None = None) -> TrainResult:
    """Train (or resume) `config` in `workdir`; returns the last eval metrics and the state.
    `stop_after`: stop (with a checkpoint) after this many steps of this call, for tests."""
    mesh = sharding.make_mesh(config.get("mesh", {"data": -1}))
    task = check_config(config, mesh)  # everything is validated before the workdir is touched
    rules = sharding.logical_rules(config.get("sharding_rules", None))
    total_steps, batch_size = int(config.total_steps), int(config.input.global_batch_size)
    optim_settings = optim.settings(config.optim)
    ema_decay = float(optim_settings["ema_decay"])
    rng = jax.random.PRNGKey(int(config.get("seed", 0)))
    init_rng, state_rng = jax.random.split(rng)

    # Abstract init: shapes, logical axes -> shardings, then a jitted init straight into them.
    boxed = jax.eval_shape(task.init_params, init_rng)
    param_shardings = sharding.param_shardings(boxed, mesh, rules)
    abstract_params = nn.meta.unbox(boxed)
    mask = step_lib.trainable_mask(abstract_params, task.trainable, optim_settings["freeze"])
    abstract_trainable, _ = step_lib.split_params(abstract_params, mask)
    tx, schedule = optim.make_optimizer(config.optim, total_steps, abstract_trainable)
    boxed_extra = jax.eval_shape(task.extra_state, abstract_params)
    extra_shardings = sharding.param_shardings(boxed_extra, mesh, rules)  # unboxed: replicated

    def init_state(params):
        return step_lib.init_state(params, tx, state_rng, trainable=mask,
                                   task_extra=nn.meta.unbox(task.extra_state(params)),
                                   ema=bool(ema_decay))

    abstract_state = jax.eval_shape(init_state, abstract_params)
    state_shardings = _state_shardings(abstract_state, param_shardings, extra_shardings, mask,
                                       mesh, tx)

    gfile.makedirs(workdir)
    ckpt_cfg = config.get("checkpoint", {})
    checkpointer = checkpoint.Checkpointer(
        workdir, every=ckpt_cfg.get("every", 1000), keep=ckpt_cfg.get("keep", 3),
        keep_period=ckpt_cfg.get("keep_period", 0), async_save=ckpt_cfg.get("async_save", True))
    latest = checkpointer.latest_step()
    _check_saved_config(workdir, config, allow_config_change, latest is not None)
    if latest is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_shardings)
        state, data_state = checkpointer.restore(latest, abstract)
        _log(f"resumed from {checkpointer.directory} at step {latest}")
    else:
        with jax.set_mesh(mesh), sharding.axis_rules(rules):
            if config.get("model_init"):
                params = task.pretrained_params(config.model_init, abstract_params,
                                                param_shardings)
                _log(f"initialised params from {config.model_init}")
            else:
                params = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)),
                                 out_shardings=param_shardings)(init_rng)
            state = jax.jit(init_state, out_shardings=state_shardings)(params)
        data_state = {}

    start_step = int(jax.device_get(state.step))
    train_input = prefetch.DevicePrefetcher(  # the next batch goes to the devices while
        _train_input(task, config, data_state),  # the step runs (issue #7)
        lambda host_batch: sharding.host_batch_to_global(host_batch, mesh))
    accum_steps = int(optim_settings["accum_steps"])
    train_step = jax.jit(
        step_lib.make_train_step(task.loss_fn, tx, schedule, accum_steps=accum_steps,
                                 accum=optim_settings["accum"], task=task, mesh=mesh,
                                 trainable=mask, update_extra=task.update_extra,
                                 ema_decay=ema_decay),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)

    writer = metrics_lib.MetricsWriter(workdir)
    log_every = int(config.get("log_every", 50))
    policy = config.get("nonfinite", "skip")
    use_ema = bool(config.get("evals", {}).get("use_ema", False))
    from vlmjax.evals.schedule import Schedule  # late: the evaluators import TensorFlow
    evaluators = Schedule(task.evaluators(config.get("evals", ml_collections.ConfigDict())))
    history, results, fetched, step = [], {}, {}, start_step
    progress = compiled_step = None
    _log(f"training {config.task} for {total_steps} steps, batch {batch_size}, mesh "
         f"{dict(mesh.shape)} over {jax.process_count()} process(es), {train_input.num_shards} "
         f"data shard(s), {_param_count(abstract_params) / 1e6:.2f}M params "
         f"({_param_count(abstract_trainable) / 1e6:.2f}M trainable)")
    try:
        # The step and the evals trace here, so `sharding_rules` act_* overrides apply to them.
        with distributed.StopSignal() as stop, jax.set_mesh(mesh), sharding.axis_rules(rules):
            while step < total_steps:
                batch = next(train_input)
                if compiled_step is None:  # compiled once, for the step and its FLOP count
                    compiled_step = train_step.lower(state, batch).compile()
                    progress = metrics_lib.Progress(
                        total_steps, start_step, batch_size,
                        task.flops_per_example(compiled_step, batch_size),
                        _peak_flops(config, task) * mesh.size, task.summary_metrics)
                state, step_metrics = compiled_step(state, batch)
                step += 1
                history.append(step_metrics)
                last = step == total_steps
                # Every process calls should_stop each step: it is where they agree on a
                # preemption step.
                stopping = stop.should_stop(step) or (stop_after is not None
                                                      and step - start_step >= stop_after)
                if step % log_every == 0 or last or stopping:
                    fetched = metrics_lib.mean_metrics(jax.device_get(history))
                    fetched.update({f"data/skipped/{k}": v
                                    for k, v in train_input.skip_counts.items()})
                    history = []
                    line, rates = progress.report(step, fetched)
                    if jax.process_index() == 0:
                        print(line, flush=True)
                    writer.write(step, {**{f"train/{k}": v for k, v in fetched.items()}, **rates})
                    if policy == "stop" and fetched["nonfinite_steps"] > 0:
                        raise NonFiniteError(
                            f"non-finite loss or gradient before step {step} (config.nonfinite="
                            f"'stop'); the last checkpoint in {checkpointer.directory} is intact")
                if evaluators.due(step, last):
                    results = _evaluate(evaluators, state, step, last, mask if use_ema else None)
                    _check_processes_agree(results)
                    writer.write(step, results)
                    _print_results(step, results)
                if step % checkpointer.every == 0 or last or stopping:
                    if policy == "stop" and int(jax.device_get(state.nonfinite_steps)) > 0:
                        raise NonFiniteError(f"non-finite loss or gradient before step {step}")
                    checkpointer.save(step, state, {
                        "num_shards": train_input.num_shards,
                        "shards": {str(k): v for k, v in train_input.get_state().items()}})
                if stopping:
                    break
    finally:
        checkpointer.close()  # waits for the async save in flight
        writer.close()
        train_input.close()
    return TrainResult(results, state, fetched, tuple(task.summary_metrics))


def _evaluate(evaluators, state, step: int, last: bool, ema_mask) -> dict:
    """The evaluators on the raw params and, if `ema_mask` (evals.use_ema), on the EMA params,
    whose metrics get the prefix 'ema/'."""
    results = evaluators.run(state.params, step, last)
    if ema_mask is not None:
        ema = evaluators.run(step_lib.ema_params(state, ema_mask), step, last)
        results.update({f"ema/{k}": v for k, v in ema.items()})
    return results


def _peak_flops(config, task) -> float:
    """Per-device peak FLOP/s, the MFU denominator: config.peak_flops if set, else the data
    sheet's for the device kind and the task's compute dtype, else (CPU, unlisted chips) the
    measured float32 matmul rate."""
    from vlmjax.train import flops
    if float(config.get("peak_flops", 0)):
        return float(config.peak_flops)
    return flops.device_peak_flops(dtype=task.compute_dtype) or _measured_peak_flops()


def _log(message: str):
    if jax.process_index() == 0:
        print(message, flush=True)


def _train_input(task, config, saved: dict[int, dict]) -> input_shards.ShardedInput:
    """This process's data shards, at the positions the checkpoint's processes saved."""
    saved_states, saved_count = {}, None
    for process_state in saved.values():
        saved_count = int(process_state["num_shards"])
        saved_states.update({int(k): v for k, v in process_state["shards"].items()})
    num_shards, note = input_shards.choose_num_shards(
        int(config.get("data_shards", 0)), saved_count, jax.process_count())
    if note:
        _log(f"warning: {note}")
    if num_shards != saved_count:
        saved_states = {}
    elif saved_count is not None and len(saved_states) != saved_count:
        raise ValueError(f"the checkpoint holds the data positions of shards "
                         f"{sorted(saved_states)}, but {saved_count} were saved; was a process's "
                         "data file lost?")
    return input_shards.ShardedInput(
        lambda shard, count, state: task.train_input(state, shard, count), num_shards,
        jax.process_index(), jax.process_count(), saved_states)


def _check_processes_agree(results: dict):
    """Evaluations must give every process the same numbers (they all log, checkpoint, stop)."""
    if jax.process_count() == 1 or not results:
        return
    from jax.experimental import multihost_utils
    values = np.asarray([v for k, v in sorted(results.items())
                         if not k.endswith("eval/seconds")],  # timings differ (ema/ too)
                        np.float32)  # what the collective carries (float64 would be cast)
    multihost_utils.assert_equal(values, "evaluation results differ between processes")


def _measured_peak_flops() -> float:
    """Per-device peak: measured float32 matmul rate of one device (CPU: the whole host)."""
    from vlmjax.train.flops import measure_matmul_flops
    per_host = measure_matmul_flops(1024)
    return per_host / max(len(jax.local_devices()), 1)


def _state_shardings(abstract_state, param_shardings, extra_shardings, mask, mesh, tx):
    """Optimiser moments and the EMA mirror their params' shardings; the task's extra state is
    sharded by its logical axes (replicated if unboxed); everything else is replicated."""
    replicated = sharding.replicated(mesh)
    trainable_shardings, _ = step_lib.split_params(param_shardings, mask)
    opt = optax.tree_map_params(tx, lambda _, sh: sh, abstract_state.opt_state,
                                trainable_shardings, transform_non_params=lambda _: replicated)
    extra = {"task": extra_shardings}
    if "ema" in abstract_state.extra:
        extra["ema"] = trainable_shardings
    return step_lib.TrainState(step=replicated, params=param_shardings, opt_state=opt,
                               rng=replicated, nonfinite_steps=replicated, extra=extra)


def _param_count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _print_results(step: int, results: dict):
    if jax.process_index() == 0 and results:
        print(f"eval @ {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())),
              flush=True)
