"""Acting on what was judged, and loading only what a server expects: the pure parts, with
the registry's I/O replaced (the integration tests in test_actions run them against MLflow)."""

from __future__ import annotations

import pytest

from abfleet import evaluation, registry, serving, train
from abfleet.settings import Settings
from abfleet.store import Store


def test_moved_names_each_alias_that_points_elsewhere():
    assert registry.moved({"candidate": "3", "production": "2"}, {"candidate": "3", "production": "2"}) == []
    assert registry.moved({"candidate": "3", "production": "2"}, {"candidate": "4", "production": "2"}) == [
        "@candidate moved from 3 to 4"]
    assert registry.moved({"candidate": "3"}, {"candidate": None}) == ["@candidate moved from 3 to none"]
    assert registry.moved({"candidate": None}, {"candidate": "5"}) == ["@candidate moved from none to 5"]


def test_promote_refuses_before_writing_when_the_candidate_moved(monkeypatch):
    # The registry says 6 now; the evaluation judged 5: nothing may be written.
    monkeypatch.setattr(registry, "aliases", lambda _s: {"production": "2", "candidate": "6"})
    writes = []
    for name in ("set_alias", "delete_alias", "tag_version"):
        monkeypatch.setattr(registry, name, lambda *a, _n=name, **k: writes.append(_n))
    for action in (registry.promote, registry.rollback):
        with pytest.raises(registry.AliasMoved, match="@candidate moved from 5 to 6 since it was judged"):
            action(Settings(), ["better"], "test", candidate="5", production="2")
    assert writes == []


def test_promote_writes_the_judged_version_and_reports_a_write_that_raced_it(monkeypatch):
    reads = iter([{"production": "2", "candidate": "5"}, {"production": "5", "candidate": "7"}])
    monkeypatch.setattr(registry, "aliases", lambda _s: next(reads))
    writes = []
    monkeypatch.setattr(registry, "set_alias", lambda _s, alias, version: writes.append((alias, version)))
    monkeypatch.setattr(registry, "delete_alias", lambda _s, alias: writes.append((alias, None)))
    monkeypatch.setattr(registry, "tag_version", lambda *a, **k: None)
    out = registry.promote(Settings(), ["better"], "test", candidate="5", production="2")
    assert writes == [("production", "5"), ("candidate", None)]
    assert out["production_version"] == "5" and "@candidate moved from none to 7" in out["conflict"]


def test_act_records_a_refused_action_as_not_applied_with_the_reason(monkeypatch, tmp_path):
    settings = Settings(run_dir=tmp_path)

    def moved(*_a, **_k):
        raise registry.AliasMoved("@candidate moved from 3 to 4 since it was judged")

    monkeypatch.setattr(registry, "promote", moved)
    monkeypatch.setattr(registry, "tag_version", lambda *a, **k: None)
    monkeypatch.setattr(evaluation.fleet, "reload_servers", lambda _s: pytest.fail("nothing moved: no reload"))
    monkeypatch.setattr(evaluation.fleet, "notify", lambda _s, _r: None)
    collected = {"production_version": "2", "candidate_version": "3", "at": "2026-01-01T00:00:00+00:00", "stats": {}}
    record = evaluation.act(settings, collected, {"decision": "promote", "reasons": ["better"]}, source="test")
    assert not record["applied"] and record["refused"] == "refused: @candidate moved from 3 to 4 since it was judged"
    row = Store(settings.db_url).decision_history(limit=1)[0]
    assert row["decision"] == "promote" and not row["applied"] and row["candidate_version"] == "3"
    assert row["reasons"][-1] == record["refused"] and row["details"]["refused"] == record["refused"]


@pytest.mark.parametrize("current, age, force, deferred", [
    (None, 0.0, False, False),  # no experiment running
    ("3", 2.0, False, True),  # younger than its minimum run
    ("3", 2.0, True, False),  # forced
    ("3", 30.0, False, False),  # ran its minimum
    ("4", 0.0, False, False),  # already the candidate
])
def test_a_retrain_defers_to_a_young_experiment_unless_forced(current, age, force, deferred):
    reason = train.deferral(current, "4", age, 24.0, force)
    assert (reason is not None) == deferred
    if deferred:
        assert "v3 is 2.0 h old" in reason and "24 h" in reason


class _Fitted:
    """Stands in for a fitted model: FastPredictor is not what is tested here."""


def test_a_refused_version_keeps_the_model_held_and_says_why(monkeypatch):
    settings = Settings(variant="production")
    holder = serving.ModelHolder(settings)
    wanted = {"production": "1"}
    fetched = []

    def load(_s, version):
        fetched.append(version)
        if version == "2":
            raise registry.ArtifactRefused("2", "artifact checksum mismatch", "hashes to abc, tag says def")
        return _Fitted()

    monkeypatch.setattr(registry, "version_for", lambda _s, alias: wanted.get(alias))
    monkeypatch.setattr(registry, "load_model", load)
    monkeypatch.setattr(serving, "FastPredictor", lambda fitted: fitted)
    assert holder.refresh() and holder.current.version == "1"
    wanted["production"] = "2"
    assert not holder.refresh() and not holder.refresh()
    assert holder.current.version == "1" and holder.last_error == "version 2 refused: artifact checksum mismatch"
    assert fetched == ["1", "2"]  # a refused version is not fetched again on every check...
    holder.wake()
    holder.refresh()
    assert fetched == ["1", "2", "2"]  # ...until someone asks for a reload
