"""The scheduler alone, with a fake runner that 'samples' scripted tokens: no model, no torch."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from gpt2_service.core.detokenizer import IncrementalDetokenizer
from gpt2_service.core.request import FinishReason, GenerationRequest, Overflow, StoppingCriteria
from gpt2_service.core.scheduler import SampledToken, Scheduler, SchedulerConfig, StepPlan
from gpt2_service.core.sequence import GenerationOutput, Sequence
from gpt2_service.model.tokenizer import GPT2Tokenizer

EOS = 50256
TOK = GPT2Tokenizer.embedded()
_ids = itertools.count(1)


def config(**kw: int) -> SchedulerConfig:
    base = dict(
        max_batch_size=4, num_slots=4, context_window=64, max_prefill_tokens=32, context_shift_keep=48, eos_token_id=EOS
    )
    base.update(kw)
    return SchedulerConfig(**base)


def seq(prompt: list[int], stopping: StoppingCriteria | None = None, max_new: int = 100, **kw: object) -> Sequence:
    stopping = stopping or StoppingCriteria()
    req = GenerationRequest(request_id=f"r{next(_ids)}", prompt_token_ids=tuple(prompt), stopping=stopping, **kw)  # type: ignore[arg-type]
    return Sequence(
        seq_id=next(_ids),
        request=req,
        prompt_ids=list(prompt),
        seed=0,
        max_new_tokens=stopping.max_new_tokens or max_new,
        truncated_prompt_tokens=0,
        arrival_time=0.0,
        detokenizer=IncrementalDetokenizer(
            TOK.token_bytes, TOK.special_ids, stopping.stop, stopping.include_stop_in_output
        ),
    )


class FakeRunner:
    """Samples, for each sequence, the next token of its script."""

    def __init__(self, scripts: dict[int, list[int]]) -> None:
        self.scripts = {k: iter(v) for k, v in scripts.items()}
        self.plans: list[StepPlan] = []

    def execute(self, plan: StepPlan) -> dict[int, SampledToken]:
        self.plans.append(plan)
        due = [s for c in plan.prefill if c.samples for s in (c.seq, *c.forks)] + plan.decode
        return {s.seq_id: SampledToken(next(self.scripts[s.seq_id]), -1.0) for s in due}


def drive(sched: Scheduler, runner: FakeRunner, max_steps: int = 500) -> dict[str, list[GenerationOutput]]:
    outputs: dict[str, list[GenerationOutput]] = {}
    for _ in range(max_steps):
        if not sched.has_work:
            break
        plan, _ = sched.schedule()
        result = sched.update_from_output(plan, runner.execute(plan))
        for s, out in result.outputs:
            outputs.setdefault(s.request_id, []).append(out)
    return outputs


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode() -> None:
    sched = Scheduler(config(max_prefill_tokens=16), TOK.id_to_text)
    short, long = seq([1, 2], max_new=40), seq(list(range(60)), max_new=2)
    sched.add(short)
    runner = FakeRunner({short.seq_id: [5] * 40, long.seq_id: [6] * 2})
    plan, _ = sched.schedule()
    sched.update_from_output(plan, runner.execute(plan))
    sched.add(long)
    drive(sched, runner)
    chunked = [p for p in runner.plans if any(c.seq is long for c in p.prefill)]
    assert [c.num_tokens for p in chunked for c in p.prefill if c.seq is long] == [16, 16, 16, 12]
    assert all(short in p.decode for p in chunked), "running streams keep decoding during a long prefill"


def test_admission_is_bounded_by_the_batch_size_and_slots_are_freed() -> None:
    sched = Scheduler(config(max_batch_size=2, num_slots=2), TOK.id_to_text)
    seqs = [seq([1], max_new=n) for n in (3, 10, 3)]
    for s in seqs:
        sched.add(s)
    runner = FakeRunner({s.seq_id: [7] * 10 for s in seqs})
    sched_plan, _ = sched.schedule()
    assert len(sched.running) == 2 and len(sched.waiting) == 1
    sched.update_from_output(sched_plan, runner.execute(sched_plan))
    out = drive(sched, runner)
    assert {k: len(v) for k, v in out.items()} == {seqs[0].request_id: 2, seqs[1].request_id: 9, seqs[2].request_id: 3}
    assert sched.slots.num_free == 2 and not sched.running


def test_eos_finishes_unless_ignored_and_is_masked_text() -> None:
    sched = Scheduler(config(), TOK.id_to_text)
    a, b = seq([1]), seq([1], StoppingCriteria(max_new_tokens=3, ignore_eos=True))
    for s in (a, b):
        sched.add(s)
    out = drive(sched, FakeRunner({a.seq_id: [64, EOS, 65], b.seq_id: [64, EOS, 65]}))
    fa = out[a.request_id][-1].finished
    fb = out[b.request_id][-1].finished
    assert fa is not None and fa.reason is FinishReason.EOS and fa.text == "a" and fa.token_ids == (64, EOS)
    assert fb is not None and fb.reason is FinishReason.LENGTH and fb.text == "ab"


def test_stop_token_ids_finish_with_stop_token() -> None:
    sched = Scheduler(config(), TOK.id_to_text)
    s = seq([1], StoppingCriteria(stop_token_ids=(65,)))
    sched.add(s)
    finished = drive(sched, FakeRunner({s.seq_id: [64, 64, 65, 66]}))[s.request_id][-1].finished
    assert finished is not None and finished.reason is FinishReason.STOP_TOKEN and finished.text == "aa"


def test_a_stop_string_across_tokens_is_reported_and_cut_from_every_delta() -> None:
    sched = Scheduler(config(), TOK.id_to_text)
    script = TOK.encode("The answer ###END### tail")
    s = seq([1], StoppingCriteria(stop=("###END###",)))
    sched.add(s)
    outs = drive(sched, FakeRunner({s.seq_id: script}))[s.request_id]
    finished = outs[-1].finished
    assert finished is not None and finished.reason is FinishReason.STOP_SEQUENCE
    assert finished.stop_sequence == "###END###"
    assert "".join(o.text for o in outs) == finished.text == "The answer "


def test_min_new_tokens_defers_stop_strings() -> None:
    sched = Scheduler(config(), TOK.id_to_text)
    s = seq([1], StoppingCriteria(stop=("b",), min_new_tokens=3, max_new_tokens=6))
    sched.add(s)
    outs = drive(sched, FakeRunner({s.seq_id: [64, 65] * 4}))[s.request_id]  # "a", "b", ...
    finished = outs[-1].finished
    assert finished is not None and finished.reason is FinishReason.STOP_SEQUENCE
    assert finished.text == "aba"  # the "b" of token 2 came before min_new_tokens; token 4 stops


@pytest.mark.parametrize("overflow", [Overflow.SHIFT, Overflow.STOP])
def test_a_full_window_shifts_or_stops(overflow: Overflow) -> None:
    sched = Scheduler(config(context_window=8, context_shift_keep=5), TOK.id_to_text)
    s = seq(list(range(6)), StoppingCriteria(max_new_tokens=10), overflow=overflow)
    sched.add(s)
    runner = FakeRunner({s.seq_id: list(range(100, 110))})
    finished = drive(sched, runner)[s.request_id][-1].finished
    assert finished is not None
    if overflow is Overflow.STOP:
        assert finished.reason is FinishReason.CONTEXT_WINDOW
        assert finished.usage.completion_tokens == 3  # from positions 5, 6 and 7
    else:
        assert finished.reason is FinishReason.LENGTH and finished.usage.completion_tokens == 10
        assert finished.usage.context_shifts >= 2
        re_encoded = [c for p in runner.plans for c in p.prefill if c.start == 0 and s.context_shifts]
        assert all(c.num_tokens == 5 for c in re_encoded[1:])
    windows = [c.start + c.num_tokens for p in runner.plans for c in p.prefill] + [
        s2.num_computed for p in runner.plans for s2 in p.decode
    ]
    assert max(windows) <= 8


def test_each_shift_is_reported_in_the_step_it_happens_and_counted_in_the_usage() -> None:
    sched = Scheduler(config(context_window=8, context_shift_keep=5), TOK.id_to_text)
    s = seq(list(range(6)), StoppingCriteria(max_new_tokens=10))
    sched.add(s)
    runner = FakeRunner({s.seq_id: list(range(100, 110))})
    shifted_in: list[int] = []
    outputs: list[GenerationOutput] = []
    for step in range(50):
        if not sched.has_work:
            break
        plan, _ = sched.schedule()
        result = sched.update_from_output(plan, runner.execute(plan))
        outputs += [out for _, out in result.outputs]
        if s.seq_id in result.shifted:
            assert s.num_computed == 0  # its window is to be re-encoded
            shifted_in.append(step)
    finished = outputs[-1].finished
    assert finished is not None
    assert finished.usage.context_shifts == len(shifted_in) >= 2


def test_an_aborted_sequence_leaves_at_the_next_schedule() -> None:
    sched = Scheduler(config(), TOK.id_to_text)
    s, w = seq([1]), seq([2])
    sched.add(s)
    sched.schedule()
    sched.abort(s.seq_id)
    sched.abort(w.seq_id)  # unknown here: ignored
    _, result = sched.schedule()
    assert result.released == [s] and not sched.running and sched.slots.num_free == 4


def test_a_waiting_sequence_past_its_deadline_is_never_admitted() -> None:
    sched = Scheduler(config(), TOK.id_to_text, clock=lambda: 100.0)
    s = seq([1])
    s = dataclasses.replace(s, request=dataclasses.replace(s.request, deadline=99.0))
    sched.add(s)
    plan, result = sched.schedule()
    assert plan.is_empty and [x for x, _ in result.failed] == [s] and sched.slots.num_free == 4


def test_fixed_prefill_chunks_end_at_multiples_of_the_budget_whatever_shares_the_step() -> None:
    """Batch-invariant mode: a prompt's chunks are the same alone and behind another prompt."""

    def chunks_of(target_prompt: int, others: list[int]) -> list[tuple[int, int]]:
        sched = Scheduler(config(max_prefill_tokens=16, fixed_prefill_chunks=True), TOK.id_to_text)
        seqs = [seq(list(range(n)), max_new=1) for n in others]
        target = seq(list(range(target_prompt)), max_new=1)
        for s in [*seqs, target]:
            sched.add(s)
        runner = FakeRunner({s.seq_id: [5] for s in [*seqs, target]})
        drive(sched, runner)
        return [(c.start, c.num_tokens) for p in runner.plans for c in p.prefill if c.seq is target]

    alone = chunks_of(40, [])
    assert alone == [(0, 16), (16, 16), (32, 8)]
    assert chunks_of(40, [5]) == alone  # budget 16 - 5 = 11 < 16: the first chunk waits whole
    assert chunks_of(40, [21, 3]) == alone


def with_forks(parent: Sequence, n: int) -> list[Sequence]:
    """Give ``parent`` n - 1 forks, as the engine's SequenceFactory does for a request's n."""
    forks = [
        dataclasses.replace(
            seq(parent.prompt_ids, max_new=parent.max_new_tokens), index=i, group_id=parent.seq_id, fork_of=parent
        )
        for i in range(1, n)
    ]
    parent.forks = list(forks)
    return forks


def test_forks_compute_nothing_until_the_prompt_is_read_then_sample_in_its_last_step() -> None:
    sched = Scheduler(config(max_prefill_tokens=16), TOK.id_to_text)
    parent = seq(list(range(40)), max_new=3)
    forks = with_forks(parent, 3)
    sched.add(parent)
    runner = FakeRunner({s.seq_id: [7, 8, 9] for s in (parent, *forks)})
    outputs = drive(sched, runner)
    prefills = [[(c.seq, c.num_tokens, c.forks) for c in p.prefill] for p in runner.plans if p.prefill]
    assert prefills == [[(parent, 16, ())], [(parent, 16, ())], [(parent, 8, tuple(forks))]]
    assert all(len(p.decode) == 3 for p in runner.plans[3:])  # then all three decode together
    assert all(s.call_id == parent.call_id for s in forks)
    for s in (parent, *forks):
        assert [t.id for o in outputs[s.request_id] for t in o.tokens] == [7, 8, 9]
        assert [o.index for o in outputs[s.request_id]] == [s.index] * 3
    assert sched.slots.num_free == 4


def test_preempting_choice_0_leaves_its_forks_to_read_the_prompt_themselves() -> None:
    sched = Scheduler(config(max_prefill_tokens=16), TOK.id_to_text)
    parent = seq(list(range(40)), max_new=2)
    (fork,) = with_forks(parent, 2)
    sched.add(parent)
    runner = FakeRunner({parent.seq_id: [7, 8], fork.seq_id: [7, 8]})
    plan, _ = sched.schedule()
    sched.update_from_output(plan, runner.execute(plan))
    sched._preempt(parent, "test", sched.schedule()[1])
    assert fork.fork_of is None and parent.forks == []
    drive(sched, runner)
    read = [(c.seq, c.num_tokens) for p in runner.plans for c in p.prefill]
    assert sum(n for s, n in read if s is fork) == 40 and sum(n for s, n in read if s is parent) == 56
    assert sched.slots.num_free == 4


def test_a_waiting_request_aborted_takes_its_forks_out_of_the_queue() -> None:
    sched = Scheduler(config(max_batch_size=1, num_slots=1), TOK.id_to_text)
    running = seq([1, 2], max_new=50)
    sched.add(running)
    sched.schedule()
    parent = seq([3, 4])
    forks = with_forks(parent, 3)
    sched.add(parent)
    sched.abort(parent.seq_id)
    _, result = sched.schedule()
    assert result.left_queue == [parent, *forks]  # each gives its place in the queue back
    assert not sched.waiting


def test_a_request_waits_for_the_prefix_another_computes_and_never_for_a_waiter() -> None:
    sched = Scheduler(config(max_prefill_tokens=16, prefix_block_tokens=4), TOK.id_to_text)
    shared = list(range(100, 140))
    a, b = seq([*shared, 1, 2], max_new=2), seq([*shared, 3], max_new=2)
    sched.add(a)
    sched.add(b)
    runner = FakeRunner({a.seq_id: [7, 8], b.seq_id: [7, 8]})
    plan, _ = sched.schedule()
    assert b.awaits == (a, 40) and [c.seq for c in plan.prefill] == [a]  # b computes nothing yet
    sched.update_from_output(plan, runner.execute(plan))
    slot = a.slot
    sched._preempt(a, "test", sched.schedule()[1])
    plan, _ = sched.schedule()
    # a is readmitted into its old slot, reusing its 16 tokens there; it does not wait for b,
    # which waits for it (waits never form a cycle)
    assert a.slot == slot and a.awaits is None and a.num_computed == 16 and b.awaits == (a, 40)
    sched.update_from_output(plan, runner.execute(plan))
    drive(sched, runner)
    assert [c for p in runner.plans for c in p.copies] == [(slot, 1, 40)]  # b (slot 1) copies a's 40
    assert b.cached_prompt_tokens == 40 and a.cached_prompt_tokens == 0  # a reused only when readmitted
    assert sched.prefix_stats.hits == 2 and sched.prefix_stats.reused_tokens == 56
    assert sched.slots.num_free == 4 and not sched.running
