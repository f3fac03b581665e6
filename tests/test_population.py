"""Populations: member i equals the same model trained (or unlearned) alone with its seed."""

import dataclasses

import chex
import jax
import numpy as np
import pytest

from salun_jax import population
from salun_jax.data.splits import make_split
from salun_jax.models import create_model
from salun_jax.saliency import salun_mask
from salun_jax.train import TrainConfig, train_classifier
from salun_jax.unlearn import UnlearnConfig, UnlearnTask, get_method

SEEDS = (3, 5)
ORDER_SEED = 11
TOLERANCE = dict(atol=2e-4, rtol=2e-4)


@pytest.fixture(scope="module")
def setup(digits):
    # A small slice of digits: 240 train images, batches of 64 (the last one padded).
    split = make_split(
        digits.train_labels[:240],
        digits.test_labels,
        dataset="digits",
        forget_fraction=0.1,
        val_fraction=0.0,
        seed=0,
    )
    model = create_model("small_cnn", digits.num_classes, digits.mean, digits.std, 0.25)
    config = TrainConfig(
        model="small_cnn",
        width=0.25,
        epochs=2,
        batch_size=64,
        learning_rate=0.05,
        milestones=(1,),
        crop_padding=1,
        flip=False,
    )
    images, labels = digits.train_images[:240], digits.train_labels[:240]
    task = UnlearnTask(model, images, labels, split, digits.num_classes)
    return images, labels, split, model, config, task


def _train_alone(setup, seed, **overrides):
    images, labels, split, model, config, _ = setup
    config = dataclasses.replace(config, seed=seed, **overrides)
    run = train_classifier(
        images, labels, split.train, model, config, progress=False, order_seed=ORDER_SEED
    )
    return run.state


@pytest.mark.parametrize("strategy", ["map", "vmap"])
def test_train_population_matches_single_runs(setup, strategy):
    images, labels, split, model, config, _ = setup
    out = population.population_train_classifier(
        images, labels, split.train, model, config, SEEDS, order_seed=ORDER_SEED, strategy=strategy
    )
    chex.assert_shape(out.state.step, (len(SEEDS),))
    assert len(out.history) == config.epochs
    for i, seed in enumerate(SEEDS):
        alone = _train_alone(setup, seed)
        got = population.member(out.state, i)
        chex.assert_trees_all_close(got.params, alone.params, **TOLERANCE)
        chex.assert_trees_all_close(got.batch_stats, alone.batch_stats, **TOLERANCE)


def test_learning_rate_members_match_separate_runs(setup):
    images, labels, split, model, config, _ = setup
    rates = (0.05, 0.01)
    out = population.population_train_classifier(
        images,
        labels,
        split.train,
        model,
        config,
        (SEEDS[0], SEEDS[0]),
        learning_rates=rates,
        order_seed=ORDER_SEED,
    )
    members = [population.member(out.state, i) for i in range(2)]
    for got, rate in zip(members, rates, strict=True):
        alone = _train_alone(setup, SEEDS[0], learning_rate=rate)
        chex.assert_trees_all_close(got.params, alone.params, **TOLERANCE)
    # Same seed, different rates: the members really differ.
    first, second = (jax.tree.leaves(m.params)[-1] for m in members)
    assert not np.allclose(first, second)


@pytest.fixture(scope="module")
def originals(setup):
    images, labels, split, model, config, _ = setup
    return population.population_train_classifier(
        images, labels, split.train, model, config, SEEDS, order_seed=ORDER_SEED
    ).state


@pytest.mark.parametrize(
    "method,strategy",
    [
        ("FT", "map"),
        ("GA", "map"),
        ("RL", "vmap"),
        ("l1-sparse", "map"),
        ("SalUn", "map"),
        ("BS", "vmap"),
        ("BE", "map"),
        ("SalUn-soft", "vmap"),
        ("NegGrad+", "vmap"),
        ("SCRUB", "vmap"),
    ],
)
def test_unlearn_population_matches_single_runs(setup, originals, method, strategy):
    *_, task = setup
    config = UnlearnConfig(
        epochs=2,
        learning_rate=0.01,
        batch_size=64,
        crop_padding=1,
        flip=False,
        rl_variant="concat",
        l1_coefficient=5e-4 if method == "l1-sparse" else 0.0,
    )
    masks = None
    if method == "SalUn":
        masks = population.stack(
            [
                salun_mask(population.member(originals, i), task, 0.5, batch_size=64)
                for i in range(len(SEEDS))
            ]
        )
    unlearn_seeds = (7, 9)
    out = population.population_unlearn(
        method,
        originals,
        task,
        config,
        unlearn_seeds,
        masks,
        order_seed=ORDER_SEED,
        strategy=strategy,
    )
    for i, seed in enumerate(unlearn_seeds):
        alone = get_method(method)(
            population.member(originals, i),
            task,
            config,
            jax.random.key(seed),
            mask=None if masks is None else population.member(masks, i),
            progress=False,
            order_seed=ORDER_SEED,
        ).state
        chex.assert_trees_all_close(
            population.member(out.state, i).params, alone.params, **TOLERANCE
        )
        chex.assert_trees_all_close(
            population.member(out.state, i).batch_stats, alone.batch_stats, **TOLERANCE
        )
    # The population's model is the task's again (BE drops its shadow output at the end).
    logits = population.population_logits(out.state, task.images[:5], batch_size=8)
    chex.assert_shape(logits, (len(SEEDS), 5, task.num_classes))


@pytest.mark.parametrize("strategy", ["vmap", "map"])
def test_ssd_population_matches_single_runs(setup, originals, strategy):
    """SSD is one-shot: its population maps the importances and the dampening over the members,
    each member's augmentation keyed as its single run (crop_padding=1 draws random crops)."""
    *_, task = setup
    config = UnlearnConfig(batch_size=64, crop_padding=1, flip=False, ssd_alpha=1.0, ssd_lambda=1.0)
    mask = salun_mask(population.member(originals, 0), task, 0.5, batch_size=64)
    for member_mask in (None, mask):
        out = population.population_unlearn(
            "SSD", originals, task, config, (7, 9), member_mask, strategy=strategy
        )
        for i, seed in enumerate((7, 9)):
            alone = get_method("SSD")(
                population.member(originals, i),
                task,
                config,
                jax.random.key(seed),
                mask=member_mask,
            ).state
            got = population.member(out.state, i)
            chex.assert_trees_all_close(got.params, alone.params, **TOLERANCE)
            # dampening really happened
            assert not all(
                np.allclose(a, b)
                for a, b in zip(
                    jax.tree.leaves(got.params),
                    jax.tree.leaves(population.member(originals, i).params),
                    strict=True,
                )
            )
    with pytest.raises(ValueError, match="one-shot"):
        population.population_unlearn("SSD", originals, task, config, (7, 9), learning_rates=(1, 2))


def test_population_logits_shape_and_strategy(setup, originals):
    images = setup[0][:37]
    by_map = population.population_logits(originals, images, batch_size=16, strategy="map")
    by_vmap = population.population_logits(originals, images, batch_size=16, strategy="vmap")
    chex.assert_shape(by_map, (len(SEEDS), 37, 10))
    np.testing.assert_allclose(by_map, by_vmap, atol=1e-4)


def test_population_logits_traces_once_for_many_calls(setup, originals):
    # The audits call it dozens of times on one population: one trace (and one compile), not
    # one per call, as long as the chunk shape is the same.
    traces = []

    def apply_fn(variables, images, train):
        traces.append(images.shape)
        return originals.apply_fn(variables, images, train=train)

    states = originals.replace(apply_fn=apply_fn)
    first = population.population_logits(states, setup[0][:37], batch_size=16)
    for count in (5, 16, 20):
        population.population_logits(states, setup[0][:count], batch_size=16)
    assert len(traces) == 1
    np.testing.assert_array_equal(
        first, population.population_logits(originals, setup[0][:37], batch_size=16)
    )


def test_unknown_strategy_and_method(setup, originals):
    with pytest.raises(ValueError, match="strategy"):
        population.resolve_strategy("pmap")
    assert population.resolve_strategy("auto") == "vmap"  # measured fastest (module docstring)
    with pytest.raises(ValueError, match="no population version"):
        population.population_unlearn("IU", originals, setup[-1], UnlearnConfig(), SEEDS)
    with pytest.raises(ValueError, match="mask"):
        population.population_unlearn("SalUn", originals, setup[-1], UnlearnConfig(), SEEDS)
    with pytest.raises(ValueError, match="BE does not take a mask"):
        population.population_unlearn(
            "BE", originals, setup[-1], UnlearnConfig(), SEEDS, originals.params
        )


def test_population_salun_masks_match_single_masks(setup, originals):
    *_, task = setup
    masks = population.population_salun_masks(
        originals, task, 0.5, batch_size=16, crop_padding=1, flip=False, seed=4
    )
    for i in range(len(SEEDS)):
        alone = salun_mask(
            population.member(originals, i),
            task,
            0.5,
            batch_size=16,
            crop_padding=1,
            flip=False,
            seed=4,
        )
        agree = np.mean(
            np.concatenate(
                [
                    (np.asarray(a) == np.asarray(b)).ravel()
                    for a, b in zip(
                        jax.tree.leaves(population.member(masks, i)),
                        jax.tree.leaves(alone),
                        strict=True,
                    )
                ]
            )
        )
        assert agree > 0.999  # ties at the top-k boundary may fall either way


def test_population_resumes_from_its_checkpoint(setup, tmp_path):
    images, labels, split, model, config, _ = setup
    args = (images, labels, split.train, model)
    whole = population.population_train_classifier(
        *args, config, SEEDS, order_seed=ORDER_SEED, workdir=str(tmp_path / "whole")
    )
    # Stopped after epoch 1, then run again to the end on the same work directory.
    population.population_train_classifier(
        *args,
        dataclasses.replace(config, epochs=1),
        SEEDS,
        order_seed=ORDER_SEED,
        workdir=str(tmp_path / "resumed"),
    )
    resumed = population.population_train_classifier(
        *args, config, SEEDS, order_seed=ORDER_SEED, workdir=str(tmp_path / "resumed")
    )
    chex.assert_trees_all_close(resumed.state.params, whole.state.params, **TOLERANCE)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert len(resumed.history[0]["loss"]) == len(SEEDS)  # one value per member
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == config.epochs


def test_a_diverging_member_does_not_stop_the_others(setup):
    images, labels, split, model, config, _ = setup
    out = population.population_train_classifier(
        images,
        labels,
        split.train,
        model,
        config,
        (SEEDS[0], SEEDS[0]),
        learning_rates=(config.learning_rate, 1e30),
        order_seed=ORDER_SEED,
    )
    losses = np.asarray(out.history[-1]["loss"])
    assert np.isfinite(losses[0]) and not np.isfinite(losses[1])
    alone = _train_alone(setup, SEEDS[0])
    chex.assert_trees_all_close(population.member(out.state, 0).params, alone.params, **TOLERANCE)
