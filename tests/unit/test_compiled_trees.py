"""Compiled trees predict what the fitted pipeline predicts, bit for bit, and fall back to
sklearn for what they do not know."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import HistGradientBoostingRegressor

from abfleet import data, model
from abfleet.model import CompiledTrees, FastPredictor


@pytest.fixture
def trained(tiny_model):
    return tiny_model.fitted, tiny_model.test


def every_location_grid(fast: FastPredictor) -> pd.DataFrame:
    """Every location the model knows, and every location of the fleet's vocabulary it does not
    (priced as "other", the way the server maps them), over a spread of flats."""
    names = list(fast.locations) + sorted(data.known_locations() - set(fast.locations))
    rows = [(fast.model_location(name, data.known_locations()), sqft, bhk, bath)
            for name in names for sqft in (300.0, 555.5, 1200.0, 1875.25, 4000.0, 30000.0)
            for bhk, bath in ((1, 1), (2, 2), (3, 4), (10, 10))]
    return pd.DataFrame(rows, columns=data.FEATURES)


def test_compiled_trees_predict_what_the_pipeline_predicts(trained):
    fitted, test = trained
    fast = FastPredictor(fitted)
    assert fast.compiled is not None, "the fitted HistGradientBoostingRegressor should compile"
    frame = pd.concat([test[data.FEATURES], every_location_grid(fast)], ignore_index=True)
    assert frame["location"].notna().all()
    expected = fitted.predict(frame)
    many = fast.predict_many(frame)
    one = np.array([fast.predict_one(r.location, r.total_sqft, r.bhk, r.bath) for r in frame.itertuples()])
    assert np.isfinite(many).all() and np.isfinite(one).all()
    np.testing.assert_allclose(many, expected, rtol=1e-9)
    np.testing.assert_allclose(one, expected, rtol=1e-9)
    # The raw scores are sklearn's to the last bit: same comparisons, same order of additions.
    trees = fitted.regressor_.named_steps["trees"]
    encoded = fitted.regressor_.named_steps["encode"].transform(frame)
    np.testing.assert_array_equal(fast.compiled.raw_many(encoded), trees._raw_predict(encoded).ravel())


def test_unknown_location_is_priced_as_other(trained):
    fitted, _test = trained
    fast = FastPredictor(fitted)
    vocabulary = data.known_locations()
    unseen = sorted(vocabulary - set(fast.locations))
    assert unseen, "a model on 8000 synthetic rows misses some rare locations"
    assert fast.model_location(unseen[0], vocabulary) == "other"
    assert fast.model_location("Atlantis", vocabulary) is None
    other = fitted.predict(pd.DataFrame([["other", 1000.0, 2, 2]], columns=data.FEATURES))[0]
    assert fast.predict_one(fast.model_location(unseen[0], vocabulary), 1000.0, 2, 2) == pytest.approx(other, rel=1e-9)


def test_missing_and_unseen_category_codes_follow_sklearn(trained):
    """Codes the encoder never emits for known names still follow sklearn's rules: NaN,
    negative (the encoder's unknown_value) and codes outside the fitted categories go the
    node's missing-value way; NaN numbers too."""
    fitted, test = trained
    trees = fitted.regressor_.named_steps["trees"]
    compiled = CompiledTrees.build(trees)
    encoded = fitted.regressor_.named_steps["encode"].transform(test[data.FEATURES].head(50))
    odd = encoded.copy()
    odd[0::5, 0] = np.nan
    odd[1::5, 0] = -1.0
    odd[2::5, 0] = 254.0  # a code no fitted category has
    odd[3::5, 1] = np.nan
    odd[4::5, 3] = np.nan
    np.testing.assert_array_equal(compiled.raw_many(odd), trees._raw_predict(odd).ravel())
    for row in odd[:10]:
        assert compiled.raw_one(row) == trees._raw_predict(row[None, :])[0, 0]


def test_what_the_compiler_does_not_know_falls_back_to_sklearn(trained):
    fitted, test = trained
    assert CompiledTrees.build(object()) is None
    assert CompiledTrees.build(HistGradientBoostingRegressor()) is None  # not fitted
    fast = FastPredictor(fitted)
    fast.compiled = None
    np.testing.assert_allclose(fast.predict_many(test.head(20)), fitted.predict(test[data.FEATURES].head(20)), rtol=1e-12)


@pytest.mark.skipif(not data.real_dataset_available(), reason=f"the real dataset is not at {data.REAL_DATASET}")
def test_served_model_is_as_accurate_as_plain_sklearn_on_the_real_held_out_split():
    cleaned = data.clean(data.read_raw(data.REAL_DATASET))
    train, test = data.train_test_split_frame(cleaned.frame, test_size=0.2, seed=0)
    fitted = model.fit(train, model.ModelParams(seed=0))
    baseline = model.score(fitted, test)  # the pipeline's own predict

    fast = FastPredictor(fitted)
    truth = test[data.TARGET].to_numpy(dtype=float)
    for served in (fast.predict_many(test),
                   np.array([fast.predict_one(r.location, r.total_sqft, r.bhk, r.bath) for r in test.itertuples()])):
        ape = np.abs(served - truth) / truth
        assert np.isfinite(served).all()
        assert np.median(ape) <= baseline["median_ape"] + 1e-12
        assert np.mean(ape) <= baseline["mape"] + 1e-12
