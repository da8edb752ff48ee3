"""DM end to end on small real-shaped data: loss falls, the batched loss equals the per-class
loop of the published code, the driver resumes bit-identically and guards against NaNs."""
import json
import math
import os
from dataclasses import replace

import pytest
import torch

import condense_engine as ce
from condense_engine.checkpoint import load_checkpoint, save_checkpoint
from condense_engine.errors import NonFiniteLossError
from condense_engine.methods.dm import DM
from condense_engine.models import ConvNetBank
from tests.toy_data import FAST, distill_interrupted, toy_dataset


def test_dm_lowers_its_loss():
    data = toy_dataset()
    log = []
    syn = ce.distill(data, method="dm", ipc=2, iterations=30, seed=0, progress=False, device="cpu", lr_img=1.0,
                     **dict(FAST, dsa=False))
    assert syn.images.shape == (6, 1, 12, 12)
    assert syn.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # Measure the loss with fixed nets before and after distillation.
    init = ce.distill(data, method="dm", ipc=2, iterations=0, seed=0, progress=False, device="cpu", **dict(FAST, dsa=False))
    method = DM(data.name, 2, **dict(FAST, dsa=False))
    real = data.normalized()
    real = torch.cat([real[data.labels == c][:24] for c in range(3)])
    for seed in range(5):
        bank = ConvNetBank(1, channel=1, width=32, im_size=(12, 12), generator=torch.Generator().manual_seed(seed))
        method.num_classes = 3
        with torch.no_grad():
            before = method.embed_loss(bank, real, init.images, 2)
            after = method.embed_loss(bank, real, syn.images, 2)
        log.append((float(before), float(after)))
    assert sum(a for _, a in log) < 0.8 * sum(b for b, _ in log), log


def test_batched_loss_equals_published_per_class_loop():
    data = toy_dataset()
    method = DM(data.name, 2, **FAST)
    method.num_classes = 3
    bank = ConvNetBank(1, channel=1, width=32, im_size=(12, 12), generator=torch.Generator().manual_seed(3))
    real = torch.randn(3 * 5, 1, 12, 12)
    syn = torch.randn(3 * 2, 1, 12, 12)
    batched = method.embed_loss(bank, real, syn, 2)
    looped = sum(((bank.embed(real[5 * c:5 * c + 5])[0].mean(0) - bank.embed(syn[2 * c:2 * c + 2])[0].mean(0)) ** 2).sum()
                 for c in range(3))
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)


def test_seed_determinism():
    data = toy_dataset()
    a = ce.distill(data, method="dm", ipc=2, iterations=3, seed=5, progress=False, device="cpu", **FAST)
    b = ce.distill(data, method="dm", ipc=2, iterations=3, seed=5, progress=False, device="cpu", **FAST)
    c = ce.distill(data, method="dm", ipc=2, iterations=3, seed=6, progress=False, device="cpu", **FAST)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_resume_after_interruption_is_bit_identical(tmp_path):
    data = toy_dataset()
    full = ce.distill(data, method="dm", ipc=2, iterations=6, seed=1, progress=False, device="cpu", **FAST)
    ckpt = str(tmp_path / "ckpt.pt")
    log = str(tmp_path / "log.jsonl")
    checkpointed = ce.distill(data, method="dm", ipc=2, iterations=6, seed=1, progress=False, device="cpu", checkpoint=ckpt,
                              checkpoint_every=2, log=log, **FAST)
    assert torch.equal(checkpointed.images, full.images)
    os.remove(ckpt)
    assert distill_interrupted(DM, 4, dataset=data, method="dm", ipc=2, iterations=6, seed=1, progress=False, device="cpu",
                               checkpoint=ckpt, checkpoint_every=100, **FAST) == 4
    resumed = ce.distill(data, method="dm", ipc=2, iterations=6, seed=1, progress=False, device="cpu", checkpoint=ckpt,
                         resume=True, log=log, **FAST)
    assert torch.equal(resumed.images, full.images)


def test_resume_rejects_another_run_naming_what_differs(tmp_path):
    data = toy_dataset()
    ckpt = str(tmp_path / "ckpt.pt")
    run = dict(method="dm", ipc=2, seed=1, progress=False, device="cpu", checkpoint=ckpt, **FAST)
    ce.distill(data, iterations=2, **run)
    with pytest.raises(ValueError, match=r"another run: seed 1 there, 2 here\. Remove it"):
        ce.distill(data, iterations=4, resume=True, **dict(run, seed=2))
    with pytest.raises(ValueError, match=r"another run: option lr_img 1\.0 there, 3\.0 here\. Remove it"):
        ce.distill(data, iterations=4, resume=True, lr_img=3.0, **run)
    other_pixels = replace(data, images=data.images.flip(0))  # same name, shape and labels' counts
    with pytest.raises(ValueError, match=r"another run: the data's fingerprint '[0-9a-f]{16}' there, '[0-9a-f]{16}' "):
        ce.distill(other_pixels, iterations=4, resume=True, **run)


def test_a_checkpoint_without_a_data_fingerprint_still_resumes(tmp_path):
    """Checkpoints written before the fingerprint was recorded continue as before."""
    data = toy_dataset()
    ckpt = str(tmp_path / "ckpt.pt")
    run = dict(method="dm", ipc=2, seed=1, progress=False, device="cpu", **FAST)
    ce.distill(data, iterations=2, checkpoint=ckpt, **run)
    state = load_checkpoint(ckpt)
    del state["config"]["data"]
    save_checkpoint(state, ckpt)
    resumed = ce.distill(data, iterations=4, checkpoint=ckpt, resume=True, **run)
    torch.testing.assert_close(resumed.images, ce.distill(data, iterations=4, **run).images, rtol=0, atol=0)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    """lr_img 1e30 blows the pixels up until the torch GroupNorm's float variance overflows to a
    NaN loss. (The fused epilogues' shifted sums overflow to rstd 0 instead: the loss stays
    finite, so this run uses the torch ops.)"""
    monkeypatch.setenv("CONDENSE_BACKEND", "torch")
    data = toy_dataset()
    ckpt = str(tmp_path / "ckpt.pt")
    with pytest.raises(NonFiniteLossError, match="iteration"):
        ce.distill(data, method="dm", ipc=2, iterations=50, seed=0, progress=False, device="cpu", checkpoint=ckpt,
                   checkpoint_every=1, **dict(FAST, lr_img=1e30))
    saved = load_checkpoint(ckpt)
    assert torch.isfinite(saved["images"]).all()


def test_bad_input():
    data = toy_dataset(per_class=4)
    with pytest.raises(ValueError, match="larger than class"):
        ce.distill(data, method="dm", ipc=5, iterations=1, progress=False, device="cpu")
    with pytest.raises(ValueError, match="unknown method"):
        ce.distill(data, method="nope", ipc=1, iterations=1, progress=False, device="cpu")
    with pytest.raises(ValueError, match="no option"):
        ce.distill(data, method="dm", ipc=1, iterations=1, progress=False, device="cpu", lr_imgg=3)
    for option, message in [(dict(lr_img="abc"), "lr_img must be a number"), (dict(lr_img=float("nan")), "finite"),
                            (dict(lr_img=-1.0), "lr_img is a learning rate and must be positive"),
                            (dict(batch_real=8.5), "batch_real must be an int"), (dict(dsa=1), "dsa must be a bool"),
                            (dict(model=3), "model must be a string")]:
        with pytest.raises(ValueError, match=message):
            ce.distill(data, method="dm", ipc=1, iterations=1, progress=False, device="cpu", **option)
    with pytest.raises(TypeError, match="ImageDataset"):
        ce.distill("mnist", method="dm", ipc=1, iterations=1, progress=False, device="cpu")


def test_log_is_json_lines(tmp_path):
    data = toy_dataset()
    log = tmp_path / "log.jsonl"
    ce.distill(data, method="dm", ipc=1, iterations=3, progress=False, device="cpu", log=str(log), **FAST)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records)


def test_bf16_precision_follows_fp32_and_bad_precision_is_refused():
    """bf16 autocast embeddings give the fp32 step's loss and pixel gradient to bf16 accuracy."""
    data = toy_dataset()
    bank = ConvNetBank(1, channel=1, width=32, im_size=(12, 12), generator=torch.Generator().manual_seed(3))
    real = torch.randn(3 * 8, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    pixels = torch.randn(3 * 2, 1, 12, 12, generator=torch.Generator().manual_seed(5), requires_grad=True)
    results = {}
    for precision in ("fp32", "bf16"):
        method = DM(data.name, 2, **dict(FAST, precision=precision))
        method.num_classes = 3
        pixels.grad = None
        results[precision] = (method.backward_loss(bank, real, pixels * 1.0, 2), pixels.grad.clone())
    (loss32, grad32), (loss16, grad16) = results["fp32"], results["bf16"]
    assert loss16.dtype == torch.float32 and not torch.equal(grad16, grad32)
    torch.testing.assert_close(loss16, loss32, rtol=5e-2, atol=0)
    cosine = torch.nn.functional.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0)
    assert cosine > 0.99, cosine
    with pytest.raises(ValueError, match="precision"):
        ce.distill(data, method="dm", ipc=2, iterations=1, progress=False, device="cpu", precision="fp16", **FAST)
