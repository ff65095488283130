"""The model a server holds, and the prediction service that answers with it.

A server of variant V serves `models:/<name>@V`; the candidate server falls back to
`@production` while there is no candidate and says so. A watcher thread re-reads the
alias every `reload_interval` seconds (or at once on `refresh()`) and swaps the model in
memory: requests in flight keep the object they already took, so none fails. A version
whose artifact is refused (`registry.ArtifactRefused`: not skops, checksum mismatch) is
never swapped in: the server keeps what it holds and says why in `problem` (public) and
`last_error` (the log's detail).

`Predictions.answer` is the one place a predict request is validated, scored and recorded:
the server's lean WSGI path and its Flask view both call it with the raw body. Feedback on
the answers is abfleet.feedback's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, NamedTuple

import sqlalchemy as sa

from abfleet import api, registry
from abfleet.decision import ARMS
from abfleet.metrics import ServerMetrics
from abfleet.model import FastPredictor
from abfleet.reload_signal import POLL_S, ReloadSignal
from abfleet.settings import Settings
from abfleet.spool import SpoolFull
from abfleet.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    version: str
    alias: str  # the alias actually served
    fallback: bool  # True when a candidate server serves production's model
    predictor: FastPredictor


# What clients are told when the registry or the model failed; the detail goes to the log.
MODEL_UNAVAILABLE = "the model could not be loaded from the registry (details in the server log)"


def no_model_yet(holder: "ModelHolder") -> str:
    """The public sentence of a 503 while `holder` has no model."""
    return f"no model loaded yet: {holder.problem or 'loading'}"


class ModelHolder:
    def __init__(self, settings: Settings, on_swap: Callable[[Loaded | None, Loaded], None] | None = None):
        self.settings = settings
        self.variant = settings.variant
        self.current: Loaded | None = None
        self.last_error: str | None = None  # the detail, for the log only
        self.problem: str | None = None  # what a public body may say about it
        self._on_swap = on_swap
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._refused: dict[str, str] = {}  # version → why; not fetched again until wake()

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
                    self.last_error = self.problem = f"no @{self.variant} model in the registry"
                    return False
                version, alias, fallback = wanted
                held = self.current
                if held is not None and (held.version, held.alias, held.fallback) == wanted:
                    self.last_error = self.problem = None
                    return False
                if version in self._refused:  # refused already: no download every reload_interval
                    self.last_error = self.problem = self._refused[version]
                    return False
                try:
                    fitted = registry.load_model(self.settings, version)
                except registry.ArtifactRefused as refused:
                    self._refused = {version: str(refused)}
                    self.last_error = self.problem = str(refused)  # short and public; the detail goes to the log
                    log.error("%s (%s); still serving %s", refused, refused.detail,
                              f"version {held.version}" if held else "nothing")
                    return False
                predictor = FastPredictor(fitted)
                loaded = Loaded(version, alias, fallback, predictor)
                self.current = loaded  # one reference assignment: readers see old or new, never half
                self.last_error = self.problem = None
            except Exception as exc:  # keep serving what we hold; the cause goes to the log, not to clients
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.problem = MODEL_UNAVAILABLE
                log.warning("model refresh failed: %s", self.last_error)
                return False
        log.info("now serving version %s (@%s%s)", version, alias, ", fallback" if fallback else "")
        if self._on_swap:
            self._on_swap(held, loaded)
        return True

    def version_header(self) -> str:
        """The version being served as the X-Model-Version header names it."""
        held = self.current
        if held is None:
            return "none"
        return f"{held.version} (fallback: production)" if held.fallback else held.version

    def wake(self) -> None:
        """Ask the watcher to check the registry now, refused versions included."""
        self._refused = {}
        self._wake.set()

    def start_watcher(self, signal: ReloadSignal | None = None) -> threading.Thread:
        """Re-read the alias every reload_interval, at once on `wake()`, and (with `signal`)
        at once when another worker of this server got a reload call; acknowledged there."""
        def loop() -> None:
            seen = signal.current() if signal is not None else ""
            asked = ""
            while not self._stopped.is_set():
                self.refresh()
                if asked:
                    signal.ack(asked, self.version_header())
                    asked = ""
                # A worker with nothing to serve looks again within a second.
                idle = self.settings.reload_interval if self.current is not None else min(1.0, self.settings.reload_interval)
                deadline = time.monotonic() + idle
                while (left := deadline - time.monotonic()) > 0:
                    if self._wake.wait(min(left, POLL_S) if signal is not None else left):
                        break
                    token = signal.current() if signal is not None else seen
                    if token != seen:
                        seen = asked = token
                        self._refused = {}
                        break
                self._wake.clear()

        thread = threading.Thread(target=loop, name="model-watcher", daemon=True)
        thread.start()
        return thread

    def stop_watcher(self) -> None:
        """End the watcher's loop (tests that start one)."""
        self._stopped.set()
        self._wake.set()


class PredictionIds:
    """Unguessable prediction ids (32 hex digits, like uuid4().hex) without a getrandom()
    call per request: random bytes from the OS are read 4 KiB at a time."""

    def __init__(self, batch: int = 4096):
        self._batch = batch
        self._lock = threading.Lock()
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked child must not repeat its parent's ids

    def _reset(self) -> None:
        self._buffer, self._at = b"", 0
        self._lock = threading.Lock()

    def new(self) -> str:
        with self._lock:
            if self._at + 16 > len(self._buffer):
                self._buffer, self._at = os.urandom(self._batch), 0
            start = self._at
            self._at = start + 16
        return self._buffer[start:start + 16].hex()


# One id source per process: every app a process builds draws from it.
new_prediction_id = PredictionIds().new


class Answer(NamedTuple):
    """What a predict request gets: the HTTP status, the JSON body, the model version its
    metrics are labelled with ("none" while no model is loaded), and extra response headers
    (Retry-After on a 503 for a full spool)."""

    status: int
    body: dict
    version: str
    headers: tuple[tuple[str, str], ...] = ()


class Predictions:
    """The prediction service of one server: validates a request body, prices the flat with
    the model held, records the answer in the store, and says what to answer."""

    def __init__(self, holder: ModelHolder, store: Store, vocabulary: frozenset[str],
                 new_id: Callable[[], str] = new_prediction_id, on_refused: Callable[[], None] = lambda: None):
        self.holder = holder
        self.store = store
        self.vocabulary = vocabulary  # the fleet's locations: both variants accept the same ones
        self.new_id = new_id
        self.on_refused = on_refused  # called for each prediction refused because the spool is full
        self.variant = holder.variant
        self._names: tuple[FastPredictor, dict[str, str]] | None = None  # (for this predictor, names by key)

    def answer(self, body: bytes | Mapping | None, user_id: str = "") -> Answer:
        """The answer to a predict request whose body is raw JSON bytes, form fields, or None
        (a body of another type); `user_id` is the X-User-Id header as sent.

        A prediction is answered only once it is recorded: a store failure is a 503."""
        started = time.perf_counter()
        held = self.holder.current
        try:
            req = api.parse(api.PredictRequest, body)
        except api.Refused as refused:
            return Answer(refused.status, refused.body(), held.version if held is not None else "none")
        if held is None:
            return Answer(503, api.error(no_model_yet(self.holder), None), "none")
        predictor = held.predictor
        names = self._names_for(predictor)
        name = names.get(api.location_key(req.location))
        location = None if name is None else predictor.model_location(name, self.vocabulary)
        if location is None:
            return Answer(422, api.unknown_location(req.location, names.values()).body(), held.version)
        t0 = time.perf_counter()
        price = predictor.predict_one(location, req.total_sqft, req.bhk, req.bath)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        prediction_id = self.new_id()
        estimate = round(price, 2)
        try:
            self.store.record_prediction({
                "id": prediction_id, "variant": self.variant, "model_version": held.version,
                "location": name, "total_sqft": req.total_sqft, "bhk": req.bhk, "bath": req.bath,
                "estimated_price": estimate, "latency_ms": latency_ms, "user_id": api.user_of(user_id),
            })
        except SpoolFull as full:  # the backlog is at its bounds or the disk is full: come back later
            log.warning("prediction refused: %s", full)
            self.on_refused()
            message = f"{full.cause}: the prediction could not be recorded, try again in {full.retry_after} s"
            return Answer(503, api.error(message, None), held.version, (("Retry-After", str(full.retry_after)),))
        except Exception as exc:  # an answer we could not store is not given: nothing is lost silently
            log.error("prediction not stored: %s", exc)
            message = "store unavailable: the prediction could not be recorded, try again"
            return Answer(503, api.error(message, None), held.version)
        return Answer(200, {
            "estimated_price": estimate, "prediction_id": prediction_id, "model_version": held.version,
            "unit": "lakh INR", "location": name, "total_sqft": req.total_sqft, "bhk": req.bhk, "bath": req.bath,
            "response_time_ms": round((time.perf_counter() - started) * 1000.0, 3),
        }, held.version)

    def _names_for(self, predictor: FastPredictor) -> dict[str, str]:
        """location_key → the location's own name, for every location `predictor` accepts."""
        cached = self._names
        if cached is None or cached[0] is not predictor:
            names = {api.location_key(n): n for n in sorted(self.vocabulary.union(predictor.locations))}
            cached = self._names = (predictor, names)
        return cached[1]


# Database faults that a later try may not meet: the client is told to retry (503), not that
# the server broke (500). A statement timeout is an OperationalError.
STORE_FAULTS = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


def store_fault(exc: BaseException) -> str:
    """The cause of a database fault in a few public words (the detail goes to the log)."""
    if isinstance(exc, sa.exc.TimeoutError):
        return "no database connection became free in time"
    orig = getattr(exc, "orig", None)
    if getattr(orig, "pgcode", None) == "57014":  # query_canceled: the statement timeout
        return "the database did not answer within the statement timeout"
    if "database is locked" in str(orig):
        return "the database stayed locked past the statement timeout"
    return "the database is unreachable"


class RequestCounts:
    """Counts answered requests into a server's metrics; each (version, endpoint, status)
    looks its label children up once, so counting stays cheap on the hot path."""

    def __init__(self, metrics: ServerMetrics, variant: str):
        self.metrics = metrics
        self.variant = variant
        self._children: dict[tuple[str, str, int], tuple] = {}

    def count(self, version: str, endpoint: str, status: int, seconds: float, routed_to: str = "") -> None:
        """One answered request; `routed_to` is the variant the router meant it for (its
        X-Router-Variant header): another variant's name means the router failed over here."""
        if routed_to != self.variant and routed_to in ARMS:  # anything else: not the router's
            self.metrics.failovers.labels(routed_to, self.variant, endpoint).inc()
        children = self._children.get((version, endpoint, status))
        if children is None:
            children = self._children[(version, endpoint, status)] = (
                self.metrics.requests.labels(self.variant, version, endpoint, str(status)),
                self.metrics.latency.labels(self.variant, endpoint),
            )
        children[0].inc()
        children[1].observe(seconds)
