"""armsproxy.tunnel.timers.Deadlines: many owners' deadlines behind one DelayedCall."""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.logger import Logger

from armsproxy.tunnel.timers import Deadlines


class Owner:
    """Records when it was called; re-arms for ``due`` if that is still ahead."""

    def __init__(self, deadlines: Deadlines, name: str) -> None:
        self.deadlines = deadlines
        self.name = name
        self.deadline_entry: Any = None
        self.due: float | None = None
        self.fired: list[float] = []
        self.calls = 0

    def set(self, due: float) -> None:
        self.due = due
        self.deadlines.arm(self, due)

    def deadline_reached(self, now: float) -> None:
        self.calls += 1
        if self.due is not None and now + 1e-6 >= self.due:
            self.fired.append(now)
            self.due = None
        elif self.due is not None:
            self.deadlines.arm(self, self.due)


def test_one_delayed_call_for_many_owners_in_due_order():
    clock = task.Clock()
    deadlines = Deadlines(clock)
    owners = [Owner(deadlines, str(i)) for i in range(100)]
    for i, owner in enumerate(owners):
        owner.set(100.0 - i)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1.0)
    assert [o.name for o in owners if o.fired] == ["99"]
    clock.pump([1.0] * 99)
    assert all(o.fired == [100.0 - i] for i, o in enumerate(owners))
    assert clock.getDelayedCalls() == [] and len(deadlines) == 0


def test_later_costs_nothing_until_due_sooner_takes_effect_at_once():
    clock = task.Clock()
    deadlines = Deadlines(clock)
    owner = Owner(deadlines, "a")
    owner.set(10.0)
    owner.set(30.0)  # later: no new entry; the old one re-arms when it comes due
    assert len(deadlines) == 1
    clock.advance(10.0)
    assert owner.fired == [] and owner.calls == 1 and len(deadlines) == 1
    owner.set(15.0)  # sooner than the entry at 30: a new entry, the old one stale
    assert len(deadlines) == 2
    clock.advance(5.0)
    assert owner.fired == [15.0]
    clock.advance(15.0)  # the stale entry at 30 is dropped without a call
    assert owner.calls == 2 and len(deadlines) == 0 and clock.getDelayedCalls() == []


def test_disarm_and_a_failing_owner_do_not_stop_the_others(monkeypatch):
    monkeypatch.setattr(Deadlines, "log", Logger(observer=lambda event: None))
    clock = task.Clock()
    deadlines = Deadlines(clock)
    gone, broken, fine = (Owner(deadlines, n) for n in ("gone", "broken", "fine"))
    gone.set(1.0)
    broken.set(1.0)
    fine.set(1.0)
    Deadlines.disarm(gone)

    def boom(now: float) -> None:
        raise RuntimeError("boom")

    broken.deadline_reached = boom  # type: ignore[method-assign]
    clock.advance(1.0)
    assert gone.calls == 0 and fine.fired == [1.0]
    assert clock.getDelayedCalls() == []


def test_an_owner_armed_from_its_callback_for_now_runs_in_the_same_pass():
    clock = task.Clock()
    deadlines = Deadlines(clock)
    first, second = Owner(deadlines, "1"), Owner(deadlines, "2")
    first.set(5.0)

    def chain(now: float) -> None:
        first.fired.append(now)
        second.set(now)

    first.deadline_reached = chain  # type: ignore[method-assign]
    clock.advance(5.0)
    assert first.fired == [5.0] and second.fired == [5.0]
