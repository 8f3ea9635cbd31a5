"""The command line: real sub-commands on a small pipeline, and clear failures."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import stagecredit as sc
from conftest import ce_loss, three_stage_pipeline, toy_eval

from stagecredit.cli.main import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("demo", "record", "attribute", "validate", "report"):
        assert command in result.output


def test_record_attribute_validate_report(tmp_path):
    run = tmp_path / "run"
    result = invoke("record", "conftest:three_stage_pipeline", run, "--no-progress")
    assert result.exit_code == 0, result.output
    assert (run / "run.json").is_file()

    result = invoke("attribute", run, "--eval", "conftest:toy_eval", "--method", "aa", "--mode", "linear")
    assert result.exit_code == 0, result.output
    data = json.loads((run / "attribution" / "attribution.json").read_text())
    assert data["stages"] == ["pretrain", "finetune", "adapt"]
    assert len(data["effects"]) == 3 and len(data["effects"][0]) == 64
    assert "blame" in result.output or "credit" in result.output

    result = invoke("validate", run, "--pipeline", "conftest:three_stage_pipeline", "--eval", "conftest:toy_eval",
                    "--method", "aa", "--no-progress")
    assert result.exit_code == 0, result.output
    rows = json.loads((run / "validation" / "validation.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"aa"} and len(rows) == 6
    assert (run / "validation" / "estimate_vs_retrain.png").is_file()

    result = invoke("attribute", run, "--eval", "conftest:toy_eval", "--method", "aa-curvature", "--scheme", "exact",
                    "--pipeline", "conftest:three_stage_pipeline", "--out", tmp_path / "curv")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "curv" / "attribution.json").read_text())
    assert data["method"] == "aa-curvature" and len(data["effects"][0]) == 64
    result = invoke("attribute", run, "--eval", "conftest:toy_eval", "--method", "aa-curvature", "--secant", "0.5",
                    "--mode", "model", "--pipeline", "conftest:three_stage_pipeline", "--out", tmp_path / "secant")
    assert result.exit_code == 0, result.output
    expected = sc.attribute(sc.Run.load(run, pipeline=three_stage_pipeline()), toy_eval(), "aa-curvature", "model",
                            curvature=sc.CurvatureOptions(secant=0.5), progress=False)
    saved = json.loads((tmp_path / "secant" / "attribution.json").read_text())["effects"]
    np.testing.assert_allclose(saved, expected.effects, rtol=1e-6, atol=1e-7)
    # the fidelity/cost knob: a preset with single settings overridden, written beside the numbers it made
    result = invoke("attribute", run, "--eval", "conftest:toy_eval", "--method", "aa-curvature", "--preset", "fast",
                    "--krylov-dim", "4", "--curvature-examples", "all", "--curvature", "hessian", "--segment-steps", 3,
                    "--recorded-adam", "--max-segments", 0, "--max-tangents", 1, "--pipeline",
                    "conftest:three_stage_pipeline", "--out", tmp_path / "knob")
    assert result.exit_code == 0, result.output
    options = sc.CurvatureOptions(centred=False, krylov_dim=4, curvature_examples=None, curvature="hessian",
                                  segment_steps=3, counterfactual_adam=False, max_segments=None,
                                  max_tangents=1)
    saved = json.loads((tmp_path / "knob" / "attribution.json").read_text())
    assert saved["settings"] == {"curvature_options": options.to_dict()}
    assert ("aa-curvature settings: scheme=segments, curvature=hessian, segment_steps=3, max_segments=no limit, "
            "krylov_dim=4, curvature_examples=all, centred=False, secant=0.0, counterfactual_adam=False, "
            "max_tangents=1.") in (tmp_path / "knob" / "summary.md").read_text()
    expected = sc.attribute(sc.Run.load(run, pipeline=three_stage_pipeline()), toy_eval(), "aa-curvature", "linear",
                            curvature=options, progress=False)
    np.testing.assert_allclose(saved["effects"], expected.effects, rtol=1e-6, atol=1e-7)
    for flags, reason in ((["--curvature-examples", "lots"], "a positive whole number or 'all'"),
                          (["--preset", "quick"], "unknown preset 'quick'"),
                          (["--curvature", "fisher"], "unknown curvature 'fisher'")):
        result = invoke("attribute", run, "--eval", "conftest:toy_eval", "--method", "aa-curvature", *flags,
                        "--pipeline", "conftest:three_stage_pipeline")
        assert result.exit_code == 2 and reason in result.output, result.output
    result = invoke("attribute", run, "--eval", "conftest:toy_eval", "--method", "aa-curvature", "--secant", "2",
                    "--pipeline", "conftest:three_stage_pipeline")
    assert result.exit_code == 2 and "secant must lie in [0, 1]" in result.output
    result = invoke("attribute", run, "--eval", "conftest:toy_eval", "--method", "aa-curvature")
    assert result.exit_code == 2 and "pipeline=" in result.output

    result = invoke("report", run / "validation")
    assert result.exit_code == 0 and "Pearson" in result.output


def test_bad_input_exits_nonzero_with_one_line_reason(tmp_path):
    result = invoke("attribute", tmp_path / "missing", "--eval", "conftest:toy_eval")
    assert result.exit_code == 2
    assert "no recorded run" in result.output

    result = invoke("record", "no_such_module_xyz:make", tmp_path / "r")
    assert result.exit_code == 2 and "cannot import module" in result.output

    result = invoke("record", "conftest:three_stage_pipeline", tmp_path / "r", "--no-progress")
    assert result.exit_code == 0
    result = invoke("attribute", tmp_path / "r", "--eval", "conftest:toy_eval", "--method", "bogus")
    assert result.exit_code == 2 and "unknown method" in result.output

    # a dataset is scored with the last stage's loss_fn, which here averages: say so instead of guessing
    result = invoke("attribute", tmp_path / "r", "--eval", "conftest:toy_eval_dataset",
                    "--pipeline", "conftest:three_stage_pipeline")
    assert result.exit_code == 2 and "one loss per" in result.output


def test_record_resume_continues_an_interrupted_recording(tmp_path):
    class Interrupt(Exception):
        pass

    calls = [0]

    def loss(model, batch):  # finetune takes 15 calls; the 20th is inside adapt
        calls[0] += 1
        if calls[0] >= 20:
            raise Interrupt
        return ce_loss(model, batch)

    with pytest.raises(Interrupt):
        three_stage_pipeline(later_loss=loss).run(tmp_path / "r", progress=False)
    result = invoke("attribute", tmp_path / "r", "--eval", "conftest:toy_eval")
    said = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == 2 and "interrupted after 2 of its 3 stages" in said and "record --resume" in said

    result = invoke("record", "conftest:three_stage_pipeline", tmp_path / "r", "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    assert sc.Run.load(tmp_path / "r").stages == ["pretrain", "finetune", "adapt"]
