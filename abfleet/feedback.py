"""The feedback service of a server: a rating, quick verdict, actual price or comment on an
estimate it gave, checked and recorded (`Feedback.record`).

Feedback that meets a database fault waits in the server's feedback spool
(abfleet.feedback_spool) and is answered 202; `Feedback.resolve` later runs the checks of a
live request on each pending item and stores it.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import Callable, NamedTuple

from abfleet import api
from abfleet.feedback_spool import FeedbackSpool, FeedbackSpoolFull, PendingFeedback
from abfleet.serving import STORE_FAULTS, store_fault
from abfleet.settings import Settings
from abfleet.store import Duplicate, Store

log = logging.getLogger(__name__)


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


# How long a feedback request waits for a thread allowed to use the database (see Feedback).
FEEDBACK_QUEUE_S = 0.5


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
