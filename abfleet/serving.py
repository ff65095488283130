"""The model a server holds, and the prediction service that answers with it.

A server of variant V serves `models:/<name>@V`; the candidate server falls back to
`@production` while there is no candidate and says so. A watcher thread re-reads the
alias every `reload_interval` seconds (or at once on `refresh()`) and swaps the model in
memory: requests in flight keep the object they already took, so none fails. A version
whose artifact is refused (`registry.ArtifactRefused`: not skops, checksum mismatch) is
never swapped in: the server keeps what it holds and says why in `problem` (public) and
`last_error` (the log's detail).

`Predictions.answer` is the one place a predict request is validated, scored and recorded:
the server's lean WSGI path and its Flask view both call it with the raw body.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, NamedTuple

import sqlalchemy as sa

from abfleet import api, registry
from abfleet.decision import ARMS
from abfleet.feedback_spool import FeedbackSpool, FeedbackSpoolFull, PendingFeedback
from abfleet.metrics import ServerMetrics
from abfleet.model import FastPredictor
from abfleet.reload_signal import POLL_S, ReloadSignal
from abfleet.settings import Settings
from abfleet.spool import SpoolFull
from abfleet.store import Duplicate, Store

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


class Recorded(NamedTuple):
    """What a feedback request gets: the HTTP status, the JSON body, and the stored feedback
    row (None when refused), which the caller counts into its metrics. A request the server
    could not handle because of a fault names it in `failure` (a feedback_failures reason)
    and says in `retry_after` (seconds) when to try again."""

    status: int
    body: dict
    row: dict | None
    failure: str | None = None
    retry_after: int | None = None


# Database faults that a later try may not meet: the client is told to retry (503), not that
# the server broke (500). A statement timeout is an OperationalError.
STORE_FAULTS = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)
# How long a feedback request waits for a thread allowed to use the database (see Feedback).
FEEDBACK_QUEUE_S = 0.5


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


class Feedback:
    """The feedback service of one server: a rating, quick verdict or actual price is
    accepted only from the user who got the estimate, within the feedback window, and (an
    actual price) within the price bounds; `record` says what to answer.

    A prediction stored without a user id (a client that called a server directly, without
    X-User-Id) can be rated only by a request without one: through the router every request
    has a user id, so nobody there can rate an anonymous estimate.

    With a `spool` (abfleet.feedback_spool), feedback that meets a database fault is kept
    there and answered 202 (pending); `resolve` later runs the same checks on it and stores it.
    `on_store_error` is called for each such fault, `on_stored` with each row stored from the
    spool (the caller counts them into its metrics, as it does for the 201 answers)."""

    def __init__(self, store: Store, settings: Settings, spool: FeedbackSpool | None = None, *,
                 on_store_error: Callable[[], None] = lambda: None, on_stored: Callable[[dict], None] = lambda row: None):
        self.store = store
        self.received_by = settings.variant
        self.spool = spool
        self.on_store_error = on_store_error
        self.on_stored = on_stored
        self.pending_max_age = dt.timedelta(seconds=settings.feedback_pending_max_age_s)
        self.settle_s = settings.feedback_settle_s
        self.settle_poll_s = min(0.25, max(0.02, settings.spool_linger / 4))
        self.retry_after = max(1, math.ceil(settings.db_check_interval_s))
        # A database that hangs (no answer, not even an error) must leave a worker threads for
        # predictions: all but one may wait on it for feedback; another feedback request waits a
        # moment for one of them to finish, then gets a 503.
        self._waiting = threading.BoundedSemaphore(max(1, settings.threads - 1))
        self.window = dt.timedelta(days=settings.feedback_window_days)
        self.bounds = api.PriceBounds(settings.actual_price_min_lakhs, settings.actual_price_max_lakhs,
                                      settings.actual_price_max_ratio)

    def record(self, body: bytes | Mapping | None, user_id: str = "") -> Recorded:
        """The answer to a feedback request whose body is raw JSON bytes, form fields or None;
        `user_id` is the X-User-Id header as sent.

        Checked in this order: the body (400/422), the prediction id (404), its user (403),
        the window (410), the actual price against the estimate (422), one of a kind (409).
        A database fault (unreachable, timed out, locked) spools the request and answers 202
        (pending); a key pending already is a 409. Without a spool, or with the spool full, a
        fault is a 503 naming it."""
        try:
            req = api.parse(api.FeedbackRequest, body)
            if req.feedback_type == "actual_price":
                self.bounds.check(req.feedback_value)
        except api.Refused as refused:
            return Recorded(refused.status, refused.body(), None)
        user = api.user_of(user_id)
        if self.spool is not None and self.spool.holds(req.prediction_id, req.feedback_type):
            return self._already_pending(req)
        if not self._waiting.acquire(timeout=FEEDBACK_QUEUE_S):
            return self._unavailable(req, user, "every thread allowed to wait for the database is waiting")
        try:
            return self._record(req, user)
        except STORE_FAULTS as exc:
            log.error("feedback not recorded: %s", exc)
            return self._unavailable(req, user, store_fault(exc))
        finally:
            self._waiting.release()

    def _unavailable(self, req: api.FeedbackRequest, user: str | None, cause: str) -> Recorded:
        """The answer to feedback the database could not take now: spooled (202), or a 503."""
        if self.spool is not None:
            item = PendingFeedback.now(req.prediction_id, req.feedback_type, req.feedback_value, user, self.received_by,
                                       req.feedback_text)
            try:
                added = self.spool.add(item)
            except (FeedbackSpoolFull, OSError) as exc:
                log.error("feedback not spooled: %s", exc)
                message = f"store unavailable: {cause}, and {exc}; the feedback was not recorded, try again later"
                return Recorded(503, api.error(message, None), None, failure="spool", retry_after=self.retry_after)
            if not added:
                return self._already_pending(req)
            self.on_store_error()
            return Recorded(202, {"status": "pending", "prediction_id": req.prediction_id,
                                  "feedback_type": req.feedback_type}, None)
        message = f"store unavailable: {cause}; the feedback was not recorded, try again later"
        return Recorded(503, api.error(message, None), None, failure="store", retry_after=self.retry_after)

    @staticmethod
    def _already_pending(req: api.FeedbackRequest) -> Recorded:
        message = f"feedback_type: {req.feedback_type} for prediction {req.prediction_id} was received already and waits to be recorded"
        return Recorded(409, api.error(message, "feedback_type"), None)

    def resolve(self, item: PendingFeedback) -> str | None:
        """Record one pending item with the checks of a live request; return its outcome
        (abfleet.feedback_spool.OUTCOMES), or None to keep it (its prediction is not known yet,
        and it is younger than `pending_max_age`). A database fault raises (it stays pending)."""
        received = item.received
        try:
            req = api.FeedbackRequest(prediction_id=item.prediction_id, feedback_type=item.feedback_type,
                                      feedback_value=item.feedback_value, feedback_text=item.feedback_text)
        except ValueError as exc:  # pydantic's ValidationError: never spooled so, but never retried either
            log.warning("pending feedback on %s dropped (refused): %s", item.prediction_id, exc)
            return "refused"
        answer = self._record(req, item.user_id, received_at=received, received_by=item.received_by)
        if answer.status == 201:
            self.on_stored(answer.row)
            return "stored"
        if answer.status == 404 and dt.datetime.now(dt.timezone.utc) - received < self.pending_max_age:
            return None
        outcome = {404: "expired", 409: "duplicate"}.get(answer.status, "refused")
        log.warning("pending feedback %s on %s dropped (%s): %s", item.feedback_type, item.prediction_id, outcome,
                    answer.body.get("error"))
        return outcome

    def _record(self, req: api.FeedbackRequest, user: str | None, received_at: dt.datetime | None = None,
                received_by: str | None = None) -> Recorded:
        """The checks and the INSERT; `received_at` and `received_by` of feedback that waited
        in the spool (the window is judged at the time it came in)."""
        pid = req.prediction_id
        pred = self.store.get_prediction(pid)
        if pred is None:
            # Another replica may have answered it moments ago, its row still in that replica's
            # spool (inserted within spool_linger): look again for a while before the 404.
            deadline = time.monotonic() + self.settle_s
            while pred is None and time.monotonic() < deadline:
                time.sleep(self.settle_poll_s)
                pred = self.store.get_prediction(pid)
        if pred is None:
            return Recorded(404, api.error(f"prediction_id: no prediction {pid!r}", "prediction_id"), None)
        if pred["user_id"] != user:
            return Recorded(403, api.error("prediction_id: this estimate was given to another user; only they can rate it",
                                           "prediction_id"), None)
        made = pred["created_at"]
        made = made.replace(tzinfo=dt.timezone.utc) if made.tzinfo is None else made  # SQLite hands back naive UTC
        if (received_at or dt.datetime.now(dt.timezone.utc)) - made > self.window:
            days = f"{self.window.total_seconds() / 86400:g}"
            return Recorded(410, api.error(f"prediction_id: feedback on estimate {pid} closed {days} days after it was given",
                                           "prediction_id"), None)
        try:
            row = self.store.record_feedback(pid, req.feedback_type, req.feedback_value, received_by or self.received_by,
                                             user_id=user, bounds=self.bounds, prediction=pred, received_at=received_at,
                                             text=req.feedback_text)
        except api.Refused as refused:
            return Recorded(refused.status, refused.body(), None)
        except Duplicate as exc:
            return Recorded(409, api.error(f"feedback_type: {exc}", "feedback_type"), None)
        return Recorded(201, {"status": "recorded", "prediction_id": pid, "feedback_type": req.feedback_type,
                              "variant": row["variant"], "model_version": row["model_version"], "ape": row["ape"]}, row)


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
