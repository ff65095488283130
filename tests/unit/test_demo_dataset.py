"""`make demo` publishes the data production was trained on as the first dataset version."""

from __future__ import annotations

import pytest

from abfleet import demo, objects
from abfleet.settings import Settings


def test_the_demo_publishes_productions_training_data_once(tmp_path):
    settings = Settings(run_dir=tmp_path)
    store = objects.open_store(settings)
    assert objects.dataset_versions(store) == []
    key = demo.ensure_dataset(settings)
    assert key == "datasets/train_V1.csv" and objects.newest_dataset(store) == key
    published = store.get_file(key, tmp_path / "got.csv").read_bytes()
    assert published == demo.training_csv(settings, "production").read_bytes()
    # The same rows every time: a run directory whose CSV was removed writes it again alike.
    demo.training_csv(settings, "production").unlink()
    assert demo.training_csv(settings, "production").read_bytes() == published
    # A store with versions already is left alone.
    assert demo.ensure_dataset(settings) == key and objects.dataset_versions(store) == [(1, key)]


def test_no_dataset_is_a_named_error(tmp_path):
    store = objects.open_store(Settings(run_dir=tmp_path))
    with pytest.raises(objects.NoDataset, match=r"no datasets/train_V\{n\}\.csv"):
        objects.newest_dataset(store)
