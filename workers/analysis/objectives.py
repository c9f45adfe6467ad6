"""The loss the gradient analysis differentiates, named for the report (``gradients.objective``).

- ``labels``: cross-entropy of a classifier's logits against the uploaded labels.
- ``predictions``: cross-entropy against the classifier's own argmax class (no labels given).
- ``instance_discrimination``: for models whose output is an embedding, not class logits:
  backbones built with ``num_classes=0`` (DINOv2, SigLIP, AIMv2 image towers) and CLIP-style
  image towers whose head is a projection into a shared image-text space. Each image is its
  own class (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination", eq. 2): with ``z_i`` the L2-normalised embedding of image ``i`` and the
  candidates ``c_j`` the detached, normalised embeddings of the batch (plus the previous
  batch, as a small memory bank),

      loss_i = -log softmax_j(z_i . c_j / T)[i]          T = `INSTANCE_TEMPERATURE`

  i.e. the contrastive (InfoNCE) loss that image-text and self-supervised towers are trained
  with, minus the other modality. Range [0, log K] for K candidates: log K (chance) when every
  embedding is the same, 0 when each image is far more similar to itself than to the others.
  Its gradient reaches every attention layer through the pooled embedding. A projection's
  outputs are never read as class scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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

    Stateful: the previous batch's embeddings (detached) join each batch's candidates, so a
    batch of one image still has something to be told apart from. The first batch needs at
    least two images.
    """

    reason: str
    temperature: float = INSTANCE_TEMPERATURE
    name: str = "instance_discrimination"
    _bank: Tensor | None = field(default=None, repr=False)

    def targets(self, output: Tensor, labels: Tensor | None = None) -> Tensor:
        """Each image is its own class: the targets are the images' positions in the batch."""
        return torch.arange(output.shape[0], device=output.device)

    def losses(self, output: Tensor, targets: Tensor | None = None) -> Tensor:
        """The loss per image (B,); see `loss`."""
        return self._losses(output)

    def reset(self) -> None:
        """Forget the previous batch (before the same images run again)."""
        self._bank = None

    def loss(self, output: Tensor, labels: Tensor | None = None) -> Tensor:
        """The loss summed over the batch; ``labels`` are not used (each image is its class)."""
        return self._losses(output).sum()

    def _losses(self, output: Tensor) -> Tensor:
        if output.ndim != 2:
            raise ValueError(f"model output is not (B, D) embeddings: {tuple(output.shape)}")
        z = F.normalize(output.float(), dim=-1)
        own = z.detach()
        bank = self._bank if self._bank is not None and self._bank.shape[1] == z.shape[1] else None
        candidates = own if bank is None else torch.cat([own, bank.to(own.device)])
        if candidates.shape[0] < 2:
            raise ValueError("instance discrimination needs at least two images")
        self._bank = own
        logits = z @ candidates.T / self.temperature
        return F.cross_entropy(logits, torch.arange(z.shape[0], device=z.device), reduction="none")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": (
                "proxy loss for an embedding model: each image is its own class; cross-entropy "
                f"of cosine similarities / {self.temperature} to the batch's (and the previous "
                "batch's) detached embeddings (Wu et al. 2018). Range [0, log K], chance log K"
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
