"""Tier 1: the autoscaling decision function, on single decisions and replayed traces."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.autoscale_sim import (HpaStylePolicy, Model, OurPolicy, Trace, budget_exhausted, burst, direction_changes,
                                 over_provisioned, pool_exhausted, ramp, reach_after, sawtooth_noise, simulate, spikes,
                                 step, stuck_pending, zero_and_back)
from omni_operator.autoscaling.load_flow import Flow, FlowHistory
from omni_operator.autoscaling.policy import (History, PodLoad, Policy, RoleState, decide, from_flow,
                                              parse_gateway_waiting, parse_pod_metrics)

pytestmark = pytest.mark.pure

POLICY = Policy(target_per_replica=4, min_replicas=1, max_replicas=10, scale_up_window=15, scale_down_window=300,
                max_step=2)
MODEL = Model()


def loads(n: int, waiting: float, running: float = 0.0) -> list[PodLoad]:
    return [PodLoad(f"p{i}", waiting, running) for i in range(n)]


def test_load_over_target_scales_up_only_after_the_window():
    history = History()
    state = RoleState(current=2, ready=2)
    first = decide(0, loads(2, 6, 4), state, POLICY, history)  # 20 in system -> 5 replicas wanted
    assert first.desired == 2 and first.recommendation == 5
    decide(5, loads(2, 6, 4), state, POLICY, history)
    decide(10, loads(2, 6, 4), state, POLICY, history)
    later = decide(15, loads(2, 6, 4), state, POLICY, history)
    assert later.desired == 4, later.reason  # 5 wanted, at most 2 per step
    assert "stepping by at most 2" in later.reason


def test_a_single_spike_does_not_scale_up():
    history = History()
    state = RoleState(current=2, ready=2)
    for t, depth in [(0, 1), (5, 30), (10, 1), (15, 1)]:
        decision = decide(t, loads(2, depth), state, POLICY, history)
        assert decision.desired == 2


def test_loading_replicas_are_not_capacity_and_are_not_asked_for_twice():
    history = History()
    # 2 ready pods with 4 in system each: 8 -> 2 replicas are enough, although 2 more are still loading.
    for t in (0, 5, 10, 15):
        calm = decide(t, loads(2, 2, 2), RoleState(current=4, ready=2), POLICY, history)
    assert calm.desired == 4 and calm.recommendation == 2
    history = History()
    # 24 in system on 2 ready pods -> 6 replicas wanted in all; 4 exist (2 loading): ask for 2 more, not 4.
    for t in (0, 5, 10, 15):
        busy = decide(t, loads(2, 8, 4), RoleState(current=4, ready=2), POLICY, history)
    assert busy.desired == 6 and "2 more loading" in busy.reason


def test_unschedulable_pods_report_an_exhausted_pool():
    history = History()
    for t in (0, 5, 10, 15):
        decision = decide(t, loads(3, 20), RoleState(current=4, ready=3, unschedulable=1), POLICY, history)
    assert decision.desired == 4 and "GPU pool exhausted" in decision.reason
    assert decision.blocked == "GPUPoolExhausted"


def test_gpu_budget_is_shared_with_the_other_role():
    history = History()
    state = RoleState(current=2, ready=2, gpus_per_replica=2, other_roles_gpus=3, gpu_budget=9)
    for t in (0, 5, 10, 15):
        decision = decide(t, loads(2, 40), state, POLICY, history)
    assert decision.desired == 3  # (9 - 3) // 2
    assert "GPU budget 9 allows 3" in decision.reason and decision.blocked == "GPUBudgetExhausted"
    calm = decide(20, loads(2, 1), RoleState(current=2, ready=2, gpus_per_replica=2, other_roles_gpus=3,
                                             gpu_budget=9), POLICY, History())
    assert calm.blocked is None


def test_scale_down_waits_for_the_whole_window():
    history = History()
    state = RoleState(current=6, ready=6)
    decide(0, loads(6, 4, 4), state, POLICY, history)  # needs 12 -> hold at 6 (max 10, but busy)
    for t in range(5, 300, 5):
        assert decide(t, loads(6, 0, 1), state, POLICY, history).desired >= 6
    assert decide(305, loads(6, 0, 1), state, POLICY, history).desired == 4


def test_zero_only_when_configured_and_back_when_the_gateway_waits():
    idle = loads(1, 0, 0)
    no_zero = Policy(target_per_replica=4, min_replicas=0, max_replicas=4, scale_down_window=10)
    zero = Policy(target_per_replica=4, min_replicas=0, max_replicas=4, scale_down_window=10, scale_to_zero=True)
    h1, h2 = History(), History()
    for t in range(0, 30, 5):
        keep = decide(t, idle, RoleState(current=1, ready=1), no_zero, h1)
        down = decide(t, idle, RoleState(current=1, ready=1), zero, h2)
    assert keep.desired == 1 and down.desired == 0
    assert decide(40, [], RoleState(current=0, ready=0), zero, h2).desired == 0
    back = decide(45, [], RoleState(current=0, ready=0, gateway_waiting=2), zero, h2)
    assert back.desired == 1 and "scaling from zero" in back.reason


@settings(max_examples=400, deadline=None)
@given(current=st.integers(0, 12), ready=st.integers(0, 12), depth=st.floats(0, 200), running=st.floats(0, 50),
       lo=st.integers(0, 4), span=st.integers(0, 8), step_=st.integers(1, 4), zero=st.booleans(),
       budget=st.one_of(st.none(), st.integers(0, 40)), waiting=st.floats(0, 5))
def test_every_decision_respects_bounds_and_step(current, ready, depth, running, lo, span, step_, zero, budget,
                                                 waiting):
    ready = min(ready, current)
    policy = Policy(target_per_replica=4, min_replicas=lo, max_replicas=lo + span, max_step=step_,
                    scale_to_zero=zero, scale_up_window=0, scale_down_window=0)
    state = RoleState(current=current, ready=ready, gpus_per_replica=2, gpu_budget=budget, gateway_waiting=waiting)
    d = decide(0, loads(ready, depth, running), state, policy, History())
    assert abs(d.desired - current) <= step_
    ceiling = lo + span if budget is None else min(lo + span, budget // 2)
    floor = min(lo if zero else max(lo, 1), ceiling)
    if floor <= current <= ceiling:
        assert floor <= d.desired <= ceiling
    unschedulable = current - ready
    if unschedulable and d.desired > current and current >= floor:
        state = RoleState(current=current, ready=ready, unschedulable=unschedulable, gpus_per_replica=2,
                          gpu_budget=budget, gateway_waiting=waiting)
        assert decide(0, loads(ready, depth, running), state, policy, History()).desired <= current


# ----------------------------------------------------------------------------- traces


def test_step_trace_reaches_the_needed_replicas_quickly():
    run = simulate(step(), MODEL, OurPolicy(POLICY))
    seconds, decisions = reach_after(run, 300)
    # 1 -> 8 replicas with at most 2 per decision is 4 decisions, one per poll once the window agrees.
    assert seconds is not None and seconds <= 60 and decisions <= 4
    assert max(run.replicas) <= POLICY.max_replicas


def test_ramp_and_burst_never_exceed_max_and_recover():
    for trace in (ramp(), burst()):
        run = simulate(trace, MODEL, OurPolicy(POLICY))
        assert max(run.replicas) <= POLICY.max_replicas and min(run.replicas) >= 1
        assert run.waiting[-1] < 50


def test_noise_does_not_flap_and_beats_the_hpa_style_baseline_on_flaps():
    ours = simulate(sawtooth_noise(), MODEL, OurPolicy(POLICY))
    baseline = simulate(sawtooth_noise(), MODEL, HpaStylePolicy(POLICY))
    assert direction_changes(ours.replicas) <= 2
    assert direction_changes(ours.replicas) <= direction_changes(baseline.replicas)


def test_stuck_pending_pods_stop_further_scale_up():
    trace = pool_exhausted()
    run = simulate(trace, MODEL, OurPolicy(POLICY))
    baseline = simulate(trace, MODEL, HpaStylePolicy(POLICY))
    assert max(run.replicas) <= trace.capacity + POLICY.max_step
    assert stuck_pending(run, trace) < stuck_pending(baseline, trace)


def test_budget_is_never_exceeded():
    run = simulate(budget_exhausted(), MODEL, OurPolicy(POLICY))
    assert max(run.replicas) * 2 <= 4


def test_scale_to_zero_and_back():
    policy = Policy(target_per_replica=4, min_replicas=0, max_replicas=4, scale_down_window=120,
                    scale_to_zero=True)
    run = simulate(zero_and_back(), MODEL, OurPolicy(policy))
    assert 0 in run.replicas[:1200]
    assert run.replicas[-1] >= 1
    assert direction_changes(run.replicas) <= 2
    assert over_provisioned(run) < over_provisioned(simulate(zero_and_back(), MODEL, HpaStylePolicy(policy)))


def test_metrics_pages_are_parsed():
    page = ('# HELP omni_queue_depth Requests waiting\n# TYPE omni_queue_depth gauge\n'
            'omni_queue_depth{role="talker"} 3.0\n'
            '# TYPE omni_requests_running gauge\nomni_requests_running{role="talker"} 2.0\n'
            '# TYPE omni_gateway_waiting_requests gauge\nomni_gateway_waiting_requests{role="thinker"} 4.0\n')
    assert parse_pod_metrics("p", page, "talker") == PodLoad("p", 3.0, 2.0)
    assert parse_pod_metrics("p", page, "thinker") is None
    assert parse_gateway_waiting(page) == {"thinker": 4.0}


# ----------------------------------------------------------------------------- the flow behind the queue


def test_flow_estimates_rate_and_service_time_from_the_pods_counters():
    """A steady 2 req/s of 8 s requests: the estimate finds both from waiting/running gauges and
    the completion counters alone."""
    policy_run = OurPolicy(POLICY)
    simulate(Trace("flat", lambda t: 2.0, 900), MODEL, policy_run)
    flow = policy_run.history.flow
    assert abs(flow.service_seconds - MODEL.service_seconds) < 0.1 * MODEL.service_seconds
    recent = [rate for t, rate in flow.rates if t >= 600]
    assert recent and all(abs(rate - 2.0) < 0.4 for rate in recent)


def test_a_restarted_pod_or_missing_counters_do_not_invent_arrivals():
    history = FlowHistory(rate_window=10, sustain_window=10)
    for t in range(0, 60, 5):  # 1 req/s finished by one pod, 4 running throughout
        assert history.observe(float(t), [("a", 0.0, 4.0, float(t))], 0.0) is None or t >= 10
    flow = history.observe(60.0, [("a", 0.0, 4.0, 0.0)], 0.0)  # the pod restarted: its counter is back to 0
    assert flow is not None and flow.arrival_rate <= 1.0
    assert history.observe(65.0, [("a", 0.0, 4.0, None)], 0.0) is None, "without counters: the queue rule"


def test_a_backlog_that_the_replicas_starting_will_clear_asks_for_nothing_more():
    flow = Flow(arrival_rate=0.5, sustained_rate=0.5, trend=0.0, service_seconds=8.0, concurrency=8.0, backlog=45)
    # one replica runs 8 at a time, 1 req/s: the 45 waiting clear in 90 s at 0.5 req/s coming in
    assert from_flow(flow, current=1, policy=POLICY).up == 1
    # the same backlog with arrivals at 1.2 req/s never clears on one replica: add what clears it in time
    busy = Flow(arrival_rate=1.2, sustained_rate=1.2, trend=0.0, service_seconds=8.0, concurrency=8.0, backlog=45)
    need = from_flow(busy, current=1, policy=POLICY)
    assert need.up == math.ceil((1.2 + 45 / POLICY.drain_seconds) * 8 / 4) and "clear within" in need.why
    # counted with replicas already starting, it clears: nothing more
    assert from_flow(busy, current=need.up, policy=POLICY).up == math.ceil(1.2 * 8 / 4)


def test_a_rising_rate_is_projected_over_a_replicas_startup():
    flat = Flow(arrival_rate=2.0, sustained_rate=2.0, trend=0.0, service_seconds=8.0, concurrency=8.0, backlog=0)
    rising = Flow(arrival_rate=2.0, sustained_rate=2.0, trend=0.01, service_seconds=8.0, concurrency=8.0, backlog=0)
    assert from_flow(flat, 4, POLICY).up == 4
    assert from_flow(rising, 4, POLICY).up == math.ceil((2.0 + 0.01 * POLICY.startup_seconds) * 8 / 4)


def test_zero_and_back_does_not_ask_for_the_maximum_for_the_cold_start_backlog():
    policy = Policy(target_per_replica=4, min_replicas=0, max_replicas=10, scale_down_window=120, scale_to_zero=True)
    run = simulate(zero_and_back(), MODEL, OurPolicy(policy))
    assert max(run.replicas[1200:]) <= 3, "0.5 req/s needs 1 replica; the held backlog clears on it"


def test_spikes_of_a_few_seconds_do_not_start_replicas_that_arrive_too_late():
    ours = simulate(spikes(), MODEL, OurPolicy(POLICY))
    hpa = simulate(spikes(), MODEL, HpaStylePolicy(POLICY))
    assert max(ours.replicas) < max(hpa.replicas)
    assert over_provisioned(ours) < 0.5 * over_provisioned(hpa)


def test_the_benchmark_meets_its_goal_on_every_trace_sum():
    from bench.autoscale_bench import replay, totals

    ours, best, _ = totals(replay(Model()))
    assert ours["over"] <= 0.7 * best["over"]
    assert ours["under"] <= 1.0 * best["under"]
    assert ours["over_budget"] == 0 and ours["flaps"] <= best["flaps"]


def test_startup_time_is_read_from_the_pods():
    from omni_operator.autoscaling.loop import startup_seconds

    def pod(created, ready):
        return {"metadata": {"creationTimestamp": created},
                "status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": ready}]}}

    pods = [pod("2026-01-01T00:00:00Z", "2026-01-01T00:02:00Z"), pod("2026-01-01T00:00:00Z", "2026-01-01T00:01:30Z"),
            pod("2026-01-01T00:00:00Z", "2026-01-01T00:01:40Z")]
    assert startup_seconds(pods) == 100
    assert startup_seconds([{"metadata": {}, "status": {}}]) is None


def test_completion_counters_are_parsed():
    page = ('omni_queue_depth{role="thinker"} 1.0\nomni_requests_running{role="thinker"} 2.0\n'
            '# TYPE omni_requests_finished counter\nomni_requests_finished_total{role="thinker"} 42.0\n')
    assert parse_pod_metrics("p", page, "thinker") == PodLoad("p", 1.0, 2.0, 42.0)
