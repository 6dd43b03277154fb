"""FID: the Frechet distance and the Inception-feature scorer against held-out scenes."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

STANDIN_WEIGHTS = "fid-standin-inception.pth"


# -- FID ----------------------------------------------------------------------------------------------------
def to_uint8(images: Tensor) -> Tensor:
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def frechet_distance(
    mu1: Tensor, sigma1_sqrt: Tensor, sigma1_trace: float, mu2: Tensor, sigma2: Tensor
) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``, with the trace of the square root taken as
    ``sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))`` (the same eigenvalues as ``S1 S2``, from a symmetric matrix:
    ``eigvalsh`` instead of the general ``eigvals`` torch-fidelity uses, same value to rounding)."""
    m = sigma1_sqrt @ sigma2 @ sigma1_sqrt
    eig = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0)
    diff = mu1 - mu2
    return float(diff @ diff + sigma1_trace + torch.trace(sigma2) - 2 * eig.sqrt().sum())


class FIDScorer:
    """FID of image sets against fixed reference images: torch-fidelity's ``inception-v3-compat`` features
    (``weights``: a local file), the reference statistics computed once (and cached at ``cache``)."""

    def __init__(
        self, weights: Path, layer: str, device: torch.device, reference: Tensor, cache: Path | None = None
    ) -> None:
        from torch_fidelity.utils import create_feature_extractor

        from ldm_sdk.evaluation.generative import FEATURE_EXTRACTOR, check_inception_weights

        self.device = device
        self.extractor = create_feature_extractor(
            FEATURE_EXTRACTOR,
            [layer],
            cuda=device.type == "cuda",
            feature_extractor_weights_path=str(check_inception_weights(weights)),
            verbose=False,
        )
        if cache is not None and cache.is_file():
            ref = torch.load(cache)
        else:
            mu, sigma = self.statistics(reference)
            ref = {"mu": mu, "sigma": sigma}
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".{os.getpid()}.tmp")
                torch.save(ref, tmp)
                os.replace(tmp, cache)
        self.mu = ref["mu"].to(device)
        sigma = ref["sigma"].to(device)
        w, v = torch.linalg.eigh(sigma)
        self.sigma_sqrt = (v * w.clamp(min=0).sqrt()) @ v.T
        self.sigma_trace = float(torch.trace(sigma))

    @torch.no_grad()
    def features(self, images: Tensor, batch: int = 250) -> Tensor:
        out = []
        for i in range(0, len(images), batch):
            feats = self.extractor(images[i : i + batch].to(self.device))
            out.append((feats[0] if isinstance(feats, tuple) else feats).double())
        return torch.cat(out)

    def statistics(self, images: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(images)
        return f.mean(0).cpu(), torch.cov(f.T).cpu()

    def score(self, images: Tensor) -> float:
        """FID of uint8 ``[N, 3, H, W]`` images against the reference."""
        if len(images) < 2:
            raise ValueError("FID needs at least 2 images")
        mu, sigma = self.statistics(images)
        return frechet_distance(
            self.mu, self.sigma_sqrt, self.sigma_trace, mu.to(self.device), sigma.to(self.device)
        )
