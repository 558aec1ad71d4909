"""CTR quality metrics on all predictions of an evaluation: logloss, AUC, normalized entropy."""

import math
from typing import Dict, Mapping, Optional

import torch
from torchmetrics.functional.classification import binary_auroc


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """``logloss`` (mean binary cross-entropy), ``auc`` (exact ROC AUC), ``ne``, the number of ``examples``
    and their ``click_rate`` (AUC and NE are NaN where it is 0 or 1: a single label leaves them undefined).

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
    return {"logloss": logloss, "auc": auc, "ne": logloss / entropy, "examples": int(labels.numel()),
            "click_rate": rate}


def learned_nothing(metrics: Mapping[str, float]) -> bool:
    """True when a model predicts no better than the click rate: NE >= 1 or AUC <= 0.5, or no NE or
    AUC at all (NaN: a diverged model, or a set with a single label, where they are undefined)."""
    return not (metrics["ne"] < 1.0 and metrics["auc"] > 0.5)


def untrained_warning(what: str, validation: Optional[Mapping[str, float]], steps: int) -> str:
    """Why ``what`` (a trained model) is not worth reading: it had no training step, or it
    :func:`learned_nothing` on ``validation`` after ``steps`` steps; "" when it learned something."""
    if steps == 0 or validation is None:
        return (f"{what} had no training step: the training split has fewer rows than one batch; give a "
                f"smaller --batch-size")
    if not learned_nothing(validation):
        return ""
    if not math.isfinite(validation["logloss"]):
        return (f"{what} diverged: its validation logloss is {validation['logloss']} after {steps} training steps; "
                f"look for dense inputs of very large magnitude (declare log1p or standardize in the CSV spec's "
                f"transforms) or lower the learning rate")
    rate = validation.get("click_rate")
    if rate in (0.0, 1.0):
        return (f"{what} cannot be judged: every validation label is {rate:g}, so AUC and NE are undefined; check "
                f"the label column (the spec's label_threshold or positive_labels) and the split")
    return (
        f"{what} learned nothing: validation NE {validation['ne']:.4f} (1 = no better than predicting the click "
        f"rate), AUC {validation['auc']:.4f}, after {steps} training steps; train for more steps (more --epochs, "
        f"or a smaller --batch-size) before reading anything into its results"
    )
