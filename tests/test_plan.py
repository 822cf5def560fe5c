"""Plans: which layers go, and every way a request can be impossible."""

import pytest

from shortgpt_deploy.errors import PlanError
from shortgpt_deploy.importance import LayerScores
from shortgpt_deploy.plan import LayerPlan, make_plan


def scores(values, metric="bi", angular=None):
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    return LayerScores(metric, "m", len(values), list(values), order, {}, angular_distance=angular)


S = scores([0.9, 0.1, 0.05, 0.3, 0.02, 0.5])


def test_lowest_scores_go_first_and_protected_layers_stay():
    plan = make_plan(num_layers=6, scores=S, n_remove=3)
    assert plan.remove == (4, 2, 1)
    assert plan.keep == (0, 3, 5)
    assert plan.num_layers_after == 3
    assert "rank 1 of 6" in plan.reasons[4]


def test_protecting_the_last_layer_skips_it():
    s = scores([0.9, 0.1, 0.5, 0.3, 0.4, 0.01])
    assert make_plan(num_layers=6, scores=s, n_remove=1).remove == (1,)
    assert make_plan(num_layers=6, scores=s, n_remove=1, protect=[]).remove == (5,)


def test_ratio_rounds_to_nearest():
    assert len(make_plan(num_layers=6, scores=S, ratio=0.25).remove) == 2  # 1.5 → 2
    assert len(make_plan(num_layers=6, scores=S, ratio=0.1).remove) == 1


def test_explicit_layers():
    plan = make_plan(num_layers=6, layers=[3, 1])
    assert plan.remove == (3, 1) and plan.keep == (0, 2, 4, 5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"layers": [6]}, "out of range"),
        ({"layers": [-1]}, "out of range"),
        ({"layers": [0]}, "layer 0 is protected"),
        ({"layers": [5], "protect": [-1]}, "layer 5 is protected"),
        ({"layers": [0, 1, 2, 3, 4, 5], "protect": []}, "cannot remove all"),
        ({"layers": [2, 2]}, "twice"),
        ({"n_remove": 6, "protect": []}, "at least one layer must stay"),
        ({"n_remove": 5}, "only 4 of 6 are not protected"),
        ({"n_remove": 1, "protect": [9]}, "protected layer 9 is out of range"),
        ({"n_remove": 1, "ratio": 0.5}, "exactly one"),
    ],
)
def test_impossible_requests(kwargs, message):
    with pytest.raises(PlanError, match=message):
        make_plan(num_layers=6, scores=S, **kwargs)


def test_scores_for_another_model_are_refused():
    with pytest.raises(PlanError, match="scores are for 6 layers"):
        make_plan(num_layers=8, scores=S, n_remove=1)


def test_angular_removes_the_closest_contiguous_block():
    n = 6
    dist = [[0.0] * (n + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        for j in range(i + 1, n + 1):
            dist[i][j] = 0.5 if (i, j) != (2, 4) else 0.01  # layers 2,3 form the closest block of two
    plan = make_plan(num_layers=n, scores=scores([0.1] * n, "angular", dist), n_remove=2)
    assert plan.remove == (2, 3)


def test_plan_round_trips_through_json(tmp_path):
    plan = make_plan(num_layers=6, scores=S, n_remove=2)
    plan.save(tmp_path / "plan.json")
    assert LayerPlan.load(tmp_path / "plan.json") == plan
