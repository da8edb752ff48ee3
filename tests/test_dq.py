"""DQ (methods.md §10): the factorised gradient-embedding similarity, recursive GraphCut bins
against a plain per-class greedy loop, bin quotas, and runs that select real training images."""
import json

import pytest
import torch
import torch.nn.functional as F

import condense_engine as ce
from condense_engine.checkpoint import load_checkpoint
from condense_engine.datasets import ClassSampler
from condense_engine.methods.dq import (DQ, bin_quotas, bin_sizes, gradient_cosine_similarity, gradient_embedding_parts,
                                        graphcut_bins)
from tests.toy_data import toy_dataset

RUN = dict(method="dq", ipc=4, seed=0, progress=False, device="cpu", model="ConvNetW32", bins=3, batch_net=16)


@pytest.mark.parametrize("double_softmax", [False, True])
def test_gradient_parts_are_the_cross_entropy_gradient_wrt_the_logits(double_softmax):
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    inputs = logits.softmax(1) if double_softmax else logits
    per_sample = F.cross_entropy(inputs, labels, reduction="none")
    expected = torch.stack([torch.autograd.grad(loss, logits, retain_graph=True)[0][i]
                            for i, loss in enumerate(per_sample)])
    torch.testing.assert_close(gradient_embedding_parts(logits.detach(), labels, double_softmax), expected)


def test_similarity_equals_the_cosine_of_the_explicit_embeddings():
    grads, features = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 6, 9, dtype=torch.float64)
    explicit = torch.cat([grads, (grads.unsqueeze(-1) * features.unsqueeze(-2)).flatten(2)], dim=2)
    expected = F.cosine_similarity(explicit.unsqueeze(2), explicit.unsqueeze(1), dim=-1)
    torch.testing.assert_close(gradient_cosine_similarity(grads, features), expected)


def _greedy_bins_one_class(similarity: torch.Tensor, bins: int, lam: float) -> list:
    """The published recursion for one class, written out: each bin greedily maximises GraphCut
    over what is left, one candidate at a time."""
    n = len(similarity)
    pool, assignment = list(range(n)), [-1] * n
    for k, size in enumerate(bin_sizes(torch.tensor([n]), bins)[0].tolist()):
        chosen = []
        for _ in range(size):
            gains = {x: lam * sum(similarity[x, j] for j in pool) - 2 * sum(similarity[x, j] for j in chosen)
                     for x in pool if x not in chosen}
            best = max(gains, key=lambda x: (gains[x], -x))
            chosen.append(best)
            assignment[best] = k
        pool = [x for x in pool if x not in chosen]
    return assignment


@pytest.mark.parametrize("bins, lam", [(1, 1.0), (3, 1.0), (4, 0.5)])
def test_graphcut_bins_match_a_per_class_greedy_loop_with_unequal_classes(bins, lam):
    counts = torch.tensor([11, 7, 9])
    width = 11
    grads, features = torch.randn(3, width, 5, dtype=torch.float64), torch.randn(3, width, 6, dtype=torch.float64)
    for c, n in enumerate(counts.tolist()):
        grads[c, n:], features[c, n:] = 0, 0
    similarity = gradient_cosine_similarity(grads, features)
    assignment = graphcut_bins(similarity, counts, bins, lam)
    for c, n in enumerate(counts.tolist()):
        assert assignment[c].tolist() == _greedy_bins_one_class(similarity[c, :n, :n], bins, lam) + [-1] * (width - n)
        assert torch.bincount(assignment[c, :n], minlength=bins).tolist() == bin_sizes(counts[c:c + 1], bins)[0].tolist()


@pytest.mark.parametrize("sizes, ipc", [([10, 10, 10], 6), ([4, 3, 3], 1), ([4, 3, 3], 10), ([5, 5, 4, 4], 7)])
def test_bin_quotas_take_the_same_fraction_of_every_bin(sizes, ipc):
    sizes = torch.tensor(sizes)
    quotas = bin_quotas(sizes, ipc, torch.Generator().manual_seed(0))
    share = ipc * sizes / sizes.sum()
    assert int(quotas.sum()) == ipc and (quotas <= sizes).all()
    assert ((quotas == share.floor()) | (quotas == share.floor() + 1)).all()


def test_a_run_selects_real_training_images_deterministically():
    data = toy_dataset()
    runs = [ce.distill(data, iterations=1, real_images_on=place, **RUN) for place in ("device", "host")]
    synset = runs[0]
    selected = torch.tensor(synset.meta["selected"])
    assert len(selected.unique()) == len(selected) == 3 * 4
    torch.testing.assert_close(synset.images, data.normalized(selected))  # the same pixels, up to rounding
    assert torch.equal(synset.labels, data.labels[selected])
    assert torch.equal(runs[1].images, synset.images)
    assert len(synset.meta["coverage"]) == 3 and all(0 < c <= 1 + 1e-6 for c in synset.meta["coverage"])
    other_seed = ce.distill(data, iterations=1, **dict(RUN, seed=1))
    assert other_seed.meta["selected"] != synset.meta["selected"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_streamed_run_on_the_gpu_selects_real_images():
    """With the images on the host, the embedding network trains and the bins fill from batches
    moved one at a time; the set is still made of the real images it names."""
    data = toy_dataset()
    synset = ce.distill(data, iterations=1, real_images_on="host", **dict(RUN, device="cuda"))
    selected = torch.tensor(synset.meta["selected"])
    assert synset.images.device.type == "cuda" and len(selected.unique()) == len(selected) == 3 * 4
    torch.testing.assert_close(synset.images.cpu(), data.normalized(selected))


def test_a_sampler_holding_only_some_classes_is_refused():
    data = toy_dataset()
    sampler = ClassSampler(data, classes=(0, 2))
    with pytest.raises(ValueError, match=r"sampler holds \d+ of its 72"):
        DQ("toy", 2, bins=3).init(None, data, sampler, torch.Generator().manual_seed(0), torch.device("cpu"))


def test_every_bin_contributes_its_share():
    method = DQ("toy", 6, bins=3)
    rows_by_bin = torch.tensor([[0, 1, 2] * 8, [2, 2, 1, 1, 0, 0] * 4])
    positions = method.draw_from_bins(rows_by_bin, [torch.Generator().manual_seed(c) for c in range(2)])
    assert positions.shape == (2, 6)
    for bins_of_rows, drawn in zip(rows_by_bin, positions):
        assert len(drawn.unique()) == 6
        assert torch.bincount(bins_of_rows[drawn], minlength=3).tolist() == [2, 2, 2]


def test_a_trained_embedding_state_is_loaded_and_bad_ones_are_refused(tmp_path):
    data = toy_dataset()
    ce.distill(data, iterations=2, checkpoint=str(tmp_path / "ckpt.pt"), **RUN)
    state = load_checkpoint(str(tmp_path / "ckpt.pt"))["method"]["net"]
    torch.save(state, tmp_path / "net.pt")
    options = {k: v for k, v in RUN.items() if k not in ("method", "ipc", "seed", "progress", "device")}
    method = DQ(data.name, 4, embed_state=str(tmp_path / "net.pt"), **options)
    generator = torch.Generator().manual_seed(0)
    method.init(None, data, ce.datasets.ClassSampler(data, generator=generator), generator, torch.device("cpu"))
    for name, value in method.net.state_dict().items():
        assert torch.equal(value, state[name]), name
    loaded = ce.distill(data, iterations=0, embed_state=str(tmp_path / "net.pt"), **RUN)
    assert len(loaded.meta["selected"]) == 12
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ce.distill(data, iterations=0, embed_state=str(tmp_path / "missing.pt"), **RUN)
    (tmp_path / "corrupt.pt").write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="is not a state_dict"):
        ce.distill(data, iterations=0, embed_state=str(tmp_path / "corrupt.pt"), **RUN)
    torch.save({"classifier.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="is not a state_dict"):
        ce.distill(data, iterations=0, embed_state=str(tmp_path / "wrong.pt"), **RUN)


@pytest.mark.parametrize("bins", [25, 2.0])  # 0: every count option's check (test_method_options)
def test_bins_outside_the_smallest_class_are_refused(bins):
    with pytest.raises(ValueError, match="bins must be an int"):
        ce.distill(toy_dataset(), iterations=0, **dict(RUN, bins=bins))


def test_training_epochs_lower_the_embedding_loss(tmp_path):
    log = tmp_path / "log.jsonl"
    ce.distill(toy_dataset(), iterations=4, log=str(log), **RUN)
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]
