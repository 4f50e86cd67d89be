"""Tier 1: the autoscaler's loop outlives a failed pass, and stops quietly."""

from __future__ import annotations

import logging
import threading

import pytest

from omni_operator.autoscaling.loop import Autoscaler

pytestmark = pytest.mark.pure


def test_a_failed_pass_is_logged_and_the_loop_goes_on_but_one_cut_short_by_the_stop_is_not(caplog):
    stop = threading.Event()
    calls = []

    def resources():
        calls.append(len(calls))
        if len(calls) == 2:
            stop.set()  # as at SIGTERM: the process shuts its thread pools while a pass runs
        raise RuntimeError("cannot schedule new futures after shutdown")

    autoscaler = Autoscaler(kube=None, enqueue=lambda *_: None, pods=lambda *_: [])
    with caplog.at_level(logging.ERROR, logger="omni_operator.autoscaling.loop"):
        autoscaler.run(stop, resources)
    assert calls == [0, 1]
    assert [r.getMessage() for r in caplog.records] == ["autoscaling pass failed"]  # the first pass only
