"""``aa-curvature``: carry every stage's perturbation through the later stages with their curvature.

Each later step is linearised with its minibatch curvature ``C_s`` (Hessian or
Gauss–Newton) kept (DESIGN §3, estimator 3). All K perturbations travel
together through one pass over the later stages (a batch of tangents).

The fidelity/cost knob (:class:`CurvatureOptions`) chooses between two schemes
(``"auto"`` uses the replay and falls back to segments for a stage that does
not replay bit-identically; ``"adam-replay"`` replays Adam stages and uses
segments for SGD ones):

* ``"exact"`` — the reference: replay each later stage from its recorded start
  (bit-identical to the recorded run) and apply every step's linearised update
  with ``C_s`` at that step's parameters on that step's minibatch, and Adam's
  preconditioner from that step's second moment. Costs about one training
  pass over the later stages plus one curvature product per tangent per step.
* ``"segments"`` (default) — cut each stage into segments centred on its recorded
  checkpoints; within a segment freeze the curvature ``C̄`` at the checkpoint in
  its middle, averaged over a few hundred examples from the segment's recorded
  minibatches, and Adam's preconditioner. The segment's steps are then polynomials in one symmetric
  operator ``A = S (C̄ + Λ) S`` (``S²``: per-group learning-rate ratios times
  Adam's preconditioner, ``Λ``: coupled weight decay), so the whole segment is
  applied as ``f(A) v`` by Lanczos with ``krylov_dim`` products per tangent: the
  scalar recurrence of the recorded schedule (momentum, Nesterov, dampening,
  decay, bias correction) is evaluated at every Ritz value. Unlike summing the
  learning rates and taking one explicit step, this stays stable however long
  the segment, since each Ritz value follows the true damped recurrence.

With segments of one step, one minibatch each and a full Krylov space, the
segment scheme reduces to the exact replay for SGD (tested). Through Adam
stages the exact replay tracks each tangent's counterfactual moments (Adam's map
is not linearised, so a quadratic loss is replayed exactly); a segment takes
each tangent's counterfactual second moment as ``v̂`` plus Adam's running
average of ``(C̄ δθ)²`` over the stage's segments
(``CurvatureOptions.counterfactual_adam``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from typing import Any, Callable, Optional

import torch

from stagecredit.call_site import warn
from stagecredit.estimators.curvature import CURVATURES, CurvatureChoice, FlatParams
from stagecredit.estimators.embedding import StageEmbedding, initial_perturbation
from stagecredit.estimators.krylov import krylov_functions_apply, lanczos
from stagecredit.estimators.optimizers import (
    STATE_KEY,
    UnsupportedOptimizerError,
    carried_state_source,
    clip_coefficients,
    live_adam_preconditioner,
    stage_kind,
    stage_steps,
    stepped_names,
)
from stagecredit.estimators.propagation import (
    ADAM,
    SGD,
    adam_counterfactual_step,
    adam_moments,
    adam_tangent_step,
    clip_rows,
    segment_maps,
    sgd_tangent_step,
)
from stagecredit.progress import progress_bar
from stagecredit.recording.batches import collate, dataset_length
from stagecredit.recording.training import train_stage
from stagecredit.storage.run import Run

SCHEMES = ("auto", "segments", "exact", "adam-replay")
METHOD = "aa-curvature"


@dataclasses.dataclass(frozen=True)
class CurvatureOptions:
    """How ``aa-curvature`` trades fidelity for cost.

    ``scheme``:

    * ``"segments"`` (default): frozen curvature per segment around recorded
      checkpoints, the cheaper knob on small models.
    * ``"exact"``: the per-step replay, the reference; a stage that does not
      replay bit for bit is an error.
    * ``"auto"``: the per-step replay for every later stage, falling back to
      segments (with a warning that names it) for a stage whose replay does not
      reproduce its recorded checkpoint (nondeterministic kernels, or data
      changed since recording).
    * ``"adam-replay"``: the replay (with ``"auto"``'s fallback) for later Adam
      and AdamW stages (tracking each tangent's counterfactual Adam moments),
      segments for SGD ones.

    Evidence (``benchmarks/curvature_schemes.py``: Pearson r against
    retraining, linear mode, mean over five seeds of each pipeline): the
    default segments average 0.965 / 0.899 / 0.980 on the 5-stage digits
    pipeline's s2–s4 and 0.745 on digits-adam's pretrain; segments starting at
    the checkpoints with 256 examples (the former default) 0.925 / 0.864 /
    0.963 and 0.669; ``adam-replay`` 0.971 / 0.910 / 0.982 and 0.745; the
    replay 0.989 / 0.935 / 0.982 and 0.851; ``aa`` 0.486 / 0.546 / 0.896 and
    0.438. ``benchmarks/cost.py`` (one run, linear mode): segments 0.0966 s and
    the replay 0.4961 s on 5-stage (retraining 0.2494 s); on a compute-bound
    1.9M-parameter MLP 4.2834 s and 12.9988 s (retraining 2.8399 s).

    ``curvature``: ``"hessian"`` or ``"ggn"`` (Gauss–Newton, positive
    semi-definite); default ``None``: the Hessian where later stages are
    replayed step by step (the update's exact linearisation), the GGN in
    segments (the Hessian scores higher there on the digits pipelines but
    breaks the MNIST demo's model-mode estimate of its pretrain stage:
    ``docs/concepts.md``) and in the replay of a stage without one of its data
    sources (removing a whole source is far outside first order, and there the
    GGN agrees better with retraining: ``benchmarks/sources.py`` against
    ``benchmarks/sources.py --curvature hessian``). Where the GGN does not
    apply (``loss_fn`` calls the model more than once, the model returns no
    differentiable output, or ``loss_fn`` is linear in it, as a model that
    computes its own loss read as ``model(...).loss``) the default takes the Hessian with an :class:`~stagecredit.GGNFallbackWarning`;
    an explicit ``"ggn"`` raises :class:`~stagecredit.GGNUnavailableError`.

    The rest only matter for segments (and for ``"auto"``'s fallback):

    * ``segment_steps``: steps per segment (default: the run's ``checkpoint_every``,
      or a multiple of it where a stage holds more than ``max_segments`` of them).
    * ``max_segments``: with ``segment_steps`` unset, at most about this many
      segments per stage (default 16): a stage with more recorded checkpoint
      intervals is cut into segments of whole multiples of the interval, each
      still frozen at the recorded checkpoint in its middle. ``None``: one
      segment per interval. The segments' cost is about products per segment
      times segments, so with the cap it stops growing with a stage's length
      once the stage is 16 intervals long. Evidence
      (``benchmarks/segment_length.py``: every stage's steps × 16, checkpoints
      every 50, one seed; Pearson r, linear mode): 16 segments per stage lost at
      most 0.018 against one per interval on the stages the estimate tracks
      (5-stage s2 0.765 against 0.783) and gained on others (digits-adam's
      pretrain 0.437 against 0.416; the demo's pretrain, negative either way,
      fell to −0.205 from −0.143) in 1.9–3.9× less time; 8 lost 0.17 on
      digits-adam's pretrain (0.242).
      Stages up to 16 intervals long (every pipeline at its written length)
      are unaffected.
    * ``centred``: segments centred on the recorded checkpoints, each frozen at
      the checkpoint in its middle (the first and last half a segment long, the
      last at the stage's end), instead of starting at them (default ``True``).
    * ``krylov_dim``: Lanczos vectors per segment and tangent.
    * ``curvature_examples``: about how many training examples a segment's
      curvature is averaged over: the fewest evenly spaced recorded minibatches
      of the segment that hold at least that many (at least one); ``None``: all
      of them. A stage recorded without minibatch indices draws as many
      examples from its data instead. ``None`` is evaluated in chunks of at
      most 512 examples (one minibatch if it is larger), their graphs rebuilt
      at every product, so memory does not grow with the segment. Fidelity
      grows with it and so does the cost of every product.

    Stages that clip their gradient's norm (``Stage(max_grad_norm=…)``,
    ``rec.stage(..., max_grad_norm=…)``, the Hugging Face Trainer's default)
    are modelled from the recorded norms: the replay clips each tangent's
    counterfactual gradient exactly, the segments scale the curvature by the
    steps' clip factors ``max_grad_norm / ‖g‖`` (``benchmarks/clipping.py``).

    ``counterfactual_adam`` (both schemes): through Adam and AdamW stages,
    normalise each perturbed run's steps by its own second moment, as Adam
    does, instead of the recorded run's. Removing a stage changes the later
    gradients by ``δg = C δθ``, on many coordinates far beyond the recorded
    gradient, and Adam then takes steps of about the same size as before
    where a frozen second moment lets them grow with ``δg``. The replay tracks
    each tangent's moments step by step (``False``: the linearised map with
    the recorded moment, which the replay also uses with ``amsgrad``); segments
    scale each tangent's ``S`` by ``√((√v̂ + ε)/(√(v̂ + ⟨δg²⟩) + ε))``, where
    ``⟨δg²⟩`` is Adam's own average (``β2``, bias-corrected) of ``δg²`` over
    the stage's segments so far, ``δg`` from one more product per segment at
    its start, so a large early change keeps the later steps normalised as
    long as it does in Adam. For a small perturbation both are the recorded
    preconditioner (the factor is ``1 − O(δg²)``). On a linear regression
    with a later AdamW stage this halves the segments' error against
    retraining (tested); on the MNIST demo it lifts the segments' pretrain
    score to the Adam replay's (``docs/concepts.md``).

    ``secant`` (both schemes, through the stages after a perturbation; the
    replay of a stage without one of its sources keeps ``0``): where along each
    tangent its curvature is taken, as a fraction of ``δθ``. ``0`` (default) is the linearisation at the
    recorded parameters. A removed stage moves the parameters far, and the
    gradient change it causes is the secant ``g(θ + δθ) − g(θ) = ∫₀¹ C(θ + tδθ)
    dt · δθ``; ``secant=0.5`` approximates it by the midpoint rule, correct to
    second order in ``δθ``. Each tangent then needs its own curvature (one
    forward graph and product call per tangent instead of one for all). Over
    five seeds in model mode the replay with ``secant=0.5`` reaches 0.903 on
    the 5-stage pipeline's s1 (0.490 without) and 0.909 on digits-adam's
    pretrain (0.851), segments with it 0.823 and 0.797 (0.427 and 0.687); in
    linear mode, which scores the far landing point by the slope at ``θ_T``,
    the replay's first stage loses (``docs/concepts.md``). On the text demo's
    pretrained transformer layer it loses in both modes (its settings, model
    mode: 0.559 / 0.297 on pretrain / finetune against 0.653 / 0.577;
    ``benchmarks/text_secant.py``), which is why the default stays ``0``.

    ``max_tangents`` (both schemes): at most this many stage (or source)
    perturbations travel together through the later stages; the rest follow in
    further passes. ``None`` (default): all in one pass, whose memory grows
    with their number (each carries its own ``δθ``, ``δs``, Krylov basis and
    product rows; ``docs/concepts.md``), which matters for many stages or
    sources on a large model. Each pass re-evaluates the later stages'
    curvature, so time grows with the number of passes. On ``mnist-wide``
    (1.9M parameters, 2 perturbations to carry) one per pass took +663 MiB
    over the loaded run instead of +853 MiB, for 4.71 s instead of 4.39 s;
    the estimates agree to float32 rounding (tested).
    """

    scheme: str = "segments"
    curvature: Optional[str] = None
    segment_steps: Optional[int] = None
    max_segments: Optional[int] = 16
    krylov_dim: int = 5
    curvature_examples: Optional[int] = 512
    centred: bool = True
    secant: float = 0.0
    counterfactual_adam: bool = True
    max_tangents: Optional[int] = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.curvature is not None and self.curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {self.curvature!r}; choose one of {', '.join(CURVATURES)}")
        if self.segment_steps is not None and self.segment_steps < 1:
            raise ValueError("segment_steps must be >= 1")
        if self.max_segments is not None and self.max_segments < 1:
            raise ValueError("max_segments must be >= 1 (or None: one segment per recorded checkpoint)")
        if self.krylov_dim < 1 or (self.curvature_examples is not None and self.curvature_examples < 1):
            raise ValueError("krylov_dim and curvature_examples must be >= 1")
        if self.max_tangents is not None and self.max_tangents < 1:
            raise ValueError("max_tangents must be >= 1 (or None: every perturbation in one pass)")
        if not 0.0 <= self.secant <= 1.0:
            raise ValueError(f"secant must lie in [0, 1] (a fraction of the way along each tangent), got {self.secant}")

    @classmethod
    def exact(cls, curvature: Optional[str] = None) -> "CurvatureOptions":
        return cls(scheme="exact", curvature=curvature)

    @classmethod
    def segments(cls, **settings) -> "CurvatureOptions":
        """Segments with the default settings (centred, ``krylov_dim=5``, 512 curvature examples) unless overridden."""
        return cls(scheme="segments", **settings)

    @classmethod
    def fast(cls) -> "CurvatureOptions":
        """Segments starting at the checkpoints, ``krylov_dim=3``, 64 curvature examples."""
        return cls(scheme="segments", centred=False, krylov_dim=3, curvature_examples=64)

    @classmethod
    def thorough(cls) -> "CurvatureOptions":
        """Centred segments, ``krylov_dim=8``, every recorded minibatch of a segment."""
        return cls(scheme="segments", krylov_dim=8, curvature_examples=None)

    def curvature_for(self, use: str) -> str:
        """The curvature for ``use``: ``"replay"`` (later stages step by step), ``"segments"`` or ``"source"``."""
        return self.curvature or {"replay": "hessian", "segments": "ggn", "source": "ggn"}[use]

    @property
    def fallback(self) -> Optional[str]:
        """The default curvature falls back to the Hessian where the GGN is unavailable; a chosen one does not."""
        return None if self.curvature else "hessian"

    def choice(self, use: str) -> CurvatureChoice:
        """The curvature for one stage's products for ``use`` (see :meth:`curvature_for`), with its fallback."""
        return CurvatureChoice(self.curvature_for(use), self.fallback)

    def key(self) -> tuple:
        return dataclasses.astuple(self)

    def to_dict(self) -> dict:
        """The settings, plus the curvature each use resolves to (``"resolved_curvature"``), for results' JSON.

        :meth:`from_dict` reads it back, ignoring the resolved part.
        """
        return {**dataclasses.asdict(self),
                "resolved_curvature": {use: self.curvature_for(use) for use in ("replay", "segments", "source")}}

    @classmethod
    def from_dict(cls, settings: dict) -> "CurvatureOptions":
        """The options :meth:`to_dict` wrote (or any dict of their fields); unknown keys are an error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - fields - {"resolved_curvature"})
        if unknown:
            raise ValueError(f"unknown CurvatureOptions settings {unknown}; known: {', '.join(sorted(fields))}")
        return cls(**{k: v for k, v in settings.items() if k in fields})


def _require_pipeline(run: Run):
    try:
        return run.pipeline
    except RuntimeError as exc:
        raise RuntimeError(
            f"{METHOD} evaluates curvature on the stages' training data, so it needs their data and loss: "
            f"load the run with sc.Run.load(path, pipeline=pipe). 'delta' and 'aa' work without it."
        ) from exc


def _fresh_names(run: Run, j: int, kind: str) -> dict[str, bool]:
    """Whether each parameter's first-moment buffer starts empty in stage j (SGD's first step then copies)."""
    source = carried_state_source(run, j)
    if source is None:
        return {n: True for n in run.parameter_names}
    state = run.optimizer_state(source)
    return {n: f"{n}/{STATE_KEY[kind]}" not in state for n in run.parameter_names}


def _buffers(probe: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` that are buffers of the model (BatchNorm's running statistics, …)."""
    return {n: state[n] for n, _ in probe.named_buffers() if n in state}


def _tangent_products(probe, loss_fn, batch, params: dict[str, torch.Tensor], flat: FlatParams,
                      choice: CurvatureChoice, buffers: dict[str, torch.Tensor], secant: float, tangents: torch.Tensor):
    """``V [R, n] ↦ C V``; with ``secant``, row ``r`` gets the curvature at ``θ + secant·δθ_{r mod B}``.

    ``tangents [B, n]``: each tangent's ``δθ``; rows ``b, b + B, b + 2B, …`` of
    ``V`` belong to tangent ``b`` (the blocks of a segment's Krylov rows).
    """
    if not secant:
        return choice.product(probe, loss_fn, batch, params, flat, buffers)
    B = tangents.shape[0]
    products = []
    for b in range(B):
        shifted = dict(params)
        for n, d in flat.unflatten(tangents[b]).items():
            shifted[n] = params[n] + secant * d.to(params[n].dtype)
        products.append(choice.product(probe, loss_fn, batch, shifted, flat, buffers))

    def product(vectors: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(vectors)
        for b, one in enumerate(products):
            out[b::B] = one(vectors[b::B])
        return out

    return product


CHUNK_EXAMPLES = 512  # with curvature_examples=None, a segment's curvature is evaluated this many examples at a time


def _sample_products(probe, stage, chunks: list[torch.Tensor], params: dict[str, torch.Tensor], flat: FlatParams,
                     choice: CurvatureChoice, buffers: dict[str, torch.Tensor], secant: float, tangents: torch.Tensor):
    """``V ↦ C V`` for the mean loss over the examples ``chunks`` index (a list of index tensors into the stage's data).

    One chunk keeps its forward graph across calls. Several are evaluated one
    at a time on every call, their graphs rebuilt and freed, and averaged by
    size (the loss is a mean over examples): a forward pass more per chunk and
    call, for memory that does not grow with the sample.
    """
    if len(chunks) == 1:
        return _tangent_products(probe, stage.loss_fn, collate(stage.data, chunks[0]), params, flat, choice,
                                 buffers, secant, tangents)
    total = sum(len(c) for c in chunks)

    def product(vectors: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(vectors.shape, dtype=torch.promote_types(vectors.dtype, torch.float32))
        for indices in chunks:
            part = _tangent_products(probe, stage.loss_fn, collate(stage.data, indices), params, flat, choice,
                                     buffers, secant, tangents)(vectors)
            out += part.to(out.dtype) * (len(indices) / total)
        return out.to(vectors.dtype)

    return product


def curvature_embeddings(run: Run, options: CurvatureOptions = CurvatureOptions(), *,
                         progress: bool = True) -> list[StageEmbedding]:
    """All K stage embeddings with the later stages' curvature kept; one pass over the later stages."""
    start = time.perf_counter()
    K = run.num_stages
    entering = {k: [initial_perturbation(run, k)] for k in range(1, K + 1)}
    final = propagate_with_curvature(run, entering, options, progress=progress)
    seconds = (time.perf_counter() - start) / K
    return [StageEmbedding(record.name, k, METHOD, {n: -v for n, v in final[k][0].items()}, seconds)
            for k, record in enumerate(run.stage_records, start=1)]


def propagate_with_curvature(run: Run, entering: dict[int, list[tuple[dict, dict]]], options: CurvatureOptions, *,
                             progress: bool = True) -> dict[int, list[dict[str, torch.Tensor]]]:
    """Carry perturbations ``(δθ, δs)`` given at the end of stages through every later stage, all in one pass.

    ``entering[k]``: perturbations of the state at the end of stage k. Returns
    each one's ``δθ`` at the end of training, in the same layout (the run's
    dtype). With ``options.max_tangents``, at most that many travel together:
    the rest follow in further passes, each from the stage after its earliest one.
    """
    _require_pipeline(run)
    K = run.num_stages
    dtype = run.parameters(K)[run.parameter_names[0]].dtype
    moving = [(k, i) for k in sorted(entering) if k < K for i in range(len(entering[k]))]
    size = options.max_tangents or max(1, len(moving))
    passes = [moving[s:s + size] for s in range(0, len(moving), size)]
    total = sum(run.stage_records[j - 1].steps for group in passes for j in range(group[0][0] + 1, K + 1))
    out: dict[int, list[dict[str, torch.Tensor]]] = {
        k: [{} for _ in perturbations] for k, perturbations in entering.items()}
    with progress_bar(f"{METHOD} ({options.scheme})", total, enabled=progress) as advance:
        for group in passes:
            for (k, i), theta in zip(group, _one_pass(run, [(k, entering[k][i]) for k, i in group], options,
                                                      advance)):
                out[k][i] = theta
    for i, (theta, _) in enumerate(entering.get(K, [])):
        out[K][i] = {n: v.to(dtype) for n, v in theta.items()}
    return out


def _one_pass(run: Run, perturbations: list[tuple[int, tuple[dict, dict]]], options: CurvatureOptions,
              advance) -> list[dict[str, torch.Tensor]]:
    """``δθ`` at the end of training of each ``(k, (δθ, δs))`` entering after stage ``k < K``: one batched pass."""
    pipeline = run.pipeline
    K = run.num_stages
    names = run.parameter_names
    dtype = run.parameters(K)[names[0]].dtype
    probe = pipeline.build_model()  # a separate module: curvature is evaluated without touching the replay
    rows = 0  # tangents in flight, in the order of perturbations (sorted by stage)
    d_theta: dict[str, torch.Tensor] = {}
    d_state: dict[str, torch.Tensor] = {}
    for j in range(perturbations[0][0] + 1, K + 1):
        kind = stage_kind(run, j, METHOD)
        new = [p for k, p in perturbations if k == j - 1]
        pieces_theta = [d_theta] if rows else []
        pieces_state = [d_state] if rows else []
        pieces_theta += [{n: v.unsqueeze(0).to(dtype) for n, v in p[0].items()} for p in new]
        pieces_state += [{n: v.unsqueeze(0).to(dtype) for n, v in p[1].items()} for p in new]
        rows += len(new)
        d_theta = {n: torch.cat([p[n] for p in pieces_theta]) for n in names}
        d_state = {n: torch.cat([p[n] for p in pieces_state]) for n in names}
        if carried_state_source(run, j) is None:
            d_state = {n: torch.zeros_like(v) for n, v in d_state.items()}
        if options.scheme == "segments" or (options.scheme == "adam-replay" and kind != ADAM):
            d_theta, d_state = _segments_stage(run, j, kind, d_theta, d_state, probe, options, advance)
        elif options.scheme == "exact":
            d_theta, d_state = _exact_stage(run, j, kind, d_theta, d_state, probe, options, advance)
        elif not run.has_batch_indices(j):  # "auto", "adam-replay": nothing to replay
            warn(f"stage {run.stages[j - 1]!r} was recorded without minibatch indices, so it cannot be "
                 f"replayed; {METHOD} uses segments for it, their curvature averaged over examples drawn from the "
                 "stage's data")
            d_theta, d_state = _segments_stage(run, j, kind, d_theta, d_state, probe, options, advance)
        else:  # "auto", or an Adam stage under "adam-replay": the replay, segments where it does not reproduce
            try:
                d_theta, d_state = _exact_stage(run, j, kind, dict(d_theta), dict(d_state), probe, options, advance)
            except ReplayMismatchError as exc:
                warn(f"{exc}; {METHOD} uses segments (frozen curvature at its recorded checkpoints) for this "
                     "stage instead")
                d_theta, d_state = _segments_stage(run, j, kind, d_theta, d_state, probe, options, lambda: None)
        # neither run hands on a buffer for a parameter this stage's optimizer did not step
        stepped = stepped_names(run, j)
        d_state = {n: v if n in stepped else torch.zeros_like(v) for n, v in d_state.items()}
    return [{n: d_theta[n][row] for n in names} for row in range(rows)]


def curvature_source_tangents(run: Run, k: int, options: CurvatureOptions, *,
                              advance=lambda: None) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """``(δθ, δs)`` at the end of stage k for removing each of its sources, with the stage's own curvature kept.

    Replays stage k (checked bit-identical to the record) and advances every
    source's tangent with each step's curvature ``C_s δθ`` plus the removed
    source's gradient as forcing — the per-step reference, inside the stage.
    """
    pipeline = _require_pipeline(run)
    stage_kind(run, k, METHOD)
    stage = pipeline.stages[k - 1]
    names = run.parameter_names
    dtype = run.parameters(k)[names[0]].dtype
    flat = FlatParams.of(run.parameters(k), names)
    probe = pipeline.build_model()

    choice = options.choice("source")

    def curvature(batch, params_before):
        product = choice.product(probe, stage.loss_fn, batch, params_before, flat, dict(model.named_buffers()))

        def apply(theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            rows = next(iter(theta.values())).shape[0]  # tangents cover the parameters this stage trains
            full = {n: theta[n].to(dtype) if n in theta else torch.zeros(rows, *shape, dtype=dtype)
                    for n, shape in zip(flat.names, flat.shapes)}
            return flat.unflatten(product(flat.flatten(full)))

        return apply

    from stagecredit.estimators.source_tangents import SourceTangents

    model = pipeline.build_model()
    model.load_state_dict(run.checkpoint(k - 1))
    carried = run.optimizer_state(k - 1) if carried_state_source(run, k) is not None else None
    carried_from = run.stage_records[k - 2].optimizer_class if carried is not None else None
    tracker = SourceTangents(model, run.sources(k), carried, curvature=curvature, max_grad_norm=stage.max_grad_norm)

    def after_step(s, batch, params_before, optimizer):
        tracker.after_step(s, batch, params_before, optimizer)
        advance()

    train_stage(model, stage, run.batch_indices(k), carried, carried_from=carried_from,
                source_hook=tracker.step, after_step=after_step)
    _check_replay(run, k, model)
    if tracker.unsupported is not None:
        raise UnsupportedOptimizerError(f"stage {run.stages[k - 1]!r}: {tracker.unsupported}")
    return [tracker.tangent(j) for j in range(len(tracker.source_names))]


class ReplayMismatchError(RuntimeError):
    """Replaying a stage did not reproduce its recorded checkpoint bit for bit."""


def _check_replay(run: Run, k: int, model: torch.nn.Module) -> None:
    replayed = model.state_dict()
    recorded = run.checkpoint(k)
    if any(not torch.equal(replayed[n], recorded[n]) for n in run.parameter_names):
        raise ReplayMismatchError(
            f"replaying stage {run.stages[k - 1]!r} did not reproduce its recorded checkpoint: the pipeline's data, "
            "loss or optimizer changed since the run was recorded, or training is not deterministic here"
        )


# --- the reference: per-step replay -------------------------------------------------------------


def _exact_stage(run, j, kind, d_theta, d_state, probe, options, advance):
    pipeline = run.pipeline
    stage = pipeline.stages[j - 1]
    record = run.stage_records[j - 1]
    steps = stage_steps(run, j)
    fresh = _fresh_names(run, j, kind)
    names = run.parameter_names
    flat = FlatParams.of(run.parameters(j), names)
    model = pipeline.build_model()
    model.load_state_dict(run.checkpoint(j - 1))
    params = dict(model.named_parameters())
    carried = run.optimizer_state(j - 1) if carried_state_source(run, j) is not None else None
    carried_from = run.stage_records[j - 2].optimizer_class if carried is not None else None
    state = {"theta": d_theta, "buf": d_state}
    dtype = d_theta[names[0]].dtype
    clip = clip_coefficients(run, j)
    choice = options.choice("replay")
    counterfactual_adam = options.counterfactual_adam and kind == ADAM and not any(
        g.get("amsgrad", False) for st in steps for g in st["groups"])
    if counterfactual_adam:
        # Adam's map is kept exact along each tangent (see adam_counterfactual_step): the recorded run's moments
        # and each tangent's counterfactual moments are tracked in float64 from the step's real gradient.
        def carried_tensor(n, key):
            value = (carried or {}).get(f"{n}/{key}")
            return torch.zeros_like(params[n], dtype=torch.float64) if value is None else value.to(torch.float64)

        moments = {n: [carried_tensor(n, "exp_avg"), carried_tensor(n, "exp_avg_sq")] for n in names}
        cf = {n: [moments[n][0] + d_state[n].to(torch.float64), moments[n][1].expand_as(d_state[n]).clone()]
              for n in names}

    def step_tangents(s: int, batch: Any, params_before: dict, optimizer) -> None:
        tangents = flat.flatten(state["theta"])
        product = _tangent_products(probe, stage.loss_fn, batch, params_before, flat, choice,
                                    dict(model.named_buffers()), options.secant, tangents)
        hv = flat.unflatten(product(tangents))
        if clip is not None:
            hv = _clipped_change(params, hv, clip[s], record.max_grad_norm)
        for g, group_names in enumerate(record.param_groups):
            hp = steps[s]["groups"][g]
            for n in group_names:
                if params[n].grad is None:  # torch's optimizers skip it: it does not move, and no state changes
                    continue
                hvp = (lambda _x, n=n: hv[n])
                if kind == SGD:
                    state["theta"][n], state["buf"][n] = sgd_tangent_step(
                        state["theta"][n], state["buf"][n], hp, first=fresh[n] and s == 0, hvp=hvp)
                elif counterfactual_adam:
                    grad = params[n].grad.to(torch.float64)
                    if not hp.get("decoupled_weight_decay", False) and hp.get("weight_decay", 0.0):
                        grad = grad + hp["weight_decay"] * params_before[n].to(torch.float64)
                    moments[n] = list(adam_moments(*moments[n], grad, hp["betas"]))
                    theta, cf[n][0], cf[n][1] = adam_counterfactual_step(
                        state["theta"][n].to(torch.float64), cf[n][0], cf[n][1], hp, t=steps[s]["adam_step"],
                        exp_avg=moments[n][0], exp_avg_sq=moments[n][1], cf_grad=grad,
                        hvp=lambda _x, n=n: hv[n].to(torch.float64))
                    state["theta"][n] = theta.to(dtype)
                    state["buf"][n] = (cf[n][0] - moments[n][0]).to(dtype)
                else:
                    precond = live_adam_preconditioner(optimizer, params[n], hp)
                    state["theta"][n], state["buf"][n] = adam_tangent_step(
                        state["theta"][n], state["buf"][n], hp, t=steps[s]["adam_step"], precond=precond, hvp=hvp)
        advance()

    train_stage(model, stage, run.batch_indices(j), carried, carried_from=carried_from, after_step=step_tangents)
    _check_replay(run, j, model)
    return state["theta"], state["buf"]


def _clipped_change(params: dict[str, torch.nn.Parameter], hv: dict[str, torch.Tensor], coefficient: float,
                    max_norm: float) -> dict[str, torch.Tensor]:
    """The change of a clipped step's gradient, ``clip(g + C δθ) − clip(g)`` per tangent, in ``hv``'s layout.

    ``params[n].grad`` holds the step's clipped gradient ``c g`` (``coefficient``
    is ``c``). Clipping is applied exactly to each tangent's counterfactual
    gradient (its norm over all parameters with a gradient), as Adam's map is:
    a removed stage changes the gradient far, and whether clipping binds with
    it is not a first-order question. Parameters without a gradient keep ``hv``
    (the replay skips them); a trainable parameter no optimizer holds counts
    in the norm with its gradient unchanged. The recorded gradient is clipped
    the same way before it is subtracted, so a zero tangent changes nothing.
    """
    raw = {n: (p.grad.to(torch.float64) / coefficient).unsqueeze(0) for n, p in params.items() if p.grad is not None}
    factual = clip_rows(raw, max_norm)
    counterfactual = clip_rows({n: g + hv[n].to(torch.float64) if n in hv else g for n, g in raw.items()}, max_norm)
    return {n: (counterfactual[n] - factual[n]).to(v.dtype) if n in raw else v for n, v in hv.items()}


# --- segments: frozen curvature, Lanczos over each segment ---------------------------------------


# Read step by step by a segment's scalar recurrence (schedules such as OneCycleLR cycle them): they may change along
# the segment but must agree across param groups. The rest enter the frozen operator and must not change at all.
_PER_STEP = ("momentum", "dampening", "nesterov", "beta1")
_FROZEN = ("beta2", "eps", "amsgrad", "decoupled_weight_decay")


def _hyperparameters(hp: dict) -> tuple:
    """The values of ``_PER_STEP + _FROZEN`` in one group's hyper-parameters (None where absent)."""
    betas = hp.get("betas") or (None, None)
    return (hp.get("momentum"), hp.get("dampening"), hp.get("nesterov"), betas[0],
            betas[1], hp.get("eps"), hp.get("amsgrad"), hp.get("decoupled_weight_decay"))


def _segment_hyperparameter_check(steps: list[dict], record) -> Callable[[int, int], None]:
    """``check(a, b)``: raise if segment ``[a, b)`` cannot be one frozen operator with one scalar recurrence.

    Param groups must agree at every step on the hyper-parameters the recurrence
    reads, and those the operator freezes must not change within a segment. The
    stage's steps are read once; each segment then compares one tuple per step.
    """
    keys = _PER_STEP + _FROZEN
    per_step = [[_hyperparameters(g) for g in s["groups"]] for s in steps]
    for groups in per_step:
        if any(values != groups[0] for values in groups[1:]):
            key = next(key for i, key in enumerate(keys) if len({values[i] for values in groups}) > 1)
            raise UnsupportedOptimizerError(
                f"stage {record.name!r}: param groups differ in {key!r}; the 'segments' scheme of {METHOD} needs "
                "them equal. Use CurvatureOptions(scheme='exact')."
            )
    frozen = [groups[0][len(_PER_STEP):] for groups in per_step]

    def check(a: int, b: int) -> None:
        if any(values != frozen[a] for values in frozen[a + 1:b]):
            key = next(key for i, key in enumerate(_FROZEN) if len({values[i] for values in frozen[a:b]}) > 1)
            raise UnsupportedOptimizerError(
                f"stage {record.name!r}: {key!r} changes within a segment, and the 'segments' scheme of {METHOD} "
                "freezes it there. Use CurvatureOptions(scheme='exact')."
            )

    return check


def _segment_scaling(run, j, kind, steps, a, b,
                     preconditioner, check) -> tuple[torch.Tensor, torch.Tensor, list[dict], Optional[torch.Tensor]]:
    """``(S, Λ, reference steps, decay)`` for segment ``[a, b)`` as flat vectors over parameters.

    ``check``: :func:`_segment_hyperparameter_check` of the stage's steps.
    ``preconditioner(hp)``: Adam's frozen ``1/(√v̂+ε)`` for the hyper-parameters
    ``hp``, for every parameter Adam has stepped. ``S`` is zero on the
    parameters the segment does not move: those the optimizer never stepped
    (outside it, frozen, unused; ``stepped_names``), and groups whose learning
    rate is zero where the reference group's is largest. The reference group,
    whose schedule the scalar recurrence follows, is the first with a positive
    learning rate in the segment; when none has one, ``S`` is zero everywhere.

    Decoupled weight decay (AdamW) is a scalar factor of ``δθ`` per step, which
    the recurrence applies when every group has the same ``lr × weight_decay``.
    Where groups differ (Hugging Face's Trainer exempts biases and norms from
    decay) it is left out of the recurrence and ``decay`` holds each
    coordinate's product ``Π (1 − η λ)`` over the segment, applied to ``δθ``
    after it: exact without curvature and momentum, off at second order in
    ``η λ`` otherwise. ``decay`` is None when not needed.
    """
    record = run.stage_records[j - 1]
    names = run.parameter_names
    sizes = {n: run.parameters(j)[n].numel() for n in names}
    check(a, b)
    scale = {n: torch.zeros(sizes[n], dtype=torch.float64) for n in names}
    decay = {n: torch.zeros(sizes[n], dtype=torch.float64) for n in names}
    g0 = next((g for g in range(len(record.param_groups)) if any(steps[s]["groups"][g]["lr"] > 0 for s in range(a, b))),
              0)
    # learning-rate ratios between groups, at the segment step where the reference group's lr is largest
    ref = max(range(a, b), key=lambda s: steps[s]["groups"][g0]["lr"])
    lr0 = steps[ref]["groups"][g0]["lr"]
    decoupled = kind == ADAM and steps[a]["groups"][g0].get("decoupled_weight_decay", False)
    precond = preconditioner(steps[a]["groups"][g0]) if kind == ADAM and lr0 > 0 else {}
    stepped = stepped_names(run, j)
    uneven = decoupled and any(
        abs(s["groups"][g]["lr"] * s["groups"][g].get("weight_decay", 0.0)
            - s["groups"][g0]["lr"] * s["groups"][g0].get("weight_decay", 0.0)) > 1e-12
        for s in steps[a:b] for g in range(len(record.param_groups)))
    factors = {n: torch.ones(sizes[n], dtype=torch.float64) for n in names} if uneven else {}
    for g, group_names in enumerate(record.param_groups):
        hp = steps[ref]["groups"][g]
        ratio = hp["lr"] / lr0 if lr0 > 0 else 0.0
        if uneven:
            factor = 1.0
            for s in steps[a:b]:
                factor *= 1.0 - s["groups"][g]["lr"] * s["groups"][g].get("weight_decay", 0.0)
            for n in group_names:
                if n in stepped:  # torch decays only what it steps
                    factors[n].fill_(factor)
        for n in group_names:
            if n not in stepped or ratio == 0:  # no gradient all stage (frozen, unused), or no step: no move
                continue
            if kind == ADAM:
                scale[n] = ratio * precond[n].reshape(-1)
            else:
                scale[n] = torch.full((sizes[n],), ratio, dtype=torch.float64)
            decay[n] = torch.full((sizes[n],), 0.0 if decoupled else hp.get("weight_decay", 0.0), dtype=torch.float64)
    S = torch.cat([scale[n].sqrt() for n in names])
    Lam = torch.cat([decay[n] for n in names])
    # the scalar recurrence runs on the reference group's schedule with coupled decay folded into the operator
    # (and decoupled decay, where groups differ in it, applied after the segment)
    reference = [{**s, "groups": [{**s["groups"][g0], **({} if decoupled and not uneven else {"weight_decay": 0.0})}]}
                 for s in steps[a:b]]
    return S, Lam, reference, (torch.cat([factors[n] for n in names]) if uneven else None)


def _v_hat(opt_state: Optional[dict], hp: dict, names) -> Optional[dict[str, torch.Tensor]]:
    """Adam's bias-corrected second moment in a recorded optimizer state, for the parameters it has stepped.

    None before Adam's first step.
    """
    if opt_state is None or not any(k.endswith("/step") and float(v) > 0 for k, v in opt_state.items()):
        return None
    out = {}
    for n in names:
        key = f"{n}/max_exp_avg_sq" if hp.get("amsgrad", False) else f"{n}/exp_avg_sq"
        if key in opt_state:
            out[n] = opt_state[key].to(torch.float64) / (1 - hp["betas"][1] ** float(opt_state[f"{n}/step"]))
    return out


def _stage_preconditioner(run, j, hp) -> dict[str, torch.Tensor]:
    """Adam's ``1/(√v̂+ε)`` for stage j's segments: ``v̂`` is the largest the stage recorded at any checkpoint.

    With the second moment frozen along the perturbation, a coordinate that is
    rarely active (an input pixel lit in few images) has ``v̂ ≈ 0`` at most
    checkpoints and a preconditioner near ``1/ε``, while the segment's averaged
    curvature is non-zero there; in the real run each step that touches it
    divides by a ``v̂`` that already holds its gradient. The largest recorded
    ``v̂`` is the preconditioner of the steps where the coordinate was active,
    which keeps the frozen recurrence as damped as the real one there. The
    checkpoints are read one at a time (a running maximum), so memory does not
    grow with the stage's length. Parameters Adam never stepped have no entry.
    """
    names = run.parameter_names
    largest: dict[str, torch.Tensor] = {}
    states = (run.inner_optimizer_state(j, s) for s in run.inner_checkpoint_steps(j))
    for state in itertools.chain(states, [run.optimizer_state(j)]):
        for n, v in (_v_hat(state, hp, names) or {}).items():
            largest[n] = v if n not in largest else torch.maximum(largest[n], v)
    return {n: 1.0 / (v.sqrt() + hp["eps"]) for n, v in largest.items()}


def _segment_bounds(run: Run, j: int, options: CurvatureOptions) -> list[tuple[int, int, int]]:
    """``(a, b, at)`` per segment: steps ``[a, b)`` with the curvature frozen at the parameters entering step ``at``.

    ``at`` is a recorded point of the stage: its start (0), an inner checkpoint,
    or its end (``at`` = the stage's length). Centred segments are cut halfway
    between the recorded points (every ``segment_steps``, offset by half a
    segment) and each takes the point nearest its middle; otherwise segments
    start at the recorded points and take the last one at or before their start.
    """
    steps = run.stage_records[j - 1].steps
    recorded = run.inner_checkpoint_steps(j)
    length = options.segment_steps or _default_segment_length(recorded[0] if recorded else steps, steps,
                                                              options.max_segments)
    if not options.centred:
        return [(a, min(a + length, steps), max(s for s in [0] + recorded if s <= a)) for a in range(0, steps, length)]
    points = [0] + recorded + [steps]
    cuts = sorted({0, steps} | set(range(length // 2, steps, length)))
    return [(a, b, min(points, key=lambda p: (abs(2 * p - a - b), p))) for a, b in zip(cuts, cuts[1:])]


def _default_segment_length(interval: int, steps: int, max_segments: Optional[int]) -> int:
    """The recorded checkpoint interval, or the smallest multiple of it that cuts ``steps`` into ``max_segments``.

    A multiple keeps every centred segment's middle on a recorded checkpoint.
    """
    if max_segments is None:
        return interval
    return interval * max(1, -(-steps // (interval * max_segments)))


RUNAWAY = 1e12  # growth over one segment beyond which cap_growth drops a mode (float32 bases overflow in a few)


def cap_growth(to_theta: torch.Tensor, to_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each mode's segment map down to spectral radius 1 where the linearisation says it grows.

    ``to_theta``/``to_state`` stack the map's columns: from ``(δθ, δs) = (1, 0)``,
    from ``(0, 1)``, then any further columns (the response to a forcing), which
    are scaled with the mode. With the curvature frozen over a segment, a
    direction sharper than the optimizer's stability edge (e.g. ``η λ > 2(1 + μ)``
    for heavy-ball SGD) grows geometrically in the linear model, although real
    training at the edge of stability stays bounded along it: the linearisation
    is invalid there, and left alone it sends the estimate to 1e15 and beyond.
    Capping keeps such a mode's phase and holds its size. A runaway mode, one
    that would grow more than ``RUNAWAY`` times over the segment (or overflow),
    is dropped instead: its capped map would still carry a momentum change of
    the order of its curvature, which compounds from segment to segment. Such
    modes come from a frozen operator far outside its validity, e.g. Adam's
    frozen ``1/(√v̂+ε)`` near ``1/ε`` on a coordinate that had no gradient where
    it was recorded, met by curvature there.
    """
    finite = torch.isfinite(to_theta).all(0) & torch.isfinite(to_state).all(0)
    to_theta, to_state = torch.where(finite, to_theta, 0.0), torch.where(finite, to_state, 0.0)
    tt, ts, st, ss = to_theta[0], to_theta[1], to_state[0], to_state[1]
    trace, det = tt + ss, tt * ss - ts * st
    disc = torch.sqrt((trace * trace - 4 * det).to(torch.complex128))
    radius = torch.maximum(((trace + disc) / 2).abs(), ((trace - disc) / 2).abs())
    scale = torch.where(radius > 1, 1 / radius, torch.ones_like(radius)) * (finite & (radius <= RUNAWAY))
    return to_theta * scale, to_state * scale


def _segment_clipping(clip: Optional[list[float]], reference: list[dict], a: int, b: int,
                      curvature_only: bool) -> tuple[float, list[float]]:
    """``(c̄, per-step factors)``: how gradient clipping scales the curvature term of segment ``[a, b)``.

    Clipping a gradient ``g`` to norm ``M`` scales the change of the step's
    gradient by ``c = M / ‖g‖`` (and removes its part along ``g``, which a
    frozen symmetric operator cannot express and the segments drop). The
    segment's operator takes the learning-rate-weighted mean ``c̄`` of its
    steps' factors; when the operator is the curvature alone (no coupled
    decay), each step's recurrence is rescaled by ``c_s / c̄`` as well, so the
    factors enter step by step.
    """
    if clip is None:
        return 1.0, [1.0] * (b - a)
    factors = clip[a:b]
    lrs = [s["groups"][0]["lr"] for s in reference]
    mean = sum(lr * c for lr, c in zip(lrs, factors)) / sum(lrs) if sum(lrs) > 0 else sum(factors) / len(factors)
    return mean, ([c / mean for c in factors] if curvature_only else [1.0] * (b - a))


def _segment_sample(run: Run, j: int, stage, options: CurvatureOptions):
    """``sample(a, b)``: the examples segment ``[a, b)``'s curvature is averaged over, as chunks of data indices.

    With the minibatch indices recorded: the fewest evenly spaced minibatches
    of the segment that hold ``curvature_examples`` (all of them for ``None``).
    Without them (a loop recorded without ``rec.batch``): as many examples
    drawn from the stage's data, without replacement and seeded by the stage's
    seed and the segment, which is what the segment's minibatches were (for
    ``None``: as many as the segment trained on, ``batch_size`` per step).
    ``curvature_examples=None`` is evaluated in chunks of at most
    ``CHUNK_EXAMPLES`` (one minibatch if larger), so that memory stays one
    chunk's forward graph however long the segment.
    """
    if run.has_batch_indices(j):
        batches = run.batch_indices(j)
        per_batch = max(1, batches.shape[1])  # batch_indices is [steps, batch_size]

        def recorded(a: int, b: int) -> list[torch.Tensor]:
            count = b - a if options.curvature_examples is None else min(-(-options.curvature_examples // per_batch),
                                                                         b - a)
            picks = torch.linspace(a, b - 1, count).round().long().unique()
            chunk = len(picks) if options.curvature_examples is not None else max(1, CHUNK_EXAMPLES // per_batch)
            return [batches[picks[i:i + chunk]].reshape(-1) for i in range(0, len(picks), chunk)]

        return recorded
    n = dataset_length(stage.data)

    def drawn(a: int, b: int) -> list[torch.Tensor]:
        count = min(n, options.curvature_examples or (b - a) * stage.batch_size)
        generator = torch.Generator().manual_seed(int(stage.seed or 0) * 1_000_003 + a)
        indices = torch.randperm(n, generator=generator)[:count]
        chunk = count if options.curvature_examples is not None else max(CHUNK_EXAMPLES, stage.batch_size)
        return [indices[i:i + chunk] for i in range(0, count, chunk)]

    return drawn


def _counterfactual_adam_scale(extra: torch.Tensor, moving: torch.Tensor, precond: dict[str, torch.Tensor], eps: float,
                               flat: FlatParams) -> torch.Tensor:
    """``[B, n]``: each tangent's factor on ``S``, ``√((√v̂ + ε) / (√(v̂ + extra) + ε))``.

    ``extra [B, n]``: how much larger each perturbed run's bias-corrected
    second moment is than the recorded ``v̂`` (the operator's own, the largest
    the stage recorded); ``precond``: ``1/(√v̂ + ε)`` per parameter Adam has
    stepped. Coordinates the segment does not move, or that Adam never
    stepped, keep a factor of 1.
    """
    inverse = torch.cat([precond[n].reshape(-1).to(torch.float64) if n in precond
                         else torch.zeros(torch.Size(shape).numel(), dtype=torch.float64)
                         for n, shape in zip(flat.names, flat.shapes)])  # 1 / (√v̂ + ε); 0 where Adam never stepped
    stepped = moving & (inverse > 0)
    root = torch.where(stepped, 1 / inverse, eps) - eps  # √v̂
    shrink = (root + eps) / ((root * root + extra).sqrt() + eps)
    return torch.where(stepped, shrink.sqrt(), 1.0)


def _segments_stage(run, j, kind, d_theta, d_state, probe, options, advance):
    pipeline = run.pipeline
    stage = pipeline.stages[j - 1]
    steps = stage_steps(run, j)
    names = run.parameter_names
    flat = FlatParams.of(run.parameters(j), names)
    stepped = stepped_names(run, j)
    fresh = {n: f for n, f in _fresh_names(run, j, kind).items() if n in stepped}
    if len(set(fresh.values())) > 1:
        raise UnsupportedOptimizerError(
            f"stage {stage.name!r}: some parameters carry a momentum buffer and others do not; use "
            "CurvatureOptions(scheme='exact')."
        )
    stage_fresh = next(iter(fresh.values()), True)
    sample = _segment_sample(run, j, stage, options)
    steps_in_stage = run.stage_records[j - 1].steps
    dtype = d_theta[names[0]].dtype
    work = torch.promote_types(dtype, torch.float32)
    theta = flat.flatten(d_theta).to(torch.float64)
    buf = flat.flatten(d_state).to(torch.float64)
    B = theta.shape[0]
    preconditioners: dict[str, dict[str, torch.Tensor]] = {}  # per (betas, eps, amsgrad): one pass over the states
    clip = clip_coefficients(run, j)

    def preconditioner(hp: dict) -> dict[str, torch.Tensor]:
        key = repr((hp["betas"], hp["eps"], hp.get("amsgrad", False)))
        if key not in preconditioners:
            preconditioners[key] = _stage_preconditioner(run, j, hp)
        return preconditioners[key]

    loaded: tuple[Optional[int], Any] = (None, None)  # the last frozen point read (uncached, may serve several)
    moment: Optional[torch.Tensor] = None  # counterfactual_adam: Adam's running average of each tangent's δg²
    choice = options.choice("segments")
    check = _segment_hyperparameter_check(steps, run.stage_records[j - 1])
    for a, b, at in _segment_bounds(run, j, options):
        S, Lam, reference, decay = _segment_scaling(run, j, kind, steps, a, b, preconditioner, check)
        moving = S > 0
        if not bool(moving.any()):  # no learning rate anywhere in the segment: nothing moves
            for _ in range(b - a):
                advance()
            continue
        if loaded[0] != at:
            loaded = (at, run.checkpoint(j) if at == steps_in_stage else run.inner_state_dict(j, at))
        state_dict = loaded[1]
        product = _sample_products(probe, stage, sample(a, b), {n: state_dict[n] for n in names}, flat, choice,
                                   _buffers(probe, state_dict), options.secant, theta)
        # The Krylov basis is built in the model's precision (its products are in it anyway), but never below
        # float32, where re-orthogonalisation stops working: on large models the basis is most of the memory and its
        # passes much of the time. The tangents stay float64 between segments.
        Lam_ = Lam.to(work) if bool(Lam.any()) else None
        clipped, per_step = _segment_clipping(clip, reference, a, b, Lam_ is None)
        if kind == ADAM and options.counterfactual_adam and bool(theta.any()):
            # Adam divides each perturbed run's steps by that run's own second moment: the recorded v̂ plus Adam's
            # average of δg² = (C̄ δθ)², which a removed stage makes far larger than the recorded gradient on many
            # coordinates. δg is taken from each tangent at the segment's start and averaged over the stage's
            # segments so far as Adam averages gradients (β2, bias-corrected), so a large early change keeps the
            # later steps normalised as long as it does in Adam.
            hp = steps[a]["groups"][0]
            beta2 = hp["betas"][1]
            dg = product(theta.to(dtype)).to(torch.float64) * clipped
            if bool(Lam.any()):
                dg = dg + Lam * theta
            kept = beta2 ** (b - a)
            moment = (1 - kept) * dg * dg + (kept * moment if moment is not None else 0.0)
            extra = moment / (1 - beta2 ** steps[b - 1]["adam_step"])
            S = S * _counterfactual_adam_scale(extra, moving, preconditioner(hp), hp["eps"], flat)
        # one S for every row, or each tangent's own for each block of its rows below (at most three blocks)
        S_ = S.to(work) if S.ndim == 1 else torch.cat([S] * 3).to(work)

        def scaling(rows: int) -> torch.Tensor:
            return S_ if S_.ndim == 1 else S_[:rows]

        def operator(x: torch.Tensor) -> torch.Tensor:
            sx = scaling(x.shape[0]) * x
            cx = product(sx.to(dtype)).to(work)
            if clipped != 1.0:
                cx = clipped * cx
            return scaling(x.shape[0]) * (cx if Lam_ is None else cx + Lam_ * sx)

        first = stage_fresh and a == 0
        # The segment moves u = δθ/S and w = S δs on the coordinates it moves (the scaled steps are polynomials in
        # the operator A). The coordinates it does not move keep their δθ, which still shifts the gradient of the
        # others by C δθ_frozen: a constant forcing, S C δθ_frozen in scaled terms.
        everything = bool(moving.all())  # the common case: no masks, no forcing
        inverse = None if everything else torch.where(moving, 1 / S, 0.0)
        still = None if everything else torch.where(moving, 0.0, theta)
        blocks = [((theta / S if everything else theta * inverse).to(work), 0)]  # (rows, the column they take)
        if not first and bool((buf != 0).any()):
            blocks.append(((buf * S).to(work), 1))
        if still is not None and bool((still != 0).any()):
            blocks.append((scaling(B) * clipped * product(still.to(dtype)).to(work), 2))

        def from_rows(ritz: torch.Tensor):
            # the map's columns in one walk over the segment's steps: from (δθ, δs) = (1, 0), from (0, 1), and the
            # response to a unit constant forcing from (0, 0); each block of rows takes its own column
            maps = segment_maps(ritz, reference, 0, kind, fresh=first, curvature_scale=per_step)
            to_theta, to_state = cap_growth(maps[..., 0, :].movedim(-1, 0), maps[..., 1, :].movedim(-1, 0))
            return tuple(torch.cat([m[column, i * B:(i + 1) * B] for i, (_, column) in enumerate(blocks)])
                         for m in (to_theta, to_state))

        # The Krylov spaces of all blocks are built side by side (one product call for all, so per-call overhead is
        # paid once) and every map comes from one eigendecomposition per basis.
        rows = torch.cat([r for r, _ in blocks])
        to_u, to_w = krylov_functions_apply(*lanczos(operator, rows, options.krylov_dim), from_rows)
        new_u, new_w = (functools.reduce(torch.add, [m[i * B:(i + 1) * B] for i in range(len(blocks))]).to(torch.float64)
                        for m in (to_u, to_w))
        theta = S * new_u if everything else S * new_u + still
        if decay is not None:
            theta = theta * decay
        buf = new_w / S if everything else torch.where(moving, new_w * inverse, buf)
        for _ in range(b - a):
            advance()
    return (flat.unflatten(theta.to(dtype)), flat.unflatten(buf.to(dtype)))
