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


def _tangents(model, count, seed):
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()} for _ in range(count)]


def test_batched_jvps_equal_one_jvp_per_tangent_across_chunks(toy_run, grouped_data, monkeypatch):
    from stagecredit.behaviours import evaluate

    monkeypatch.setattr(evaluate, "TANGENT_CHUNK", 4)  # 10 tangents: chunks of 4, 4 and 2
    data, groups = grouped_data
    behaviour = sc.PerExampleLoss(data, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"))
    model = toy_run.build_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = _tangents(model, 10, seed=3)
    value, derivatives = evaluate.behaviour_jvps(model, behaviour, params, tangents)
    assert derivatives.shape == (10, 60)
    for t, row in zip(tangents, derivatives):
        expected_value, expected = evaluate.behaviour_jvp(model, behaviour, params, t)
        torch.testing.assert_close(row, expected)
        torch.testing.assert_close(value, expected_value)


def test_batched_jvps_fall_back_to_one_tangent_at_a_time_when_vmap_cannot_batch(toy_run, grouped_data, monkeypatch):
    from stagecredit.behaviours import evaluate

    data, _ = grouped_data
    calls = []

    class Doubled(torch.autograd.Function):  # has a forward-mode rule but no vmap rule: vmap cannot batch it
        @staticmethod
        def forward(x):
            return 2 * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def jvp(ctx, x_tangent):
            return 2 * x_tangent

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

    def doubled_loss(model):
        return Doubled.apply(torch.nn.functional.cross_entropy(model(data[0]), data[1], reduction="none"))

    original = evaluate.behaviour_jvp
    monkeypatch.setattr(evaluate, "behaviour_jvp", lambda *a: calls.append(1) or original(*a))
    model = toy_run.build_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = _tangents(model, 3, seed=4)
    _, derivatives = evaluate.behaviour_jvps(model, doubled_loss, params, tangents)
    assert len(calls) == 3  # the fallback ran, one JVP per tangent
    plain = sc.PerExampleLoss(data, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"))
    for t, row in zip(tangents, derivatives):
        torch.testing.assert_close(row, 2 * original(model, plain, params, t)[1])
