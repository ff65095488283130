"""The predict route's common case, without Flask's request machinery.

Flask's dispatch costs more than the model itself (see the README's serving-speed table), so a
POST to the predict path whose body is `application/json` of a known length is answered here:
by the same `Predictions.answer` the Flask view calls, with the same status, headers, JSON bytes,
stored row and metrics. Every other request (form posts, other content types, chunked or
oversized bodies) goes on to the Flask app unchanged.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable

from werkzeug.http import HTTP_STATUS_CODES

from abfleet import api
from abfleet.serving import Answer, Predictions, RequestCounts
from inference.backend.views import internal_error

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


def status_line(code: int) -> str:
    """The status line werkzeug writes for `code` ("422 UNPROCESSABLE ENTITY")."""
    return f"{code} {HTTP_STATUS_CODES.get(code, 'UNKNOWN').upper()}"


class FastPredict:
    """WSGI middleware in front of the Flask app: answers plain JSON predict requests itself."""

    def __init__(self, app: WSGIApp, predictions: Predictions, counts: RequestCounts, max_body: int):
        self.app = app
        self.predictions = predictions
        self.counts = counts
        self.max_body = max_body
        self.variant = predictions.variant
        self._status_lines = {code: status_line(code) for code in (200, 400, 422, 500, 503)}

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if (environ.get("PATH_INFO") != api.PREDICT or environ.get("REQUEST_METHOD") != "POST"
                or environ.get("CONTENT_TYPE") != "application/json"):
            return self.app(environ, start_response)
        started = time.perf_counter()
        announced = environ.get("CONTENT_LENGTH", "")
        if not announced.isdigit() or int(announced) > self.max_body:
            return self.app(environ, start_response)  # Flask refuses it (413) or reads it chunked
        length = int(announced)
        try:
            raw = environ["wsgi.input"].read(length)
        except Exception:  # a broken stream: Flask's own error handling answers
            return self.app(environ, start_response)
        if len(raw) != length:  # the client sent less than it announced: Flask says so
            environ["wsgi.input"] = io.BytesIO(raw)
            return self.app(environ, start_response)
        try:
            answer = self.predictions.answer(raw, environ.get("HTTP_X_USER_ID", ""))
            body = json.dumps(answer.body, separators=(",", ":")).encode() + b"\n"
        except Exception as exc:  # the same JSON 500 as the Flask app's, never a traceback
            held = self.predictions.holder.current
            answer = Answer(500, internal_error(exc), held.version if held is not None else "none")
            body = json.dumps(answer.body, separators=(",", ":")).encode() + b"\n"
        status = self._status_lines.get(answer.status) or status_line(answer.status)
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                   ("X-Variant", self.variant), ("X-Model-Version", self.predictions.holder.version_header()),
                   *answer.headers]
        self.counts.count(answer.version, api.PREDICT, answer.status, time.perf_counter() - started,
                          environ.get("HTTP_X_ROUTER_VARIANT", ""))
        start_response(status, headers)
        return [body]
