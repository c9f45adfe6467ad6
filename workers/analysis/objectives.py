"""The loss the gradient analysis differentiates, named for the report (``gradients.objective``).

- ``labels``: cross-entropy of a classifier's logits against the uploaded labels.
- ``predictions``: cross-entropy against the classifier's own argmax class (no labels given).
- ``instance_discrimination``: for models whose output is an embedding, not class logits:
  backbones built with ``num_classes=0`` (DINOv2, SigLIP, AIMv2 image towers) and CLIP-style
  image towers whose head is a projection into a shared image-text space. Each image is its
  own class (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination", eq. 2, with the batch in place of their memory bank): with ``z_i`` the
  L2-normalised embedding of image ``i`` and ``j`` over the images of its batch,

      loss_i = -log softmax_j(z_i . z_j / T)[i]          T = `INSTANCE_TEMPERATURE`

  i.e. the contrastive (InfoNCE) loss that image-text and self-supervised towers are trained
  with, minus the other modality. Range [0, log B] for a batch of B: log B (chance) when every
  embedding is the same, 0 when each image is far more similar to itself than to the others.
  Its gradient reaches every attention layer through the pooled embedding. A projection's
  outputs are never read as class scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Wu et al. 2018 use T = 0.07; CLIP learns it and ends near 0.01. 0.1 keeps the softmax of a
# random-init model (near-identical embeddings) far from saturating while separated
# embeddings still dominate their row.
INSTANCE_TEMPERATURE = 0.1
# Classifier-dataset markers in timm pretrained tags ("openai_ft_in12k_in1k"): a tag with
# one of these names a classifier head, one without names an image-text embedding.
CLASSIFIER_TAG_MARKERS = ("ft", "in1k", "in12k", "in21k", "in22k", "inat")


class ClassifierObjective:
    """Cross-entropy of (B, num_classes) logits against labels or the model's predictions;
    named ``labels`` or ``predictions`` by the batches it saw."""

    name = "predictions"

    def targets(self, output: Tensor, labels: Tensor | None) -> Tensor:
        """The classes each image is scored against: its label, or the model's argmax."""
        if output.ndim != 2:
            raise ValueError(f"model output is not (B, num_classes) logits: {tuple(output.shape)}")
        self.name = "predictions" if labels is None else "labels"
        targets = output.detach().argmax(-1) if labels is None else labels.to(output.device).long()
        if targets.min() < 0 or targets.max() >= output.shape[1]:
            raise ValueError(f"labels must lie in [0, {output.shape[1]})")
        return targets

    def losses(self, output: Tensor, targets: Tensor) -> Tensor:
        """The loss per image (B,) against fixed ``targets`` (see `targets`)."""
        return F.cross_entropy(output, targets, reduction="none")

    def loss(self, output: Tensor, labels: Tensor | None) -> Tensor:
        """The loss summed over the batch."""
        return self.losses(output, self.targets(output, labels)).sum()

    def describe(self) -> dict[str, Any]:
        target = "the uploaded labels" if self.name == "labels" else "the model's own argmax class"
        return {
            "name": self.name,
            "description": f"cross-entropy of the class logits against {target}",
        }


@dataclass
class InstanceDiscrimination:
    """The ``instance_discrimination`` proxy loss over (B, D) embeddings (see module doc).

    A pure function of the batch: the candidates are the batch's own embeddings, kept in
    the graph, so the gradient the section analyses is the whole gradient of this loss (the
    real SGD step check measures exactly that). A batch of one image has nothing to be told
    apart from: its loss is 0 (log 1) and it adds no gradient.
    """

    reason: str
    temperature: float = INSTANCE_TEMPERATURE
    name: str = "instance_discrimination"

    def targets(self, output: Tensor, labels: Tensor | None = None) -> Tensor:
        """Each image is its own class: the targets are the images' positions in the batch."""
        return torch.arange(output.shape[0], device=output.device)

    def losses(self, output: Tensor, targets: Tensor | None = None) -> Tensor:
        """The loss per image (B,): -log softmax_j(z_i . z_j / T)[i]."""
        if output.ndim != 2:
            raise ValueError(f"model output is not (B, D) embeddings: {tuple(output.shape)}")
        z = F.normalize(output.float(), dim=-1)
        logits = z @ z.T / self.temperature
        return F.cross_entropy(logits, torch.arange(z.shape[0], device=z.device), reduction="none")

    def loss(self, output: Tensor, labels: Tensor | None = None) -> Tensor:
        """The loss summed over the batch; ``labels`` are not used (each image is its class)."""
        return self.losses(output).sum()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": (
                "proxy loss for an embedding model: each image is its own class; cross-entropy "
                f"of the cosine similarities / {self.temperature} among the batch's embeddings "
                "(in-batch instance discrimination, Wu et al. 2018 without the memory bank). "
                "Range [0, log B] for a batch of B, chance log B"
            ),
            "temperature": self.temperature,
            "why": self.reason,
        }


@cache
def projection_dims(arch: str | None) -> frozenset[int]:
    """Output sizes of ``arch``'s image-text pretrained heads (CLIP-style projections).

    Read from timm's pretrained configs of the arch: the ``num_classes`` of every tag that
    names no classification dataset, minus the sizes a classifier tag of the arch uses.
    """
    if not arch:
        return frozenset()
    import timm

    embedding, classifier = set(), set()
    for name in timm.list_pretrained(f"{arch}.*"):
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not cfg.num_classes:
            continue
        words = name.split(".", 1)[1].split("_")
        is_classifier = any(w in CLASSIFIER_TAG_MARKERS for w in words)
        (classifier if is_classifier else embedding).add(int(cfg.num_classes))
    return frozenset(embedding - classifier)


def choose_objective(
    model: nn.Module, arch: str | None
) -> ClassifierObjective | InstanceDiscrimination:
    """The objective for ``model``: a classifier's cross-entropy, or the embedding proxy for
    a head-less backbone (``num_classes=0``) or a CLIP-style projection head (its output size
    is one of the arch's image-text pretrained heads, see `projection_dims`)."""
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    head = getattr(model, "head", None)
    if num_classes == 0 or isinstance(head, nn.Identity):
        return InstanceDiscrimination("the model has no classifier head (num_classes=0)")
    if num_classes in projection_dims(arch):
        return InstanceDiscrimination(
            f"the head's {num_classes} outputs match the image-text projection of '{arch}' "
            "(a CLIP-style embedding, not class scores)"
        )
    return ClassifierObjective()
