"""Helpers shared by the rollout tests (HF and vLLM generation)."""


def turn_spans(t) -> list[tuple[int, int]]:
    """[start, end) of every run of agent tokens in a trajectory: one per turn."""
    spans, start = [], None
    for i, a in enumerate([*t.action_mask, False]):
        if a and start is None:
            start = i
        elif not a and start is not None:
            spans.append((start, i))
            start = None
    return spans
