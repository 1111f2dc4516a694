"""The annealing schedule, random orders, label dropout and the named scan orders."""
import pytest
import torch

from rar.model.orders import NAMED_ORDERS, drop_labels, is_permutation, named_order, random_ratio, sample_orders


def test_schedule_start_mid_end():
    assert random_ratio(0, 100, 200) == 1.0
    assert random_ratio(99, 100, 200) == 1.0
    assert random_ratio(100, 100, 200) == 1.0
    assert random_ratio(150, 100, 200) == pytest.approx(0.5)
    assert random_ratio(175, 100, 200) == pytest.approx(0.25)
    assert random_ratio(200, 100, 200) == 0.0
    assert random_ratio(10_000, 100, 200) == 0.0
    # the paper's recipe: anneal from 125k to 187.5k steps
    assert random_ratio(156_250, 125_000, 187_500) == pytest.approx(0.5)
    # a floor: 1 -> r_final instead of 1 -> 0
    assert random_ratio(50, 100, 200, r_final=0.2) == 1.0
    assert random_ratio(150, 100, 200, r_final=0.2) == pytest.approx(0.6)
    assert random_ratio(200, 100, 200, r_final=0.2) == pytest.approx(0.2)
    assert random_ratio(10_000, 100, 200, r_final=0.2) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="r_final must be a probability"):
        random_ratio(0, 10, 20, r_final=1.5)


def test_schedule_rejects_reversed_bounds():
    with pytest.raises(ValueError, match="anneal_end"):
        random_ratio(0, 10, 5)


def test_orders_are_permutations_and_seeded():
    a = sample_orders(64, 16, 0.5, torch.Generator().manual_seed(1))
    b = sample_orders(64, 16, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert is_permutation(a)
    raster = (a == torch.arange(16)).all(dim=1)
    assert 10 < raster.sum() < 54  # about half permuted


def test_ratio_zero_gives_raster_only_and_one_gives_no_raster():
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_orders(32, 64, 0.0, g), torch.arange(64).expand(32, 64))
    r1 = sample_orders(256, 64, 1.0, g)
    assert not (r1 == torch.arange(64)).all(dim=1).any()


def test_label_dropout():
    labels = torch.arange(10).repeat(100)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(drop_labels(labels, 0.0, 10, g), labels)
    assert (drop_labels(labels, 1.0, 10, g) == 10).all()
    d = drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(3))
    assert torch.equal(d, drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(3)))
    dropped = d == 10
    assert 60 < dropped.sum() < 140
    assert torch.equal(d[~dropped], labels[~dropped])


@pytest.mark.parametrize("name", sorted(NAMED_ORDERS))
@pytest.mark.parametrize("n", [1, 3, 4, 16])
def test_named_orders_are_permutations(name, n):
    order = named_order(name, n)
    assert order.shape == (n * n,)
    assert is_permutation(order)


def test_named_order_definitions_on_3x3_and_4x4():
    assert named_order("raster", 3).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert named_order("spiral_in", 3).tolist() == [0, 1, 2, 5, 8, 7, 6, 3, 4]
    assert named_order("spiral-out", 3).tolist() == [4, 3, 6, 7, 8, 5, 2, 1, 0]
    assert named_order("alternate", 3).tolist() == [0, 1, 2, 5, 4, 3, 6, 7, 8]
    assert named_order("z_curve", 4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert named_order("subsample", 4).tolist() == [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15]


def test_unknown_order_is_clear():
    with pytest.raises(ValueError, match="unknown order 'hilbert'"):
        named_order("hilbert", 4)
