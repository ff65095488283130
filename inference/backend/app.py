"""The model server: a Flask app factory. gunicorn runs `create_app()` in each worker."""

from __future__ import annotations

import gc

from flask import Flask

from abfleet.saturation import count_in_flight
from abfleet.serving import ModelHolder
from abfleet.settings import Settings
from abfleet.store import Store
from inference.backend import views
from inference.backend.fast_path import FastPredict
from inference.backend.parts import init_app


def create_app(settings: Settings | None = None, holder: ModelHolder | None = None, store: Store | None = None) -> Flask:
    """Build a model server. Defaults come from the environment; tests pass their own parts."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    parts = init_app(app, settings, holder, store)
    app.register_blueprint(views.bp)
    app.wsgi_app = FastPredict(app.wsgi_app, parts["predictions"], parts["counts"], settings.max_body_bytes)
    app.wsgi_app = count_in_flight(app.wsgi_app, parts["metrics"].in_flight)  # every request, the fast path's too
    if holder is None:
        # A real server: everything loaded so far (libraries, the model) lives as long as the
        # process. Out of the cyclic collector's sight, a full collection no longer walks it
        # in the middle of a request (tens of milliseconds at the latency tail).
        gc.freeze()
    return app
