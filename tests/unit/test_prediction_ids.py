"""Prediction ids are unique hex, and a forked worker never repeats its parent's."""

from __future__ import annotations

import os

from abfleet.serving import new_prediction_id


def test_prediction_ids_are_unique_hex_and_not_shared_with_a_forked_child():
    ids = [new_prediction_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids) and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, new_prediction_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert child and child != new_prediction_id()
