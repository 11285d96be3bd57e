"""The rules both stores apply to pay-on-success requests (``HeldRequest``), so they cannot
drift apart: what ``add_held_request`` and ``move_held_request`` refuse, which states keep the
stored request whole, and what a move or a delivery writes."""

from __future__ import annotations

import dataclasses

from gateway.ports import HELD_UNFINISHED, HeldRequest, HeldState, StoredRequest, StoredResponse

# Nothing left to do for them: the rows ``prune_held_requests`` may delete.
HELD_FINAL = frozenset(HeldState) - HELD_UNFINISHED
# The stored request's headers and body are kept only until it ran (RUNNING: the runner reads
# them), or never will; its method and target stay (a replay is checked against them).
_KEEPS_REQUEST = frozenset({HeldState.WAITING, HeldState.RUNNING})
# A move to one of these writes the backend's answer. A failed request's answer is never
# replayed (its failure names the status), so it is not kept.
ANSWERED = frozenset({HeldState.SUCCEEDED})


def check_new(held: HeldRequest) -> None:
    """A held request ``add_held_request`` may record."""
    if held.state is not HeldState.WAITING:
        raise ValueError(f"a held request begins WAITING, not {held.state.value}")


def check_move(state: HeldState, response: StoredResponse | None, keep_until: float | None) -> None:
    """Arguments of ``move_held_request`` that would be silently lost: refused."""
    if response is not None and state not in ANSWERED:
        raise ValueError(f"a response is stored with SUCCEEDED only, not {state.value}")
    if keep_until is not None and state not in HELD_FINAL:
        raise ValueError(f"keep_until is set with a final state, not {state.value}")


def predecessors(state: HeldState) -> frozenset[HeldState]:
    """The states a held request may move to ``state`` from (``HeldState.may_become``)."""
    return frozenset(old for old in HeldState if old.may_become(state))


def keeps_request(state: HeldState) -> bool:
    """Whether a held request in ``state`` still holds its stored request's headers and body."""
    return state in _KEEPS_REQUEST


def ran(request: StoredRequest | None) -> StoredRequest | None:
    """What is kept of a stored request once it ran or never will: its method and target."""
    return None if request is None else StoredRequest(request.method, request.target, (), b"")


def earliest(current: float | None, new: float | None) -> float | None:
    """The sooner of two deletion times; None stands for "not set"."""
    if current is None:
        return new
    return current if new is None else min(current, new)


def moved(
    held: HeldRequest,
    state: HeldState,
    now: float,
    response: StoredResponse | None,
    failure: str,
    keep_until: float | None,
) -> HeldRequest | None:
    """``held`` after a move to ``state`` (None: refused), as ``move_held_request`` writes it;
    the arguments passed ``check_move``.

    An empty ``failure`` keeps the earlier text (a FAILED request's reason stays through its
    cancel); ``keep_until`` never lengthens what a delivery already shortened.
    """
    if not held.state.may_become(state):
        return None
    return dataclasses.replace(
        held,
        state=state,
        updated_at=now,
        request=held.request if keeps_request(state) else ran(held.request),
        response=response if state in ANSWERED else held.response,
        failure=failure or held.failure,
        keep_until=earliest(held.keep_until, keep_until),
    )


def delivered(held: HeldRequest, now: float, keep_until: float) -> HeldRequest:
    """``held`` after its stored response was replayed (``mark_held_delivered``)."""
    return dataclasses.replace(
        held,
        delivered_at=now if held.delivered_at is None else held.delivered_at,
        keep_until=earliest(held.keep_until, keep_until),
    )
