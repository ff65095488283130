"""Behavioural tests of the price model: invariances and directions, not just a score."""

from __future__ import annotations

import numpy as np
import pytest

from abfleet import data, model


@pytest.fixture(scope="module")
def trained():
    cleaned = data.clean(data.synth(6000, seed=3))
    train, test = data.train_test_split_frame(cleaned.frame, test_size=0.2, seed=0)
    return model.fit(train, model.ModelParams(max_iter=150)), test, train


def test_larger_area_never_lowers_the_estimate(trained):
    fast = model.FastPredictor(trained[0])
    areas = np.arange(400, 6000, 50, dtype=float)
    for location in fast.locations[:: max(1, len(fast.locations) // 40)]:
        for bhk, bath in ((1, 1), (2, 2), (3, 3)):
            prices = [fast.predict_one(location, a, bhk, bath) for a in areas]
            assert all(b >= a for a, b in zip(prices, prices[1:])), (location, bhk, bath)


def test_central_location_is_dearer_than_peripheral(trained):
    fast = model.FastPredictor(trained[0])
    for sqft, bhk, bath in ((1000, 2, 2), (1500, 3, 2), (2400, 4, 4)):
        assert fast.predict_one("Indira Nagar", sqft, bhk, bath) > 1.5 * fast.predict_one("Anekal", sqft, bhk, bath)


def test_unknown_location_is_not_known(trained):
    fast = model.FastPredictor(trained[0])
    assert fast.knows("Indira Nagar") and not fast.knows("Atlantis")


def test_model_beats_a_city_wide_price_per_sqft_baseline(trained):
    fitted, test, train = trained
    metrics = model.score(fitted, test)
    # Baseline: the city's median price per sq ft on the training rows times the area (location ignored).
    ppsf = float((train.price / train.total_sqft).median())
    baseline = ppsf * test.total_sqft.to_numpy()
    baseline_ape = np.median(np.abs(baseline - test.price.to_numpy()) / test.price.to_numpy())
    assert metrics["median_ape"] < 0.8 * baseline_ape
    assert 0 < metrics["median_ape"] < 0.3 and metrics["r2"] > 0.5


@pytest.mark.skipif(not data.real_dataset_available(), reason="the real dataset ../shared/data/bengaluru_house_data.csv is absent")
def test_on_the_real_dataset_held_out_20_percent_seed_0():
    cleaned = data.clean(data.read_raw(data.REAL_DATASET))
    train, test = data.train_test_split_frame(cleaned.frame, test_size=0.2, seed=0)
    fitted = model.fit(train)
    metrics = model.score(fitted, test)
    print(f"real dataset, held-out 20% seed 0: {metrics}")
    assert metrics["median_ape"] < 0.2
    fast = model.FastPredictor(fitted)
    assert fast.predict_one("Indira Nagar", 1200, 2, 2) > fast.predict_one("Anekal", 1200, 2, 2)
