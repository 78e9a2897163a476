"""The mathematics of growing a chain by one model (`rdscale extend`): the extension step as a 2-block fit on
[z; h_new], taken from a longer fit (`step_from_longer_fit`), and the base fit followed by its steps applied to
per-model embeddings (`apply_chain`). Pure functions of fits and tensors: no I/O."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rdscale.errors import RdscaleError
from rdscale.fit.chain import ChainFit


class ExtendError(RdscaleError, RuntimeError):
    """The run cannot be extended as asked; the message says why and what to do."""


def step_from_longer_fit(longer: ChainFit, width: int) -> ChainFit:
    """The last step of `longer` (whose second-to-last level is `width`) as a 2-block fit on [z; h_new].

    In the long chain, new block = ((h - mu_h) - (acc - mean acc) W) V with acc = z and mean acc = the offset of z
    ([mean h_1, 0, ...], chain.py's `affine`), i.e. ([z; h] - [offset; mu_h]) @ [[-W V], [V]]."""
    if len(longer.widths) < 2 or longer.widths[-2] != width:
        raise ExtendError(f"the longer fit's chain {longer.widths} does not extend a {width}-wide embedding")
    k_new = longer.widths[-1]
    predictor, direction = longer.predictors[-1], longer.directions[-1]  # (width, k_new), (k_new, k_new - width)
    _, _, offset = truncate(longer, len(longer.widths) - 1).affine()  # offset: (width,)
    mean = np.concatenate([offset, longer.mean[-k_new:]])  # (width + k_new,)
    projection = np.concatenate([-predictor @ direction, direction], axis=0)  # (width + k_new, k_new - width)
    return ChainFit(
        widths=(width, k_new), regression=longer.regression, mean=mean, projection=projection,
        predictors=[predictor], directions=[direction], steps=[longer.steps[-1]], n_residues=longer.n_residues,
        options=dict(longer.options),
    )


def truncate(fit: ChainFit, levels: int) -> ChainFit:
    """The first `levels` levels of a chain fit: a fit of the first `levels` models (level j uses models <= j)."""
    widths = fit.widths[:levels]
    k_total = sum(widths)
    return ChainFit(
        widths=widths, regression=fit.regression, mean=fit.mean[:k_total],
        projection=fit.projection[:k_total, : widths[-1] - widths[0]],
        predictors=fit.predictors[: levels - 1], directions=fit.directions[: levels - 1],
        steps=fit.steps[: levels - 1], n_residues=fit.n_residues, options=dict(fit.options),
    )


def check_prefix_fit(longer: ChainFit, base: ChainFit) -> None:
    m = len(base.widths)
    if tuple(longer.widths[:m]) != tuple(base.widths) or len(longer.widths) != m + 1:
        raise ExtendError(f"--from-fit has chain {longer.widths}; this run needs {tuple(base.widths)} + one model")
    head = truncate(longer, m)
    if not (np.allclose(head.mean, base.mean, rtol=1e-9, atol=1e-12)
            and np.allclose(head.projection, base.projection, rtol=1e-7, atol=1e-9)):
        raise ExtendError(
            "the longer fit's first levels differ from this run's fit (fitted on another sample?), so its last "
            "step does not apply to the stored embeddings; omit --from-fit to fit the step from the stored prefix"
        )


def apply_chain(fits: Sequence[ChainFit], blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-model embeddings [h_1, ..., h_n] of some residues -> the run's stored embedding, through the base fit
    and then each extension step: z <- step.apply([z, h_next]). blocks: (L, k_i) each; returns (L, width)."""
    if not fits:
        return blocks[0].float()
    base = fits[0]
    m = len(base.widths)
    if len(blocks) != m + len(fits) - 1:
        raise ExtendError(f"{len(blocks)} model outputs for a chain of {m + len(fits) - 1} models")
    z = base.apply(list(blocks[:m]))  # (L, k_m) float32
    for step, h in zip(fits[1:], blocks[m:]):
        z = step.apply([z, h.to(z.dtype)])  # (L, k_next)
    return z
