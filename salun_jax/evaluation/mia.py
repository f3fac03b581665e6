"""MIA-Efficacy: the SVC membership-inference attack of the SalUn / Sparse-Unlearn code.

Upstream (`Classification/evaluation/SVC_MIA.py::SVC_MIA` in OPTML-Group/Unlearn-Saliency, taken
from OPTML-Group/Unlearn-Sparse) trains one RBF `SVC(C=3, gamma="auto")` per feature set to tell
"shadow train" samples (label 1, member: the first |test| retain samples) from "shadow test"
samples (label 0, non-member: the test set), then scores the forget set by the fraction it
predicts as non-member. The paper's MIA-Efficacy is `100 * svc_mia(...)["confidence"]`.

Also here, not in upstream: `stratified_shadow_indices` (random, class-matched shadow sets in
place of upstream's "first n", which is class-skewed on class-sorted data) and `loss_mia` (the
loss-threshold logistic-regression attack of the NeurIPS 2023 unlearning challenge's starting kit).

Everything here is numpy on host arrays: features are tiny and the SVC is scikit-learn.

References:
    SalUn (Fan et al., ICLR 2024), Sec. 5 "MIA-Efficacy"; Sparse-Unlearn (Jia et al., NeurIPS 2023),
    App. C.3; Song & Mittal, "Systematic Evaluation of Privacy Risks of ML Models" (USENIX Sec.
    2021), Eq. 3 (modified entropy).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jax.typing import ArrayLike

FEATURE_KINDS = ("correctness", "confidence", "entropy", "m_entropy", "prob")

# Both upstream (torch, `log(1e-30)` for p == 0) and Song & Mittal (`np.maximum(p, 1e-30)`) clip
# logarithms at 1e-30, so log(0) becomes log(1e-30) ~= -69.08 rather than -inf.
_LOG_FLOOR = 1e-30
_ROW_SUM_TOLERANCE = 1e-3


def from_logits(logits: ArrayLike) -> np.ndarray:
    """Softmax over the last axis, in numpy, at (at least) float32 precision.

    Upstream feeds the attack `softmax(model(x))` in float32; a float32 input keeps that precision.

    Args:
        logits: `[N, K]` logits.

    Returns:
        `[N, K]` probabilities, rows summing to 1.
    """
    x = np.asarray(logits)
    x = x.astype(np.result_type(x.dtype, np.float32), copy=False)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _check_probs_labels(probs: ArrayLike, labels: ArrayLike, name: str = "probs"):
    """Validates a `[N, K]` probability matrix and `[N]` integer labels; returns float64/int64."""
    p = np.asarray(probs)
    y = np.asarray(labels)
    if p.ndim != 2:
        raise ValueError(f"{name} must be a [N, K] matrix of probabilities, got shape {p.shape}.")
    if y.ndim != 1:
        raise ValueError(f"{name} labels must be a 1-d array [N], got shape {y.shape}.")
    if p.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name} has {p.shape[0]} rows but its labels have length {y.shape[0]}; "
            "they must match."
        )
    if p.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 samples); the attack needs at least one sample.")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)  # e.g. labels stored as floats; exact integers only
        else:
            raise ValueError(f"{name} labels must be integers, got dtype {y.dtype}.")
    num_classes = p.shape[1]
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"{name} labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}] "
            "(forget-set marks such as -y-1 must be undone first)."
        )
    p = p.astype(np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    if p.min() < 0:
        raise ValueError(f"{name} contains negative entries; pass probabilities, not logits.")
    row_sums = p.sum(axis=1)
    worst = int(np.argmax(np.abs(row_sums - 1.0)))
    if abs(row_sums[worst] - 1.0) > _ROW_SUM_TOLERANCE:
        raise ValueError(
            f"{name} rows must sum to 1 (tolerance {_ROW_SUM_TOLERANCE}); row {worst} sums to "
            f"{row_sums[worst]:.6g}. Apply `from_logits` to logits first."
        )
    return p, y.astype(np.int64)


def _log_clipped(x: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(x, _LOG_FLOOR))


def _true_class_prob(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    return p[np.arange(p.shape[0]), y]  # [N]


def m_entropy_upstream(probs: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """The upstream (buggy) `m_entropy` feature, reproduced exactly.

    Upstream computes, in torch, with `log_p = log(p)` where p > 0 and `log(1e-30)` where p == 0:

            modified_probs = p.clone(); modified_probs[:, labels] = (1 - p)[:, labels]
            modified_log_probs = log_p.clone(); modified_log_probs[:, labels] = log_p[:, labels]
            return -sum(modified_probs * modified_log_probs, dim=-1)

    Two bugs of upstream `SVC_MIA.py`:
    1. `[:, labels]` with a length-N label vector selects whole *columns*: every column whose class
          occurs anywhere in `labels` gets `1 - p` in every row, not just the true-label entry.
    2. The "reverse" log uses `log p` instead of `log(1 - p)`, so the second assignment is a no-op
          and the log factor is `log p` everywhere.

    Hence, with `S = set(labels)` (the classes present in the *whole call*, e.g. the whole forget
    set), for each row:

            m_i = -sum_{j in S} (1 - p_ij) log p_ij - sum_{j not in S} p_ij log p_ij

    which depends on which other samples are passed together. When S holds all classes this is
    `-sum_j (1 - p_ij) log p_ij`; for a class-wise forget set (S = {k}) it is the entropy with the
    k-th term replaced by `-(1 - p_ik) log p_ik`. Zero probabilities in S contribute
    `-log(1e-30) ~= 69.08` each (outside S they contribute 0). Use only to reproduce upstream.

    Args:
        probs: `[N, K]` softmax probabilities.
        labels: `[N]` integer labels.

    Returns:
        `[N, 1]` float64 feature.
    """
    p, y = _check_probs_labels(probs, labels)
    log_p = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), np.log(_LOG_FLOOR))
    in_label_set = np.zeros(p.shape[1], dtype=bool)
    in_label_set[np.unique(y)] = True  # [K]; bug 1: column selection by the set of labels
    weights = np.where(in_label_set[None, :], 1.0 - p, p)
    return -np.sum(weights * log_p, axis=1, keepdims=True)  # bug 2: log p, never log(1 - p)


def _m_entropy_fixed(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Song & Mittal's Mentr: -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)."""
    rows = np.arange(p.shape[0])
    p_y = p[rows, y]
    others = p * _log_clipped(1.0 - p)  # [N, K]
    others[rows, y] = 0.0
    value = -(1.0 - p_y) * _log_clipped(p_y) - others.sum(axis=1)
    return value[:, None]


def mia_features(probs: ArrayLike, labels: ArrayLike, kind: str) -> np.ndarray:
    """One feature set of the SVC attack.

    Args:
        probs: `[N, K]` softmax probabilities (rows summing to 1 within 1e-3).
        labels: `[N]` integer true labels.
        kind: one of
            - `"correctness"`: `1[argmax p == y]` as float, `[N, 1]`;
            - `"confidence"`: `p_y`, `[N, 1]` (the feature of the paper's MIA-Efficacy);
            - `"entropy"`: `-sum_i p_i log p_i` with `0 log 0 = 0`, `[N, 1]`;
            - `"m_entropy"`: the correct modified entropy of Song & Mittal (2021),
                `-(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)`, logs clipped at 1e-30,
                `[N, 1]` (see `m_entropy_upstream` for the upstream variant);
            - `"prob"`: the full probability vector, `[N, K]`.

    Returns:
        `[N, d]` float64 array.

    Raises:
        ValueError: on an unknown kind, mismatched lengths, empty input, out-of-range labels or rows
            that are not probability distributions.

    References:
        Song & Mittal (2021), Eq. 3.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"Unknown MIA feature kind {kind!r}; expected one of {FEATURE_KINDS}.")
    p, y = _check_probs_labels(probs, labels)
    if kind == "correctness":
        return (np.argmax(p, axis=1) == y).astype(np.float64)[:, None]
    if kind == "confidence":
        return _true_class_prob(p, y)[:, None]
    if kind == "entropy":
        plogp = np.where(p > 0, p * _log_clipped(p), 0.0)
        return -plogp.sum(axis=1, keepdims=True)
    if kind == "m_entropy":
        return _m_entropy_fixed(p, y)
    return p  # "prob"


def _features(probs, labels, kind: str, m_entropy: str) -> np.ndarray:
    if kind == "m_entropy" and m_entropy == "upstream":
        return m_entropy_upstream(probs, labels)
    return mia_features(probs, labels, kind)


def svc_mia(
    shadow_train_probs: ArrayLike,
    shadow_train_labels: ArrayLike,
    shadow_test_probs: ArrayLike,
    shadow_test_labels: ArrayLike,
    target_probs: ArrayLike,
    target_labels: ArrayLike,
    *,
    kinds: Sequence[str] = FEATURE_KINDS,
    m_entropy: str = "fixed",
) -> dict[str, float]:
    """The upstream SVC membership-inference attack, scored on a target (forget) set.

    For each feature kind an `sklearn.svm.SVC(C=3, gamma="auto", kernel="rbf")` is fit on
    `X = [shadow_train; shadow_test]`, `Y = [1, ..., 1, 0, ..., 0]` (1 = member), and the result is
    `1 - mean(clf.predict(X_target))`: the fraction of the target set predicted *non-member*. Higher
    means more forgetting. This is upstream's `SVC_MIA(..., target_train=None, target_test=forget)`.

    The paper's MIA-Efficacy (%) is `100 * result["confidence"]` . Upstream's
    call site uses the first `len(test)` retain samples (in index order) as `shadow_train` and the
    test set as `shadow_test`.

    Args:
        shadow_train_probs: `[N1, K]` probabilities of known members (label 1).
        shadow_train_labels: `[N1]` their true labels.
        shadow_test_probs: `[N0, K]` probabilities of known non-members (label 0).
        shadow_test_labels: `[N0]` their true labels.
        target_probs: `[M, K]` probabilities of the samples to score (the forget set).
        target_labels: `[M]` their true labels.
        kinds: which feature kinds to run (subset of `FEATURE_KINDS`). Each fits its own SVC, which
            costs O(N^2) to O(N^3) in the shadow size; pass `("confidence",)` if that is all
            you need.
        m_entropy: `"fixed"` (default) uses Song & Mittal's modified entropy; `"upstream"` uses the
            buggy upstream feature (`m_entropy_upstream`), computed separately on each of the three
            sets exactly as upstream does.

    Returns:
        `{kind: fraction in [0, 1]}` for each requested kind, as Python floats.

    Raises:
        ValueError: on bad inputs (see `mia_features`), an unknown kind or `m_entropy` option, or
            mismatched class counts between the sets.

    References:
        upstream `Classification/evaluation/SVC_MIA.py`.
    """
    from sklearn.svm import SVC  # local: scikit-learn is only needed for evaluation

    if m_entropy not in ("fixed", "upstream"):
        raise ValueError(f"m_entropy must be 'fixed' or 'upstream', got {m_entropy!r}.")
    kinds = tuple(kinds)
    if not kinds:
        raise ValueError(f"kinds is empty; pass a subset of {FEATURE_KINDS}.")
    unknown = [k for k in kinds if k not in FEATURE_KINDS]
    if unknown:
        raise ValueError(
            f"Unknown MIA feature kind(s) {unknown}; expected a subset of {FEATURE_KINDS}."
        )
    sets = {
        "shadow_train_probs": (shadow_train_probs, shadow_train_labels),
        "shadow_test_probs": (shadow_test_probs, shadow_test_labels),
        "target_probs": (target_probs, target_labels),
    }
    checked = {name: _check_probs_labels(p, y, name) for name, (p, y) in sets.items()}
    num_classes = {name: p.shape[1] for name, (p, _) in checked.items()}
    if len(set(num_classes.values())) != 1:
        raise ValueError(f"All sets must have the same number of classes, got {num_classes}.")
    (s1_p, s1_y), (s0_p, s0_y), (t_p, t_y) = checked.values()

    results = {}
    for kind in kinds:
        x_member = _features(s1_p, s1_y, kind, m_entropy)
        x_nonmember = _features(s0_p, s0_y, kind, m_entropy)
        x_target = _features(t_p, t_y, kind, m_entropy)
        x_shadow = np.concatenate([x_member, x_nonmember])
        y_shadow = np.concatenate([np.ones(len(x_member)), np.zeros(len(x_nonmember))])
        clf = SVC(C=3, gamma="auto", kernel="rbf")
        clf.fit(x_shadow, y_shadow)
        results[kind] = float(1.0 - np.mean(clf.predict(x_target)))
    return results


def _stratified_quotas(member_counts: np.ndarray, nonmember_counts: np.ndarray, n: int):
    """Per-class draws `k_c <= min(m_c, t_c)` summing to n (or to sum(min) when that is smaller).

    Proportional to `min(m_c, t_c)` with largest-remainder rounding (ties to the lower class), so
    when the smaller set fits class by class it is taken whole.
    """
    caps = np.minimum(member_counts, nonmember_counts)
    total = int(caps.sum())
    if total <= n:
        return caps
    exact = n * caps / total
    quotas = np.floor(exact).astype(np.int64)
    remainder = n - int(quotas.sum())
    order = np.argsort(-(exact - quotas), kind="stable")  # largest fractional parts first
    quotas[order[:remainder]] += 1  # each has quota < exact <= cap, so +1 stays within its cap
    return quotas


def stratified_shadow_indices(
    member_labels: ArrayLike, nonmember_labels: ArrayLike, seed: int | np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random, class-stratified, balanced member / non-member shadow sets for the SVC attack.

    Both sides get `n = min(len(member_labels), len(nonmember_labels))` samples, and each class
    contributes the same number to both, proportional to `min(#members, #non-members)` of that
    class, drawn without replacement. Where classes cannot be matched (the per-class minima sum to
    less than n), every class gives its minimum and each side is topped up to n with random
    leftovers, so the SVC stays balanced. Upstream's "first n retain samples" is class-skewed on
    data sets stored sorted by class; this draw is not.

    Args:
      member_labels: `[M]` integer labels of the candidate members (the retain set).
      nonmember_labels: `[T]` integer labels of the candidate non-members (the test set).
      seed: an int or a `np.random.Generator`; the same int gives the same sets.

    Returns:
      `(member_idx [n], nonmember_idx [n])`, ascending positions into the two label arrays.

    Raises:
      ValueError: on labels that are not 1-d integer arrays, or an empty side.

    References:
      upstream's call site in `main_forget.py`, which this replaces on request.
    """
    rng = np.random.default_rng(seed)
    labels = []
    for name, value in (("member_labels", member_labels), ("nonmember_labels", nonmember_labels)):
        y = np.asarray(value)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name} must be a 1-d integer array, got {y.dtype} {y.shape}.")
        if y.size == 0:
            raise ValueError(f"{name} is empty; the attack needs samples on both sides.")
        labels.append(y)
    member_y, nonmember_y = labels
    n = min(member_y.size, nonmember_y.size)
    classes = np.union1d(member_y, nonmember_y)
    member_counts = np.array([np.count_nonzero(member_y == c) for c in classes])
    nonmember_counts = np.array([np.count_nonzero(nonmember_y == c) for c in classes])
    quotas = _stratified_quotas(member_counts, nonmember_counts, n)

    picked = []
    for y in (member_y, nonmember_y):
        chosen = [
            rng.choice(np.flatnonzero(y == c), size=q, replace=False)
            for c, q in zip(classes, quotas, strict=True)
        ]
        chosen = np.concatenate(chosen)
        shortfall = n - chosen.size  # > 0 only when classes cannot be matched
        if shortfall:
            leftover = np.setdiff1d(np.arange(y.size), chosen)
            chosen = np.concatenate([chosen, rng.choice(leftover, size=shortfall, replace=False)])
        picked.append(np.sort(chosen))
    return picked[0], picked[1]


def loss_mia(forget_losses: ArrayLike, test_losses: ArrayLike, seed: int = 0) -> float:
    """The 2023 unlearning challenge starting kit's loss-threshold MIA: mean CV accuracy.

    A logistic regression on the per-example loss tells forget (label 1) from test (label 0)
    samples. The larger side is subsampled at random to the size of the smaller (the kit shuffles
    the forget losses and keeps the first |test|); accuracy is averaged over 10 stratified
    shuffle splits (`StratifiedShuffleSplit(n_splits=10)`, 10% held out, as the kit's
    `simple_mia`). About 0.5 means the attacker cannot tell forgotten from unseen samples.

    Args:
      forget_losses: `[F]` per-example cross-entropy losses on the forget set.
      test_losses: `[T]` per-example losses on unseen (test) samples.
      seed: seeds both the subsampling and the splits (the kit uses global `np.random` and
        `random_state=0`).

    Returns:
      Mean cross-validated attack accuracy in `[0, 1]`, a Python float.

    Raises:
      ValueError: on non-1-d or non-finite losses, or fewer than 10 samples on a side (the
        10% held-out fold must hold both classes).

    References:
      unlearning-challenge/starting-kit, `unlearning-CIFAR10.ipynb` ("simple_mia"); Shokri et al.
      (2017) / Yeom et al. (2018) loss-threshold attacks.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score

    sides = []
    for name, value in (("forget_losses", forget_losses), ("test_losses", test_losses)):
        x = np.asarray(value, dtype=np.float64)
        if x.ndim != 1:
            raise ValueError(f"{name} must be 1-d [N], got shape {x.shape}.")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} contains NaN or infinite values.")
        if x.size < 10:
            raise ValueError(f"{name} has {x.size} samples; the attack needs at least 10 per side.")
        sides.append(x)
    rng = np.random.default_rng(seed)
    n = min(s.size for s in sides)
    forget, test = (rng.permutation(s)[:n] for s in sides)
    samples = np.concatenate([test, forget])[:, None]
    members = np.concatenate([np.zeros(n, np.int64), np.ones(n, np.int64)])
    cv = StratifiedShuffleSplit(n_splits=10, random_state=seed)
    scores = cross_val_score(LogisticRegression(), samples, members, cv=cv, scoring="accuracy")
    return float(np.mean(scores))
