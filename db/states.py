"""The study state machine, written as a transition table.

Every study is in exactly one :class:`StudyState`. Something that happens to a study is a
:class:`StudyEvent`; :data:`TRANSITIONS` maps ``(state, event)`` to the next state. An event that
the table does not list for the current state raises :class:`InvalidTransition` — the caller
must not guess.
"""

from __future__ import annotations

import enum


class StudyState(enum.StrEnum):
    """Where a study is in radflag's pipeline."""

    RECEIVING = "RECEIVING"
    """Instances are arriving; the quiet period has not passed yet."""
    READY = "READY"
    """No instance for the quiet period: waiting for a worker."""
    PROCESSING = "PROCESSING"
    """A worker holds the study's lease and is classifying it."""
    DELIVERING = "DELIVERING"
    """Results exist; the outbox is sending them to the destinations."""
    DONE = "DONE"
    """Every result was delivered (or there was no destination)."""
    NOT_APPLICABLE = "NOT_APPLICABLE"
    """No instance of the study is one any loaded model applies to."""
    FAILED = "FAILED"
    """Classification failed permanently; the reason is on the study and in the audit log."""
    DELIVERY_FAILED = "DELIVERY_FAILED"
    """A result could not be delivered within the maximum number of attempts (dead letter)."""


class StudyEvent(enum.StrEnum):
    """Something that happened to a study."""

    INSTANCE_RECEIVED = "INSTANCE_RECEIVED"
    QUIET_PERIOD_ELAPSED = "QUIET_PERIOD_ELAPSED"
    CLAIMED = "CLAIMED"
    LEASE_EXPIRED = "LEASE_EXPIRED"
    RETRYABLE_ERROR = "RETRYABLE_ERROR"
    CLASSIFIED = "CLASSIFIED"
    NOTHING_TO_CLASSIFY = "NOTHING_TO_CLASSIFY"
    PROCESSING_FAILED = "PROCESSING_FAILED"
    ALL_DELIVERED = "ALL_DELIVERED"
    DELIVERY_GAVE_UP = "DELIVERY_GAVE_UP"
    DELIVERY_RETRIED = "DELIVERY_RETRIED"
    REPROCESS_REQUESTED = "REPROCESS_REQUESTED"
    RESEND_REQUESTED = "RESEND_REQUESTED"
    """An operator (or a duplicate push) queued the study's results again (``db.admin_actions``)."""


S = StudyState
E = StudyEvent

TRANSITIONS: dict[tuple[StudyState, StudyEvent], StudyState] = {
    (S.RECEIVING, E.INSTANCE_RECEIVED): S.RECEIVING,
    (S.RECEIVING, E.QUIET_PERIOD_ELAPSED): S.READY,
    # A late instance re-opens the study; its results are recomputed and replace the old ones
    # in the PACS (deterministic result UIDs).
    (S.READY, E.INSTANCE_RECEIVED): S.RECEIVING,
    (S.PROCESSING, E.INSTANCE_RECEIVED): S.RECEIVING,
    (S.DELIVERING, E.INSTANCE_RECEIVED): S.RECEIVING,
    (S.DONE, E.INSTANCE_RECEIVED): S.RECEIVING,
    (S.NOT_APPLICABLE, E.INSTANCE_RECEIVED): S.RECEIVING,
    (S.FAILED, E.INSTANCE_RECEIVED): S.RECEIVING,
    (S.DELIVERY_FAILED, E.INSTANCE_RECEIVED): S.RECEIVING,
    (S.READY, E.CLAIMED): S.PROCESSING,
    (S.PROCESSING, E.LEASE_EXPIRED): S.READY,
    (S.PROCESSING, E.RETRYABLE_ERROR): S.READY,
    (S.PROCESSING, E.CLASSIFIED): S.DELIVERING,
    (S.PROCESSING, E.NOTHING_TO_CLASSIFY): S.NOT_APPLICABLE,
    (S.PROCESSING, E.PROCESSING_FAILED): S.FAILED,
    (S.DELIVERING, E.ALL_DELIVERED): S.DONE,
    (S.DELIVERING, E.DELIVERY_GAVE_UP): S.DELIVERY_FAILED,
    (S.DELIVERY_FAILED, E.DELIVERY_RETRIED): S.DELIVERING,
    (S.DONE, E.REPROCESS_REQUESTED): S.READY,
    (S.FAILED, E.REPROCESS_REQUESTED): S.READY,
    (S.NOT_APPLICABLE, E.REPROCESS_REQUESTED): S.READY,
    (S.DELIVERY_FAILED, E.REPROCESS_REQUESTED): S.READY,
    # Operator actions (``radflag studies reprocess|resend``): a study stuck delivering may be
    # re-classified (its PENDING entries are cancelled by the new result); results re-queued.
    (S.DELIVERING, E.REPROCESS_REQUESTED): S.READY,
    (S.DONE, E.RESEND_REQUESTED): S.DELIVERING,
    (S.DELIVERY_FAILED, E.RESEND_REQUESTED): S.DELIVERING,
    (S.DELIVERING, E.RESEND_REQUESTED): S.DELIVERING,
}

TERMINAL_STATES: frozenset[StudyState] = frozenset(
    {S.DONE, S.NOT_APPLICABLE, S.FAILED, S.DELIVERY_FAILED}
)


class InvalidTransition(RuntimeError):
    """An event was applied to a study in a state that does not accept it."""

    def __init__(self, state: StudyState, event: StudyEvent) -> None:
        super().__init__(f"event {event.value} is not allowed in state {state.value}")
        self.state = state
        self.event = event


def next_state(state: StudyState, event: StudyEvent) -> StudyState:
    """Return the state that ``event`` leads to from ``state``.

    Parameters
    ----------
    state
        The study's current state.
    event
        What happened.

    Raises
    ------
    InvalidTransition
        When the table has no entry for ``(state, event)``.
    """
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(state, event) from None
