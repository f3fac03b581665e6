"""Populations: N classifiers trained (or unlearned) together in ONE compiled program.

Every array of a `TrainState` (params, optimizer state, BatchNorm statistics, step) gets a leading
member axis [N, ...]; each member has its own key, and optionally its own learning rate (held in
the optimizer state by `optax.inject_hyperparams`, so N learning rates share one compile) and its
own saliency mask. All members see the SAME batch order (one gather of the batch per step), so a
member equals the model trained alone with its seed when that run uses the population's batch
order (`order_seed`): `train_classifier(..., order_seed=...)`, or a method's single run with
`order_seed=...`.

Populations run in the one loop, `loop.run`, with the one step builder's step, `make_step(loss_fn)`,
mapped over the members (`population_step`): the same data parallelism over devices and
processes, compile cache, progress bars, checkpoints and resume (`workdir`) and metrics.jsonl as
a single run; a member that diverges is logged, and the others go on. Records hold a list per
metric, one value per member. How members are mapped (`strategy`):
  * "vmap": `jax.vmap` over members.
  * "map": `jax.lax.map` over members inside one jit (a loop in the compiled program).
  * "unroll": the members as N copies of the step in one program (compile time grows with N).
  * "auto": "vmap" on every backend, from experiments/bench_population.py on the 2-core CPU
    (digits SmallCNN x0.5, batch 64, one epoch, jax 0.10.2): 8 members took 1.58x one model's
    time with vmap, 0.91x unrolled (compiling 7.6 s instead of 2.4 s, growing with N) and 7.6x
    with lax.map, which at 32 members ran over 200x (vmap: 7.3x); vmap trained the whole
    forgetting-quality run (96 trainings, 160 unlearnings) in 7 minutes. This model's step is
    dominated by fixed per-op costs, which vmap amortises. docs/environment.md measured vmapped
    convolutions (grouped convolutions on XLA:CPU) far slower for larger convolutions: for wider
    models on CPU, time "unroll" and "map" against "vmap" with the benchmark.

Keys reproduce single runs exactly: member i's key is `loop.run`'s key of its single run, folded
with the epoch, the step and the device index by the same code.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from salun_jax import loop
from salun_jax.data.augment import to_float
from salun_jax.data.batches import gather_batches, index_batches
from salun_jax.saliency import forget_loss_given_stats, gradient_saliency, mask_from_scores
from salun_jax.step import TrainState, init_variables, make_step
from salun_jax.train import TrainConfig, training_loss, training_optimizer
from salun_jax.types import BatchesFn, PyTree
from salun_jax.unlearn import SGD_METHODS, method_spec, sgd_methods, ssd
from salun_jax.unlearn.boundary import drop_last_output, extend_head, wide_head_model
from salun_jax.unlearn.common import (
    UnlearnConfig,
    UnlearnTask,
    unlearning_optimizer,
)

STRATEGIES = ("auto", "vmap", "map", "unroll")
# One-shot methods with a population version (no SGD: `population_unlearn` maps their update over
# the members). IU is not here: its WoodFisher recursion is a Python loop of per-sample steps.
ONE_SHOT_POPULATION_METHODS = ("SSD",)
# Every method declared by a `MethodSpec`, and the one-shot ones above.
POPULATION_METHODS = (*SGD_METHODS, *ONE_SHOT_POPULATION_METHODS)


class PopulationOutput(NamedTuple):
    """The population's state (every array leaf [N, ...]), one record per epoch (per-member
    `loss` and `accuracy` lists), seconds of compilation and of the run proper."""

    state: TrainState
    history: list[dict]
    compile_seconds: float
    run_seconds: float


def resolve_strategy(strategy: str) -> str:
    """ "auto" -> "vmap" (measured fastest on CPU too, module docstring); raises ValueError for
    unknown names."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if strategy == "auto":
        return "vmap"
    return strategy


def map_members(fn: Callable, strategy: str, *args):
    """`fn` applied to each member's slice of `args` (leading axis [N]), outputs stacked."""
    strategy = resolve_strategy(strategy)
    if strategy == "vmap":
        return jax.vmap(fn)(*args)
    if strategy == "unroll":
        num_members = jax.tree.leaves(args)[0].shape[0]
        return stack([fn(*member(args, i)) for i in range(num_members)])
    return jax.lax.map(lambda member_args: fn(*member_args), args)


def member(tree: PyTree, index: int) -> PyTree:
    """Member `index` of a population pytree (e.g. its `TrainState`)."""
    return jax.tree.map(lambda x: x[index], tree)


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stacks equal-structure pytrees (e.g. single-model states) on a new leading member axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _learning_rates(learning_rates, default: float, num_members: int) -> np.ndarray:
    if learning_rates is None:
        return np.full(num_members, default, np.float32)
    rates = np.asarray(learning_rates, np.float32).reshape(-1)
    if rates.size != num_members:
        raise ValueError(f"{rates.size} learning rates for {num_members} members")
    return rates


def _with_optimizers(state: TrainState, masks, learning_rates, tx_fn) -> TrainState:
    """`state` with each member's fresh optimizer (its learning rate and mask, both in the
    optimizer state: `optim.multistep_sgd`, so all members share one update function) and step
    0; inits on the host, one member at a time, so the mask checks see concrete values."""
    txs = [
        tx_fn(float(lr), None if masks is None else member(masks, i))
        for i, lr in enumerate(learning_rates)
    ]
    opt_states = stack([tx.init(member(state.params, i)) for i, tx in enumerate(txs)])
    return state.replace(
        tx=txs[0], opt_state=opt_states, step=jnp.zeros(len(txs), jnp.int32), ema_params=None
    )


@functools.cache
def population_step(step: Callable, strategy: str) -> Callable:
    """The loop step of a population: `step` (from `make_step`) on every member with its own
    key, on the same batch: (state [N, ...], batch, keys [N]) -> (state, metrics [N]).
    Memoised, so `loop.run` reuses its executable across populations of the same shapes."""
    strategy = resolve_strategy(strategy)

    def run(state, batch, keys):
        return map_members(lambda s, k: step(s, batch, k), strategy, state, keys)

    return run


def run_population(
    state: TrainState,
    step: Callable,
    data: dict[str, np.ndarray],
    batches_fn: BatchesFn,
    *,
    num_epochs: int,
    keys: jax.Array,
    order_seed: int,
    strategy: str = "auto",
    progress: bool = False,
    desc: str = "population",
    workdir: str | None = None,
    checkpoint_every: int = 1,
    epoch_end_fn: Callable[[int, TrainState], None] | None = None,
    epoch_start_fn: Callable[[TrainState, int], TrainState] | None = None,
) -> PopulationOutput:
    """`loop.run` of `step` on every member (`population_step`), batches shared: the same loop,
    compile cache, progress bars, checkpoints and resume (with `workdir`) as a single run. A
    member whose loss becomes non-finite is logged and the others go on.

    Args:
      state: the population (array leaves [N, ...]; `_with_optimizers` gave each member its
        optimizer state).
      step: from `make_step(loss_fn)`, as a single run's.
      data, batches_fn: as `loop.run` (e.g. `data.batches.index_batches`, `unlearn.phase_batches`).
      num_epochs: epochs.
      keys: [N] member keys (`jax.random.key(seed)` each).
      order_seed: seed of the shared batch order (`loop.run`'s `seed`).
      strategy: "auto", "vmap", "map" or "unroll".
      progress: progress bars.
      desc: the run's name in records and bars.
      workdir, checkpoint_every: checkpoints and metrics.jsonl, as `loop.run`.
      epoch_end_fn: called as fn(epoch, state) after each epoch (1-based), e.g. to evaluate the
        members at several epoch counts of one run (`salun_jax.tuning`).
      epoch_start_fn: (state, epoch) -> state before each epoch (0-based), on the whole
        population (e.g. SalUn-soft's snapshot of the params into `extra`).

    Returns:
      A `PopulationOutput`.
    """
    eval_fn = None
    if epoch_end_fn is not None:
        steps = batches_fn(0, np.random.default_rng(0))[1].shape[0]

        def eval_fn(member_states):
            epoch_end_fn(int(member_states.step[0]) // steps, member_states)
            return {}

    out = loop.run(
        state,
        population_step(step, resolve_strategy(strategy)),
        data,
        batches_fn,
        num_epochs=num_epochs,
        key=keys,
        seed=order_seed,
        workdir=workdir,
        checkpoint_every=checkpoint_every,
        eval_fn=eval_fn,
        epoch_start_fn=epoch_start_fn,
        progress=progress,
        desc=desc,
        nonfinite="warn",
    )
    return PopulationOutput(out.state, out.history, out.compile_seconds, out.run_seconds)


def population_train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    model: nn.Module,
    config: TrainConfig,
    seeds: Sequence[int],
    *,
    learning_rates: Sequence[float] | None = None,
    order_seed: int | None = None,
    strategy: str = "auto",
    progress: bool = False,
    desc: str = "train population",
    workdir: str | None = None,
    checkpoint_every: int = 1,
) -> PopulationOutput:
    """Trains len(seeds) classifiers from scratch on `images[indices]` (original or Retrain
    populations), member i initialised and keyed by `seeds[i]` (`config.seed` is ignored).

    Member i equals `train_classifier(..., dataclasses.replace(config, seed=seeds[i]),
    order_seed=order_seed)` up to float rounding.

    Args:
      images, labels: the whole train arrays; indices: the examples to train on.
      model, config: as `train_classifier`.
      seeds: one per member.
      learning_rates: per-member base learning rates (default: config.learning_rate for all).
      order_seed: seed of the shared batch order (default: seeds[0], so member 0 is exactly
        `train_classifier` with seed seeds[0]).
      strategy: "auto", "vmap", "map" or "unroll" (module docstring).
      progress: progress bars.
      desc: name in the records.
      workdir, checkpoint_every: checkpoints (resume), as `loop.run`.

    Returns:
      A `PopulationOutput`; its state's array leaves are [N, ...].

    References: upstream `Classification/main_train.py` (SGD + multi-step LR), as `train.py`.
    """
    seeds = [int(s) for s in seeds]
    rates = _learning_rates(learning_rates, config.learning_rate, len(seeds))

    def tx_fn(lr, mask):  # the single run's optimizer
        del mask
        return training_optimizer(config, len(indices), lr)

    variables = stack([init_variables(model, jax.random.key(s), images.shape[1:]) for s in seeds])
    state = TrainState(
        step=jnp.zeros(len(seeds), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=None,
        apply_fn=model.apply,
    )
    return run_population(
        _with_optimizers(state, None, rates, tx_fn),
        make_step(training_loss(config)),
        {"image": images, "label": labels},
        index_batches(np.asarray(indices), config.batch_size),
        num_epochs=config.epochs,
        keys=_keys(seeds),
        order_seed=seeds[0] if order_seed is None else int(order_seed),
        strategy=strategy,
        progress=progress,
        desc=desc,
        workdir=workdir,
        checkpoint_every=checkpoint_every,
    )


def _per_member(values: dict, num_members: int) -> dict:
    """A method's `extra` values with its scalars broadcast to [N]; pytree values (e.g. the
    frozen originals) are the population's own, already [N, ...]."""

    def member_axis(value):
        if isinstance(value, (np.ndarray, np.generic, int, float)) and np.ndim(value) == 0:
            return np.full(num_members, value, np.asarray(value).dtype)
        return value

    return {key: member_axis(value) for key, value in values.items()}


def _member_masks(mask: PyTree, params: PyTree, num_members: int) -> PyTree:
    """Per-member masks [N, ...]: `mask` as given if it has the member axis, else N copies."""
    leaf, param = jax.tree.leaves(mask)[0], jax.tree.leaves(params)[0]
    if np.shape(leaf) == np.shape(param):  # already [N, ...]
        return jax.tree.map(jnp.asarray, mask)
    return jax.tree.map(
        lambda m: jnp.broadcast_to(jnp.asarray(m), (num_members, *np.shape(m))), mask
    )


def _widen_heads(states: TrainState, task: UnlearnTask, seeds: Sequence[int]):
    """BE's start, as its single run does it from key(seed): split the key, widen the head with
    the first half (`extend_head`); returns (the widened population, the member keys)."""
    halves = jax.vmap(jax.random.split)(_keys(seeds))  # [N, 2]
    init_keys, keys = halves[:, 0], halves[:, 1]
    params = jax.vmap(lambda p, k: extend_head(p, task.num_classes, k))(states.params, init_keys)
    return states.replace(apply_fn=wide_head_model(task).apply, params=params), keys


def _keys(seeds: Sequence[int]) -> jax.Array:
    return jnp.stack([jax.random.key(int(s)) for s in seeds])


def _order_seed(key: jax.Array) -> int:
    """The batch-order seed `run_unlearning_sgd` draws from its key."""
    return int(jax.random.randint(key, (), 0, 2**31 - 1))


def unlearning_order_seed(seed: int) -> int:
    """The batch-order seed a single unlearning run with key `jax.random.key(seed)` uses
    (`run_unlearning_sgd` draws it from its key; BE from the second half of its split)."""
    return _order_seed(jax.random.key(seed))


def _check_unlearn_inputs(method_name: str, seeds: list[int], num_members: int) -> None:
    known = (*sgd_methods(), *ONE_SHOT_POPULATION_METHODS)
    if method_name not in known:  # registered later too (docs/README.md, a new method)
        raise ValueError(f"no population version of {method_name!r}; known: {', '.join(known)}")
    if len(seeds) != num_members:
        raise ValueError(f"{len(seeds)} seeds for a population of {num_members}")


def population_unlearn(
    method_name: str,
    states: TrainState,
    task: UnlearnTask,
    config: UnlearnConfig,
    seeds: Sequence[int],
    mask: PyTree | None = None,
    *,
    learning_rates: Sequence[float] | None = None,
    order_seed: int | None = None,
    strategy: str = "auto",
    progress: bool = False,
    epoch_end_fn: Callable[[int, TrainState], None] | None = None,
    workdir: str | None = None,
    checkpoint_every: int = 1,
) -> PopulationOutput:
    """Unlearns every member of a population with an SGD method (`POPULATION_METHODS`: FT, GA,
    RL, l1-sparse, BS, BE, SalUn, SalUn-soft, NegGrad+, SCRUB) or SSD (one-shot:
    `population_ssd`, which takes no learning rates, epochs or work directory; IU is not here:
    `salun_jax.tuning` sweeps its step size on one inverse-Hessian direction instead). BE's
    members keep the widened head during the run (`epoch_end_fn` sees K+1 outputs) and lose the
    shadow output at the end unless `config.remove_shadow_logit` is False.

    Member i equals `get_method(method_name)(member(states, i), task, config,
    jax.random.key(seeds[i]), mask=<its mask>, order_seed=order_seed)` up to float rounding, by
    construction: both run the method's one declaration (`salun_jax.unlearn.method_spec`) with
    the one optimizer (`unlearning_optimizer`) and step (`make_step`).

    Args:
      method_name: one of `POPULATION_METHODS`.
      states: the population to unlearn (e.g. `population_train_classifier(...).state`); its
        weights and BatchNorm statistics are kept, the optimizer is fresh.
      task, config: as the single-run methods.
      seeds: one per member; member i's key is `jax.random.key(seeds[i])`.
      mask: SalUn's saliency mask (required for SalUn, allowed for the others): one mask for all
        members, or per-member masks with a leading [N] axis.
      learning_rates: per-member learning rates (default: config.learning_rate for all).
      order_seed: seed of the shared batch order (default: the order of member 0's single run).
      strategy: "auto", "vmap" or "map".
      progress: progress bars.
      epoch_end_fn, workdir, checkpoint_every: as `run_population`.

    Returns:
      A `PopulationOutput`.

    Raises:
      ValueError: an unknown method, SalUn without a mask, or a wrong number of members.

    References: upstream `Classification/unlearn/impl.py`, `FT.py`, `GA.py`, `RL.py`.
    """
    seeds = [int(s) for s in seeds]
    num_members = int(states.step.shape[0])
    _check_unlearn_inputs(method_name, seeds, num_members)
    if method_name in ONE_SHOT_POPULATION_METHODS:
        if learning_rates is not None or epoch_end_fn is not None:
            raise ValueError(f"{method_name} is one-shot: no learning rates or epochs")
        return population_ssd(states, task, config, seeds, mask, strategy=strategy)
    spec = method_spec(method_name, task, config)  # the single run's declaration
    spec.check_mask(mask)
    spec.check_config(config)
    keys = _keys(seeds)
    narrow_apply_fn = states.apply_fn
    if method_name == "BE":
        states, keys = _widen_heads(states, task, seeds)
    steps = spec.steps_per_epoch(config.batch_size)
    rates = _learning_rates(learning_rates, config.learning_rate, num_members)
    masks = None if mask is None else _member_masks(mask, states.params, num_members)
    state = _with_optimizers(
        states, masks, rates, lambda lr, m: unlearning_optimizer(config, steps, m, lr)
    )
    if spec.extra_fn is not None:
        state = state.replace(extra=_per_member(spec.extra_fn(states), num_members))
    step = make_step(
        spec.loss_fn,
        update_batch_stats=config.update_batch_stats,
        post_update_fn=spec.post_update_fn,
    )
    out = run_population(
        state,
        step,
        task.data(),
        spec.batches_fn(config.batch_size),
        num_epochs=config.epochs,
        keys=keys,
        order_seed=_order_seed(keys[0]) if order_seed is None else int(order_seed),
        strategy=strategy,
        progress=progress,
        desc=method_name,
        workdir=workdir,
        checkpoint_every=checkpoint_every,
        epoch_end_fn=epoch_end_fn,
        epoch_start_fn=spec.epoch_start_fn,
    )
    if method_name == "BE" and config.remove_shadow_logit:
        narrow = out.state.replace(
            apply_fn=narrow_apply_fn, params=drop_last_output(out.state.params)
        )
        out = out._replace(state=narrow)
    return out


def population_ssd(
    states: TrainState,
    task: UnlearnTask,
    config: UnlearnConfig,
    seeds: Sequence[int],
    mask: PyTree | None = None,
    *,
    strategy: str = "auto",
) -> PopulationOutput:
    """SSD on every member in one compiled program per pass: each member's importances are the
    squared gradients of its own batch-mean CE (the gradient of the members' summed losses with
    respect to the stacked params is each member's own), then `ssd.ssd_update` on the stacked
    params (elementwise).

    Member i equals `selective_synaptic_dampening(member(states, i), task, config,
    jax.random.key(seeds[i]), mask=<its mask>)` up to float rounding: the same batches, and its
    augmentation keyed as there, fold_in(<half of its key>, batch number).

    References: Foster et al., AAAI 2024 (`salun_jax.unlearn.ssd`).
    """
    start = time.perf_counter()
    num_members = int(states.step.shape[0])
    halves = jax.vmap(jax.random.split)(_keys(seeds))  # [N, 2]: each single run's two keys
    loss_fn = _members_mean_ce_loss(
        states.apply_fn, config.crop_padding, config.flip, resolve_strategy(strategy)
    )

    def members_importance(indices, keys):
        batches = ssd.importance_batches(task, indices, config.batch_size)
        context = (states.batch_stats, keys)
        return ssd.mean_squared_gradients(loss_fn, states.params, batches, keys[0], context)

    forget_importance = members_importance(task.forget, halves[:, 0])
    train_importance = members_importance(ssd.train_indices(task), halves[:, 1])
    masks = None if mask is None else _member_masks(mask, states.params, num_members)
    params = ssd.ssd_update(
        states.params,
        forget_importance,
        train_importance,
        config.ssd_alpha,
        config.ssd_lambda,
        masks,
    )
    params = jax.block_until_ready(params)
    # One-shot, as the single run: compilation is not separated from the run.
    return PopulationOutput(states.replace(params=params), [], 0.0, time.perf_counter() - start)


@functools.cache
def _members_mean_ce_loss(apply_fn, crop_padding: int, flip: bool, strategy: str):
    """SSD's batch-mean CE (`ssd.mean_ce_loss`) of every member, summed; member i's augmentation
    key is fold_in(keys[i], batch number), as `accumulate_gradients` keys a single model's."""
    one = ssd.mean_ce_loss(apply_fn, crop_padding, flip)

    def loss_fn(params, batch, rng, context):
        del rng  # each member's own key comes in the context
        batch_stats, keys = context

        def member_loss(p, s, key):
            return one(p, batch, jax.random.fold_in(key, batch["index"]), s)

        return jnp.sum(map_members(member_loss, strategy, params, batch_stats, keys))

    return loss_fn


@functools.cache
def _members_logits_fn(apply_fn: Callable, strategy: str) -> Callable:
    """Jitted (params, batch_stats, uint8 batch) -> every member's eval-mode logits. Cached: the
    audits call `population_logits` dozens of times on one population (traced once, not each
    call)."""

    def member_logits(params, batch_stats, batch):
        variables = {"params": params, "batch_stats": batch_stats}
        return apply_fn(variables, to_float(batch), train=False)

    @jax.jit
    def logits_fn(params, batch_stats, batch):
        return map_members(lambda p, s: member_logits(p, s, batch), strategy, params, batch_stats)

    return logits_fn


def population_logits(
    states: TrainState,
    images: np.ndarray,
    *,
    batch_size: int = 512,
    strategy: str = "auto",
) -> np.ndarray:
    """Eval-mode logits of every member, [N, n, K] float32 (images uint8 [n, H, W, C])."""
    logits_fn = _members_logits_fn(states.apply_fn, resolve_strategy(strategy))
    images = np.asarray(images)
    outs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        padded = np.zeros((batch_size, *images.shape[1:]), images.dtype)
        padded[: len(chunk)] = chunk  # one shape, one compile
        outs.append(
            np.asarray(logits_fn(states.params, states.batch_stats, padded))[:, : len(chunk)]
        )
    return np.concatenate(outs, axis=1)


def population_salun_masks(
    states: TrainState,
    task: UnlearnTask,
    fraction: float = 0.5,
    *,
    batch_size: int = 256,
    crop_padding: int = 4,
    flip: bool = True,
    seed: int | None = None,
    strategy: str = "auto",
) -> PyTree:
    """SalUn's 0/1 mask of every member (leaves [N, ...]), in one compiled program.

    Member i's mask equals `saliency.salun_mask(member(states, i), task, fraction, ...)` with the
    same batch size, augmentation and seed (default, as there: the task's split seed): the same
    shuffled forget batches for all members, batch b augmented with fold_in(key(seed), b).

    References: SalUn Eq. 3; upstream `generate_mask.py`.
    """
    if seed is None:
        seed = int(task.split.description.get("seed", 0))
    batches = gather_batches(
        {"image": task.images, "label": task.labels},
        task.forget,
        batch_size,
        np.random.default_rng(seed),
    )
    loss_fn = _members_forget_loss(states.apply_fn, crop_padding, flip, resolve_strategy(strategy))
    scores = jax.device_get(
        gradient_saliency(
            loss_fn, states.params, batches, jax.random.key(seed), context=states.batch_stats
        )
    )
    num_members = int(states.step.shape[0])
    return stack([mask_from_scores(member(scores, i), fraction) for i in range(num_members)])


@functools.cache
def _members_forget_loss(apply_fn, crop_padding: int, flip: bool, strategy: str):
    """The single model's saliency loss (`saliency.forget_loss_given_stats`) on every member,
    summed: its gradient with respect to the stacked params is each member's own gradient
    (members share no weights), so `gradient_saliency` of it is every member's saliency."""
    one = forget_loss_given_stats(apply_fn, crop_padding, flip)

    def loss_fn(params, batch, rng, batch_stats):
        losses = map_members(lambda p, s: one(p, batch, rng, s), strategy, params, batch_stats)
        return jnp.sum(losses)

    return loss_fn
