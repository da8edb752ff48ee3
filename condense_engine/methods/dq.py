"""DQ: dataset quantisation (Zhou et al., ICCV 2023; methods.md §10): selection, not pixel optimisation.

Every class is split into `bins` bins (published 10) by recursive greedy GraphCut selection: bin 1
is the greedy GraphCut selection of n/K images from the whole class, bin 2 the same from what is
left, and so on, so the bins partition the class and each covers it diversely. The set is a uniform
sample of the same fraction of every bin: `ipc` images per class. GraphCut's marginal gain of x
given the selected S is λ·Σ_{j in pool} s(x, j) − 2·Σ_{j∈S} s(x, j) (λ = `graphcut_lambda`, pool:
the class's images not binned yet), where s is the cosine similarity of the per-sample last-layer
gradient embeddings e = [g, vec(g ⊗ h)] (g = ∂loss/∂logits, h the penultimate features). Their inner
products factorise, ⟨e_i, e_j⟩ = (g_i·g_j)(1 + h_i·h_j), so the (classes·(d + 1))-wide embeddings
are never built: one class's similarities are two small Gram matrices.

The embedding network (published: a pretrained ResNet-18 on CIFAR-10, not trained further) is
trained here: one `step()` is one epoch on the real data (SGD lr 0.01, momentum 0.9, weight decay
5e-4, batch 256, per-sample DSA; our choice, the evaluation protocol's), so a run checkpoints and
resumes by epoch; `embed_state` starts it from a saved state_dict instead (with iterations=0 that
network is used as it is). The selection runs once, at the end (`finish`): evaluating during the
run sees the initial random real images. `double_softmax` reproduces the published code's
cross-entropy on softmax(logits) for g. The selected training-set indices land in
synset.meta["selected"].

Under torchrun DQ shards the classes (`condense_engine.distributed`): the embedding network
trains data-parallel (each rank backpropagates its classes' rows of every batch; one gradient
all-reduce per step), and each rank bins and draws its own classes, the costly part on a large
set (a class's similarity matrix is n²). Every class draws from its own generator, seeded from
one draw, so the selection is the one-process selection.

Not implemented: DQ's pixel quantisation (GradCAM patch dropping, reconstruction with an MAE
ViT-L/16), which needs pretrained MAE weights; the keep ratio is therefore the sample ratio.
"""
import os
import pickle

import torch
import torch.nn.functional as F

from condense_engine.distributed import ClassShard
from condense_engine.methods.base import Method, refuse_batchnorm_when_sharded, register
from condense_engine.models import get_model
from condense_engine.ops.dsa import DSAParams, default_strategy, dsa
from condense_engine.ops.gather import host_to_device

#: Entries of one class chunk's similarity matrices held at once (chunk · n² floats).
SIMILARITY_BUDGET = 2**27


def gradient_embedding_parts(logits: torch.Tensor, labels: torch.Tensor, double_softmax: bool) -> torch.Tensor:
    """g = ∂loss/∂logits per sample, (N, classes), in closed form: softmax − one-hot, or with
    `double_softmax` the gradient of cross_entropy(softmax(logits)) (the published code's)."""
    probs = logits.softmax(1)
    onehot = F.one_hot(labels, logits.shape[1]).to(probs.dtype)
    if not double_softmax:
        return probs - onehot
    upstream = probs.softmax(1) - onehot  # ∂loss/∂probs; the softmax Jacobian diag(p) − p pᵀ is symmetric
    return probs * upstream - probs * (probs * upstream).sum(1, keepdim=True)


def gradient_cosine_similarity(grads: torch.Tensor, features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarities (..., n, n) of the embeddings [g, vec(g ⊗ h)] of `grads` (..., n, classes)
    and `features` (..., n, d), from (g_i·g_j)(1 + h_i·h_j) without building the embeddings."""
    inner = (grads @ grads.transpose(-1, -2)) * (1 + features @ features.transpose(-1, -2))
    norms = inner.diagonal(dim1=-2, dim2=-1).clamp_min(eps).sqrt()
    return inner / (norms.unsqueeze(-1) * norms.unsqueeze(-2))


def bin_sizes(counts: torch.Tensor, bins: int) -> torch.Tensor:
    """(classes, bins) sizes splitting each class as evenly as possible, larger bins first."""
    extra = torch.arange(bins).unsqueeze(0) < (counts % bins).unsqueeze(1)
    return (counts // bins).unsqueeze(1) + extra.long()


def graphcut_bins(similarity: torch.Tensor, counts: torch.Tensor, bins: int, lam: float = 1.0) -> torch.Tensor:
    """Per class, the bin (0 … bins−1) of every row of its (n, n) `similarity` block (rows at or
    past the class's count: −1): bin k is the greedy GraphCut selection of its size from the rows
    not in bins 0 … k−1. All classes of `similarity` (C, n, n) are selected together; ties go to
    the lowest row."""
    classes, width, _ = similarity.shape
    sizes = bin_sizes(counts.cpu(), bins)
    remaining = torch.arange(width, device=similarity.device).unsqueeze(0) < counts.to(similarity.device).unsqueeze(1)
    assignment = torch.full((classes, width), -1, dtype=torch.long, device=similarity.device)
    for k in range(bins):
        pool_sum = lam * torch.bmm(similarity, remaining.to(similarity.dtype).unsqueeze(-1)).squeeze(-1)
        selected_sum = torch.zeros_like(pool_sum)
        for t in range(int(sizes[:, k].max())):
            gain = (pool_sum - 2 * selected_sum).masked_fill(~remaining, float("-inf"))
            active = (t < sizes[:, k]).nonzero().squeeze(1).to(similarity.device)  # host-side: no device sync
            pick = gain[active].argmax(1)
            remaining[active, pick] = False
            assignment[active, pick] = k
            selected_sum[active] += similarity[active, pick]
    return assignment


def bin_quotas(sizes: torch.Tensor, ipc: int, generator: torch.Generator) -> torch.Tensor:
    """How many of `ipc` images to draw from each of a class's bins of `sizes` (bins,): the same
    fraction of every bin, ⌊ipc·size/n⌋, and the remainder one each to bins drawn at random
    among those whose share has a fractional part."""
    share = ipc * sizes.double() / sizes.sum()
    quotas = share.floor().long()
    fractional = (share > quotas).nonzero().squeeze(1)
    extra = ipc - int(quotas.sum())
    quotas[fractional[torch.randperm(len(fractional), generator=generator)[:extra]]] += 1
    return quotas


@register("dq")
class DQ(Method):
    defaults = dict(
        iterations=5,           # epochs of training the embedding network (0: use it as initialised/loaded)
        bins=10,                # K, bins per class (published num_exp 10)
        graphcut_lambda=1.0,    # λ of the GraphCut gain (published 1)
        double_softmax=True,    # g from cross_entropy(softmax(logits)), as the published code computes it
        model="ConvNet",        # embedding network (published: ResNet-18 on CIFAR-10)
        embed_state=None,       # path to a state_dict for `model` to start from (e.g. a pretrained one)
        lr_net=0.01,
        net_momentum=0.9,
        net_weight_decay=5e-4,
        batch_net=256,
        dsa=True,
        embed_batch=1024,       # images per forward pass while embedding
    )
    overrides = [(("tinyimagenet", "tiny", "tinyimagenet200"), None, dict(model="ConvNetD4"))]
    class_sharded = True

    def init(self, synset, dataset, sampler, generator, device):
        counts = dataset.class_counts().cpu()
        bins = self.options["bins"]
        if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= int(counts.min()):
            raise ValueError(f"bins must be an integer in [1, {int(counts.min())}] (the smallest class), got {bins!r}")
        if self.iterations < 0:
            raise ValueError(f"iterations (training epochs of the embedding network) must be >= 0, "
                             f"got {self.iterations}")
        self.shard = self.shard or ClassShard.whole(dataset.num_classes)
        refuse_batchnorm_when_sharded(self.shard, self.options["model"], dataset)
        self.dataset, self.sampler, self.generator, self.device = dataset, sampler, generator, device
        self.labels = dataset.labels.cpu()
        self.dataset_rows = self._dataset_rows_of_store(len(sampler.store))
        self.store_rows = None  # data-set row → stored row, for a class-sharded sampler
        if self.dataset_rows is not None:
            self.store_rows = torch.full((len(dataset),), -1, dtype=torch.int64)
            self.store_rows[self.dataset_rows] = torch.arange(len(self.dataset_rows))
        self.real = sampler.store  # the images where the sampler keeps them: on the device, or streamed
        self.net = get_model(self.options["model"], dataset.channels, dataset.num_classes,
                             im_size=dataset.image_size).to(device)
        if self.options["embed_state"] is not None:
            self._load_embedding_network(self.options["embed_state"])
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=self.options["lr_net"],
                                         momentum=self.options["net_momentum"],
                                         weight_decay=self.options["net_weight_decay"])
        self.strategy = default_strategy(dataset.name) if self.options["dsa"] else None

    def _dataset_rows_of_store(self, held: int) -> torch.Tensor | None:
        """The data-set rows of the sampler's stored rows, in order: None when it stores the whole
        set as it is; the rank's classes in class order for a class-sharded sampler."""
        if held == len(self.dataset):
            return None
        order = torch.argsort(self.labels, stable=True)  # as the ClassSampler keeps a shard
        own = order[(self.labels[order] >= self.shard.first) & (self.labels[order] < self.shard.end)]
        if not self.shard.sharded or len(own) != held:
            raise ValueError(f"DQ bins every image of the data set (or of this rank's classes), but the sampler "
                             f"holds {held} of its {len(self.dataset)}; give it one over the whole set")
        return own

    def _load_embedding_network(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"embed_state {path!r} does not exist")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            self.net.load_state_dict(state)
        except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"embed_state {path!r} is not a state_dict of {self.options['model']} for "
                             f"{self.dataset.channels}×{self.dataset.image_size} images and "
                             f"{self.dataset.num_classes} classes: {err}") from err

    def step(self, synset, iteration):
        """One epoch of training the embedding network on the real data (a sharded rank: on its
        classes' rows of every batch, the gradients summed across the ranks)."""
        self.net.train()
        count = len(self.dataset)
        total = torch.zeros((), device=self.device)
        for batch in torch.randperm(count, generator=self.generator).split(self.options["batch_net"]):
            params = None  # drawn for the whole batch on every rank, so the random stream stays shared
            if self.strategy:
                params = DSAParams.sample(len(batch), self.strategy, size=self.dataset.image_size, siamese=False,
                                          generator=self.generator, device=self.device)
            self.optimizer.zero_grad(set_to_none=True)
            if self.shard.sharded:
                total += self._sharded_batch_step(batch, params)
            else:
                images = self.real.normalized(batch)
                loss = F.cross_entropy(self.net(images if params is None else dsa(images, params)),
                                       self.real.labels_at(batch))
                loss.backward()
                total += loss.detach() * len(batch)
            self.optimizer.step()
        return {"loss": self.shard.sum(total) / count}

    def _sharded_batch_step(self, batch: torch.Tensor, params) -> torch.Tensor:
        """This rank's share of the batch's mean loss, backpropagated, and the gradients summed
        across the ranks; returns the share's summed loss."""
        labels = self.labels[batch]
        mine = ((labels >= self.shard.first) & (labels < self.shard.end)).nonzero().squeeze(1)
        total = torch.zeros((), device=self.device)
        if len(mine):
            rows = batch[mine] if self.store_rows is None else self.store_rows[batch[mine]]
            images = self.real.normalized(rows)
            if params is not None:
                images = dsa(images, params.select(host_to_device(mine, self.device)))
            loss = F.cross_entropy(self.net(images), self.real.labels_at(rows), reduction="sum")
            (loss / len(batch)).backward()
            total = loss.detach()
        self.shard.sum_gradients(self.net)
        return total

    @torch.no_grad()
    def embed_parts(self, index: torch.Tensor) -> tuple:
        """(g, h) of the real images at `index`: ∂loss/∂logits and the classifier's input."""
        self.net.eval()
        grads, features = [], []
        for batch in index.split(self.options["embed_batch"]):
            hidden = self.net.embed(self.real.normalized(batch))
            grads.append(gradient_embedding_parts(self.net.classifier(hidden), self.real.labels_at(batch),
                                                  self.options["double_softmax"]))
            features.append(hidden)
        return torch.cat(grads), torch.cat(features)

    def finish(self, synset):
        """Bin every class (a sharded rank: its own) and draw the set from its bins, a chunk of
        classes at a time; a sharded run then gathers the images and what was selected."""
        counts = self.sampler.counts
        width = self.sampler.index.shape[1]
        chunk = max(1, SIMILARITY_BUDGET // (width * width))
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        selected, coverage = [], []
        for first in range(self.shard.first, self.shard.end, chunk):
            end = min(first + chunk, self.shard.end)
            stored = self.sampler.index[first:end]  # beside the images: on the host when they stream
            grads, features = self.embed_parts(stored[stored >= 0])
            block = stored.to(self.device)
            valid = block >= 0
            padded_g = grads.new_zeros(end - first, width, grads.shape[1])
            padded_h = features.new_zeros(end - first, width, features.shape[1])
            padded_g[valid], padded_h[valid] = grads, features
            similarity = gradient_cosine_similarity(padded_g, padded_h)
            assignment = graphcut_bins(similarity, counts[first:end], self.options["bins"],
                                       self.options["graphcut_lambda"])
            generators = [torch.Generator().manual_seed(seed + label) for label in range(first, end)]
            positions = self.draw_from_bins(assignment.cpu(), generators).to(block.device)
            nearest = similarity.gather(2, positions.unsqueeze(1).expand(-1, width, -1)).amax(2)
            coverage.append((nearest * valid).sum(1) / valid.sum(1))
            selected.append(block.gather(1, positions))
        selected = torch.cat(selected).reshape(-1)
        images = self.real.normalized(selected).to(synset.images.device)
        rows = selected.cpu() if self.dataset_rows is None else self.dataset_rows[selected.cpu()]
        if not self.shard.sharded:
            synset.images = images
        else:
            with torch.no_grad():
                synset.images[self.shard.first * self.ipc:self.shard.end * self.ipc] = images
            self.shard.gather_classes(synset.images, self.ipc)
        synset.meta["selected"] = sum(self.shard.gather_objects(rows.tolist()), [])
        synset.meta["coverage"] = sum(self.shard.gather_objects(torch.cat(coverage).cpu().tolist()), [])

    def gather(self, synset) -> None:
        """Nothing to gather before the end: the steps train the network every rank shares, and
        the set is the initial real images on every rank until finish() selects and gathers it."""

    def draw_from_bins(self, assignment: torch.Tensor, generators: list) -> torch.Tensor:
        """(classes, ipc) row positions: per class, each bin's quota drawn uniformly from it, with
        that class's generator."""
        drawn = []
        for bins_of_rows, generator in zip(assignment, generators):
            members = [(bins_of_rows == k).nonzero().squeeze(1) for k in range(self.options["bins"])]
            quotas = bin_quotas(torch.tensor([len(m) for m in members]), self.ipc, generator)
            drawn.append(torch.cat([m[torch.randperm(len(m), generator=generator)[:q]]
                                    for m, q in zip(members, quotas.tolist())]))
        return torch.stack(drawn)

    def state_dict(self):
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
