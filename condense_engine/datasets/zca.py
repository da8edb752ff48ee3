"""ZCA whitening as MTT/TESLA/DATM use it (kornia ZCAWhitening, eps 0.1, fit on [0, 1] pixels).

Each image is flattened to a D = C·H·W vector. Fitting centres by the mean image, forms the
unbiased covariance, and eigendecomposes it: with cov = U diag(λ) Uᵀ the transform is
W = U diag(1/√(λ+eps)) Uᵀ and y = (x − μ) W; the inverse is x = y U diag(√(λ+eps)) Uᵀ + μ.
All arithmetic is float64, accumulated in chunks so a 50000 × 3072 set never needs a float64 copy.
"""
from dataclasses import replace

import torch

from condense_engine.datasets.base import ImageDataset

_CHUNK_ELEMENTS = 1 << 24


class ZCA:
    """A fitted ZCA transform for images of one shape (C, H, W)."""

    def __init__(self, mean: torch.Tensor, eigenvectors: torch.Tensor, eigenvalues: torch.Tensor,
                 eps: float, shape: tuple):
        self.mean = mean.detach().double().cpu()
        self.eigenvectors = eigenvectors.detach().double().cpu()
        self.eigenvalues = eigenvalues.detach().double().cpu()
        self.eps = float(eps)
        self.shape = tuple(int(s) for s in shape)
        self._matrices = {}

    @classmethod
    def fit(cls, images01: torch.Tensor, eps: float = 0.1) -> "ZCA":
        """Fit on (N, C, H, W) pixels in [0, 1] (uint8 is read as value/255); N ≥ 2."""
        if images01.dim() != 4 or images01.shape[0] < 2:
            raise ValueError(f"images01 must be (N, C, H, W) with N >= 2, got {tuple(images01.shape)}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        count, dim = images01.shape[0], images01[0].numel()
        total = torch.zeros(dim, dtype=torch.float64, device=images01.device)
        for chunk in _flat_chunks(images01):
            total += chunk.sum(dim=0)
        mean = total / count
        covariance = torch.zeros(dim, dim, dtype=torch.float64, device=images01.device)
        for chunk in _flat_chunks(images01):
            centred = chunk - mean
            covariance.addmm_(centred.T, centred)
        covariance /= count - 1
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        return cls(mean, eigenvectors, eigenvalues.clamp_min(0), eps, images01.shape[1:])

    def _matrix(self, device: torch.device, inverse: bool) -> torch.Tensor:
        key = (str(device), inverse)
        if key not in self._matrices:
            power = 0.5 if inverse else -0.5
            scales = (self.eigenvalues + self.eps).pow(power)
            matrix = (self.eigenvectors * scales) @ self.eigenvectors.T
            self._matrices[key] = matrix.to(device)
        return self._matrices[key]

    def _check(self, x: torch.Tensor, what: str) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{what} must be (N, {', '.join(map(str, self.shape))}), "
                             f"got {tuple(x.shape)}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten (N, C, H, W) [0, 1] pixels (uint8 read as value/255) → float32, same device."""
        self._check(x, "x")
        matrix = self._matrix(x.device, inverse=False)
        mean = self.mean.to(x.device)
        parts = [((chunk - mean) @ matrix).float() for chunk in _flat_chunks(x)]
        return _join(parts, x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Map whitened (N, C, H, W) images back to [0, 1] pixel space (float32)."""
        self._check(y, "y")
        matrix = self._matrix(y.device, inverse=True)
        mean = self.mean.to(y.device)
        parts = [(chunk @ matrix + mean).float() for chunk in _flat_chunks(y)]
        return _join(parts, y)

    def state_dict(self) -> dict:
        """Plain tensors and numbers (loadable with torch.load(weights_only=True))."""
        return {"mean": self.mean, "eigenvectors": self.eigenvectors,
                "eigenvalues": self.eigenvalues, "eps": self.eps, "shape": self.shape}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ZCA":
        return cls(state["mean"], state["eigenvectors"], state["eigenvalues"], state["eps"],
                   tuple(state["shape"]))


def _flat_chunks(images: torch.Tensor):
    """Float64 (n, D) row blocks of the flattened images; uint8 scaled to [0, 1]."""
    flat = images.reshape(images.shape[0], -1)
    rows = max(1, _CHUNK_ELEMENTS // max(1, flat.shape[1]))
    for chunk in flat.split(rows):
        values = chunk.double()
        yield values / 255.0 if chunk.dtype == torch.uint8 else values


def _join(parts: list, like: torch.Tensor) -> torch.Tensor:
    joined = torch.cat(parts) if parts else torch.empty(0, like[0].numel(), device=like.device)
    return joined.reshape(like.shape)


def whiten(dataset: ImageDataset, zca: ZCA | None = None, *, eps: float = 0.1) -> ImageDataset:
    """The data set ZCA-whitened: fit on it when `zca` is None (train), else apply `zca` (test).

    The result stores float32 images in network space, `zca` set, and mean 0 / std 1 (so
    network space = ZCA(pixels), and `zca.inverse` maps back to [0, 1] pixels).
    """
    if dataset.zca is not None:
        raise ValueError(f"{dataset.name} ({dataset.split}) is already ZCA-whitened")
    pixels = dataset.images if dataset.images.dtype == torch.uint8 else dataset.pixels01()
    zca = zca if zca is not None else ZCA.fit(pixels, eps=eps)
    zeros = (0.0,) * dataset.channels
    return replace(dataset, images=zca.apply(pixels), mean=zeros, std=(1.0,) * dataset.channels,
                   zca=zca)
