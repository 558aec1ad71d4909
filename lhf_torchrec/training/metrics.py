"""CTR quality metrics on all predictions of an evaluation: logloss, AUC, normalized entropy."""

import math
from typing import Dict

import torch
from torchmetrics.functional.classification import binary_auroc


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """``logloss`` (mean binary cross-entropy), ``auc`` (exact ROC AUC) and ``ne``.

    NE (He et al., "Practical Lessons from Predicting Clicks on Ads at Facebook", 2014) is the
    logloss divided by the entropy of the evaluated set's click rate: 1.0 is no better than
    predicting the base rate, lower is better.
    """
    if logits.numel() == 0:
        raise ValueError("no predictions to evaluate")
    logits = logits.detach().double().reshape(-1)
    labels = labels.detach().double().reshape(-1)
    logloss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).item()
    rate = labels.mean().item()
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) if 0 < rate < 1 else float("nan")
    auc = binary_auroc(torch.sigmoid(logits), labels.long()).item() if 0 < rate < 1 else float("nan")
    return {"logloss": logloss, "auc": auc, "ne": logloss / entropy, "examples": int(labels.numel())}
