"""Cost: estimator time vs retraining time vs one forward pass over the evaluation set, and peak memory.

On the fidelity pipelines and on mnist-wide, a 1.9M-parameter MLP with batches
of 128, where curvature products are compute-bound rather than call overhead.

    python benchmarks/cost.py

Every ratio is measured in the same run; each phase is timed as the median of
up to three warm calls in its process (fewer once they have taken 10 s; the
first call, with one-time set-up, is reported too). Each phase runs in a fresh child
process so its peak resident memory (ru_maxrss) is its own; "extra MiB" is
that peak minus the peak of a child that only loads the run and does one
forward pass. Writes benchmarks/results/cost.{json,md}.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue as queue_module
import resource
import statistics
import tempfile
import time
from pathlib import Path

from common import write_results
from pipelines import COST_PIPELINES as PIPELINES

from stagecredit.reports.tables import Table

WARM_CALLS, WARM_BUDGET_S = 3, 10.0  # median of up to 3 warm calls; fewer once they have taken 10 s
PHASES = ["forward", "delta/linear", "delta/model", "aa/linear", "aa/model", "aa-curvature/linear", "aa-curvature/model",
          "aa-curvature exact/linear", "aa-curvature exact/model", "aa-curvature secant/model",
          "aa-curvature exact secant/model", "retrain"]
# the CurvatureOptions of each aa-curvature variant, by the words after "aa-curvature" in its phase
VARIANTS = {"": {}, "exact": {"scheme": "exact"}, "secant": {"secant": 0.5},
            "exact secant": {"scheme": "exact", "secant": 0.5}}


def _phase(name: str, run_dir: str, phase: str, queue, settings: dict) -> None:
    import torch

    import stagecredit as sc

    torch.set_num_threads(torch.get_num_threads())
    pipe, behaviour = PIPELINES[name](**settings)
    run = sc.Run.load(run_dir, pipeline=pipe)
    model = run.build_model()
    with torch.no_grad():
        behaviour(model)  # data and model in memory for every phase alike

    def once() -> float:
        run._cache.clear()  # no cached embeddings, checkpoints or retrained models between calls
        start = time.perf_counter()
        if phase == "forward":
            with torch.no_grad():
                behaviour(model)
        elif phase == "retrain":
            sc.retrain_effects(run, behaviour, progress=False)
        else:
            method, mode = phase.split("/")
            method, _, variant = method.partition(" ")
            options = sc.CurvatureOptions(**VARIANTS[variant]) if method == "aa-curvature" else None
            sc.attribute(run, behaviour, method=method, mode=mode, curvature=options, progress=False)
        return time.perf_counter() - start

    first = once()  # includes one-time set-up (torch.func's forward-mode machinery, lazy imports)
    warm = [once()]
    while len(warm) < WARM_CALLS and sum(warm) < WARM_BUDGET_S:
        warm.append(once())
    queue.put((statistics.median(warm), first, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def measure(name: str, run_dir: str, phase: str, **settings) -> tuple[float, float, float]:
    """``(warm seconds, first-call seconds, peak MiB)`` of ``phase`` in a fresh process.

    ``settings`` go to the pipeline's factory (e.g. ``scale=4`` for mnist-demo).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_phase, args=(name, run_dir, phase, queue, settings))
    child.start()
    while True:  # a child that dies (an exception, the OOM killer) puts nothing: say so instead of waiting forever
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not child.is_alive():
                raise RuntimeError(f"{name} {phase}: the measuring process exited with code {child.exitcode} "
                                   f"without a result (its traceback is above)") from None
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(PIPELINES), action="append")
    args = parser.parse_args()
    rows, tables = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(PIPELINES):
            pipe, _ = PIPELINES[name]()
            run_dir = str(Path(tmp) / name)
            pipe.run(run_dir, progress=False)
            measured = {phase: measure(name, run_dir, phase) for phase in PHASES}
            forward_s, _, base_mib = measured["forward"]
            retrain_s = measured["retrain"][0]
            for phase in PHASES:
                seconds, first, peak = measured[phase]
                rows.append({
                    "pipeline": name, "phase": phase, "seconds": seconds, "first_call_seconds": first, "peak_mib": peak,
                    "extra_mib": peak - base_mib, "retrain_over_this": retrain_s / seconds,
                    "this_over_forward": seconds / forward_s,
                })
            table = Table(
                title=f"{name}: cost of attributing all {len(pipe.stages)} stages",
                columns=["phase", "seconds", "first call s", "× forward pass", "retraining ÷ this", "peak MiB",
                         "extra MiB"],
                rows=[[r["phase"], f"{r['seconds']:.4f}", f"{r['first_call_seconds']:.4f}", f"{r['this_over_forward']:.1f}",
                       f"{r['retrain_over_this']:.1f}", f"{r['peak_mib']:.0f}", f"{r['extra_mib']:+.0f}"]
                      for r in rows if r["pipeline"] == name],
                note="forward = one pass of the behaviour over the evaluation set; aa-curvature = the default "
                     "(segments), aa-curvature exact = the per-step replay (CurvatureOptions.exact()), secant = "
                     "either with CurvatureOptions(secant=0.5); retrain = "
                     "retraining without each stage in turn (ground truth). seconds = median of up to 3 warm calls in a process (first "
                     "call s adds one-time set-up). Ratios use seconds, all from this one run.",
            )
            table.print()
            tables.append(table)
    write_results("cost", args.only, {"rows": rows}, tables)


if __name__ == "__main__":
    main()
