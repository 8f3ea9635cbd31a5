"""Property tests of the H = 0 propagation against real torch optimizers.

With a LINEAR loss ``loss_s = c_s · θ`` the Hessian is exactly zero while the
gradients are not, so the difference of two real training runs started from
``θ0`` and ``θ0 + δ`` is exactly the tangent map that ``aa`` propagates (for
SGD and AdamW; Adam with coupled L2 is only approximately linear, see below).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stagecredit.estimators.optimizers import adam_preconditioner
from stagecredit.estimators.propagation import (
    ADAM,
    SGD,
    StageTransition,
    adam_tangent_step,
    propagate_through_stage,
    segment_maps,
    stage_transition,
)
from stagecredit.recording.optimizer_state import adam_step_count, group_hyperparameters

N = 5
SETTINGS = settings(max_examples=30, deadline=None, database=None)  # no .hypothesis/ folder in the repo
F64 = torch.float64


class _Vector(torch.nn.Module):
    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(theta.clone().to(F64))


class _StateOnly:
    """Just enough of a Run for ``adam_preconditioner``: the recorded end-of-stage optimizer state."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self._state = state

    def optimizer_state(self, k: int) -> dict[str, torch.Tensor]:
        return self._state


def _vectors(seed: int, count: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(N, generator=g, dtype=F64) for _ in range(count)]


def train_linear(make_opt, theta0, cs, lrs, init_state=None):
    """Real torch training on ``loss_s = (c_s * θ).sum()``; returns (final θ, step records, optimizer, module).

    Records are exactly what ``recording/training.py`` writes: the groups' hyper-parameters
    read before ``opt.step()`` and Adam's step counter read after it.
    """
    model = _Vector(theta0)
    opt = make_opt(model.parameters())
    if init_state is not None:
        opt.state[model.theta].update({k: v.clone() for k, v in init_state.items()})
    records = []
    for c, lr in zip(cs, lrs):
        opt.param_groups[0]["lr"] = lr
        hyper = group_hyperparameters(opt)
        opt.zero_grad(set_to_none=True)
        (c * model.theta).sum().backward()
        opt.step()
        record = {"groups": hyper}
        t = adam_step_count(opt)
        if t is not None:
            record["adam_step"] = t
        records.append(record)
    return model.theta.detach().clone(), records, opt, model


def _assert_propagation_exact(records, kind, d_theta, d_state, brute, *, fresh, precond=1.0):
    prop, _ = propagate_through_stage(d_theta, d_state, records, 0, kind, fresh=fresh, precond=precond)
    torch.testing.assert_close(prop, brute, rtol=1e-9, atol=1e-10)
    transition = stage_transition(records, 0, kind, fresh=fresh, precond=precond)
    via_map, _ = transition.apply(d_theta, d_state)
    torch.testing.assert_close(via_map, brute, rtol=1e-9, atol=1e-10)


# --- SGD -----------------------------------------------------------------------------------

sgd_settings = st.fixed_dictionaries(
    {
        "momentum": st.one_of(st.just(0.0), st.floats(0.0, 0.99)),
        "dampening": st.floats(0.0, 0.5),
        "nesterov": st.booleans(),
        "weight_decay": st.one_of(st.just(0.0), st.floats(0.0, 0.1)),
    }
)


def _sgd_factory(cfg):
    nesterov = cfg["nesterov"] and cfg["momentum"] > 0
    dampening = 0.0 if nesterov else cfg["dampening"]  # torch: Nesterov needs dampening = 0

    def make(params):
        return torch.optim.SGD(params, lr=0.1, momentum=cfg["momentum"], dampening=dampening,
                               nesterov=nesterov, weight_decay=cfg["weight_decay"])

    return make


@SETTINGS
@given(cfg=sgd_settings, lrs=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=12), seed=st.integers(0, 2**31 - 1))
def test_sgd_fresh_stage_matches_two_real_runs(cfg, lrs, seed):
    cs = _vectors(seed, len(lrs))
    theta0, delta, d_state = _vectors(seed + 1, 3)
    make = _sgd_factory(cfg)
    final_a, records, _, _ = train_linear(make, theta0, cs, lrs)
    final_b, records_b, _, _ = train_linear(make, theta0 + delta, cs, lrs)
    assert records == records_b  # the schedule does not depend on θ
    assert [r["groups"][0]["lr"] for r in records] == pytest.approx(lrs)
    # fresh=True: the incoming δs must be ignored (both runs start without a buffer)
    _assert_propagation_exact(records, SGD, delta, d_state, final_b - final_a, fresh=True)


@SETTINGS
@given(cfg=sgd_settings, lrs=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=12), seed=st.integers(0, 2**31 - 1))
def test_sgd_stage_with_carried_momentum_buffer_matches_two_real_runs(cfg, lrs, seed):
    cs = _vectors(seed, len(lrs))
    theta0, delta, buf0, d_buf = _vectors(seed + 1, 4)
    make = _sgd_factory(cfg)
    final_a, records, opt_a, model_a = train_linear(make, theta0, cs, lrs, {"momentum_buffer": buf0})
    final_b, _, opt_b, model_b = train_linear(make, theta0 + delta, cs, lrs, {"momentum_buffer": buf0 + d_buf})
    brute = final_b - final_a
    d_state = d_buf if cfg["momentum"] > 0 else torch.zeros(N, dtype=F64)
    _assert_propagation_exact(records, SGD, delta, d_state, brute, fresh=False)
    if cfg["momentum"] > 0 and sum(lrs) > 0:
        # the propagated buffer difference is the real one, too
        _, d_buf_out = propagate_through_stage(delta, d_state, records, 0, SGD, fresh=False)
        real = opt_b.state[model_b.theta]["momentum_buffer"] - opt_a.state[model_a.theta]["momentum_buffer"]
        torch.testing.assert_close(d_buf_out, real, rtol=1e-9, atol=1e-10)


def test_sgd_momentum_example_is_not_trivial():
    """A fixed example where the propagated δ differs visibly from δ itself (so equality is informative)."""
    cfg = {"momentum": 0.9, "dampening": 0.0, "nesterov": True, "weight_decay": 0.1}
    lrs = [0.5] * 10
    cs = _vectors(0, 10)
    theta0, delta, buf0, d_buf = _vectors(1, 4)
    make = _sgd_factory(cfg)
    a, records, _, _ = train_linear(make, theta0, cs, lrs, {"momentum_buffer": buf0})
    b, _, _, _ = train_linear(make, theta0 + delta, cs, lrs, {"momentum_buffer": buf0 + d_buf})
    assert ((b - a) - delta).abs().max() > 0.1
    _assert_propagation_exact(records, SGD, delta, d_buf, b - a, fresh=False)


# --- AdamW (decoupled decay): exact ---------------------------------------------------------

adam_settings = st.fixed_dictionaries(
    {
        "beta1": st.floats(0.0, 0.99),
        "beta2": st.floats(0.9, 0.9999),
        "weight_decay": st.one_of(st.just(0.0), st.floats(0.0, 0.5)),
    }
)


@SETTINGS
@given(cfg=adam_settings, lrs=st.lists(st.floats(0.0, 0.2), min_size=1, max_size=12), seed=st.integers(0, 2**31 - 1))
def test_adamw_fresh_stage_matches_two_real_runs(cfg, lrs, seed):
    cs = _vectors(seed, len(lrs))
    theta0, delta, d_state = _vectors(seed + 1, 3)

    def make(params):
        return torch.optim.AdamW(params, lr=0.1, betas=(cfg["beta1"], cfg["beta2"]), weight_decay=cfg["weight_decay"])

    final_a, records, _, _ = train_linear(make, theta0, cs, lrs)
    final_b, _, _, _ = train_linear(make, theta0 + delta, cs, lrs)
    assert [r["adam_step"] for r in records] == list(range(1, len(lrs) + 1))
    expected_scale = math.prod(1 - lr * cfg["weight_decay"] for lr in lrs)
    torch.testing.assert_close(final_b - final_a, expected_scale * delta, rtol=1e-9, atol=1e-10)
    _assert_propagation_exact(records, ADAM, delta, d_state, final_b - final_a, fresh=True)


@SETTINGS
@given(cfg=adam_settings, lrs=st.lists(st.floats(0.0, 0.2), min_size=1, max_size=12), seed=st.integers(0, 2**31 - 1))
def test_adamw_stage_with_carried_exp_avg_matches_two_real_runs(cfg, lrs, seed):
    """Carried state where ``exp_avg`` differs between the two runs.

    ``propagate_through_stage`` takes ONE preconditioner for the stage. To make the
    comparison exact, every |c_s| equals a fixed ``a`` (random signs), the carried
    ``exp_avg_sq`` is ``a²`` (so ``v`` stays ``a²``) and the carried step counter is so large
    that both bias corrections are 1 in float64: then the real ``1/(√v̂+ε)`` is the same at
    every step and equals ``adam_preconditioner`` of the final state.
    """
    g = torch.Generator().manual_seed(seed)
    a = 0.5 + torch.rand(N, generator=g, dtype=F64)
    cs = [a * torch.sign(torch.randn(N, generator=g, dtype=F64)) for _ in lrs]
    theta0, delta, m0, d_m = _vectors(seed + 1, 4)
    step0 = torch.tensor(1e6)
    state_a = {"step": step0, "exp_avg": m0, "exp_avg_sq": a**2}
    state_b = {"step": step0, "exp_avg": m0 + d_m, "exp_avg_sq": a**2}

    def make(params):
        return torch.optim.AdamW(params, lr=0.1, betas=(cfg["beta1"], cfg["beta2"]), weight_decay=cfg["weight_decay"])

    final_a, records, opt_a, model_a = train_linear(make, theta0, cs, lrs, state_a)
    final_b, _, opt_b, model_b = train_linear(make, theta0 + delta, cs, lrs, state_b)
    assert records[0]["adam_step"] == 1_000_001
    state = {f"theta/{k}": v for k, v in opt_a.state[model_a.theta].items()}
    precond = adam_preconditioner(_StateOnly(state), 1, "theta", records[-1]["groups"][0])
    torch.testing.assert_close(precond, 1 / (a + 1e-8), rtol=1e-12, atol=0)
    brute = final_b - final_a
    if cfg["beta1"] >= 0.1 and sum(lrs) >= 0.05:
        # the carried δexp_avg visibly moves θ beyond the decoupled decay (far above the 1e-10 tolerance below)
        assert (brute - math.prod(1 - lr * cfg["weight_decay"] for lr in lrs) * delta).abs().max() > 1e-6
    _assert_propagation_exact(records, ADAM, delta, d_m, brute, fresh=False, precond=precond)
    _, d_m_out = propagate_through_stage(delta, d_m, records, 0, ADAM, fresh=False, precond=precond)
    real = opt_b.state[model_b.theta]["exp_avg"] - opt_a.state[model_a.theta]["exp_avg"]
    torch.testing.assert_close(d_m_out, real, rtol=1e-9, atol=1e-10)


@SETTINGS
@given(cfg=adam_settings, lrs=st.lists(st.floats(0.0, 0.2), min_size=1, max_size=10), seed=st.integers(0, 2**31 - 1))
def test_adam_tangent_step_exact_with_per_step_preconditioner(cfg, lrs, seed):
    """Non-stationary ``v``: one tangent step at a time, each with the real ``1/(√v̂_s+ε)`` of that step."""
    cs = _vectors(seed, len(lrs))
    theta0, delta, m0, d_m = _vectors(seed + 1, 4)
    v0 = _vectors(seed + 2, 1)[0] ** 2
    betas = (cfg["beta1"], cfg["beta2"])

    def make(params):
        return torch.optim.AdamW(params, lr=0.1, betas=betas, weight_decay=cfg["weight_decay"])

    model_a, model_b = _Vector(theta0), _Vector(theta0 + delta)
    opt_a, opt_b = make(model_a.parameters()), make(model_b.parameters())
    opt_a.state[model_a.theta].update({"step": torch.tensor(3.0), "exp_avg": m0.clone(), "exp_avg_sq": v0.clone()})
    opt_b.state[model_b.theta].update({"step": torch.tensor(3.0), "exp_avg": (m0 + d_m).clone(), "exp_avg_sq": v0.clone()})
    d_theta, d_state = delta.clone(), d_m.clone()
    for c, lr in zip(cs, lrs):
        for opt, model in ((opt_a, model_a), (opt_b, model_b)):
            opt.param_groups[0]["lr"] = lr
            hp = group_hyperparameters(opt)[0]
            opt.zero_grad(set_to_none=True)
            (c * model.theta).sum().backward()
            opt.step()
        t = adam_step_count(opt_a)
        v_hat = opt_a.state[model_a.theta]["exp_avg_sq"] / (1 - betas[1] ** t)
        precond = 1 / (v_hat.sqrt() + hp["eps"])
        d_theta, d_state = adam_tangent_step(d_theta, d_state, hp, t=t, precond=precond)
        torch.testing.assert_close(d_theta, (model_b.theta - model_a.theta).detach(), rtol=1e-9, atol=1e-10)


# --- Adam with coupled L2: approximate --------------------------------------------------------

@SETTINGS
@given(
    lr=st.floats(0.03, 0.1),
    lam=st.floats(0.05, 0.1),
    beta1=st.floats(0.8, 0.95),
    beta2=st.floats(0.995, 0.9999),
    steps=st.integers(20, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_adam_coupled_l2_is_approximately_linear(lr, lam, beta1, beta2, steps, seed):
    """Adam with coupled L2 (``torch.optim.Adam(weight_decay=λ)``): approximate by design.

    The gradient is ``c_s + λθ``, so the second moment ``v`` depends on θ; the propagation
    neglects the first-order change of ``v`` and uses one preconditioner taken from the
    final ``exp_avg_sq`` (``adam_preconditioner``). Both are small in this regime:

    * ``|c_s| = a ∈ [1, 2]`` with random signs and ``λ|θ| ≲ 0.3 < a``, so ``v ≈ a²`` at every
      step and the final preconditioner represents the whole stage;
    * the stage continues a long-running optimizer (carried state, ``exp_avg_sq = a²``, large
      step counter): the neglected ``δv`` then only accumulates ``(1 − β2)·steps ≲ 20 %`` of the
      EMA and enters multiplied by ``m̂ ≈ 0`` (random signs). From a *fresh* optimizer the very
      first steps have ``m̂ = g`` and ``v̂ = g²`` (Adam's update is ``sign(g)``, insensitive to
      ``δg``), which is the case the linearisation gets wrong by ~10 % of the change.

    With ``δ ~ 1e-6`` (second-order terms negligible) the propagated change must match the
    brute-force change ``(θ_B − θ_A) − δ`` within 3 %.
    """
    g = torch.Generator().manual_seed(seed)
    a = 1 + torch.rand(N, generator=g, dtype=F64)
    cs = [a * torch.sign(torch.randn(N, generator=g, dtype=F64)) for _ in range(steps)]
    theta0 = torch.randn(N, generator=g, dtype=F64)
    delta = 1e-6 * torch.randn(N, generator=g, dtype=F64)
    state = {"step": torch.tensor(1e4), "exp_avg": torch.zeros(N, dtype=F64), "exp_avg_sq": a**2}

    def make(params):
        return torch.optim.Adam(params, lr=lr, betas=(beta1, beta2), weight_decay=lam)

    lrs = [lr] * steps
    final_a, records, opt_a, model_a = train_linear(make, theta0, cs, lrs, state)
    final_b, _, _, _ = train_linear(make, theta0 + delta, cs, lrs, state)
    assert records[0]["groups"][0]["decoupled_weight_decay"] is False
    recorded = {f"theta/{k}": v for k, v in opt_a.state[model_a.theta].items()}
    precond = adam_preconditioner(_StateOnly(recorded), 1, "theta", records[-1]["groups"][0])
    prop, _ = propagate_through_stage(delta, torch.zeros(N, dtype=F64), records, 0, ADAM, fresh=False, precond=precond)
    true_change = (final_b - final_a) - delta
    est_change = prop - delta
    # coupled decay shrinks δ visibly (≈ lr·λ·steps/a), so matching the change is informative
    assert true_change.norm() > 0.005 * delta.norm()
    assert (est_change - true_change).norm() <= 0.03 * true_change.norm()
    # and, the preconditioned decay being the only thing that acts, per coordinate it is a shrink
    assert torch.all(prop.abs() < delta.abs())


# --- StageTransition algebra -------------------------------------------------------------------

entry = st.floats(-3.0, 3.0, allow_nan=False)
transitions = st.builds(
    lambda tt, ts, s_t, ss: StageTransition(*(torch.tensor(x, dtype=F64) for x in (tt, ts, s_t, ss))),
    entry, entry, entry, entry,
)


def _close(x: StageTransition, y: StageTransition) -> None:
    for field in ("tt", "ts", "st", "ss"):
        torch.testing.assert_close(getattr(x, field), getattr(y, field), rtol=1e-12, atol=1e-12)


@SETTINGS
@given(a=transitions, b=transitions, c=transitions)
def test_then_is_associative(a, b, c):
    _close(a.then(b).then(c), a.then(b.then(c)))


@SETTINGS
@given(a=transitions, x=entry, y=entry)
def test_identity_is_neutral_and_then_applies_in_order(a, x, y):
    _close(StageTransition.identity().then(a), a)
    _close(a.then(StageTransition.identity()), a)
    b = StageTransition(*(torch.tensor(v, dtype=F64) for v in (0.5, -1.0, 2.0, 0.25)))
    dx, ds = torch.tensor(x, dtype=F64), torch.tensor(y, dtype=F64)
    composed = a.then(b).apply(dx, ds)
    stepwise = b.apply(*a.apply(dx, ds))
    torch.testing.assert_close(composed[0], stepwise[0])
    torch.testing.assert_close(composed[1], stepwise[1])


@SETTINGS
@given(
    kind=st.sampled_from([SGD, ADAM]),
    cfg_sgd=sgd_settings,
    cfg_adam=adam_settings,
    lrs=st.lists(st.floats(0.0, 0.5), min_size=2, max_size=10),
    split=st.integers(1, 9),
    fresh=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_composed_transitions_equal_step_by_step_propagation(kind, cfg_sgd, cfg_adam, lrs, split, fresh, seed):
    """Splitting a stage's steps anywhere and composing the two maps (the later one not fresh:
    its state is carried) equals propagating step by step, and equals one map per step."""
    split = min(split, len(lrs) - 1)
    cs = _vectors(seed, len(lrs))
    theta0, d_theta, d_state = _vectors(seed + 1, 3)
    if kind == SGD:
        make = _sgd_factory(cfg_sgd)
        precond = 1.0
    else:
        c = cfg_adam

        def make(params):
            return torch.optim.Adam(params, lr=0.1, betas=(c["beta1"], c["beta2"]), weight_decay=c["weight_decay"])

        precond = 0.5 + torch.rand(N, generator=torch.Generator().manual_seed(seed), dtype=F64)
    _, records, _, _ = train_linear(make, theta0, cs, [lr * (0.2 if kind == ADAM else 1.0) for lr in lrs])
    whole = stage_transition(records, 0, kind, fresh=fresh, precond=precond)
    first = stage_transition(records[:split], 0, kind, fresh=fresh, precond=precond)
    second = stage_transition(records[split:], 0, kind, fresh=False, precond=precond)
    per_step = StageTransition.identity()
    for i, record in enumerate(records):
        per_step = per_step.then(stage_transition([record], 0, kind, fresh=fresh and i == 0, precond=precond))
    expected = propagate_through_stage(d_theta, d_state, records, 0, kind, fresh=fresh, precond=precond)
    for candidate in (whole, first.then(second), per_step):
        got = candidate.apply(d_theta, d_state)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-12)


@SETTINGS
@given(
    kind=st.sampled_from([SGD, ADAM, "adamw"]),
    cfg_sgd=sgd_settings,
    cfg_adam=adam_settings,
    lrs=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=13),
    fresh=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_segment_maps_equal_stepping_with_curvature(kind, cfg_sgd, cfg_adam, lrs, fresh, seed):
    """The segments' composed 3×3 maps (pairwise products over steps) equal stepping every step in turn with
    ``δg = λ δθ + c_s (r δθ + f)``, for each eigenvalue r, clip factor c_s and column (δθ, δs, forcing)."""
    if kind == SGD:
        make, scale = _sgd_factory(cfg_sgd), 1.0
    else:
        c = cfg_adam
        optimizer = torch.optim.Adam if kind == ADAM else torch.optim.AdamW

        def make(params):
            return optimizer(params, lr=0.1, betas=(c["beta1"], c["beta2"]), weight_decay=c["weight_decay"])

        scale = 0.2
    _, records, _, _ = train_linear(make, torch.zeros(N, dtype=F64), _vectors(seed, len(lrs)),
                                    [lr * scale for lr in lrs])
    g = torch.Generator().manual_seed(seed)
    ritz = torch.rand(4, 2, generator=g, dtype=F64) * 3
    clip = (0.5 + torch.rand(len(lrs), generator=g, dtype=F64)).tolist()
    step_kind = SGD if kind == SGD else ADAM
    maps = segment_maps(ritz, records, 0, step_kind, fresh=fresh, curvature_scale=clip)
    assert maps.shape == (4, 2, 3, 3)
    one, zero = torch.ones_like(ritz), torch.zeros_like(ritz)
    for column, (theta, state, forcing) in enumerate([(one, zero, zero), (zero, one, zero), (zero, zero, one)]):
        expected = propagate_through_stage(theta, state, records, 0, step_kind, fresh=fresh,
                                           hvp_at=lambda i, f=forcing: (lambda x: clip[i] * (ritz * x + f)))
        torch.testing.assert_close(maps[..., 0, column], expected[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(maps[..., 1, column], expected[1], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(maps[..., 2, column], forcing)
