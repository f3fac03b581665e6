"""The README's Python API example runs as written and gives sensible numbers."""

import json
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_example() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("### Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def readme_run():
    """The README's block run once as written, compiled as `xla_optimized` tests are (it
    trains for seconds; the pipeline it is compared with compiles the same way)."""
    import jax

    code = _readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 15
    namespace: dict = {}
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    finally:
        jax.config.update("jax_disable_most_optimizations", True)
    return namespace


def test_readme_api_example_runs_as_written(readme_run):
    namespace = readme_run
    metrics = namespace["metrics"]
    assert set(metrics) >= {"UA", "RA", "TA", "MIA"}
    assert metrics["RA"] > 85.0 and metrics["TA"] > 80.0, metrics  # SalUn keeps the model
    assert 0.0 <= metrics["UA"] <= 100.0
    # The mask is a hard guarantee: non-salient weights are bit-identical to the original's.
    import jax
    import numpy as np

    for m, before, after in zip(
        jax.tree.leaves(namespace["mask"]),
        jax.tree.leaves(namespace["original"].params),
        jax.tree.leaves(namespace["unlearned"].params),
        strict=True,
    ):
        m = np.asarray(m, bool)
        np.testing.assert_array_equal(np.asarray(after)[~m], np.asarray(before)[~m])


def _run_readme_example(**split_options) -> dict:
    code = _readme_example()
    options = ", ".join(f"{k}={v!r}" for k, v in split_options.items())
    code = code.replace('scenario="random", forget_fraction=0.1', options)
    assert options in code
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    return namespace


@pytest.mark.xla_optimized
def test_readme_api_flow_gives_the_pipelines_row(readme_run, tmp_path):
    """The README's calls and the pipeline (`experiments/unlearn.py`'s function) with the same
    settings, split and seed give the same SalUn row: one set of defaults (stratified MIA shadow
    sets from the split seed, the RL schedule, the original model's seed, the mask's batches and
    the method's key from its name)."""
    import dataclasses

    import ml_collections

    from salun_jax.pipeline import classification

    api = readme_run
    recipe, config = api["recipe"], api["config"]
    seed = int(api["split"].description["seed"])
    assert recipe.seed == seed  # the original model of split seed s is trained with seed s
    pipeline_config = ml_collections.ConfigDict(
        {
            "dataset": "digits",
            "seeds": (seed,),
            "split": {"scenario": "random", "forget_fraction": 0.1, "val_fraction": 0.1},
            "train": {**dataclasses.asdict(recipe), "model": "small_cnn", "width": 0.5},
            "retrain": {},
            "unlearn": dataclasses.asdict(config),
            "methods": {},
            "run_methods": ("SalUn",),
            "mask": {"fraction": 0.5},
            "sweep_fractions": (),
            "mia_kinds": ("confidence",),
        }
    )
    classification.train_and_evaluate(pipeline_config, str(tmp_path))
    rows = json.loads((tmp_path / "results.json").read_text())["runs"]
    row = next(r["metrics"] for r in rows if r["method"] == "SalUn")
    assert {k: row[k] for k in ("UA", "RA", "TA", "MIA")} == {
        k: api["metrics"][k] for k in ("UA", "RA", "TA", "MIA")
    }


@pytest.mark.xla_optimized
def test_readme_api_flow_forgets_a_class_with_the_library_defaults():
    metrics = _run_readme_example(scenario="class", forget_class=3)["metrics"]
    assert metrics["UA"] >= 80.0, metrics
    assert metrics["RA"] > 90.0 and metrics["TA"] > 85.0, metrics


def test_upstream_method_names_are_aliases(digits):
    """The original code's `--unlearn` names map to this registry's methods, and upstream's RL
    with a mask is SalUn (the same run, the same key)."""
    import jax
    import numpy as np

    import salun_jax as sj
    from salun_jax.unlearn import UPSTREAM_NAMES

    for upstream, ours in UPSTREAM_NAMES.items():
        assert sj.get_method(upstream) is sj.get_method(ours)
    with pytest.raises(ValueError, match="upstream's retrain, wfisher"):
        sj.get_method("fisher")
    x, y = digits.train_images, digits.train_labels
    split = sj.make_split(y, digits.test_labels, scenario="random", forget_fraction=0.1)
    model = sj.create_model("small_cnn", 10, digits.mean, digits.std, width=0.25)
    recipe = sj.TrainConfig(epochs=1, batch_size=128, crop_padding=0, flip=False)
    original = sj.train_classifier(x, y, split.train, model, recipe, progress=False).state
    task = sj.UnlearnTask(model, x, y, split, 10)
    config = sj.UnlearnConfig(epochs=1, batch_size=128, crop_padding=0, flip=False)
    mask = sj.salun_mask(original, task, 0.5, config=config)
    rl = sj.unlearn("RL", original, task, config, mask=mask, progress=False).state
    salun = sj.unlearn("SalUn", original, task, config, mask=mask, progress=False).state
    for a, b in zip(jax.tree.leaves(rl.params), jax.tree.leaves(salun.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
