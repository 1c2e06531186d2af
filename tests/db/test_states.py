import pytest

from db.states import TRANSITIONS, InvalidTransition, StudyEvent, StudyState, next_state


def test_happy_path_reaches_done() -> None:
    s = StudyState.RECEIVING
    for event in (
        StudyEvent.INSTANCE_RECEIVED,
        StudyEvent.QUIET_PERIOD_ELAPSED,
        StudyEvent.CLAIMED,
        StudyEvent.CLASSIFIED,
        StudyEvent.ALL_DELIVERED,
    ):
        s = next_state(s, event)
    assert s is StudyState.DONE


def test_event_not_in_table_raises() -> None:
    with pytest.raises(InvalidTransition, match="CLASSIFIED is not allowed in state RECEIVING"):
        next_state(StudyState.RECEIVING, StudyEvent.CLASSIFIED)


def test_every_state_accepts_a_late_instance() -> None:
    for state in StudyState:
        assert next_state(state, StudyEvent.INSTANCE_RECEIVED) is StudyState.RECEIVING


def test_every_state_is_reachable_and_table_targets_are_states() -> None:
    targets = {v for v in TRANSITIONS.values()}
    assert targets | {StudyState.RECEIVING} == set(StudyState)
