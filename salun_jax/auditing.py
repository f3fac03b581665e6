"""Audits of unlearning methods on populations: U-LiRA and KLoM on shadow populations, the
population SVC MIA, the relearning attack and weight space (the numbers: `evaluation.audit`).

The shadow design (one target pool, balanced in-masks):
  * The target pool is the split's forget set; the rest of the train split (D_r) is in every
    model's training set.
  * `in_masks(pool, groups, seed)`: groups/2 random halves of the pool and their complements, so
    each example is "in" for exactly half of the groups, hence of the members. Group g's members
    (its own seeds) train on D_r + In(g) (Original) and are unlearned with forget set In(g)
    (`group_split`), so every group is one population program of the method's own.
  * Retrain: models trained on D_r alone, which is what deleting In(g) from Original g gives
    for every g: one population seeded as the originals (the same initial weights, so L2 to
    Retrain and the relearning baseline compare like with like), and an independent one (other
    seeds) that plays the unlearned models in the sanity row.
  * Members alternate between shadow and target (`shadow_members`). Per pool example, U-LiRA
    fits Gaussians to the margins of the shadow members that held it and unlearned it, and of
    the retrained shadows, and scores the target members: positives the unlearned targets that
    held it, negatives the retrained targets. KLoM per example compares the margins of the N/2
    members that held it with all N retrained ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from salun_jax import population
from salun_jax.data.splits import Split
from salun_jax.evaluation import audit, mia
from salun_jax.step import TrainState
from salun_jax.unlearn.common import UnlearnConfig, UnlearnTask


def in_masks(num_examples: int, num_groups: int, seed: int) -> np.ndarray:
    """[groups, examples] bool: rows 2k and 2k+1 are a random half of the examples (from
    `np.random.default_rng(seed)`) and its complement, so each example is in exactly half the
    rows."""
    if num_groups < 2 or num_groups % 2:
        raise ValueError(f"num_groups must be even and >= 2, got {num_groups}")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_groups // 2):
        half = np.zeros(num_examples, bool)
        half[rng.permutation(num_examples)[: num_examples // 2]] = True
        rows += [half, ~half]
    return np.stack(rows)


def group_split(split: Split, in_set: np.ndarray, group: int) -> Split:
    """Group `group`'s split: forget = the pool examples of `in_set` (a bool mask over
    `split.forget`), retain = `split.retain`, train = both."""
    forget = np.asarray(split.forget)[np.asarray(in_set, bool)]
    return dataclasses.replace(
        split,
        train=np.sort(np.concatenate([split.retain, forget])),
        forget=forget,
        description={**split.description, "audit_group": int(group)},
    )


def member_in(masks: np.ndarray, group_size: int) -> np.ndarray:
    """[N, examples] bool, member m of group m // group_size holding its group's examples."""
    return np.repeat(np.asarray(masks, bool), group_size, axis=0)


def shadow_members(num_members: int, group_size: int) -> np.ndarray:
    """[N] bool: the shadow members (even positions within each group); the others are targets."""
    return (np.arange(num_members) % group_size) % 2 == 0


def concat_members(states: Sequence[TrainState]) -> TrainState:
    """Populations joined along the member axis (groups -> one population)."""
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *states)


def ulira_and_klom(
    unlearned: np.ndarray,
    held: np.ndarray,
    retrained: np.ndarray,
    shadow: np.ndarray,
    retrained_shadow: np.ndarray,
) -> dict:
    """U-LiRA and KLoM of one population against the retrained one (the module's design).

    Args:
      unlearned: [N, E] margins of the unlearned members.
      held: [N, E] bool, which member held (trained on, then unlearned) which example; each
        example held by the same number of members.
      retrained: [N_r, E] margins of the retrained members (none held any example).
      shadow, retrained_shadow: [N], [N_r] bool, the shadow members (the others are targets).

    Returns:
      {"ulira": `audit.attack_metrics`, "positive", "negative" (the attack's scores, for ROC
      curves), "klom": [E] per-example KLoM}.
    """
    held = np.asarray(held, bool)
    counts = held.sum(axis=0)
    if len(set(counts.tolist())) != 1:
        raise ValueError("ulira_and_klom: every example must be held by as many members")
    scores = np.where(held, unlearned, np.nan)
    positive, negative = audit.ulira_scores(
        scores[~shadow], retrained[~retrained_shadow], scores[shadow], retrained[retrained_shadow]
    )
    # [N/2, E]: per example, the margins of the members that held it (column-wise gather).
    order = np.argsort(~held, axis=0, kind="stable")[: counts[0]]
    held_margins = np.take_along_axis(np.asarray(unlearned), order, axis=0)
    return {
        "ulira": audit.attack_metrics(positive, negative),
        "positive": positive,
        "negative": negative,
        "klom": audit.klom(held_margins, retrained),
    }


def population_mia(
    states: TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    retain: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    forget_sets: Sequence[np.ndarray],
    seed: int,
    strategy: str = "auto",
) -> np.ndarray:
    """MIA-Efficacy (%) of every member on its own forget set: the pipeline's confidence SVC
    (`mia.svc_mia`) trained on class-stratified retain (member) vs test (non-member) samples
    drawn from `seed` (the same for all members). Returns [N]."""
    member, nonmember = mia.stratified_shadow_indices(labels[retain], test_labels, seed)
    shadow_in = mia.from_logits(
        population.population_logits(states, images[retain[member]], strategy=strategy)
    )
    shadow_out = mia.from_logits(
        population.population_logits(states, test_images[nonmember], strategy=strategy)
    )
    pool = np.unique(np.concatenate(list(forget_sets)))
    pool_probs = mia.from_logits(
        population.population_logits(states, images[pool], strategy=strategy)
    )
    values = []
    for m, forget in enumerate(forget_sets):
        target = np.searchsorted(pool, forget)
        result = mia.svc_mia(
            shadow_in[m],
            labels[retain[member]],
            shadow_out[m],
            test_labels[nonmember],
            pool_probs[m, target],
            labels[forget],
            kinds=("confidence",),
        )
        values.append(100.0 * result["confidence"])
    return np.asarray(values)


def member_accuracy(
    states: TrainState, images: np.ndarray, labels: np.ndarray, strategy: str = "auto"
) -> np.ndarray:
    """Every member's accuracy (%) on the images, [N]."""
    logits = population.population_logits(states, images, strategy=strategy)
    return 100.0 * np.mean(np.argmax(logits, -1) == labels[None], axis=-1)


def relearning_curve(
    states: TrainState,
    task: UnlearnTask,
    train_indices: np.ndarray,
    eval_indices: np.ndarray,
    config: UnlearnConfig,
    steps: int,
    seeds: Sequence[int],
    strategy: str = "auto",
) -> np.ndarray:
    """The relearning attack: `steps` SGD steps of fine-tuning (FT's loss and optimizer, the
    config's learning rate, momentum and augmentation) on `train_indices`, one full batch per
    step, from every member; the accuracy (%) on `eval_indices` before and after each step.
    Returns [steps + 1, N].

    References: relearning attacks on unlearned models, e.g. arXiv 2505.22310.
    """
    train_indices, eval_indices = np.asarray(train_indices), np.asarray(eval_indices)
    split = dataclasses.replace(task.split, forget=eval_indices, retain=train_indices)
    relearn_task = dataclasses.replace(task, split=split)  # FT trains on its "retain" set only
    cfg = dataclasses.replace(
        config, epochs=steps, batch_size=len(train_indices), milestones=(), mask_mode="hard"
    )
    eval_images, eval_labels = task.images[eval_indices], task.labels[eval_indices]
    curve = [member_accuracy(states, eval_images, eval_labels, strategy)]

    def after_step(epoch, state):
        del epoch
        curve.append(member_accuracy(state, eval_images, eval_labels, strategy))

    population.population_unlearn(
        "FT", states, relearn_task, cfg, seeds, strategy=strategy, epoch_end_fn=after_step
    )
    return np.stack(curve)


def _mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N, n, K] logits -> [N] mean CE (float64)."""
    z = np.asarray(logits, np.float64)
    top = z.max(-1, keepdims=True)
    log_normalizer = np.log(np.exp(z - top).sum(-1)) + top[..., 0]
    true = np.take_along_axis(z, np.broadcast_to(labels[None, :, None], (*z.shape[:2], 1)), -1)
    return np.mean(log_normalizer - true[..., 0], axis=-1)


def weight_space(
    unlearned: TrainState,
    originals: TrainState,
    retrained: TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    strategy: str = "auto",
) -> dict[str, np.ndarray]:
    """Per member m: the L2 distance of its weights to Original m and to Retrain m, and the
    loss barrier (mean CE on `images`) along the line from it (alpha 0) to Original m (alpha 1),
    weights and BatchNorm statistics interpolated together. Returns {"l2_original",
    "l2_retrain", "loss_barrier"}, each [N]."""
    num_members = int(np.shape(unlearned.step)[0])

    def distances(other):
        return np.asarray(
            [
                audit.l2_distance(
                    population.member(unlearned.params, m), population.member(other.params, m)
                )
                for m in range(num_members)
            ]
        )

    losses = []
    for alpha in alphas:
        params = audit.interpolate(unlearned.params, originals.params, alpha)
        stats = audit.interpolate(unlearned.batch_stats, originals.batch_stats, alpha)
        line = unlearned.replace(params=params, batch_stats=stats)
        logits = population.population_logits(line, images, strategy=strategy)
        losses.append(_mean_cross_entropy(logits, labels))
    losses = np.stack(losses, axis=1)  # [N, alphas]
    barriers = np.asarray([audit.loss_barrier(alphas, row) for row in losses])
    return {
        "l2_original": distances(originals),
        "l2_retrain": distances(retrained),
        "loss_barrier": barriers,
    }
