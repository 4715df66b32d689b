"""RequestOutput pieces that need no model."""

from leanlm.engine.outputs import RequestMetrics


def test_metrics_copy_is_an_independent_equal_snapshot():
    metrics = RequestMetrics(num_prompt_tokens=5, num_generated_tokens=2, arrival_time=1.5, first_token_time=2.0)
    snapshot = metrics.copy()
    assert snapshot == metrics and type(snapshot) is RequestMetrics
    metrics.num_generated_tokens = 3
    assert snapshot.num_generated_tokens == 2
