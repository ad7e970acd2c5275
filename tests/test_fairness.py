"""The sharing policy alone (core/fairness.py, core/estimate.py, the scheduler's admission and
preemption), with scripted sequences and fake step times: no model, no torch."""

from __future__ import annotations

import pytest
from gpt2_service.core.estimate import FirstTokenEstimator, Load, load_of, shortfall
from gpt2_service.core.request import GenerationRequest, Priority, StoppingCriteria
from gpt2_service.core.scheduler import SampledToken, Scheduler, SchedulerConfig, StepPlan, StepResult
from gpt2_service.core.sequence import Sequence

from tests.test_scheduler import FakeRunner, config, seq


def sq(
    tenant: str = "", priority: Priority = Priority.DEFAULT, call_id: str = "", prompt_len: int = 4, max_new: int = 50
) -> Sequence:
    return seq(list(range(1, prompt_len + 1)), max_new=max_new, tenant=tenant, priority=priority, call_id=call_id)


def step(sched: Scheduler, runner: FakeRunner) -> tuple[StepPlan, StepResult]:
    plan, early = sched.schedule()
    if not plan.is_empty:
        sched.update_from_output(plan, runner.execute(plan))
    return plan, early


class Endless(FakeRunner):
    """Samples token 7 for everyone, forever."""

    def __init__(self) -> None:
        super().__init__({})

    def execute(self, plan: StepPlan) -> dict[int, SampledToken]:
        self.plans.append(plan)
        due = [c.seq for c in plan.prefill if c.samples] + [s for s in plan.decode if s.seq_id not in plan.replay]
        return {s.seq_id: SampledToken(7, -1.0) for s in due}


def test_higher_classes_are_admitted_first_then_tenants_in_turn() -> None:
    sched = Scheduler(config(max_batch_size=3, num_slots=3, max_prefill_tokens=64), lambda i: "x")
    flood = [sq("a") for _ in range(5)]
    for s in flood:
        sched.add(s)
    b = sq("b")
    urgent = sq("c", Priority.INTERACTIVE)
    late = sq("d", Priority.BATCH)
    for s in (b, late, urgent):
        sched.add(s)
    step(sched, Endless())
    admitted = {s.seq_id for s in sched.running}
    # the interactive one, then tenants a and b in turn (a's oldest first); never the BATCH one
    assert admitted == {urgent.seq_id, flood[0].seq_id, b.seq_id}
    assert late.slot is None


def test_a_higher_class_preempts_the_newest_of_the_lowest_class() -> None:
    sched = Scheduler(config(max_batch_size=2, num_slots=2), lambda i: "x")
    runner = Endless()
    low = [sq("a", Priority.BATCH), sq("a", Priority.BATCH)]
    for s in low:
        sched.add(s)
        step(sched, runner)
    urgent = sq("b", Priority.INTERACTIVE)
    sched.add(urgent)
    _, early = step(sched, runner)
    assert [(s.seq_id, why) for s, why in early.preempted] == [(low[1].seq_id, "priority")]
    assert low[1].num_computed == 0 and low[1].slot is None and low[1].num_preemptions == 1
    assert urgent in sched.running and low[0] in sched.running


def test_an_under_served_tenant_preempts_the_richest_only_while_it_is_two_ahead() -> None:
    sched = Scheduler(config(max_batch_size=4, num_slots=4), lambda i: "x")
    runner = Endless()
    for _ in range(6):
        sched.add(sq("a"))
    step(sched, runner)
    assert len(sched.running) == 4
    sched.add(sq("b"))
    sched.add(sq("b"))
    sched.add(sq("b"))
    for _ in range(4):
        step(sched, runner)
    held = sorted(s.tenant for s in sched.running)
    assert held == ["a", "a", "b", "b"]  # 2-2: no more preemption, none back and forth


def test_one_call_is_capped_while_another_call_waits_and_not_when_alone() -> None:
    sched = Scheduler(config(max_batch_size=4, num_slots=4, call_cap=2), lambda i: "x")
    runner = Endless()
    big = [sq(call_id="big") for _ in range(6)]
    for s in big:
        sched.add(s)
    step(sched, runner)
    assert len(sched.running) == 4  # alone: it fills the batch
    small = sq(call_id="small")
    sched.add(small)
    _, early = step(sched, runner)
    assert [why for _, why in early.preempted] == ["call_share"]
    assert small in sched.running
    assert sum(s.call_id == "big" for s in sched.running) == 3


def test_paused_sequences_take_no_steps_and_give_their_place_first() -> None:
    sched = Scheduler(config(max_batch_size=2, num_slots=2), lambda i: "x")
    runner = Endless()
    a, b = sq("a"), sq("a")
    sched.add(a)
    sched.add(b)
    step(sched, runner)
    sched.pause(a.seq_id)
    plan, _ = step(sched, runner)
    assert a not in plan.decode and b in plan.decode
    assert sched.has_work
    sched.pause(b.seq_id)
    assert not sched.has_work  # paused alone: the engine thread sleeps
    newcomer = sq("z", Priority.BATCH)  # even a lower class takes a paused sequence's place
    sched.add(newcomer)
    _, early = step(sched, runner)
    assert [why for _, why in early.preempted] == ["paused"]
    assert newcomer in sched.running
    sched.resume(a.seq_id)
    sched.resume(b.seq_id)
    assert sched.has_work


def test_preemption_can_be_turned_off() -> None:
    sched = Scheduler(config(max_batch_size=1, num_slots=1, preemption=False), lambda i: "x")
    runner = Endless()
    sched.add(sq("a", Priority.BATCH))
    step(sched, runner)
    sched.add(sq("b", Priority.INTERACTIVE))
    _, early = step(sched, runner)
    assert not early.preempted


def test_a_preempted_sequence_replays_its_output_as_decodes_without_sampling() -> None:
    cfg = config(max_batch_size=1, num_slots=1, max_prefill_tokens=8)
    sched = Scheduler(SchedulerConfig(**{**cfg.__dict__, "fixed_prefill_chunks": True}), lambda i: "x")
    runner = Endless()
    victim = sq("a", Priority.BATCH, prompt_len=10)
    sched.add(victim)
    for _ in range(5):
        step(sched, runner)  # prompt in chunks 8 + 2, then 3 decodes: 4 tokens generated
    assert victim.num_output == 4
    sched.add(sq("b", Priority.INTERACTIVE, max_new=1))
    step(sched, runner)  # the interactive one takes the place, and finishes in its prefill step
    assert victim.num_computed == 0 and victim.slot is None
    plans = []  # from the victim's readmission on
    while victim.num_output == 4:
        plan, _ = step(sched, runner)
        plans.append(plan)
    prefill = [(c.start, c.num_tokens, c.samples) for p in plans for c in p.prefill]
    assert prefill == [(0, 8, False), (8, 2, False)]  # the prompt, in the same chunks as before
    replays = [p for p in plans if victim.seq_id in p.replay]
    assert len(replays) == 3  # outputs 1-3 recomputed, not sampled; output 4's decode samples output 5
    assert victim.num_output == 5


def test_the_queue_leaves_count_only_first_admissions() -> None:
    sched = Scheduler(config(max_batch_size=1, num_slots=1), lambda i: "x")
    runner = Endless()
    low = sq("a", Priority.BATCH)
    sched.add(low)
    _, early = step(sched, runner)
    assert early.left_queue == [low]
    high = sq("b", Priority.INTERACTIVE)
    sched.add(high)
    _, early = step(sched, runner)
    assert early.left_queue == [high]  # the preempted one waits again, uncounted
    sched.abort(low.seq_id)
    _, early = step(sched, runner)
    assert early.left_queue == []


# -- deadline-aware admission ------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def timed(estimator: FirstTokenEstimator, clock: FakeClock, seconds: float, prefilled: bool) -> None:
    """One engine step that the fake clock says took ``seconds``."""
    start = clock()
    clock.now += seconds
    estimator.observe(clock() - start, prefilled)


def test_the_estimate_is_unknown_until_a_step_was_timed() -> None:
    estimator = FirstTokenEstimator(max_batch_size=4, max_prefill_tokens=256, preemption=True)
    assert estimator.first_token_in(Priority.DEFAULT, 100) is None
    assert shortfall(estimator, GenerationRequest(request_id="r"), 100, seconds_left=0.0) is None  # refuses nothing


def test_a_free_place_costs_the_prefill_steps_and_one_decode_step() -> None:
    clock = FakeClock()
    estimator = FirstTokenEstimator(max_batch_size=4, max_prefill_tokens=100, preemption=True)
    for _ in range(10):
        timed(estimator, clock, 0.02, prefilled=False)
        timed(estimator, clock, 0.05, prefilled=True)
    estimator.publish(Load(num_running=1, remaining=(30,), running_by_class=(0, 1, 0)))
    # 250 prompt tokens: 3 prefill steps, then one step
    assert estimator.first_token_in(Priority.DEFAULT, 250) == pytest.approx(3 * 0.05 + 0.02)
    deadline = clock() + 0.1
    request = GenerationRequest(request_id="r")
    missed = shortfall(estimator, request, 250, deadline - clock())
    assert missed == pytest.approx(0.07)
    assert shortfall(estimator, request, 250, deadline - clock() + 1.0) is None


def test_a_full_batch_costs_the_wait_for_the_needed_place() -> None:
    estimator = FirstTokenEstimator(max_batch_size=2, max_prefill_tokens=100, preemption=True)
    estimator.observe(0.01, prefilled=False)
    estimator.observe(0.01, prefilled=True)
    full = Load(num_running=2, remaining=(40, 300), running_by_class=(0, 2, 0), waiting={(Priority.DEFAULT, ""): 1})
    estimator.publish(full)
    # one DEFAULT request waits ahead: this one needs the second place to open, after 300 steps
    assert estimator.first_token_in(Priority.DEFAULT, 10) == pytest.approx(300 * 0.01 + 0.01 + 0.01)
    # an INTERACTIVE request waits for nobody ahead, and preempts a DEFAULT one at once
    assert estimator.first_token_in(Priority.INTERACTIVE, 10) == pytest.approx(0.02)
    # a request needs more places than the batch frees in one round: it waits for later rounds
    crowded = Load(
        num_running=2,
        remaining=(40, 300),
        running_by_class=(0, 2, 0),
        waiting={(Priority.DEFAULT, ""): 3},
        waiting_max_new=500,
    )
    estimator.publish(crowded)
    # the 4th place: the second to finish (300), then the occupant of the first freed (500 at most)
    assert estimator.first_token_in(Priority.DEFAULT, 10) == pytest.approx((300 + 500) * 0.01 + 0.02)


def test_places_that_preemption_would_free_are_not_waited_for() -> None:
    estimator = FirstTokenEstimator(max_batch_size=4, max_prefill_tokens=100, preemption=True)
    estimator.observe(0.01, prefilled=False)
    estimator.observe(0.01, prefilled=True)
    base = dict(num_running=4, remaining=(500, 500, 500, 500), running_by_class=(0, 4, 0))
    one_tenant = Load(**base, held={(Priority.DEFAULT, "a"): 4})
    estimator.publish(one_tenant)
    assert estimator.first_token_in(Priority.DEFAULT, 10, tenant="b") == pytest.approx(0.02)  # takes a's 4th
    assert estimator.first_token_in(Priority.DEFAULT, 10, tenant="a") == pytest.approx(5.02)  # waits its turn
    one_call = Load(**base, held={(Priority.DEFAULT, "a"): 4}, over_share={"big": 2})
    estimator.publish(one_call)
    assert estimator.first_token_in(Priority.DEFAULT, 10, tenant="a", call_id="small") == pytest.approx(0.02)
    assert estimator.first_token_in(Priority.DEFAULT, 10, tenant="a", call_id="big") == pytest.approx(5.02)
    paused = Load(**base, held={(Priority.DEFAULT, "a"): 4}, num_paused=1)
    estimator.publish(paused)
    assert estimator.first_token_in(Priority.DEFAULT, 10, tenant="a") == pytest.approx(0.02)
    no_preemption = FirstTokenEstimator(max_batch_size=4, max_prefill_tokens=100, preemption=False)
    no_preemption.observe(0.01, prefilled=False)
    no_preemption.publish(one_call)
    assert no_preemption.first_token_in(Priority.DEFAULT, 10, tenant="b", call_id="small") == pytest.approx(5.02)


def test_load_of_counts_classes_and_remaining_tokens() -> None:
    a = sq("a", Priority.BATCH, max_new=10)
    b = sq("b", Priority.INTERACTIVE, prompt_len=7)
    load = load_of([a], [b], call_cap=1)
    assert load.num_running == 1 and load.remaining == (10,)
    assert load.held == {(Priority.BATCH, "a"): 1} and load.over_share == {} and load.waiting_max_new == 50
    assert load.running_by_class == (0, 0, 1)
    assert load.waiting == {(Priority.INTERACTIVE, "b"): 1} and load.waiting_tokens == {(Priority.INTERACTIVE, "b"): 7}
    # what cannot be admitted before a newcomer is not ahead of it: a call at its share, a paused one
    c, d = sq("a", call_id="big"), sq("a", call_id="big")
    d.paused = True
    assert load_of([sq("a", call_id="big")], [c], call_cap=1).waiting == {}
    assert load_of([], [d], call_cap=1).waiting == {}


def test_requests_of_the_engine_default_to_the_default_class() -> None:
    assert GenerationRequest(request_id="r", stopping=StoppingCriteria()).priority is Priority.DEFAULT
