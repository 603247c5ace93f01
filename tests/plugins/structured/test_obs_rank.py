"""importance: obs (compressflow_structured.obs_rank): units ranked by what their removal
costs once the other inputs compensate by least squares, not by their own size."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from compressflow_structured.obs_rank import removal_order  # noqa: E402


def gram_of(columns: list[torch.Tensor]) -> torch.Tensor:
    x = torch.stack(columns, dim=1).double()
    return x.T @ x


def test_a_duplicated_input_goes_first_however_large_its_weight():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, generator=g), torch.randn(500, generator=g)
    # input 2 repeats input 0: whatever it carries, input 0 can carry instead, so removing
    # either of them costs nothing, while input 1 is needed, though its weight is small
    weight = torch.tensor([[1.0, 0.5, 5.0]], dtype=torch.float64)
    order = removal_order(weight, gram_of([a, b, a]), size=1)
    assert order[0] in (0, 2) and order[1] == 1 and sorted(order) == [0, 1, 2]


def test_units_of_several_columns_go_whole_and_a_silent_one_first():
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(400, generator=g) for _ in range(6)]
    weight = torch.randn(4, 6, generator=g, dtype=torch.float64)
    weight[:, 2:4] *= 1e-4  # unit 1 (columns 2, 3) writes almost nothing
    order = removal_order(weight, gram_of(inputs), size=2)
    assert order[0] == 1 and sorted(order) == [0, 1, 2]


def test_many_units_go_a_step_at_a_time_and_each_exactly_once():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 40, generator=g, dtype=torch.float64)
    weight = torch.randn(8, 40, generator=g, dtype=torch.float64)
    weight[:, 7] = 0  # an input that writes nothing goes in the first step
    order = removal_order(weight, x.T @ x, size=1, steps=8)
    assert sorted(order) == list(range(40)) and 7 in order[:5]
