"""Unlearning methods on a tiny digits task: each runs and moves the metrics the way it should
(upstream `Classification/unlearn/*.py`).

One original model is trained per module and every run is cached by its config, so each method
compiles once however many tests look at it.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from salun_jax import population, saliency
from salun_jax.data.splits import make_split
from salun_jax.evaluation.classification import make_predict_fn, model_accuracy, predict
from salun_jax.losses import classification_loss, relabel_forget_fn
from salun_jax.models import create_model
from salun_jax.step import TrainState
from salun_jax.train import TrainConfig, train_classifier
from salun_jax.unlearn import (
    METHODS,
    SGD_METHODS,
    UnlearnConfig,
    UnlearnTask,
    get_method,
    method_spec,
)
from salun_jax.unlearn.common import MethodSpec, sgd_method
from salun_jax.unlearn.finetune import l1_schedule
from salun_jax.unlearn.influence import _woodfisher

UNLEARNING = [name for name in METHODS["classification"] if name != "Retrain"]
ONE_SHOT = ("IU", "SSD")  # no SGD loop

NUM_CLASSES = 10
BASE = dict(epochs=2, batch_size=64, crop_padding=1, flip=False)
LEARNING_RATES = {
    "FT": 0.01,
    "GA": 0.05,
    "RL": 0.05,
    "IU": 1.0,
    "l1-sparse": 0.01,
    "BS": 0.01,
    "BE": 0.01,
    "SalUn": 0.1,
    "SalUn-soft": 0.05,
    "NegGrad+": 0.05,
    "SSD": 0.0,  # training-free
    "SCRUB": 0.01,
}
# Per-method settings of the shared runs. IU: a short WoodFisher recursion, and gradients without
# augmentation (halves its compile time). l1-sparse: an alpha that shows against FT in 2 epochs.
# SalUn-soft: one epoch (see its test).
DEFAULTS = {
    "IU": dict(iu_step_size=1.0, woodfisher_samples=20, iu_augment=False),
    "l1-sparse": dict(l1_coefficient=1e-3),
    "SalUn-soft": dict(epochs=1),
    "SSD": dict(ssd_alpha=2.0),
}
# RL as SalUn-soft runs it (one epoch, concat), without the proximal step.
RL_CONCAT = dict(epochs=1, rl_variant="concat")


@dataclasses.dataclass(frozen=True)
class Setup:
    state: TrainState
    task: UnlearnTask
    mask: dict
    digits: object

    def data(self, part):
        split, d = self.task.split, self.digits
        if part == "test":
            return d.test_images, d.test_labels
        indices = getattr(split, part)
        return d.train_images[indices], d.train_labels[indices]


@pytest.fixture(scope="module")
def setup(digits):
    split = make_split(
        digits.train_labels, digits.test_labels, scenario="random", forget_fraction=0.1, seed=1
    )
    model = create_model("small_cnn", NUM_CLASSES, digits.mean, digits.std, 0.25)
    config = TrainConfig(
        model="small_cnn",
        width=0.25,
        epochs=6,
        batch_size=64,
        learning_rate=0.1,
        milestones=(),
        crop_padding=1,
        flip=False,
        seed=0,  # the runs' margins below were measured from this original model
    )
    state = train_classifier(
        digits.train_images, digits.train_labels, split.train, model, config, progress=False
    ).state
    task = UnlearnTask(model, digits.train_images, digits.train_labels, split, NUM_CLASSES)
    mask = saliency.salun_mask(state, task, 0.5, batch_size=64, crop_padding=1, flip=False, seed=0)
    return Setup(state, task, mask, digits)


@pytest.fixture(scope="module")
def run(setup):
    """run(name, with_mask=False, **config overrides) -> UnlearnOutput, cached."""
    cache = {}

    def run_fn(name, with_mask=False, **overrides):
        key = (name, with_mask, tuple(sorted(overrides.items())))
        if key not in cache:
            config = UnlearnConfig(
                **{
                    **BASE,
                    "learning_rate": LEARNING_RATES[name],
                    **DEFAULTS.get(name, {}),
                    **overrides,
                }
            )
            cache[key] = get_method(name)(
                setup.state,
                setup.task,
                config,
                jax.random.key(1),
                mask=setup.mask if with_mask else None,
            )
        return cache[key]

    return run_fn


@pytest.fixture(scope="module")
def predict_fn(setup):
    return make_predict_fn(setup.task.model.apply)


def _accuracy(setup, predict_fn, state, part):
    return model_accuracy(predict_fn, state.variables, *setup.data(part))


def _unlearning_accuracy(setup, predict_fn, state):
    return 100.0 - _accuracy(setup, predict_fn, state, "forget")


def _forget_loss(setup, predict_fn, state, part="forget"):
    """Mean CE on the forget (or another) set, eval mode."""
    images, labels = setup.data(part)
    logits = np.asarray(predict(predict_fn, state.variables, images), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def _flat(tree):
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])


def _l1(params):
    return float(np.sum(np.abs(_flat(params))))


def _method_args(name):
    # The sequential schedule: the margin below was measured with it (HEAD's CIFAR-10 branch).
    relabel = {"rl_variant": "sequential"} if name in ("RL", "SalUn") else {}
    return {"with_mask": name == "SalUn", **relabel}


@pytest.mark.parametrize("name", UNLEARNING)
def test_each_method_runs_and_changes_finite_params(setup, run, name):
    out = run(name, **_method_args(name))
    chex.assert_tree_all_finite(out.state.params)
    chex.assert_tree_all_finite(out.state.batch_stats)
    chex.assert_trees_all_equal_structs(out.state.params, setup.state.params)
    chex.assert_trees_all_equal_shapes(out.state.params, setup.state.params)
    assert out.model is None
    assert not np.array_equal(_flat(out.state.params), _flat(setup.state.params))
    assert out.compile_seconds >= 0 and out.run_seconds > 0
    if name not in ONE_SHOT:  # no epochs
        epochs = DEFAULTS.get(name, {}).get("epochs", BASE["epochs"])
        assert [h["epoch"] for h in out.history] == list(range(1, epochs + 1))
        assert all(np.isfinite(h["loss"]) for h in out.history)


@pytest.mark.parametrize("name", [name for name in UNLEARNING if name not in ONE_SHOT])
def test_another_learning_rate_or_key_reuses_the_compiled_step(setup, run, name):
    # Values live in the state, not in the step: another learning rate, then also another key
    # (seed), run the first run's executable (0 s compiling), and the learning rate is used.
    mask = setup.mask if name == "SalUn" else None
    first = run(name, with_mask=mask is not None)
    values = {**BASE, **DEFAULTS.get(name, {})}
    slower = UnlearnConfig(**{**values, "learning_rate": 0.5 * LEARNING_RATES[name]})
    method = get_method(name)
    same_key = method(setup.state, setup.task, slower, jax.random.key(1), mask=mask)
    other_key = method(setup.state, setup.task, slower, jax.random.key(2), mask=mask)
    assert same_key.compile_seconds == 0.0 and other_key.compile_seconds == 0.0
    for a, b in ((first, same_key), (same_key, other_key)):
        assert not np.allclose(_flat(a.state.params), _flat(b.state.params))


def test_original_model_is_good(setup, predict_fn):
    # The checks below need an original that fits the forget set.
    assert _unlearning_accuracy(setup, predict_fn, setup.state) < 15
    assert _accuracy(setup, predict_fn, setup.state, "retain") > 85


def test_ga_raises_the_forget_loss(setup, run, predict_fn):
    out = run("GA")
    before = _forget_loss(setup, predict_fn, setup.state)
    after = _forget_loss(setup, predict_fn, out.state)
    assert after > before + 0.05, (before, after)


def test_ft_lowers_the_retain_loss_it_optimises(setup, run, predict_fn):
    # A no-op would leave the retain loss where it is: FT must beat it on its own objective.
    before = _forget_loss(setup, predict_fn, setup.state, "retain")
    after = _forget_loss(setup, predict_fn, run("FT").state, "retain")
    assert after < before - 0.01, (before, after)
    assert (
        _accuracy(setup, predict_fn, run("FT").state, "retain")
        > _accuracy(setup, predict_fn, setup.state, "retain") - 3.0
    )


@pytest.mark.parametrize("name", ["RL", "SalUn"])
def test_rl_and_salun_raise_unlearning_accuracy(setup, run, predict_fn, name):
    before = _unlearning_accuracy(setup, predict_fn, setup.state)
    after = _unlearning_accuracy(setup, predict_fn, run(name, **_method_args(name)).state)
    # UA on this 129-image forget set (2 epochs from an original at 6.2%) moves with float
    # rounding: compiled with XLA's default optimisation, RL ended at 15.5% on jax 0.10.2, at
    # 12.4% and 10.1% on jax 0.12 (conv_impl "plain" and "xla"), SalUn at 9.3%, 17.1% and 10.1%.
    # A margin of 2.5 points (> 3 images) holds for all of them, passes at the level this suite
    # compiles with (conftest.py) on both jax versions, and still fails a no-op.
    assert after > before + 2.5, (before, after)


def test_salun_hard_changes_only_salient_weights(setup, run):
    out = run("SalUn", with_mask=True)  # mask_mode "hard" is the default
    mask = _flat(setup.mask)
    before, after = _flat(setup.state.params), _flat(out.state.params)
    np.testing.assert_array_equal(after[~mask], before[~mask])  # bit-identical
    changed = after[mask] != before[mask]
    assert changed.mean() > 0.5, changed.mean()


def test_salun_paper_mode_moves_non_salient_weights_and_freeze_keeps_bn_stats(setup, run):
    # One run checks two independent options (each run costs a compile): mask_mode "paper"
    # (weight decay still reaches non-salient weights, upstream issue #32) and frozen BatchNorm
    # statistics.
    out = run("SalUn", with_mask=True, mask_mode="paper", update_batch_stats=False)
    mask = _flat(setup.mask)
    before, after = _flat(setup.state.params), _flat(out.state.params)
    moved = after[~mask] != before[~mask]
    assert moved.mean() > 0.9, moved.mean()
    chex.assert_trees_all_equal(out.state.batch_stats, setup.state.batch_stats)
    # ... while the default ("update") does change them.
    hard = run("SalUn", with_mask=True)
    assert not np.array_equal(_flat(hard.state.batch_stats), _flat(setup.state.batch_stats))


def test_salun_without_mask_refused(setup):
    with pytest.raises(ValueError, match="mask"):
        get_method("SalUn")(setup.state, setup.task, UnlearnConfig(**BASE), jax.random.key(0))


def test_be_returns_k_way_model_by_default(setup, run, predict_fn):
    out = run("BE")
    assert out.model is None
    chex.assert_trees_all_equal_shapes(out.state.params, setup.state.params)
    images = setup.data("forget")[0]
    chex.assert_shape(predict_fn(out.state.variables, images), (len(images), NUM_CLASSES))


def test_be_keeps_the_shadow_logit_on_request(setup, run):
    wide = run("BE", remove_shadow_logit=False)
    assert wide.model is not None and wide.model.num_classes == NUM_CLASSES + 1
    fc = wide.state.params["fc"]
    assert {leaf.shape[-1] for leaf in jax.tree.leaves(fc)} == {NUM_CLASSES + 1}
    images = setup.data("forget")[0]
    logits = make_predict_fn(wide.model.apply)(wide.state.variables, images)
    chex.assert_shape(logits, (len(images), NUM_CLASSES + 1))
    # Same seed: the default run is this one with the shadow output dropped.
    narrow = run("BE")
    chex.assert_trees_all_equal(narrow.state.params["fc"], jax.tree.map(lambda x: x[..., :-1], fc))
    chex.assert_trees_all_equal(narrow.state.batch_stats, wide.state.batch_stats)
    others = {k: v for k, v in wide.state.params.items() if k != "fc"}
    chex.assert_trees_all_equal({k: narrow.state.params[k] for k in others}, others)


def test_be_with_mask_refused(setup):
    with pytest.raises(ValueError, match="mask"):
        get_method("BE")(
            setup.state, setup.task, UnlearnConfig(**BASE), jax.random.key(0), mask=setup.mask
        )


def test_iu_changes_params_and_keeps_them_finite(setup, run):
    out = run("IU")
    chex.assert_tree_all_finite(out.state.params)
    assert np.mean(_flat(out.state.params) != _flat(setup.state.params)) > 0.5
    chex.assert_trees_all_equal(out.state.batch_stats, setup.state.batch_stats)


def test_l1_sparse_reduces_l1_norm_relative_to_ft(run):
    ft, sparse = run("FT"), run("l1-sparse")  # same settings and seed; alpha only
    assert _l1(sparse.state.params) < _l1(ft.state.params)


def test_salun_soft_resets_coordinates_to_the_epoch_start(setup, run):
    # With one epoch the epoch-start snapshot is the original: after the last step's proximal
    # step, at least `ratio` coordinates equal it exactly (upstream `RL_proximal.py`).
    soft = run("SalUn-soft")  # one epoch
    rl = run("RL", **RL_CONCAT)  # the same run without the proximal step
    chex.assert_tree_all_finite(soft.state.params)
    assert soft.state.extra is None
    before = _flat(setup.state.params)
    steps = int(np.ceil((len(setup.task.forget) + len(setup.task.retain)) / BASE["batch_size"]))
    ratio = int(0.5 * (steps - 1) / steps * before.size)
    reset = _flat(soft.state.params) == before
    assert ratio - 1 <= reset.sum() < 0.6 * before.size, (reset.sum(), ratio)  # -1: float32
    assert np.mean(_flat(rl.state.params) == before) < 0.05
    assert not np.array_equal(_flat(soft.state.params), _flat(rl.state.params))
    assert len(soft.history) == len(rl.history) == 1


def test_rl_variants_both_run(setup, run):
    # Sequential: all forget batches, then all retain batches; concat: mixed batches
    # (upstream `RL.py` HEAD vs paper time). The step counts tell the two batchings apart.
    num_forget, num_retain = len(setup.task.forget), len(setup.task.retain)
    sequential = run("RL", rl_variant="sequential")  # two epochs
    concat = run("RL", **RL_CONCAT)  # one epoch
    for out in (sequential, concat):
        chex.assert_tree_all_finite(out.state.params)
    assert int(sequential.state.step) == 2 * (-(-num_forget // 64) + -(-num_retain // 64))
    assert int(concat.state.step) == -(-(num_forget + num_retain) // 64)


def test_each_sgd_method_is_one_declaration_for_single_runs_and_populations(setup):
    config = UnlearnConfig(**BASE)
    assert set(SGD_METHODS) == set(UNLEARNING) - set(ONE_SHOT)  # all but Retrain and one-shot
    assert population.POPULATION_METHODS == (*SGD_METHODS, "SSD")  # SSD: one-shot, mapped
    forget, retain = set(setup.task.forget.tolist()), set(setup.task.retain.tolist())
    data_of = {"FT": [retain], "l1-sparse": [retain], "GA": [forget], "BS": [forget]}
    data_of |= {"BE": [forget], "SalUn-soft": [forget | retain], "RL": [forget | retain]}
    data_of["SalUn"] = data_of["NegGrad+"] = [forget | retain]  # the default: mixed batches
    data_of["SCRUB"] = [forget, retain]  # max-steps, then min-steps
    for name in SGD_METHODS:
        spec = method_spec(name, setup.task, config)
        assert spec.name == name
        assert [set(p.tolist()) for p in spec.phases] == data_of[name], name
        # one compiled loss however often it is declared (the single run and the population)
        assert get_method(name).spec(setup.task, config).loss_fn is spec.loss_fn, name
    sequential = method_spec(
        "SalUn", setup.task, dataclasses.replace(config, rl_variant="sequential")
    )
    assert [set(p.tolist()) for p in sequential.phases] == [forget, retain]
    mask_rules = {n: method_spec(n, setup.task, config).mask for n in SGD_METHODS}
    assert mask_rules == {
        **{n: "optional" for n in SGD_METHODS},
        "SalUn": "required",
        "BE": "forbidden",
        "SalUn-soft": "forbidden",
    }
    with pytest.raises(ValueError, match="SalUn-soft does not take a mask \\(its soft threshold"):
        method_spec("SalUn-soft", setup.task, config).check_mask(setup.mask)
    with pytest.raises(ValueError, match="IU is not an SGD unlearning method; these are: FT, GA"):
        method_spec("wfisher", setup.task, config)  # upstream's name of IU


def test_a_method_registered_later_is_declared_once_too(setup, monkeypatch):
    # docs/README.md's recipe: a spec, `sgd_method`, the registry; the population accepts it.
    def retain_twice_spec(task, config):
        loss = classification_loss(crop_padding=config.crop_padding, flip=config.flip)
        return MethodSpec("mine", loss, (task.retain, task.retain), mask="optional")

    monkeypatch.setitem(METHODS["classification"], "mine", sgd_method(retain_twice_spec))
    spec = method_spec("mine", setup.task, UnlearnConfig(**BASE))
    assert spec.steps_per_epoch(64) == 2 * -(-len(setup.task.retain) // 64)
    population._check_unlearn_inputs("mine", [1, 2], 2)  # accepted
    with pytest.raises(ValueError, match="no population version of 'IU'; known: FT.*mine"):
        population._check_unlearn_inputs("IU", [1, 2], 2)


def test_neggrad_plus_step_equals_a_hand_written_reference(setup):
    # One plain SGD step (no momentum, weight decay or augmentation) on one batch of 6 forget and
    # 26 retain images: params - lr * grad(beta * mean_r CE - (1 - beta) * mean_f CE), with
    # train-mode BatchNorm over the whole batch.
    forget, retain = setup.task.forget[:6], setup.task.retain[:26]
    split = dataclasses.replace(setup.task.split, forget=forget, retain=retain, description={})
    task = dataclasses.replace(setup.task, split=split)
    lr = 0.1
    config = UnlearnConfig(
        epochs=1, batch_size=32, learning_rate=lr, momentum=0.0, weight_decay=0.0,
        crop_padding=0, flip=False, neggrad_beta=0.75,
    )  # fmt: skip
    out = get_method("NegGrad+")(setup.state, task, config, jax.random.key(0), progress=False)

    order = np.concatenate([forget, retain])
    images = jnp.asarray(task.images[order], jnp.float32) / 255.0
    labels = jnp.asarray(task.labels[order])

    @jax.jit  # one program instead of one per operation
    def reference_step(beta):
        def loss(params):
            logits, _ = setup.state.apply_fn(
                {"params": params, "batch_stats": setup.state.batch_stats},
                images,
                train=True,
                batch_mask=jnp.ones(len(labels), bool),
                mutable=["batch_stats"],
            )
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return beta * jnp.mean(ce[6:]) - (1 - beta) * jnp.mean(ce[:6])

        grads = jax.grad(loss)(setup.state.params)
        return jax.tree.map(lambda p, g: p - lr * g, setup.state.params, grads)

    assert int(out.state.step) == 1
    chex.assert_trees_all_close(out.state.params, reference_step(0.75), atol=2e-5, rtol=1e-4)
    # The forget term matters: the retain-only step (beta = 1) lands elsewhere.
    assert np.max(np.abs(_flat(out.state.params) - _flat(reference_step(1.0)))) > 1e-3


def test_scrub_epoch_equals_a_hand_written_reference(setup):
    # One epoch, plain SGD, no augmentation: a max-step on the 6 forget images (-KL to the
    # teacher), then a min-step on the 26 retain images (gamma CE + alpha KL); the student in
    # train mode, the teacher (the start) in inference mode; KL at temperature T times T^2.
    forget, retain = setup.task.forget[:6], setup.task.retain[:26]
    split = dataclasses.replace(setup.task.split, forget=forget, retain=retain, description={})
    task = dataclasses.replace(setup.task, split=split)
    lr, alpha, gamma, temperature = 0.1, 0.5, 0.9, 4.0
    config = UnlearnConfig(
        epochs=1, batch_size=32, learning_rate=lr, momentum=0.0, weight_decay=0.0,
        crop_padding=0, flip=False, scrub_max_epochs=1, scrub_alpha=alpha, scrub_gamma=gamma,
        scrub_temperature=temperature,
    )  # fmt: skip
    out = get_method("SCRUB")(setup.state, task, config, jax.random.key(0), progress=False)
    state = setup.state

    def kl(student, teacher):  # by hand
        p_t = jax.nn.softmax(teacher / temperature)
        return temperature**2 * jnp.sum(
            p_t * (jnp.log(p_t) - jax.nn.log_softmax(student / temperature)), axis=-1
        )

    @functools.partial(jax.jit, static_argnums=3)  # one program instead of one per operation
    def step(params, images, labels, loss_of):
        teacher = state.apply_fn(state.variables, images, train=False)

        def loss(p):
            logits, _ = state.apply_fn(
                {"params": p, "batch_stats": state.batch_stats},
                images,
                train=True,
                batch_mask=jnp.ones(len(labels), bool),
                mutable=["batch_stats"],
            )
            return jnp.mean(loss_of(logits, teacher, labels))

        return jax.tree.map(lambda p, g: p - lr * g, params, jax.grad(loss)(params))

    def batch(indices):
        return jnp.asarray(task.images[indices], jnp.float32) / 255.0, task.labels[indices]

    maxed = step(state.params, *batch(forget), lambda s, t, y: -kl(s, t))
    ce = optax.softmax_cross_entropy_with_integer_labels
    expected = step(maxed, *batch(retain), lambda s, t, y: gamma * ce(s, y) + alpha * kl(s, t))
    assert int(out.state.step) == 2
    chex.assert_trees_all_close(out.state.params, expected, atol=2e-5, rtol=1e-4)
    # Without the max-step (scrub_max_epochs=0) the run is one min-step: another point.
    no_max = get_method("SCRUB")(
        state, task, dataclasses.replace(config, scrub_max_epochs=0), jax.random.key(0)
    )
    assert int(no_max.state.step) == 1
    assert np.max(np.abs(_flat(no_max.state.params) - _flat(out.state.params))) > 1e-4
    # Epochs of different lengths: an LR milestone inside the run is refused.
    with pytest.raises(ValueError, match="SCRUB: its epochs differ in length"):
        get_method("SCRUB")(
            state, task, dataclasses.replace(config, epochs=3, milestones=(2,)), jax.random.key(0)
        )


def test_ssd_equals_a_hand_written_reference(setup):
    # Importances by hand: mean over batches of the squared gradient of the batch-mean CE (eval
    # mode, no augmentation): forget = 10 images in one padded batch of 20; train = forget +
    # retain, 40 images, 2 batches in index order. Then theta * min(lam I_D / I_f, 1) where
    # I_f > alpha I_D.
    forget, retain = np.sort(setup.task.forget[:10]), np.sort(setup.task.retain[:30])
    split = dataclasses.replace(setup.task.split, forget=forget, retain=retain, description={})
    task = dataclasses.replace(setup.task, split=split)
    alpha, lam = 2.0, 0.5
    config = UnlearnConfig(
        batch_size=20, crop_padding=0, flip=False, ssd_alpha=alpha, ssd_lambda=lam
    )
    out = get_method("SSD")(setup.state, task, config, jax.random.key(0))
    state = setup.state

    def batch_gradient_squared(indices):
        images = jnp.asarray(task.images[indices], jnp.float32) / 255.0
        return gradient_squared(images, task.labels[indices])

    @jax.jit  # one program instead of one per operation
    def gradient_squared(images, labels):
        def loss(params):
            logits = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

        return jax.tree.map(jnp.square, jax.grad(loss)(state.params))

    i_f = batch_gradient_squared(forget)
    train = np.sort(np.concatenate([forget, retain]))
    halves = [batch_gradient_squared(train[:20]), batch_gradient_squared(train[20:])]
    i_d = jax.tree.map(lambda a, b: (a + b) / 2, *halves)
    selected = jax.tree.map(lambda f, d: f > alpha * d, i_f, i_d)
    expected = jax.tree.map(
        lambda p, f, d, s: np.where(s, p * np.minimum(lam * d / np.where(s, f, 1), 1), p),
        state.params, i_f, i_d, selected,
    )  # fmt: skip
    share = np.mean(_flat(selected))
    assert 0.01 < share < 0.99, share  # the case tests both branches
    chex.assert_trees_all_close(out.state.params, expected, atol=1e-6, rtol=1e-4)
    chex.assert_trees_all_equal(out.state.batch_stats, state.batch_stats)
    # With a mask, only its weights may change.
    masked = get_method("SSD")(state, task, config, jax.random.key(0), mask=setup.mask)
    frozen = _flat(setup.mask) == 0
    np.testing.assert_array_equal(_flat(masked.state.params)[frozen], _flat(state.params)[frozen])


def test_unknown_method_refused():
    with pytest.raises(ValueError, match="unknown classification unlearning method 'UNSIR'.*SalUn"):
        get_method("UNSIR")
    with pytest.raises(ValueError, match="unknown kind of task 'video'"):
        get_method("SalUn", "video")
    assert get_method("SalUn", "sd") is METHODS["sd"]["SalUn"]
    assert get_method("SalUn") is METHODS["classification"]["SalUn"]
    assert get_method("SalUn", "diffusion") is METHODS["diffusion"]["SalUn"]


@pytest.mark.parametrize(
    "field, value",
    [("mask_mode", "soft"), ("rl_variant", "mixed"), ("epochs", -1), ("batch_size", 0)],
)
def test_unlearn_config_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=str(value) if isinstance(value, str) else ">"):
        UnlearnConfig(**{field: value})


class RelabelTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_exclude_true_label_never_draws_the_true_label(self):
        n = 4000
        labels = jnp.asarray(np.arange(n) % NUM_CLASSES, jnp.int32)
        forget = jnp.asarray(np.arange(n) % 3 == 0)
        images = jnp.zeros((n, 1))

        def relabel(rng, exclude):
            fn = relabel_forget_fn(NUM_CLASSES, exclude)
            return fn(rng, images, labels, {"forget": forget}, None)

        new = self.variant(relabel, static_argnums=1)(jax.random.key(0), True)
        new, labels_np, forget_np = np.asarray(new), np.asarray(labels), np.asarray(forget)
        np.testing.assert_array_equal(new[~forget_np], labels_np[~forget_np])  # retain untouched
        assert np.all(new[forget_np] != labels_np[forget_np])
        assert np.all((new >= 0) & (new < NUM_CLASSES))
        # Uniform over the other K - 1 classes: every other class appears for each true label.
        for k in range(NUM_CLASSES):
            drawn = set(new[forget_np & (labels_np == k)].tolist())
            assert drawn == set(range(NUM_CLASSES)) - {k}, (k, drawn)

        # Upstream's draw (may equal y) hits the true label about 1/K of the time.
        uniform = self.variant(relabel, static_argnums=1)(jax.random.key(0), False)
        same = np.mean(np.asarray(uniform)[forget_np] == labels_np[forget_np])
        assert 0.05 < same < 0.15, same


def test_l1_schedule_value_by_value():
    # alpha * (1 - epoch / (E - no_l1_epochs)) for the first E - no_l1_epochs epochs, then 0.
    config = UnlearnConfig(epochs=5, no_l1_epochs=1, l1_coefficient=0.1)
    coefficient = jax.jit(l1_schedule(config, steps=3))
    expected = [
        0.1,
        0.1,
        0.1,
        0.075,
        0.075,
        0.075,
        0.05,
        0.05,
        0.05,
        0.025,
        0.025,
        0.025,
        0.0,
        0.0,
        0.0,
    ]
    got = [float(coefficient(step)) for step in range(15)]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_l1_sparse_penalty_enters_the_loss(setup, run):
    # The per-epoch l1 term is in the logged loss: l1-sparse's first-epoch loss exceeds FT's (same
    # data, same seed) by about alpha * ||theta||_1 of the weights along the way.
    ft, sparse = run("FT"), run("l1-sparse")
    gap = sparse.history[0]["loss"] - ft.history[0]["loss"]
    penalty = 1e-3 * _l1(setup.state.params)
    assert 0.5 * penalty < gap < 1.5 * penalty, (gap, penalty)


def test_woodfisher_matches_a_numpy_reference():
    """Upstream's recursion (Wfisher.py): k = v, o = g_0; per later sample g:
    tmp = o.g; k -= (k.g / (N + tmp)) o; o -= (tmp / (N + tmp)) o."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    params = {"w": jnp.asarray(rng.standard_normal(5), jnp.float32)}
    v = rng.standard_normal(5).astype(np.float32)
    n = 4.0

    def per_sample_loss(p, batch, key, batch_stats):  # gradient = the sample's x (times its weight)
        del key, batch_stats
        return jnp.sum(p["w"] * batch["x"][0]) * batch["label"][0]

    samples = {"x": jnp.asarray(x), "label": jnp.ones(6, jnp.float32)}
    got = _woodfisher(per_sample_loss, params, {}, samples, jax.random.key(0), jnp.asarray(v), n)
    k, o = v.astype(np.float64), x[0].astype(np.float64)
    for g in x[1:].astype(np.float64):
        tmp = o @ g
        k = k - (k @ g / (n + tmp)) * o
        o = o - (tmp / (n + tmp)) * o
    np.testing.assert_allclose(np.asarray(got["w"]), k, rtol=1e-4, atol=1e-5)


def test_iu_honours_the_runs_augmentation(setup):
    # iu_augment uses the run's crop_padding / flip: with both off it must equal no augmentation
    # (the old code cropped with padding 4 and flipped whatever the config said).
    base = dict(BASE, learning_rate=0.0, iu_step_size=1.0, woodfisher_samples=5)
    plain = get_method("IU")(
        setup.state, setup.task, UnlearnConfig(**base, iu_augment=False), jax.random.key(3)
    )
    config = UnlearnConfig(**{**base, "crop_padding": 0, "flip": False, "iu_augment": True})
    off = get_method("IU")(setup.state, setup.task, config, jax.random.key(3))
    chex.assert_trees_all_close(plain.state.params, off.state.params, rtol=1e-6, atol=1e-7)
    cropped = get_method("IU")(
        setup.state, setup.task, UnlearnConfig(**base, iu_augment=True), jax.random.key(3)
    )  # BASE: crop_padding=1
    assert not np.allclose(_flat(cropped.state.params), _flat(plain.state.params))
