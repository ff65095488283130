"""The price model: how it is built and trained, how it predicts, and how it is scored.

The fitted artifact is a plain scikit-learn Pipeline (so MLflow's own server can serve the
very same registered model); `FastPredictor` evaluates its trees on a pre-encoded array
for the serving hot path, without a DataFrame per request.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer, TransformedTargetRegressor
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.metrics import mean_absolute_error, r2_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OrdinalEncoder

from abfleet.data import FEATURES, TARGET

# Numeric features after the location code, in the order the trees see them.
NUMERIC = ["total_sqft", "bhk", "bath"]

# skops refuses to load types it was not told to trust; these are the ones our pipeline holds.
SKOPS_TRUSTED_TYPES = [
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
    "numpy.log",
    "numpy.exp",
    # ColumnTransformer's fitted "passthrough" holds a partial of check_array.
    "functools.partial",
    "sklearn.utils.validation.check_array",
]


def load_skops(path) -> TransformedTargetRegressor:
    """A fitted model from a skops file, trusting only SKOPS_TRUSTED_TYPES (this code's list,
    never one written beside the file); raises when the file holds any other type."""
    import skops.io

    return skops.io.load(path, trusted=SKOPS_TRUSTED_TYPES)


@dataclass(frozen=True)
class ModelParams:
    max_iter: int = 400
    learning_rate: float = 0.06
    max_leaf_nodes: int = 31
    min_samples_leaf: int = 10
    l2_regularization: float = 1.0
    seed: int = 0


def build_pipeline(params: ModelParams = ModelParams()) -> TransformedTargetRegressor:
    """An unfitted pipeline: location → ordinal code (native categorical in the trees),
    area/bhk/bath passed through; the target is fitted in log space."""
    encode = ColumnTransformer(
        [
            (
                "location",
                OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1, dtype=np.float64),
                ["location"],
            ),
            ("numeric", "passthrough", NUMERIC),
        ],
        verbose_feature_names_out=False,
    )
    trees = HistGradientBoostingRegressor(
        max_iter=params.max_iter,
        learning_rate=params.learning_rate,
        max_leaf_nodes=params.max_leaf_nodes,
        min_samples_leaf=params.min_samples_leaf,
        l2_regularization=params.l2_regularization,
        categorical_features=[0],
        # A larger flat in the same place never costs less: enforced, not hoped for.
        monotonic_cst=[0, 1, 0, 0],
        early_stopping=False,
        random_state=params.seed,
    )
    return TransformedTargetRegressor(
        regressor=Pipeline([("encode", encode), ("trees", trees)]),
        func=np.log,
        inverse_func=np.exp,
        check_inverse=False,
    )


def fit(train: pd.DataFrame, params: ModelParams = ModelParams()) -> TransformedTargetRegressor:
    """Fit on a cleaned frame (columns FEATURES + TARGET)."""
    model = build_pipeline(params)
    model.fit(train[FEATURES], train[TARGET].to_numpy(dtype=float))
    return model


def score(model, test: pd.DataFrame) -> dict[str, float]:
    """Held-out metrics: median and mean absolute percentage error (fractions), MAE (lakhs), R²."""
    truth = test[TARGET].to_numpy(dtype=float)
    pred = np.asarray(model.predict(test[FEATURES]), dtype=float)
    ape = np.abs(pred - truth) / truth
    return {
        "median_ape": float(np.median(ape)),
        "mape": float(np.mean(ape)),
        "mae": float(mean_absolute_error(truth, pred)),
        "r2": float(r2_score(truth, pred)),
    }


class FastPredictor:
    """The fitted pipeline's trees on a pre-encoded row: the serving hot path.

    Gives what `model.predict` gives for the same inputs (tested on many rows, every
    location included), at a fraction of the cost: no DataFrame, no column transformer and
    no input validation run per call, and the trees are compiled (`CompiledTrees`).
    """

    def __init__(self, model: TransformedTargetRegressor):
        pipeline = model.regressor_
        encoder = pipeline.named_steps["encode"].named_transformers_["location"]
        self.locations: list[str] = [str(x) for x in encoder.categories_[0]]
        self._codes = {name: float(i) for i, name in enumerate(self.locations)}
        self._trees: HistGradientBoostingRegressor = pipeline.named_steps["trees"]
        self._inverse = model.inverse_func
        # None when the estimator holds something the compiler does not know: sklearn then predicts.
        self.compiled = CompiledTrees.build(self._trees)

    def knows(self, location: str) -> bool:
        return location in self._codes

    def model_location(self, location: str, vocabulary: frozenset[str]) -> str | None:
        """The location as the model should see it: itself when trained on it, "other" when it
        is a known Bengaluru location the training data was too thin on, None when unknown."""
        if location in self._codes:
            return location
        if location in vocabulary and "other" in self._codes:
            return "other"
        return None

    def predict_one(self, location: str, total_sqft: float, bhk: int, bath: int) -> float:
        code = self._codes[location]
        if self.compiled is not None:
            return float(self._inverse(self.compiled.raw_one((code, total_sqft, bhk, bath))))
        row = np.array([[code, total_sqft, bhk, bath]], dtype=np.float64)
        return float(self._inverse(self._trees.predict(row))[0])

    def predict_many(self, frame: pd.DataFrame) -> np.ndarray:
        codes = frame["location"].map(self._codes).to_numpy(dtype=np.float64)
        rows = np.column_stack([codes, frame[NUMERIC].to_numpy(dtype=np.float64)])
        raw = self.compiled.raw_many(rows) if self.compiled is not None else self._trees.predict(rows)
        return np.asarray(self._inverse(raw), dtype=float)


class CompiledTrees:
    """A fitted HistGradientBoostingRegressor's trees as lookup tables, evaluated exactly.

    The QuickScorer idea (Lucchese et al., SIGIR 2015): number each tree's leaves left to
    right and give every split node a bit mask that clears the leaves of its left subtree.
    A row's exit leaf in a tree is the leftmost leaf whose bit survives AND-ing the masks of
    every node the row does *not* go left at. Which nodes those are depends on one feature
    each, so per feature the AND of masks is tabulated once over the intervals between its
    split thresholds (numeric) or per category code (categorical, from the raw left-category
    bitsets and the known-category bitsets, the way sklearn's predictor reads them; NaN,
    negative and unknown codes follow `missing_go_to_left`). A prediction is then 4 table
    rows AND-ed, one lowest-set-bit per tree, one gather of leaf values and a sum in the
    same order as sklearn's `_raw_predict` (baseline, then tree by tree), so the raw score
    is bit-for-bit sklearn's.
    """

    MAX_LEAVES = 64  # one uint64 mask per tree
    CATEGORY_CODES = 256  # sklearn reads a raw category as uint8

    def __init__(self, baseline: float, tables: list[np.ndarray], thresholds: list[list[float] | None],
                 leaf_values: np.ndarray):
        self.baseline = baseline
        self.tables = tables  # per feature: (rows, n_trees) uint64
        self.thresholds = thresholds  # per numeric feature: sorted split thresholds; None if categorical
        self.leaf_values = leaf_values  # (n_trees, MAX_LEAVES) float64
        self.n_trees = leaf_values.shape[0]
        # sklearn starts from 0 + baseline and adds the trees in order; adding the baseline to
        # the first tree's leaves here is that very first addition, done once.
        self._flat_values = leaf_values.copy()
        self._flat_values[0] += baseline
        self._flat_values = self._flat_values.ravel()
        # Leaf k of tree t is at t * MAX_LEAVES + k; _leaf_sum reads k + 1023 off a float's exponent.
        self._offsets_1023 = np.arange(self.n_trees, dtype=np.int64) * self.MAX_LEAVES - 1023
        self._missing_row = [len(t) - 1 for t in tables]

    # ---- building ------------------------------------------------------------
    @classmethod
    def build(cls, est) -> "CompiledTrees | None":
        """Compile a fitted HistGradientBoostingRegressor, or None when it is not one this
        compiler handles exactly (then the caller keeps sklearn's predict)."""
        from sklearn._loss.link import IdentityLink

        try:
            if not isinstance(est, HistGradientBoostingRegressor) or est.n_trees_per_iteration_ != 1:
                return None
            if not isinstance(est._loss.link, IdentityLink):
                return None
            predictors = [p for iteration in est._predictors for p in iteration]
            if not predictors or any(p.get_n_leaf_nodes() > cls.MAX_LEAVES for p in predictors):
                return None
            n_features = int(est.n_features_in_)
            if n_features < 2:
                return None
            is_cat = np.zeros(n_features, dtype=bool)
            if est.is_categorical_ is not None:
                is_cat[:] = est.is_categorical_
            known, f_idx_map = est._bin_mapper.make_known_categories_bitsets()
            baseline = float(np.asarray(est._baseline_prediction, dtype=np.float64).ravel()[0])
        except (AttributeError, TypeError, ValueError):
            return None
        return cls._compile(predictors, n_features, is_cat, known, f_idx_map, baseline)

    @classmethod
    def _compile(cls, predictors, n_features, is_cat, known, f_idx_map, baseline) -> "CompiledTrees":
        n_trees = len(predictors)
        all_ones = np.uint64(np.iinfo(np.uint64).max)
        leaf_values = np.zeros((n_trees, cls.MAX_LEAVES), dtype=np.float64)
        # Every split node: (tree, feature, threshold, goes-left-when-missing, mask, node, predictor).
        splits: list[tuple] = []
        for t, predictor in enumerate(predictors):
            nodes = predictor.nodes
            left_bits: dict[int, int] = {}
            n_leaves = 0

            def walk(i: int) -> int:
                """Number the leaves under node i left to right; return their bit set."""
                nonlocal n_leaves
                if nodes["is_leaf"][i]:
                    leaf_values[t, n_leaves] = nodes["value"][i]
                    n_leaves += 1
                    return 1 << (n_leaves - 1)
                left = walk(int(nodes["left"][i]))
                right = walk(int(nodes["right"][i]))
                left_bits[i] = left
                return left | right

            walk(0)
            for i, bits in left_bits.items():
                mask = np.uint64(~bits & ((1 << 64) - 1))
                splits.append((t, int(nodes["feature_idx"][i]), float(nodes["num_threshold"][i]),
                               bool(nodes["missing_go_to_left"][i]), mask, nodes[i], predictor))

        tables: list[np.ndarray] = []
        thresholds: list[list[float] | None] = []
        for f in range(n_features):
            mine = [s for s in splits if s[1] == f]
            if is_cat[f]:
                # Rows 0..255: the category code; the last row: missing (NaN, negative or unknown).
                table = np.full((cls.CATEGORY_CODES + 1, n_trees), all_ones, dtype=np.uint64)
                known_f = _bits(known[f_idx_map[f]])
                for t, _f, _thr, missing_left, mask, node, predictor in mine:
                    goes_left = _bits(predictor.raw_left_cat_bitsets[node["bitset_idx"]])
                    # Not in the left set: a known code goes right; an unknown one is missing.
                    goes_right = ~goes_left & (known_f | (not missing_left))
                    table[:cls.CATEGORY_CODES][goes_right, t] &= mask
                    if not missing_left:
                        table[cls.CATEGORY_CODES, t] &= mask
                tables.append(table)
                thresholds.append(None)
            else:
                values = sorted({s[2] for s in mine})
                position = {v: j for j, v in enumerate(values)}
                # Row b: values with exactly b thresholds below them (x <= threshold goes left);
                # the last row: NaN.
                step = np.full((len(values) + 1, n_trees), all_ones, dtype=np.uint64)
                nan_row = np.full(n_trees, all_ones, dtype=np.uint64)
                for t, _f, thr, missing_left, mask, _node, _p in mine:
                    step[position[thr] + 1, t] &= mask
                    if not missing_left:
                        nan_row[t] &= mask
                table = np.vstack([np.bitwise_and.accumulate(step, axis=0), nan_row[None, :]])
                tables.append(np.ascontiguousarray(table))
                thresholds.append(values)
        return cls(baseline, tables, thresholds, leaf_values)

    # ---- predicting ----------------------------------------------------------
    def _row_of(self, f: int, x: float) -> int:
        """The table row of value x of feature f (sklearn's rules for NaN and categories)."""
        if x != x:  # NaN
            return self._missing_row[f]
        values = self.thresholds[f]
        if values is None:
            if x < 0:  # a negative category is missing to sklearn
                return self._missing_row[f]
            if x >= self.CATEGORY_CODES:
                raise ValueError(f"category code {x} is outside 0..255: not a code of the fitted encoder")
            return int(x)
        return bisect.bisect_left(values, x)  # thresholds strictly below x: the nodes x goes right at

    def _rows_of(self, f: int, column: np.ndarray) -> np.ndarray:
        """`_row_of` for a whole column."""
        missing = np.isnan(column)
        values = self.thresholds[f]
        if values is None:
            if np.any(column >= self.CATEGORY_CODES):
                raise ValueError("a category code is outside 0..255: not a code of the fitted encoder")
            missing |= column < 0
            index = np.where(missing, 0, column).astype(np.intp)
        else:
            index = np.searchsorted(np.asarray(values, dtype=np.float64), column, side="left")
        return np.where(missing, self._missing_row[f], index)

    def _leaf_sum(self, alive: np.ndarray) -> np.ndarray:
        """Raw scores from the surviving-leaf masks (shape (..., n_trees))."""
        lowest = alive & np.negative(alive)  # the leftmost surviving leaf's bit, 2**k
        # 2**k as a float64 has exponent field k + 1023: bits 52.. of its representation.
        index = lowest.astype(np.float64).view(np.int64)
        index >>= 52
        index += self._offsets_1023
        # The trees' values in sklearn's order (the baseline is in tree 0's); accumulate is sequential.
        return np.add.accumulate(self._flat_values.take(index), axis=-1)[..., -1]

    def raw_one(self, row) -> np.float64:
        """The raw score of one row (a sequence of feature values, in the fitted order)."""
        tables, row_of = self.tables, self._row_of
        alive = tables[0][row_of(0, row[0])] & tables[1][row_of(1, row[1])]
        for f in range(2, len(tables)):
            alive &= tables[f][row_of(f, row[f])]
        return self._leaf_sum(alive)

    def raw_many(self, rows: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """Raw scores of many rows (shape (n, n_features))."""
        rows = np.asarray(rows, dtype=np.float64)
        out = np.empty(len(rows), dtype=np.float64)
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            alive = self.tables[0][self._rows_of(0, part[:, 0])]
            for f in range(1, len(self.tables)):
                alive &= self.tables[f][self._rows_of(f, part[:, f])]
            out[start:start + len(part)] = self._leaf_sum(alive)
        return out


def _bits(bitset: np.ndarray) -> np.ndarray:
    """sklearn's 256-bit category bitset (8 uint32 words) as 256 booleans: code c is bit
    c % 32 of word c // 32, as `in_bitset` reads it."""
    words = np.asarray(bitset, dtype=np.uint64).reshape(-1, 1)
    return (((words >> np.arange(32, dtype=np.uint64)) & np.uint64(1)) == 1).ravel()
