"""The trajectory-matching methods through ce.distill: MTT lowers its matching loss and resumes
exactly, its memory modes agree, TESLA trains on the target expert's soft labels, DATM learns its
labels inside a growing start-epoch window."""
import json

import pytest
import torch

import condense_engine as ce
from condense_engine.checkpoint import load_checkpoint
from condense_engine.datasets import from_tensors
from condense_engine.expert import load_experts, train_experts
from condense_engine.methods.mtt import DATM, MTT

SMALL = dict(model="ConvNetD1", syn_steps=4, expert_epochs=2, max_start_epoch=1, lr_img=100.0)




def _toy():
    """4 classes of 8×8 images whose brightness depends on the class (learnable in a few epochs)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(12)
    images = torch.rand(48, 3, 8, 8, generator=generator) * 0.5 + labels.view(-1, 1, 1, 1) / 8.0
    return from_tensors((images * 255).to(torch.uint8), labels, name="toy")


@pytest.fixture(scope="module")
def buffer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("experts")
    train_experts(_toy(), 2, 3, model="ConvNetD1", batch_size=16, device="cpu", out=folder)
    return str(folder)


def _losses(path):
    return [json.loads(line)["loss"] for line in open(path)]


def test_mtt_lowers_its_matching_loss(buffer, tmp_path):
    log = tmp_path / "log.jsonl"
    synset = ce.distill(_toy(), method="mtt", ipc=2, iterations=12, device="cpu", progress=False, buffer=buffer,
                        log=str(log), memory="exact", **SMALL)
    losses = _losses(log)
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    assert isinstance(synset.lr, torch.Tensor) and not synset.lr.requires_grad
    assert float(synset.lr) != 0.01                     # the student lr is learned
    assert synset.labels.dtype == torch.int64


def test_memory_modes_unrolled_and_exact_give_the_same_run(buffer):
    runs = [ce.distill(_toy(), method="mtt", ipc=2, iterations=3, device="cpu", progress=False, buffer=buffer,
                       memory=memory, **SMALL) for memory in ("unrolled", "constant")]
    assert torch.allclose(runs[0].images, runs[1].images, atol=1e-4)
    assert torch.allclose(runs[0].lr, runs[1].lr, rtol=1e-4)


def test_mtt_resume_is_exact(buffer, tmp_path, monkeypatch):
    options = dict(ipc=2, iterations=4, device="cpu", progress=False, buffer=buffer, **SMALL)
    full = ce.distill(_toy(), method="mtt", **options)
    checkpoint = str(tmp_path / "ckpt.pt")
    original, calls = MTT.step, {"n": 0}

    def failing_step(self, synset, iteration):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return original(self, synset, iteration)

    monkeypatch.setattr(MTT, "step", failing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ce.distill(_toy(), method="mtt", checkpoint=checkpoint, checkpoint_every=2, **options)
    monkeypatch.setattr(MTT, "step", original)
    assert load_checkpoint(checkpoint)["iteration"] == 2
    resumed = ce.distill(_toy(), method="mtt", checkpoint=checkpoint, resume=True, **options)
    assert torch.equal(resumed.images, full.images)
    assert torch.equal(resumed.lr, full.lr)


def test_missing_or_mismatched_buffer_is_a_clear_error(buffer, tmp_path):
    with pytest.raises(ValueError, match="needs buffer="):
        ce.distill(_toy(), method="mtt", ipc=2, iterations=1, device="cpu", progress=False, model="ConvNetD1")
    with pytest.raises(FileNotFoundError, match="no expert buffer"):
        ce.distill(_toy(), method="mtt", ipc=2, iterations=1, device="cpu", progress=False,
                   buffer=str(tmp_path / "none"), model="ConvNetD1")
    with pytest.raises(ValueError, match="model 'ConvNetD1', not 'ConvNet'"):
        ce.distill(_toy(), method="mtt", ipc=2, iterations=1, device="cpu", progress=False, buffer=buffer)
    with pytest.raises(ValueError, match="need trajectories of 4 epochs"):
        ce.distill(_toy(), method="mtt", ipc=2, iterations=1, device="cpu", progress=False, buffer=buffer,
                   **dict(SMALL, max_start_epoch=3))
    with pytest.raises(ValueError, match="memory"):
        ce.distill(_toy(), method="mtt", ipc=2, iterations=1, device="cpu", progress=False, buffer=buffer,
                   **dict(SMALL, memory="sparse"))


def test_published_defaults_follow_the_data_set_and_ipc():
    assert MTT("cifar10", 10).options["syn_steps"] == 30
    assert MTT("CIFAR-100", 50).options["batch_syn"] == 125
    assert MTT("tinyimagenet", 10).options["model"] == "ConvNetD4"
    datm = DATM("cifar10", 50).options
    assert (datm["min_start_epoch"], datm["current_max_start_epoch"], datm["max_start_epoch"]) == (0, 20, 40)
    assert datm["sequential_generation"] and datm["expansion_end_epoch"] == 2000
    assert not DATM("cifar100", 100).options["sequential_generation"]


def test_tesla_trains_on_the_target_experts_soft_labels(buffer):
    synset = ce.distill(_toy(), method="tesla", ipc=2, iterations=3, device="cpu", progress=False, buffer=buffer,
                        **SMALL)
    assert synset.labels.shape == (8, 4) and synset.labels.dtype == torch.float32
    assert torch.allclose(synset.labels.sum(1), torch.ones(8))
    assert float(synset.lr) != 0.01


def test_datm_window_grows_to_its_final_value():
    datm = DATM("toy", 2, min_start_epoch=1, current_max_start_epoch=3, max_start_epoch=9,
                expansion_end_epoch=100)
    assert datm.start_window(0) == (1, 3)
    assert datm.start_window(50) == (1, 6)
    assert datm.start_window(100) == (1, 9) == datm.start_window(10_000)
    fixed = DATM("toy", 2, min_start_epoch=1, max_start_epoch=9, sequential_generation=False)
    assert fixed.start_window(0) == (1, 9)


@pytest.mark.parametrize("window, message", [
    (dict(current_max_start_epoch=12), "current_max_start_epoch ≤ max_start_epoch"),
    (dict(current_max_start_epoch=1), "min_start_epoch < current_max_start_epoch")])
def test_datm_refuses_a_window_that_cannot_grow(window, message):
    datm = DATM("toy", 2, **dict(dict(min_start_epoch=1, current_max_start_epoch=3, max_start_epoch=9,
                                      expansion_end_epoch=100), **window))
    with pytest.raises(ValueError, match=message):
        datm.start_window_limits()
    assert DATM("toy", 2, **dict(dict(min_start_epoch=1, max_start_epoch=9, sequential_generation=False),
                                 **window)).start_window_limits() == (1, 8)  # no growth, no constraint


def test_datm_learns_soft_labels_from_expert_logits(buffer, tmp_path):
    log = tmp_path / "log.jsonl"
    options = dict(ipc=2, device="cpu", progress=False, buffer=buffer, model="ConvNetD1", syn_steps=4,
                   expert_epochs=1, min_start_epoch=0, current_max_start_epoch=1, max_start_epoch=2,
                   expansion_end_epoch=4, batch_syn=None, lr_y=10.0, threshold=10.0)
    initial = ce.distill(_toy(), method="datm", iterations=0, **options)
    learned = ce.distill(_toy(), method="datm", iterations=6, log=str(log), **options)
    assert initial.labels.shape == (8, 4) and torch.allclose(initial.labels.sum(1), torch.ones(8))
    assert not torch.allclose(learned.labels, initial.labels, atol=1e-6)
    records = [json.loads(line) for line in open(log)]
    assert [r["window_end"] for r in records] == [1.0, 1.0, 1.0, 1.0, 2.0, 2.0]  # 1 + ⌊it/4⌋, capped at 2
    assert all(r["start_epoch"] < r["window_end"] for r in records)
    assert not any(r["skipped"] for r in records)


def test_datm_skips_updates_above_the_loss_threshold(buffer):
    options = dict(ipc=2, device="cpu", progress=False, buffer=buffer, model="ConvNetD1", syn_steps=2,
                   expert_epochs=1, min_start_epoch=0, max_start_epoch=2, sequential_generation=False,
                   batch_syn=None, threshold=0.0)
    before = ce.distill(_toy(), method="datm", iterations=0, **options)
    after = ce.distill(_toy(), method="datm", iterations=2, **options)
    assert torch.equal(before.images, after.images) and torch.equal(before.labels, after.labels)


def test_datm_starts_from_real_images_an_expert_classifies_correctly(buffer):
    data = _toy()
    synset = ce.distill(data, method="datm", iterations=0, ipc=2, device="cpu", progress=False, buffer=buffer,
                        model="ConvNetD1", expert_epochs=1, max_start_epoch=2, sequential_generation=False)
    experts = load_experts(buffer)
    student = experts.network()
    predicted = student.forward(synset.images, experts[0][-1]).argmax(1)
    assert torch.equal(predicted, synset.hard_labels)
    real = data.normalized()
    assert all((real - image).abs().amax((1, 2, 3)).min() < 1e-5 for image in synset.images)
