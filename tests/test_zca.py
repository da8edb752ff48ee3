"""ZCA whitening: exact inverse, the whitened covariance, agreement with a direct formula, state."""
import io

import numpy as np
import pytest
import torch

import condense_engine.datasets as ds
from condense_engine.datasets import zca as zca_module


def correlated_pixels(count=300, shape=(2, 4, 4), seed=0):
    """[0, 1] images with correlated pixels and unequal variances (so whitening has work to do)."""
    generator = torch.Generator().manual_seed(seed)
    dim = int(np.prod(shape))
    mixing = torch.eye(dim, dtype=torch.float64) + torch.randn(dim, dim, generator=generator,
                                                            dtype=torch.float64) * 0.3 / dim ** 0.5
    values = torch.randn(count, dim, generator=generator, dtype=torch.float64) @ mixing
    values = (values - values.min()) / (values.max() - values.min())
    return values.float().reshape(count, *shape)


def test_apply_then_inverse_recovers_the_input():
    images = correlated_pixels()
    zca = ds.ZCA.fit(images, eps=0.1)
    whitened = zca.apply(images)
    assert whitened.dtype == torch.float32 and whitened.shape == images.shape
    assert torch.allclose(zca.inverse(whitened), images, atol=1e-5)


def test_whitened_covariance_is_near_identity():
    images = correlated_pixels(count=2000)
    flat = ds.ZCA.fit(images, eps=1e-6).apply(images).double().reshape(len(images), -1)
    covariance = torch.cov(flat.T)
    assert torch.allclose(covariance, torch.eye(flat.shape[1], dtype=torch.float64), atol=1e-3)
    assert flat.mean(dim=0).abs().max() < 1e-5


def test_matches_the_direct_formula_with_eps():
    images = correlated_pixels()
    flat = images.double().reshape(len(images), -1).numpy()
    centred = flat - flat.mean(axis=0)
    eigenvalues, vectors = np.linalg.eigh(np.cov(centred, rowvar=False))
    transform = vectors @ np.diag(1 / np.sqrt(np.clip(eigenvalues, 0, None) + 0.1)) @ vectors.T
    expected = torch.from_numpy(centred @ transform).float().reshape(images.shape)
    assert torch.allclose(ds.ZCA.fit(images).apply(images), expected, atol=1e-5)


def test_uint8_is_read_as_pixels_and_chunking_changes_nothing(monkeypatch):
    raw = (correlated_pixels() * 255).round().to(torch.uint8)
    whole = ds.ZCA.fit(raw)
    monkeypatch.setattr(zca_module, "_CHUNK_ELEMENTS", 40)
    chunked = ds.ZCA.fit(raw.float() / 255)
    assert torch.allclose(whole.apply(raw), chunked.apply(raw.float() / 255), atol=1e-5)


def test_state_dict_round_trip_through_torch_save():
    images = correlated_pixels()
    zca = ds.ZCA.fit(images)
    buffer = io.BytesIO()
    torch.save(zca.state_dict(), buffer)
    buffer.seek(0)
    restored = ds.ZCA.from_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.apply(images), zca.apply(images))
    assert restored.shape == (2, 4, 4) and restored.eps == pytest.approx(0.1)


def test_errors_and_whiten_dataset():
    images = correlated_pixels(count=50)
    zca = ds.ZCA.fit(images)
    with pytest.raises(ValueError, match=r"x must be \(N, 2, 4, 4\)"):
        zca.apply(torch.zeros(4, 2, 4, 3))
    with pytest.raises(ValueError, match="N >= 2"):
        ds.ZCA.fit(images[:1])
    dataset = ds.from_tensors((images * 255).round().to(torch.uint8), torch.arange(50) % 5)
    whitened = ds.whiten(dataset)
    assert whitened.images.dtype == torch.float32 and whitened.zca is not None
    assert whitened.mean == (0.0, 0.0) and whitened.std == (1.0, 1.0)
    with pytest.raises(ValueError, match="already ZCA-whitened"):
        ds.whiten(whitened)
