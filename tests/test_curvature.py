"""aa-curvature: curvature products, Lanczos, and exactness against retraining."""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import stagecredit as sc
from conftest import SGD_ADAMW_SCHEDULES, ce_loss, make_mlp, recorded_loop, three_stage_pipeline, toy_data, zero_loss
from conftest import quadratic_run as _quadratic_run
from stagecredit.estimators.curvature import CurvatureChoice, FlatParams, GGNUnavailableError, curvature_product
from stagecredit.estimators.krylov import krylov_function_apply, lanczos

C = sc.CurvatureOptions


# --- curvature products against brute force -----------------------------------------------------

def _tiny():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    X = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    return model, (X, y)


def _flat_loss(model, flat, batch, loss=torch.nn.functional.cross_entropy):
    def f(vector):
        params = flat.unflatten(vector)
        out = torch.func.functional_call(model, params, (batch[0],))
        return loss(out, batch[1])
    return f


def test_hessian_product_matches_autograd_hessian():
    model, batch = _tiny()
    params = dict(model.named_parameters())
    flat = FlatParams.of(params, list(params))
    p0 = flat.flatten({n: p.detach() for n, p in params.items()})
    H = torch.autograd.functional.hessian(_flat_loss(model, flat, batch), p0)
    V = torch.randn(3, p0.numel(), dtype=torch.float64)
    product = curvature_product(model, ce_loss, batch, params, flat, "hessian")
    torch.testing.assert_close(product(V), V @ H.T, rtol=1e-8, atol=1e-10)


def test_ggn_product_matches_explicit_gauss_newton():
    model, batch = _tiny()
    params = dict(model.named_parameters())
    flat = FlatParams.of(params, list(params))
    p0 = flat.flatten({n: p.detach() for n, p in params.items()})
    outputs = lambda v: torch.func.functional_call(model, flat.unflatten(v), (batch[0],))  # noqa: E731
    J = torch.autograd.functional.jacobian(outputs, p0).reshape(-1, p0.numel())  # [N*C, n]
    z = outputs(p0).detach()
    H_L = torch.autograd.functional.hessian(lambda out: torch.nn.functional.cross_entropy(out.view_as(z), batch[1]),
                                            z.reshape(-1)).reshape(J.shape[0], J.shape[0])
    G = J.T @ H_L @ J
    V = torch.randn(2, p0.numel(), dtype=torch.float64)
    product = curvature_product(model, ce_loss, batch, params, flat, "ggn")
    torch.testing.assert_close(product(V), V @ G.T, rtol=1e-8, atol=1e-10)
    # the GGN is positive semi-definite for cross-entropy
    assert torch.linalg.eigvalsh(G).min() > -1e-10


def _batchnorm_model():
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 3)).double()


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_products_use_the_given_buffers(curvature):
    """Eval mode uses BatchNorm's running statistics: the product must see the recorded ones, not the module's."""
    trained, batch = _batchnorm_model(), _tiny()[1]
    trained.train()
    with torch.no_grad():
        for _ in range(3):
            trained(batch[0] * 3 + 1)  # moves the running statistics far from their initial (0, 1)
    trained.eval()
    params = {n: p.detach() for n, p in trained.named_parameters()}
    flat = FlatParams.of(params, list(params))
    V = torch.randn(2, sum(flat.sizes), dtype=torch.float64)
    expected = curvature_product(trained, ce_loss, batch, params, flat, curvature)(V)
    fresh = _batchnorm_model()  # initial running statistics
    with_buffers = curvature_product(fresh, ce_loss, batch, params, flat, curvature,
                                     buffers=dict(trained.named_buffers()))(V)
    torch.testing.assert_close(with_buffers, expected, rtol=1e-8, atol=1e-10)
    without = curvature_product(fresh, ce_loss, batch, params, flat, curvature)(V)
    assert (without - expected).norm() > 0.1 * expected.norm()  # so the equality above is informative


@pytest.mark.parametrize("scheme", ["segments", "exact"])
def test_aa_curvature_evaluates_curvature_with_the_recorded_buffers(tmp_path, monkeypatch, toy_behaviour, scheme):
    import stagecredit.estimators.curvature as cp

    X, y = toy_data()
    stages = [sc.Stage(f"s{i}", (X, y), ce_loss, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), steps=10,
                       batch_size=16, seed=i) for i in (1, 2)]
    model_fn = lambda: torch.nn.Sequential(torch.nn.Linear(X.shape[1], 8), torch.nn.BatchNorm1d(8),  # noqa: E731
                                           torch.nn.Tanh(), torch.nn.Linear(8, 3))
    run = sc.Pipeline(model_fn, stages, checkpoint_every=5).run(tmp_path / "bn", progress=False)
    seen = []
    product = cp.curvature_product
    monkeypatch.setattr(cp, "curvature_product",
                        lambda *args, buffers=None, **kw: seen.append(buffers) or product(*args, buffers=buffers, **kw))
    sc.attribute(run, toy_behaviour, "aa-curvature", "linear", curvature=C(scheme=scheme), progress=False)
    assert len(seen) == {"segments": 3, "exact": 10}[scheme]
    assert all(not torch.equal(b["1.running_mean"], torch.zeros(8)) for b in seen)  # never the initial statistics
    if scheme == "segments":  # centred segments frozen at the stage's start, its inner checkpoint and its end
        recorded = [run.checkpoint(1), run.inner_checkpoint(2, 5)[0], run.checkpoint(2)]
        for b, state in zip(seen, recorded):
            assert torch.equal(b["1.running_mean"], state["1.running_mean"])
            assert torch.equal(b["1.running_var"], state["1.running_var"])


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_products_without_a_batching_rule_fall_back_to_one_row_at_a_time(curvature, monkeypatch):
    model, batch = _tiny()
    params = dict(model.named_parameters())
    flat = FlatParams.of(params, list(params))
    V = torch.randn(3, sum(flat.sizes), dtype=torch.float64)
    batched = curvature_product(model, ce_loss, batch, params, flat, curvature)(V)
    real_grad = torch.autograd.grad
    refused = []

    def no_batching_rule(*args, is_grads_batched=False, **kwargs):
        if is_grads_batched:
            refused.append(1)
            raise RuntimeError("Batching rule not implemented")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching_rule)
    torch.testing.assert_close(curvature_product(model, ce_loss, batch, params, flat, curvature)(V), batched)
    assert refused  # the batched pull was tried and the rows were pulled one at a time


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_parameters_the_loss_does_not_curve_get_zero_rows(curvature):
    # "unused" enters the loss not at all: no curvature through it
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    model.unused = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)

    def squared(m, batch):
        return (m(batch[0]) - batch[1]).square().squeeze(1)

    params = dict(model.named_parameters())
    flat = FlatParams.of(params, list(params))
    p0 = flat.flatten({n: p.detach() for n, p in params.items()})
    V = torch.randn(2, p0.numel(), dtype=torch.float64)
    product = curvature_product(model, squared, (X, y), params, flat, curvature)(V)
    outputs = lambda v: torch.func.functional_call(model, flat.unflatten(v), (X,)).squeeze(1)  # noqa: E731
    if curvature == "hessian":
        C = torch.autograd.functional.hessian(lambda v: (outputs(v) - y.squeeze(1)).square().mean(), p0)
    else:
        J = torch.autograd.functional.jacobian(outputs, p0)  # [6, n]; the loss's Hessian in the outputs is 2/6
        C = J.T @ J * (2 / len(X))
    torch.testing.assert_close(product, V @ C.T, rtol=1e-8, atol=1e-10)
    assert flat.unflatten(product)["unused"].abs().max() == 0


def test_a_loss_linear_in_the_outputs_has_a_hessian_but_no_gauss_newton_part():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    X = torch.randn(6, 3, dtype=torch.float64)

    def mean_output(m, batch):  # linear in the output, as a model's own loss read off as model(...).loss is
        return m(batch[0]).squeeze(1)

    params = dict(model.named_parameters())
    flat = FlatParams.of(params, list(params))
    p0 = flat.flatten({n: p.detach() for n, p in params.items()})
    V = torch.randn(2, p0.numel(), dtype=torch.float64)
    product = curvature_product(model, mean_output, (X,), params, flat, "hessian")(V)
    f = lambda v: torch.func.functional_call(model, flat.unflatten(v), (X,)).mean()  # noqa: E731
    torch.testing.assert_close(product, V @ torch.autograd.functional.hessian(f, p0).T, rtol=1e-8, atol=1e-10)
    with pytest.raises(GGNUnavailableError, match="linear in the model's outputs.*curvature='hessian'"):
        curvature_product(model, mean_output, (X,), params, flat, "ggn")


class _Nested(torch.nn.Module):
    """Returns its logits inside a dict, beside a hidden state the loss ignores, a constant and an integer tensor."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        hidden = self.net[1](self.net[0](x))
        logits = self.net[2](hidden)
        return {"aux": (logits.detach().sum(), torch.arange(3)), "hidden": hidden, "logits": logits}


def test_ggn_reads_the_logits_out_of_a_nested_model_output():
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double()
    X, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 4, (7,))
    plain = lambda m, batch: F.cross_entropy(m(batch[0]), batch[1], reduction="none")  # noqa: E731
    nested = lambda m, batch: F.cross_entropy(m(batch[0])["logits"], batch[1], reduction="none")  # noqa: E731
    params = dict(net.named_parameters())
    flat = FlatParams.of(params, list(params))
    V = torch.randn(3, sum(flat.sizes), dtype=torch.float64)
    wrapped = _Nested(net)
    wrapped_params = {f"net.{n}": p for n, p in params.items()}
    expected = curvature_product(net, plain, (X, y), params, flat, "ggn")(V)
    got = curvature_product(wrapped, nested, (X, y), wrapped_params, FlatParams.of(wrapped_params, list(wrapped_params)),
                            "ggn")(V)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert expected.abs().max() > 1e-3


class _Attention(torch.nn.Module):
    """One self-attention layer through ``F.scaled_dot_product_attention``, whose fused CPU kernel has no
    second (nor forward-mode) derivative."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(4, 12)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        return self.head(torch.nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1).mean(1))


def test_products_and_linear_scores_differentiate_through_fused_attention():
    torch.manual_seed(5)
    model = _Attention()  # float32: the fused kernel is what runs by default here
    X, y = torch.randn(6, 5, 4), torch.randint(0, 3, (6,))
    params = dict(model.named_parameters())
    flat = FlatParams.of(params, list(params))
    p0 = flat.flatten({n: p.detach() for n, p in params.items()})
    V = torch.randn(2, p0.numel())
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        H = torch.autograd.functional.hessian(_flat_loss(model, flat, (X, y)), p0)
    product = curvature_product(model, ce_loss, (X, y), params, flat, "hessian")
    torch.testing.assert_close(product(V), V @ H.T, rtol=1e-4, atol=1e-5)
    assert curvature_product(model, ce_loss, (X, y), params, flat, "ggn")(V).abs().sum() > 0

    from stagecredit.behaviours.evaluate import behaviour_at, behaviour_jvp

    behaviour = lambda m: torch.nn.functional.cross_entropy(m(X), y, reduction="none")  # noqa: E731
    tangent = flat.unflatten(V[0])
    _, derivative = behaviour_jvp(model, behaviour, {n: p.detach() for n, p in params.items()}, tangent)
    eps = 1e-3
    shifted = lambda sign: behaviour_at(model, behaviour, flat.unflatten(p0 + sign * eps * V[0]))  # noqa: E731
    torch.testing.assert_close(derivative, (shifted(1) - shifted(-1)) / (2 * eps), rtol=2e-2, atol=2e-3)


def test_ggn_refuses_a_loss_that_calls_the_model_twice():
    model, batch = _tiny()
    params = dict(model.named_parameters())
    flat = FlatParams.of(params, list(params))
    twice = lambda m, b: ce_loss(m, b) + 0 * m(b[0]).sum()  # noqa: E731
    vectors = torch.randn(2, sum(flat.sizes), dtype=torch.float64)
    with pytest.raises(GGNUnavailableError, match="exactly once"):
        curvature_product(model, twice, batch, params, flat, "ggn")(vectors)
    # the default curvature's fallback: the Hessian of the same loss, with a warning that says why
    with pytest.warns(sc.GGNFallbackWarning, match="exactly once"):
        fell_back = curvature_product(model, twice, batch, params, flat, "ggn", fallback="hessian")
    torch.testing.assert_close(fell_back(vectors), curvature_product(model, twice, batch, params, flat, "hessian")(vectors))
    # a stage's choice falls back on its first product and keeps the Hessian: no second GGN attempt, no second warning
    choice = CurvatureChoice("ggn", fallback="hessian")
    with pytest.warns(sc.GGNFallbackWarning):
        choice.product(model, twice, batch, params, flat)
    assert (choice.curvature, choice.fallback) == ("hessian", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = choice.product(model, twice, batch, params, flat)
    assert again.curvature == "hessian"
    torch.testing.assert_close(again(vectors), fell_back(vectors))


# --- Lanczos ------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, database=None)
@given(n=st.integers(4, 20), seed=st.integers(0, 10_000), scale=st.floats(0.01, 2.0))
def test_lanczos_function_apply_matches_eigendecomposition(n, seed, scale):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = M @ M.T / n
    V = torch.randn(3, n, generator=g, dtype=torch.float64)
    evals, U = torch.linalg.eigh(A)
    f = lambda x: torch.exp(-scale * x) * torch.cos(x)  # noqa: E731
    exact = V @ (U @ torch.diag(f(evals)) @ U.T).T
    approx = krylov_function_apply(*lanczos(lambda X: X @ A, V, n), f)  # full Krylov space: exact
    torch.testing.assert_close(approx, exact, rtol=1e-7, atol=1e-9)


def test_lanczos_is_exact_at_the_operator_rank_and_handles_zero_vectors():
    g = torch.Generator().manual_seed(0)
    L = torch.randn(12, 2, generator=g, dtype=torch.float64)
    A = L @ L.T
    V = torch.randn(2, 12, generator=g, dtype=torch.float64)
    V[1] = 0
    evals, U = torch.linalg.eigh(A)
    f = lambda x: 1 / (1 + x)  # noqa: E731
    exact = V @ (U @ torch.diag(f(evals)) @ U.T).T
    approx = krylov_function_apply(*lanczos(lambda X: X @ A, V, 6), f)
    torch.testing.assert_close(approx, exact, rtol=1e-9, atol=1e-10)


def test_lanczos_in_float32_agrees_with_float64():
    """Segments build their Krylov basis in the model's precision; a float32 basis loses only float32 digits."""
    g = torch.Generator().manual_seed(1)
    n = 3000
    U, _ = torch.linalg.qr(torch.randn(n, 40, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(-3, 3, 40, dtype=torch.float64)  # six decades, as Adam's scaling produces
    A = (U * spectrum) @ U.T
    V = torch.randn(4, n, generator=g, dtype=torch.float64)
    f = lambda x: torch.exp(-0.01 * x)  # noqa: E731
    wide = krylov_function_apply(*lanczos(lambda X: X @ A, V, 5), f)  # a truncated space, as in segments
    narrow = krylov_function_apply(*lanczos(lambda X: X @ A.float(), V.float(), 5), f)
    assert narrow.dtype == torch.float32
    assert float((narrow.double() - wide).norm() / wide.norm()) < 1e-5

# --- exactness against retraining ---------------------------------------------------------------

@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_exact_replay_equals_retraining_on_a_quadratic_model(tmp_path, curvature):
    run, behaviour = _quadratic_run(tmp_path)
    truth = sc.retrain_effects(run, behaviour, progress=False)
    est = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=C.exact(curvature), progress=False)
    assert np.abs(truth.effects).max() > 0.1
    np.testing.assert_allclose(est.effects, truth.effects, atol=5e-5, rtol=1e-4)
    # without the curvature the same run is visibly wrong, so the equality above is informative
    aa = sc.attribute(run, behaviour, "aa", "model")
    assert np.abs(aa.effects - truth.effects).max() > 1e-2


def _adam_quadratic_run(tmp_path, optimizer):
    """SGD, then an Adam stage, on linear regression: removing the first stage changes the Adam stage's gradients
    far beyond the recorded ones."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 6, generator=g), torch.randn(64, 2, generator=g)
    mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(1)  # noqa: E731
    stages = [
        sc.Stage("a", (X, Y), mse, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), steps=20, batch_size=16,
                 seed=1),
        sc.Stage("b", (X, Y), mse, optimizer, steps=16, batch_size=16, seed=2,
                 scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=16)),
    ]
    run = sc.Pipeline(lambda: torch.nn.Linear(6, 2), stages, checkpoint_every=4).run(tmp_path / "q", progress=False)
    return run, sc.PerExampleLoss((X[:20], Y[:20]), mse)


@pytest.mark.parametrize("optimizer", [
    lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1),
    lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.05),
    lambda p: torch.optim.AdamW(list(p)[:1], lr=0.02, weight_decay=0.1),  # the weight alone
])
def test_exact_replay_through_adam_equals_retraining_on_a_quadratic_model(tmp_path, optimizer):
    """Adam's own map is tracked, not linearised: with a quadratic loss the replay is exact through Adam too."""
    run, behaviour = _adam_quadratic_run(tmp_path, optimizer)
    truth = sc.retrain_effects(run, behaviour, progress=False)
    est = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=C.exact("hessian"), progress=False)
    assert np.abs(truth.effects[0]).max() > 0.1
    np.testing.assert_allclose(est.effects, truth.effects, atol=5e-5, rtol=1e-4)


def _cubic_run(tmp_path, later=lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.8, weight_decay=0.01)):
    """A linear model whose loss is a cubic polynomial in the parameters: its gradient is exactly quadratic."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 6, generator=g), torch.randn(64, 2, generator=g)
    cubic = lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(1) + 0.05 * ((m(b[0]) - b[1]) ** 3).sum(1)  # noqa: E731
    stages = [
        sc.Stage("a", (X, Y), cubic, lambda p: torch.optim.SGD(p, lr=0.03, momentum=0.5), steps=12, batch_size=16,
                 seed=1),
        sc.Stage("b", (X, Y), cubic, later, steps=10, batch_size=16, seed=2,
                 scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10)),
        sc.Stage("c", (X, Y), cubic, later, steps=8, batch_size=16, seed=3),
    ]
    run = sc.Pipeline(lambda: torch.nn.Linear(6, 2), stages, checkpoint_every=1).run(tmp_path / "c", progress=False)
    return run, sc.PerExampleLoss((X[:20], Y[:20]), cubic)


@pytest.mark.parametrize("later", [
    lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.8, weight_decay=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
], ids=["sgd", "adamw"])
def test_the_midpoint_secant_replay_equals_retraining_when_the_gradient_is_quadratic(tmp_path, later):
    """With a cubic loss, g(θ + δθ) − g(θ) = H(θ + δθ/2) δθ exactly: the replay with secant=0.5 is retraining."""
    run, behaviour = _cubic_run(tmp_path, later)
    truth = sc.retrain_effects(run, behaviour, progress=False)
    est = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=C(scheme="exact", curvature="hessian",
                                                                            secant=0.5), progress=False)
    np.testing.assert_allclose(est.effects, truth.effects, atol=5e-5, rtol=1e-4)
    # at the recorded parameters (secant 0) the same replay is visibly off, so the equality above is informative
    tangent = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=C.exact("hessian"), progress=False)
    assert np.abs(tangent.effects - truth.effects).max() > 100 * np.abs(est.effects - truth.effects).max()


def test_one_step_segments_with_the_midpoint_secant_are_the_secant_replay(tmp_path):
    run, behaviour = _cubic_run(tmp_path)
    truth = sc.retrain_effects(run, behaviour, progress=False)
    options = C.segments(curvature="hessian", segment_steps=1, curvature_examples=1, krylov_dim=14, centred=False,
                         secant=0.5)
    est = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=options, progress=False)
    np.testing.assert_allclose(est.effects, truth.effects, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("centred", [False, True])
def test_segments_converge_to_the_exact_replay(tmp_path, centred):
    run, behaviour = _quadratic_run(tmp_path)
    exact = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=C.exact("hessian"), progress=False)
    errors = []
    for length in (16, 4, 1):
        options = C.segments(curvature="hessian", segment_steps=length, curvature_examples=1, krylov_dim=14,
                             centred=centred)
        seg = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=options, progress=False)
        errors.append(np.abs(seg.effects - exact.effects).max())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 5e-5  # one step per segment, that step's own batch, full Krylov space: the exact replay


@pytest.mark.parametrize("centred", [False, True])
def test_segments_with_a_constant_hessian_are_exact_at_any_length(tmp_path, centred):
    run, behaviour = _quadratic_run(tmp_path, batch_size=64)  # full batch: one Hessian for every step
    truth = sc.retrain_effects(run, behaviour, progress=False)
    options = C.segments(curvature="hessian", segment_steps=16, curvature_examples=1, krylov_dim=14, centred=centred)
    est = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=options, progress=False)
    np.testing.assert_allclose(est.effects, truth.effects, atol=5e-5, rtol=1e-4)


ONLY_SOME = {
    "the weight alone": lambda params: params[:1],
    "the bias in a group with lr 0": lambda params: [{"params": params[1:], "lr": 0.0}, {"params": params[:1]}],
}


@pytest.mark.parametrize("trained", sorted(ONLY_SOME))
@pytest.mark.parametrize("scheme", ["exact", "segments"])
def test_a_stage_that_trains_some_parameters_is_exact_on_a_quadratic_model(tmp_path, trained, scheme):
    """Stage b leaves the bias alone, yet stage a's change to the bias moves b's weight through the curvature."""
    run, behaviour = _quadratic_run(tmp_path, batch_size=64, b_params=ONLY_SOME[trained])
    truth = sc.retrain_effects(run, behaviour, progress=False)
    options = C.exact("hessian") if scheme == "exact" else C.segments(
        curvature="hessian", segment_steps=16, curvature_examples=1, krylov_dim=14)
    est = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=options, progress=False)
    assert np.abs(truth.effects).max() > 0.1
    np.testing.assert_allclose(est.effects, truth.effects, atol=5e-5, rtol=1e-4)


def test_segments_keep_no_inner_checkpoint_in_memory(tmp_path):
    """Memory must not grow with a stage's length: inner checkpoints are read, used and dropped."""
    run, behaviour = _quadratic_run(tmp_path)  # a checkpoint entering every step
    sc.attribute(run, behaviour, "aa-curvature", "linear", progress=False)
    inner = {entry[key]["path"] for stage in run.manifest["stages"] for entry in stage["inner_checkpoints"]
             for key in ("checkpoint", "optimizer_state")}
    cached = {key[1] for key in run._cache if key[0] == "file"}
    assert len(inner) > 40 and cached and not inner & cached


def test_adam_segments_use_the_largest_recorded_second_moment(tmp_path):
    from stagecredit.estimators.curvature_propagation import _stage_preconditioner

    X, y = toy_data()
    stages = [sc.Stage("s1", (X, y), ce_loss, lambda p: torch.optim.SGD(p, lr=0.1), steps=5, batch_size=16, seed=1),
              sc.Stage("s2", (X, y), ce_loss, lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.9)), steps=12,
                       batch_size=16, seed=2)]
    run = sc.Pipeline(make_mlp, stages, checkpoint_every=4).run(tmp_path / "r", progress=False)
    hp = run.steps(2)[0]["groups"][0]
    states = [run.inner_checkpoint(2, s)[1] for s in run.inner_checkpoint_steps(2)] + [run.optimizer_state(2)]
    assert len(states) == 3
    for name, precond in _stage_preconditioner(run, 2, hp).items():
        v_hat = torch.stack([st[f"{name}/exp_avg_sq"].double() / (1 - 0.9 ** float(st[f"{name}/step"]))
                             for st in states])
        torch.testing.assert_close(precond, 1 / (v_hat.max(dim=0).values.sqrt() + hp["eps"]))


@pytest.mark.parametrize("optimizer", [
    lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1),
    lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.05),
], ids=["adamw", "adam-coupled-decay"])
def test_adam_segments_normalise_by_the_counterfactual_second_moment(tmp_path, optimizer):
    """The replay, which tracks each tangent's Adam moments, is retraining here; segments that take the perturbed
    run's second moment from each tangent get much closer to it than segments with the recorded one."""
    run, behaviour = _adam_quadratic_run(tmp_path, optimizer)
    truth = sc.retrain_effects(run, behaviour, progress=False).effects[0]

    def error(**settings):
        est = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=C(curvature="hessian", **settings),
                           progress=False).effects[0]
        return np.abs(est - truth).max()

    assert np.abs(truth).max() > 1.0
    assert error(scheme="exact") < 5e-5
    counterfactual, recorded = error(), error(counterfactual_adam=False)
    assert counterfactual < 0.6 * recorded


def test_for_a_small_perturbation_the_counterfactual_second_moment_is_the_recorded_one(tmp_path):
    from stagecredit.estimators.curvature_propagation import propagate_with_curvature
    from stagecredit.estimators.embedding import initial_perturbation

    run, _ = _adam_quadratic_run(tmp_path, lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1))
    theta, state = initial_perturbation(run, 1)
    out = {}
    for size in (1.0, 1e-5):
        entering = {1: [({n: size * v for n, v in theta.items()}, {n: size * v for n, v in state.items()})]}
        for counterfactual in (True, False):
            final = propagate_with_curvature(run, entering, C(counterfactual_adam=counterfactual), progress=False)
            out[size, counterfactual] = torch.cat([v.reshape(-1).double() for v in final[1][0].values()]) / size

    def gap(size):
        return float((out[size, True] - out[size, False]).norm() / out[size, False].norm())

    assert gap(1.0) > 0.05  # the whole stage's removal: Adam's normalisation matters
    assert gap(1e-5) < 1e-6  # first order: the factor is 1 − O(δg²)


def test_the_counterfactual_adam_factor_is_the_ratio_of_the_two_runs_normalisers():
    from stagecredit.estimators.curvature_propagation import _counterfactual_adam_scale

    g = torch.Generator().manual_seed(3)
    flat = FlatParams(("w", "b"), (torch.Size([2, 3]), torch.Size([2])))
    eps = 1e-3
    v_hat = torch.rand(2, 3, generator=g, dtype=torch.float64)  # "b": Adam never stepped it
    extra = torch.rand(4, 8, generator=g, dtype=torch.float64) * 3
    moving = torch.tensor([True] * 5 + [False] + [True] * 2)
    factor = _counterfactual_adam_scale(extra, moving, {"w": 1 / (v_hat.sqrt() + eps)}, eps, flat)
    v = v_hat.reshape(-1)[:5]
    torch.testing.assert_close(factor[:, :5] ** 2, (v.sqrt() + eps) / ((v + extra[:, :5]).sqrt() + eps))
    assert bool((factor[:, 5:] == 1).all())  # not moving, or never stepped by Adam
    assert bool((_counterfactual_adam_scale(0 * extra, moving, {"w": 1 / (v_hat.sqrt() + eps)}, eps, flat) == 1).all())


def test_segment_bounds_start_at_or_centre_on_the_recorded_points():
    from types import SimpleNamespace

    from stagecredit.estimators.curvature_propagation import _segment_bounds

    def run_with(steps, inner):
        return SimpleNamespace(stage_records=[None, SimpleNamespace(steps=steps)],
                               inner_checkpoint_steps=lambda j: inner)

    long, short, bare = run_with(150, [50, 100]), run_with(80, [50]), run_with(30, [])
    assert _segment_bounds(long, 2, C(centred=False)) == [(0, 50, 0), (50, 100, 50), (100, 150, 100)]
    # centred: cut halfway between recorded points, each segment frozen at the point in its middle (150: the end)
    assert _segment_bounds(long, 2, C(centred=True)) == [(0, 25, 0), (25, 75, 50), (75, 125, 100), (125, 150, 150)]
    assert _segment_bounds(short, 2, C(centred=True)) == [(0, 25, 0), (25, 75, 50), (75, 80, 80)]
    assert _segment_bounds(bare, 2, C(centred=True)) == [(0, 15, 0), (15, 30, 30)]
    assert _segment_bounds(long, 2, C(centred=True, segment_steps=100)) == [(0, 50, 0), (50, 150, 100)]
    # a stage with more recorded intervals than max_segments: segments span whole multiples of the interval, each
    # still frozen at the recorded checkpoint in its middle; an explicit segment_steps is taken as it is
    dense = run_with(1000, list(range(50, 1000, 50)))
    every = [(a, a + 50, a) for a in range(0, 1000, 50)]
    assert _segment_bounds(dense, 2, C(centred=False, max_segments=None)) == every
    doubled = [(a, a + 100, a) for a in range(0, 1000, 100)]
    assert _segment_bounds(dense, 2, C(centred=False, max_segments=10)) == doubled
    assert _segment_bounds(dense, 2, C(centred=True, max_segments=4)) == [(0, 125, 50), (125, 375, 250),
                                                                          (375, 625, 500), (625, 875, 750),
                                                                          (875, 1000, 950)]
    assert len(_segment_bounds(dense, 2, C(max_segments=10))) == 11  # centred: the first and last are half segments
    explicit = _segment_bounds(dense, 2, C(max_segments=1, segment_steps=50))
    assert explicit == _segment_bounds(dense, 2, C(max_segments=None))


@pytest.mark.parametrize("options", [C(), C(secant=0.5), C.exact()], ids=["segments", "secant", "exact"])
def test_fewer_tangents_per_pass_give_the_same_estimates(toy_run, toy_behaviour, options):
    """max_tangents splits the perturbations into passes over the later stages; each travels alone, so the
    estimates are the single pass's (to float32 rounding of batched kernels)."""
    import dataclasses

    together = sc.attribute(toy_run, toy_behaviour, "aa-curvature", "linear", curvature=options, progress=False)
    alone = sc.attribute(toy_run, toy_behaviour, "aa-curvature", "linear",
                         curvature=dataclasses.replace(options, max_tangents=1), progress=False)
    np.testing.assert_allclose(alone.effects, together.effects, rtol=1e-4, atol=1e-6)
    assert not np.allclose(together.effects[0], 0)


@pytest.mark.parametrize("name", sorted(SGD_ADAMW_SCHEDULES))
@pytest.mark.parametrize("scheme", ["exact", "segments", "segments-start"])
@pytest.mark.filterwarnings("ignore::stagecredit.GGNFallbackWarning")  # 0·output is linear in it: no GGN
def test_aa_curvature_equals_retraining_when_later_losses_are_zero(tmp_path, toy_behaviour, name, scheme):
    first, later = SGD_ADAMW_SCHEDULES[name]
    X, y = toy_data()
    stages = [sc.Stage("s1", (X, y), ce_loss, first, steps=20, batch_size=16, seed=1)]
    for i, (opt, sched) in enumerate(later, start=2):
        stages.append(sc.Stage(f"s{i}", (X, y), zero_loss, opt, steps=17, batch_size=16, seed=i, scheduler=sched))
    run = sc.Pipeline(make_mlp, stages, checkpoint_every=5).run(tmp_path / "r", progress=False)
    truth = sc.retrain_effects(run, toy_behaviour, progress=False)
    options = C(scheme="segments", centred=False) if scheme == "segments-start" else C(scheme=scheme)
    est = sc.attribute(run, toy_behaviour, "aa-curvature", "model", curvature=options, progress=False)
    np.testing.assert_allclose(est.effects, truth.effects, atol=2e-5, rtol=1e-4)


def _own_loss_run(tmp_path):
    """A later stage whose loss is computed inside the model: linear in the model's output, so no GGN."""

    class OwnLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_mlp()

        def forward(self, x, y):
            return {"loss": F.cross_entropy(self.net(x), y), "logits": self.net(x)}

    X, y = toy_data()
    own = lambda model, batch: model(*batch)["loss"]  # noqa: E731
    stages = [sc.Stage("s1", (X, y), own, lambda p: torch.optim.SGD(p, lr=0.1), steps=12, batch_size=16, seed=1),
              sc.Stage("s2", (X, y), own, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), steps=12,
                       batch_size=16, seed=2)]
    return sc.Pipeline(OwnLoss, stages, checkpoint_every=4).run(tmp_path / "r", progress=False)


@pytest.mark.parametrize("scheme", ["segments", "exact"])
def test_the_default_curvature_falls_back_to_the_hessian_where_the_loss_is_linear_in_the_outputs(tmp_path, scheme):
    run = _own_loss_run(tmp_path)
    X, y = toy_data(seed=5)

    def behaviour(model):
        return F.cross_entropy(model.net(X), y, reduction="none")

    hessian = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=C(scheme=scheme, curvature="hessian"),
                           progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        default = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=C(scheme=scheme), progress=False)
    fell_back = [w for w in caught if issubclass(w.category, sc.GGNFallbackWarning)]
    # segments take the GGN by default, the replay the Hessian: only segments fall back, and once for the stage (its
    # later segments take the Hessian without trying the GGN again)
    assert len(fell_back) == (1 if scheme == "segments" else 0)
    assert all("model(...).loss" in str(w.message) for w in fell_back)
    np.testing.assert_allclose(default.effects, hessian.effects, rtol=1e-10, atol=1e-12)
    with pytest.raises(sc.GGNUnavailableError, match="linear in the model's outputs"):
        sc.attribute(run, behaviour, "aa-curvature", "model", curvature=C(scheme=scheme, curvature="ggn"),
                     progress=False)


# --- errors and integration ---------------------------------------------------------------------

def test_segments_refuse_param_groups_that_differ_in_momentum(tmp_path, toy_behaviour):
    from stagecredit.estimators.optimizers import UnsupportedOptimizerError

    X, y = toy_data()

    def two_momenta(params):
        params = list(params)
        return torch.optim.SGD([{"params": params[:2], "momentum": 0.9}, {"params": params[2:], "momentum": 0.5}],
                               lr=0.1)

    stages = [sc.Stage("s1", (X, y), ce_loss, lambda p: torch.optim.SGD(p, lr=0.1), steps=6, batch_size=16, seed=1),
              sc.Stage("s2", (X, y), ce_loss, two_momenta, steps=6, batch_size=16, seed=2)]
    run = sc.Pipeline(make_mlp, stages).run(tmp_path / "r", progress=False)
    with pytest.raises(UnsupportedOptimizerError, match="param groups differ in 'momentum'.*scheme='exact'"):
        sc.attribute(run, toy_behaviour, "aa-curvature", "linear", progress=False)
    sc.attribute(run, toy_behaviour, "aa-curvature", "linear", curvature=C.exact(), progress=False)


class _RaiseEpsAt:
    """A scheduler that changes Adam's eps (which segments freeze) after step ``at``."""

    def __init__(self, optimizer, at: int) -> None:
        self.optimizer, self.at, self.count = optimizer, at, 0

    def step(self) -> None:
        self.count += 1
        if self.count == self.at:
            for group in self.optimizer.param_groups:
                group["eps"] = 1e-6


def test_segments_refuse_a_frozen_hyperparameter_that_changes_within_a_segment(tmp_path, toy_behaviour):
    from stagecredit.estimators.optimizers import UnsupportedOptimizerError

    X, y = toy_data()
    stages = [sc.Stage("s1", (X, y), ce_loss, lambda p: torch.optim.SGD(p, lr=0.1), steps=6, batch_size=16, seed=1),
              sc.Stage("s2", (X, y), ce_loss, lambda p: torch.optim.Adam(p, lr=1e-2), steps=6, batch_size=16, seed=2,
                       scheduler=lambda o: _RaiseEpsAt(o, 2))]
    run = sc.Pipeline(make_mlp, stages).run(tmp_path / "r", progress=False)
    with pytest.raises(UnsupportedOptimizerError, match="stage 's2': 'eps' changes within a segment.*scheme='exact'"):
        sc.attribute(run, toy_behaviour, "aa-curvature", "linear", progress=False)
    # segments that each hold one eps are fine
    sc.attribute(run, toy_behaviour, "aa-curvature", "linear", curvature=C(segment_steps=2, centred=False),
                 progress=False)


def test_aa_curvature_needs_the_pipeline(toy_run, toy_behaviour):
    loaded = sc.Run.load(toy_run.path)
    with pytest.raises(RuntimeError, match="pipeline=pipe") as info:
        sc.attribute(loaded, toy_behaviour, "aa-curvature", "linear", progress=False)
    assert "'delta' and 'aa' work without it" in str(info.value)


def test_exact_replay_detects_a_changed_pipeline(toy_run, toy_behaviour):
    from conftest import three_stage_pipeline

    changed = three_stage_pipeline()
    changed.stages[1].optimizer = lambda p: torch.optim.AdamW(p, lr=0.021, weight_decay=0.3)
    loaded = sc.Run.load(toy_run.path, pipeline=changed)
    with pytest.raises(RuntimeError, match="did not reproduce its recorded checkpoint"):
        sc.attribute(loaded, toy_behaviour, "aa-curvature", "linear", curvature=C.exact(), progress=False)


def test_auto_falls_back_to_segments_only_where_a_stage_does_not_replay(toy_run, toy_behaviour):
    from conftest import three_stage_pipeline

    assert C().scheme == "segments"
    changed = three_stage_pipeline()
    changed.stages[1].optimizer = lambda p: torch.optim.AdamW(p, lr=0.021, weight_decay=0.3)
    loaded = sc.Run.load(toy_run.path, pipeline=changed)
    with pytest.warns(UserWarning, match="'finetune' did not reproduce.*uses segments") as caught:
        auto = sc.attribute(loaded, toy_behaviour, "aa-curvature", "linear", curvature=C(scheme="auto"),
                            progress=False)
    mismatched = [w for w in caught if "did not reproduce" in str(w.message)]
    assert len(mismatched) == 1
    assert mismatched[0].filename == __file__  # the warning names the caller's sc.attribute line, not internals
    assert np.all(np.isfinite(auto.effects))
    # finetune's perturbation only travels through adapt, which still replays: the reference result
    exact = sc.attribute(toy_run, toy_behaviour, "aa-curvature", "linear", curvature=C.exact(), progress=False)
    np.testing.assert_allclose(auto.effects[1:], exact.effects[1:], rtol=1e-6, atol=1e-8)


def test_auto_equals_segments_when_no_stage_replays(toy_run, toy_behaviour, monkeypatch):
    """The fallback starts from the tangents that entered the failed replay, not from what it left behind."""
    from stagecredit.estimators import curvature_propagation as cp

    def mismatch(run, k, model):
        raise cp.ReplayMismatchError(f"stage {k} forced to mismatch")

    monkeypatch.setattr(cp, "_check_replay", mismatch)
    loaded = sc.Run.load(toy_run.path, pipeline=toy_run.pipeline)
    with pytest.warns(UserWarning, match="forced to mismatch"):
        auto = sc.attribute(loaded, toy_behaviour, "aa-curvature", "linear", curvature=C(scheme="auto"),
                            progress=False)
    segments = sc.attribute(loaded, toy_behaviour, "aa-curvature", "linear", curvature=C(), progress=False)
    np.testing.assert_array_equal(auto.effects, segments.effects)


def test_adam_replay_replays_the_adam_stage_and_uses_segments_for_the_sgd_one(toy_run, toy_behaviour, monkeypatch):
    from stagecredit.estimators import curvature_propagation as cp

    used = []
    for name in ("_exact_stage", "_segments_stage"):
        original = getattr(cp, name)

        def spy(run, j, *args, _original=original, _name=name):
            used.append((_name, run.stages[j - 1]))
            return _original(run, j, *args)

        monkeypatch.setattr(cp, name, spy)
    mixed = sc.attribute(toy_run, toy_behaviour, "aa-curvature", "linear", curvature=C(scheme="adam-replay"),
                         progress=False)
    assert used == [("_exact_stage", "finetune"), ("_segments_stage", "adapt")]  # AdamW, then SGD
    # finetune's perturbation only crosses adapt, an SGD stage: exactly the segments' result
    segments = sc.attribute(toy_run, toy_behaviour, "aa-curvature", "linear", curvature=C(), progress=False)
    np.testing.assert_array_equal(mixed.effects[1:], segments.effects[1:])
    # pretrain's crosses the replayed AdamW stage: not the segments' result
    assert np.abs(mixed.effects[0] - segments.effects[0]).max() > 1e-6


def test_default_curvature_is_the_hessian_in_replays_and_the_ggn_elsewhere():
    assert C.exact().curvature_for("replay") == "hessian"
    assert C().curvature_for("segments") == "ggn" and C().curvature_for("source") == "ggn"
    assert C(curvature="hessian").curvature_for("segments") == "hessian"
    assert C.exact("ggn").curvature_for("replay") == "ggn"


def test_options_are_validated():
    for bad in ({"scheme": "magic"}, {"curvature": "fisher"}, {"segment_steps": 0}, {"max_segments": 0},
                {"max_tangents": 0}, {"krylov_dim": 0}, {"curvature_examples": 0}, {"secant": -0.1}, {"secant": 1.5}):
        with pytest.raises(ValueError):
            C(**bad)


def test_options_round_trip_through_their_json():
    for options in (C(), C.fast(), C.thorough(), C.exact("ggn"), C(scheme="auto", secant=0.5, segment_steps=7)):
        saved = json.loads(json.dumps(options.to_dict()))
        assert C.from_dict(saved) == options
        assert saved["resolved_curvature"] == {use: options.curvature_for(use) for use in ("replay", "segments", "source")}
    with pytest.raises(ValueError, match="unknown CurvatureOptions settings \\['krylov'\\]"):
        C.from_dict({"krylov": 3})


def test_validate_reports_aa_curvature_rows(toy_run, toy_behaviour):
    options = C(krylov_dim=4)
    report = sc.validate(toy_run, toy_behaviour, methods=["aa", "aa-curvature"], modes=["model"], curvature=options,
                         progress=False)
    # the JSON says how aa-curvature was set up, so the numbers can be reproduced; aa has no settings
    assert report.to_dict()["settings"] == {"aa-curvature": {"curvature_options": options.to_dict()}}
    assert report.to_markdown().count("aa-curvature settings: scheme=segments, curvature=default, "
                                      "segment_steps=the checkpoint interval, max_segments=16, krylov_dim=4, "
                                      "curvature_examples=512") == 1
    rows = {(r["stage"], r["method"]): r for r in report.rows}
    assert rows[("adapt", "aa-curvature")]["pearson"] == pytest.approx(1.0)
    assert np.isfinite(rows[("pretrain", "aa-curvature")]["pearson"])


def test_every_example_of_a_segment_is_taken_in_chunks_of_bounded_size(tmp_path, monkeypatch):
    """curvature_examples=None: memory holds one chunk's graph, and the chunks average to the whole sample."""
    import stagecredit.estimators.curvature_propagation as cp

    run, behaviour = _quadratic_run(tmp_path)  # batches of 16
    options = C.segments(curvature="hessian", segment_steps=16, curvature_examples=None, krylov_dim=14)
    monkeypatch.setattr(cp, "CHUNK_EXAMPLES", 10**6)
    whole = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=options, progress=False)
    sizes = []
    collate = cp.collate
    monkeypatch.setattr(cp, "collate", lambda data, indices: sizes.append(len(indices)) or collate(data, indices))
    monkeypatch.setattr(cp, "CHUNK_EXAMPLES", 48)
    chunked = sc.attribute(sc.Run.load(run.path, pipeline=run.pipeline), behaviour, "aa-curvature", "model",
                           curvature=options, progress=False)
    assert max(sizes) == 48 and len(sizes) > 20  # three minibatches per chunk, rebuilt at every product call
    np.testing.assert_allclose(chunked.effects, whole.effects, atol=1e-5, rtol=1e-4)


def test_segments_without_minibatch_indices_draw_their_examples_from_the_stage_data(tmp_path):
    """Full batches: the drawn sample is every example, so the estimate equals the one from the recorded batches."""
    run, behaviour = _quadratic_run(tmp_path, batch_size=64)
    looped = recorded_loop(run.pipeline, tmp_path / "loop", with_batches=False)
    assert not looped.has_batch_indices(2) and run.has_batch_indices(2)
    for options in (C.segments(curvature="hessian", segment_steps=4, curvature_examples=64, krylov_dim=14), C()):
        a, b = (sc.attribute(r, behaviour, "aa-curvature", "model", curvature=options, progress=False).effects
                for r in (run, looped))
        assert np.abs(a).max() > 0.1
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)


def test_without_minibatch_indices_the_replay_says_so_and_auto_uses_segments(tmp_path, toy_behaviour):
    pipe = three_stage_pipeline()
    pipe.checkpoint_every = 5
    piped = pipe.run(tmp_path / "pipeline", progress=False)
    looped = recorded_loop(pipe, tmp_path / "loop", with_batches=False)
    with pytest.raises(sc.RunFileError, match="aa-curvature's segments do not"):
        sc.attribute(looped, toy_behaviour, "aa-curvature", curvature=C.exact(), progress=False)
    with pytest.warns(UserWarning, match="without minibatch indices, so it cannot be replayed"):
        auto = sc.attribute(looped, toy_behaviour, "aa-curvature", curvature=C(scheme="auto"), progress=False)
    segments = sc.attribute(looped, toy_behaviour, "aa-curvature", progress=False)
    np.testing.assert_allclose(auto.effects, segments.effects, atol=1e-6)
    # the drawn examples stand in for the recorded minibatches (other examples: not equal, but alike)
    recorded = sc.attribute(piped, toy_behaviour, "aa-curvature", progress=False)
    aa = sc.attribute(piped, toy_behaviour, "aa")
    for k in range(2):
        assert np.corrcoef(segments.effects[k], recorded.effects[k])[0, 1] > 0.8
        assert np.abs(segments.effects[k] - aa.effects[k]).max() > 1e-3  # the curvature was kept
