"""The model registry: MLflow's registered model and its `production` / `candidate` aliases.

Versions are never deleted here: promotion and rollback only move aliases and tag versions.
"""

from __future__ import annotations

import datetime as dt
import functools

from abfleet.decision import PROMOTE, ROLLBACK
from abfleet.settings import VARIANTS, Settings, set_mlflow_client_defaults


class RegistryError(RuntimeError):
    """The registry could not be reached or does not hold what was asked for."""


@functools.lru_cache(maxsize=8)
def _client(tracking_uri: str):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def client(settings: Settings):
    """An MLflow client for the configured tracking server (also set as mlflow's default)."""
    import mlflow

    set_mlflow_client_defaults()
    mlflow.set_tracking_uri(settings.tracking_uri)
    return _client(settings.tracking_uri)


def version_for(settings: Settings, alias: str) -> str | None:
    """The version an alias points at, or None when the alias (or the model) is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client(settings).get_model_version_by_alias(settings.model_name, alias).version)
    except MlflowException as exc:
        if _is_missing(exc):
            return None
        raise RegistryError(f"registry at {settings.tracking_uri}: {exc.message}") from None


def aliases(settings: Settings) -> dict[str, str | None]:
    """Alias → version for both variants."""
    return {alias: version_for(settings, alias) for alias in VARIANTS}


def set_alias(settings: Settings, alias: str, version: str) -> None:
    client(settings).set_registered_model_alias(settings.model_name, alias, str(version))
    if alias == "candidate":
        # The experiment window starts here: evaluation counts traffic since this moment.
        tag_version(settings, version, {"candidate_since": _now()})


def delete_alias(settings: Settings, alias: str) -> None:
    client(settings).delete_registered_model_alias(settings.model_name, alias)


def tag_version(settings: Settings, version: str, tags: dict[str, str]) -> None:
    c = client(settings)
    for key, value in tags.items():
        c.set_model_version_tag(settings.model_name, str(version), key, str(value))


def version_info(settings: Settings, version: str):
    return client(settings).get_model_version(settings.model_name, str(version))


def load_model(settings: Settings, version: str):
    """The fitted scikit-learn model of a registered version."""
    import mlflow.sklearn

    client(settings)
    return mlflow.sklearn.load_model(f"models:/{settings.model_name}/{version}")


def promote(settings: Settings, reasons: list[str], source: str) -> dict:
    """@production → the candidate's version; the old production tagged `retired`; @candidate removed.

    Nothing is deleted: the retired version stays registered, one `set_alias` away.
    """
    candidate = version_for(settings, "candidate")
    if candidate is None:
        raise RegistryError("there is no @candidate to promote")
    previous = version_for(settings, "production")
    now, why = _now(), _join(reasons)
    set_alias(settings, "production", candidate)
    delete_alias(settings, "candidate")
    tag_version(settings, candidate, {"promoted_at": now, "promoted_by": source, "promoted_reasons": why})
    if previous and previous != candidate:
        tag_version(settings, previous, {"retired": now, "retired_by": source, "retired_for": candidate})
    return {"action": PROMOTE, "production_version": candidate, "previous_production_version": previous}


def rollback(settings: Settings, reasons: list[str], source: str) -> dict:
    """@candidate removed and its version tagged `rolled_back` with the reasons; artifacts stay."""
    candidate = version_for(settings, "candidate")
    if candidate is None:
        raise RegistryError("there is no @candidate to roll back")
    delete_alias(settings, "candidate")
    tag_version(settings, candidate, {"rolled_back": _now(), "rolled_back_by": source, "rolled_back_reasons": _join(reasons)})
    return {"action": ROLLBACK, "rolled_back_version": candidate, "production_version": version_for(settings, "production")}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _join(reasons: list[str]) -> str:
    # MLflow caps tag values; the decisions table keeps the full text.
    return "; ".join(reasons)[:4900]


def _is_missing(exc) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or "not found" in str(exc).lower()
