"""The model a server holds, and how it follows its registry alias.

A server of variant V serves `models:/<name>@V`; the candidate server falls back to
`@production` while there is no candidate and says so. A watcher thread re-reads the
alias every `reload_interval` seconds (or at once on `refresh()`) and swaps the model in
memory: requests in flight keep the object they already took, so none fails.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from abfleet import registry
from abfleet.model import FastPredictor
from abfleet.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    version: str
    alias: str  # the alias actually served
    fallback: bool  # True when a candidate server serves production's model
    predictor: FastPredictor


class ModelHolder:
    def __init__(self, settings: Settings, on_swap: Callable[[Loaded | None, Loaded], None] | None = None):
        self.settings = settings
        self.variant = settings.variant
        self.current: Loaded | None = None
        self.last_error: str | None = None
        self._on_swap = on_swap
        self._lock = threading.Lock()
        self._wake = threading.Event()

    @classmethod
    def fixed(cls, settings: Settings, predictor: FastPredictor, version: str) -> "ModelHolder":
        """A holder with a model already in hand (tests, benchmarks); it never reloads."""
        holder = cls(settings)
        holder.current = Loaded(version, settings.variant, False, predictor)
        holder.refresh = lambda: False  # type: ignore[method-assign]
        return holder

    def wanted(self) -> tuple[str, str, bool] | None:
        """(version, alias, fallback) the registry says this server should serve."""
        version = registry.version_for(self.settings, self.variant)
        if version is not None:
            return version, self.variant, False
        if self.variant == "candidate":
            version = registry.version_for(self.settings, "production")
            if version is not None:
                return version, "production", True
        return None

    def refresh(self) -> bool:
        """Load the model the alias points at if it is not the one held; True when swapped."""
        with self._lock:
            try:
                wanted = self.wanted()
                if wanted is None:
                    self.last_error = f"no @{self.variant} model in the registry"
                    return False
                version, alias, fallback = wanted
                held = self.current
                if held is not None and (held.version, held.alias, held.fallback) == wanted:
                    self.last_error = None
                    return False
                predictor = FastPredictor(registry.load_model(self.settings, version))
                loaded = Loaded(version, alias, fallback, predictor)
                self.current = loaded  # one reference assignment: readers see old or new, never half
                self.last_error = None
            except Exception as exc:  # keep serving what we hold; report the cause in /api/health
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("model refresh failed: %s", self.last_error)
                return False
        log.info("now serving version %s (@%s%s)", version, alias, ", fallback" if fallback else "")
        if self._on_swap:
            self._on_swap(held, loaded)
        return True

    def wake(self) -> None:
        """Ask the watcher to check the registry now."""
        self._wake.set()

    def start_watcher(self) -> threading.Thread:
        def loop() -> None:
            while True:
                self.refresh()
                self._wake.wait(self.settings.reload_interval)
                self._wake.clear()

        thread = threading.Thread(target=loop, name="model-watcher", daemon=True)
        thread.start()
        return thread
