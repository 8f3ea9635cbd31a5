"""Ready-made group behaviours, checked against hand computations and retraining."""

import numpy as np
import pytest
import torch

import stagecredit as sc
from conftest import toy_data


@pytest.fixture(scope="module")
def grouped_data():
    X, y = toy_data(n=60, seed=11)
    groups = torch.arange(60) % 3
    return (X, y), groups


def test_group_accuracy_and_worst_group_by_hand(toy_run, grouped_data):
    data, groups = grouped_data
    model = toy_run.build_model()
    with torch.no_grad():
        correct = (model(data[0]).argmax(1) == data[1]).float()
    expected = torch.stack([correct[groups == g].mean() for g in range(3)])
    torch.testing.assert_close(sc.group_accuracy(data, groups)(model), expected)
    torch.testing.assert_close(sc.worst_group_accuracy(data, groups)(model), expected.min().reshape(1))
    losses = torch.nn.functional.cross_entropy(model(data[0]), data[1], reduction="none").detach()
    worst_loss = sc.WorstGroup(sc.group_loss(data, groups))(model)
    torch.testing.assert_close(worst_loss, torch.stack([losses[groups == g].mean() for g in range(3)]).max().reshape(1))


def test_worst_group_accuracy_in_model_mode_matches_retraining_on_the_last_stage(toy_run, grouped_data):
    data, groups = grouped_data
    behaviour = sc.worst_group_accuracy(data, groups)
    est = sc.attribute(toy_run, behaviour, method="aa", mode="model")
    truth = sc.retrain_effects(toy_run, behaviour, progress=False)
    assert est.effects.shape == (3, 1)
    np.testing.assert_allclose(est.effects[-1], truth.effects[-1], atol=1e-9)
    # accuracy is a score: the sign convention says so
    assert "higher is better" in est.sign_convention


def test_group_loss_linear_mode_equals_mean_of_per_example_effects(toy_run, grouped_data):
    data, groups = grouped_data
    per_example = sc.attribute(toy_run, sc.PerExampleLoss(data), method="aa", mode="linear").effects
    per_group = sc.attribute(toy_run, sc.group_loss(data, groups), method="aa", mode="linear").effects
    expected = np.stack([per_example[:, groups.numpy() == g].mean(1) for g in range(3)], axis=1)
    np.testing.assert_allclose(per_group, expected, rtol=1e-5, atol=1e-7)


def test_collate_of_a_contiguous_range_equals_indexing():
    from stagecredit.recording.batches import collate

    X, y = toy_data(n=20, seed=3)
    for data in [(X, y), torch.utils.data.TensorDataset(X, y)]:
        sliced = collate(data, range(4, 13))
        indexed = collate(data, torch.arange(4, 13))
        assert all(torch.equal(a, b) for a, b in zip(sliced, indexed))


def test_evaluation_chunks_shrink_for_large_examples_and_give_the_same_values():
    from stagecredit.behaviours.loss import evaluation_chunk

    small = (torch.randn(3000, 784), torch.randint(0, 10, (3000,)))
    assert evaluation_chunk(small) == 1024  # MNIST-sized examples: the chunk of before
    large = (torch.randn(100, 64, 384), torch.ones(100, 64), torch.randint(0, 2, (100,)))
    assert evaluation_chunk(large) == 2**20 // (64 * 384 + 64 + 1) == 42
    assert evaluation_chunk((torch.randn(20, 512, 1024), torch.zeros(20))) == 16  # never below 16
    assert sc.PerExampleLoss(large, lambda m, b: m(b[0]).sum((1, 2))).batch_size == 42
    assert sc.PerExampleLoss(large, batch_size=7).batch_size == 7

    model = torch.nn.Sequential(torch.nn.Linear(384, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    def loss_fn(m, batch):
        logits = m(batch[0]).mean(1)
        return torch.nn.functional.cross_entropy(logits, batch[2], reduction="none")

    auto, whole = sc.PerExampleLoss(large, loss_fn), sc.PerExampleLoss(large, loss_fn, batch_size=1024)
    torch.testing.assert_close(auto(model), whole(model))
    correct = (torch.randn(100, 5), torch.randint(0, 3, (100,)))
    assert sc.PerExampleCorrect(correct).batch_size == 1024
