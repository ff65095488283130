"""The Locust load shape of `abfleet load --shape step|spike` (abfleet.load_shapes says how
many users run when). `abfleet load` adds this file to the locustfile only for a shape other
than steady, and passes the shape as `--shape`; the peak users, the spawn rate and the run
time are Locust's own --users, --spawn-rate and --run-time."""

from __future__ import annotations

from locust import LoadTestShape, events

from abfleet.load_shapes import SHAPES, users_at


@events.init_command_line_parser.add_listener
def _shape_argument(parser) -> None:
    parser.add_argument("--shape", choices=SHAPES, default="steady", include_in_web_ui=False,
                        help="how the number of users changes over the run (abfleet.load_shapes)")


class FleetShape(LoadTestShape):
    use_common_options = True  # --users is the peak, --run-time the length, --spawn-rate the ramp

    def tick(self):
        options = self.runner.environment.parsed_options
        users = users_at(options.shape, self.get_run_time(), options.num_users, options.run_time)
        return None if users is None else (users, options.spawn_rate)
