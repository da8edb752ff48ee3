"""IDC: gradient matching on a multi-formation parameterisation (Kim et al., ICML 2022; methods.md §9).

Each stored image holds factor² half-size (for factor 2) images that decode to full size
(`SyntheticSet.materialize`), initialised as a mosaic of real images of its class. One `step()`
is one published outer iteration: a fresh network (SGD lr 0.01, momentum 0.9, weight decay
5e-4), then `inner_steps` times {match every class's gradient of the conv weights (biases, norm
parameters and the classifier skipped) between a real batch and the decoded synthetic images,
both under one shared DSA transform per class, with the "l1" or "mse" distance, and take one
image step (SGD, momentum 0.5); train the network for one epoch on `real_per_epoch` real images
with per-sample DSA and CutMix}; at the end the pixels are clamped to [0, 1].

IDC keeps its images in [0, 1] pixel space and sets its lr there; the engine stores network-space
images (x − mean)/std, so the pixel-space step is taken by scaling each channel's gradient by
1/std² (SGD with momentum is linear) and clamping to that channel's [0, 1] range: the same
trajectory as the published code. The classes' image steps are one step on the summed loss,
which equals the published per-class steps (each class's loss reaches only its own images).

Deviations, all data: the real batches are class-balanced draws (published: a class loader for
matching, a random `n_data` subset for the network epoch); the network epoch's batch is 64 (the
published loader's size is not recorded in methods.md); `lr_base` for data sets IDC did not
run (TinyImageNet) is CIFAR's.

Under torchrun IDC shards the classes as DC does (`condense_engine.distributed`); the real-data
epoch trains data-parallel too, each rank on its classes' rows of every batch. A CutMix batch
needs its partners' images, so its augmented rows are summed across the ranks first (one
batch-sized all-reduce).
"""
import torch
import torch.nn.functional as F

from condense_engine import ops
from condense_engine.methods.augment import cutmix, matched_batches
from condense_engine.methods.base import register
from condense_engine.methods.dc import DC
from condense_engine.methods.dm import multi_formation_init
from condense_engine.ops.gather import host_to_device

METRICS = ("l1", "mse")


def real_loss(logits, targets, pasted, kept: float, reduction: str) -> torch.Tensor:
    """Cross-entropy of a real batch; after CutMix (`pasted` labels, `kept` fraction) the mix of
    the two labels' losses, as IDC trains."""
    loss = F.cross_entropy(logits, targets, reduction=reduction)
    if pasted is None:
        return loss
    return kept * loss + (1 - kept) * F.cross_entropy(logits, pasted, reduction=reduction)


@register("idc")
class IDC(DC):
    defaults = dict(
        iterations=2000,      # outer iterations (published n_iter = niter·100 / inner_loop = 2000)
        inner_steps=100,      # image steps per network (published inner_loop 100)
        factor=2,             # multi-formation factor (1: IDC-I)
        lr_base=5e-3,         # pixel-space image lr at IPC 10 (CIFAR, SVHN); MNIST/FMNIST 1e-4
        lr_img=None,          # None: lr_base · ipc/10 (published rule at the native image size)
        momentum=0.5,
        lr_net=0.01,          # network SGD: lr, momentum 0.9, weight decay 5e-4
        net_momentum=0.9,
        net_weight_decay=5e-4,
        batch_real=64,        # real images per class per matching step
        batch_syn_max=128,    # decoded synthetic images per class per matching step, at most
        real_per_epoch=500,   # real images the network trains on between image steps (CIFAR: 2000)
        batch_net=64,
        metric="l1",          # "l1" (MNIST, FMNIST, ImageNet) or "mse" (CIFAR, SVHN)
        model="ConvNet",
        dsa=True,
        dsa_strategy="color_crop_cutout",
        cutmix=True,          # CutMix while training the network (β = 1, probability 0.5)
        cutmix_beta=1.0,
        cutmix_prob=0.5,
        class_batching=None,
        class_chunk=None,
    )
    overrides = [
        (("cifar10", "cifar100"), None, dict(metric="mse", real_per_epoch=2000)),
        (("svhn",), None, dict(metric="mse")),
        (("mnist", "fashion-mnist"), None, dict(lr_base=1e-4)),
        (("mnist",), None, dict(dsa_strategy="color_crop", cutmix=False)),  # published MNIST with factor > 1
    ]

    def init(self, synset, dataset, sampler, generator, device):
        if self.options["metric"] not in METRICS:
            raise ValueError(f"IDC's metric must be one of {METRICS}, got {self.options['metric']!r}")
        factor = int(self.options["factor"])
        self.sampler, self.generator, self.device = sampler, generator, device
        self.num_classes = dataset.num_classes
        self.channels, self.image_size = dataset.channels, tuple(dataset.image_size)
        self.take_shard(dataset)
        self.check_real_batch(sampler)
        self.strategy = self.options["dsa_strategy"] if self.options["dsa"] else None
        if factor > 1:
            multi_formation_init(synset, sampler, factor, self.ipc, self.shard)
        synset.images.requires_grad_(True)
        lr = self.options["lr_img"] or self.options["lr_base"] * self.ipc / 10
        self.optimizer = torch.optim.SGD([synset.images], lr=lr, momentum=self.options["momentum"])
        std = torch.tensor(dataset.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean = torch.tensor(dataset.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.pixel_scale = std.pow(-2)                       # network-space gradient → pixel-space step
        self.low, self.high = (0 - mean) / std, (1 - mean) / std  # [0, 1] pixels in network space

    def matching_loss(self, net, real, syn, batch_real, per_class):
        """Σ over classes of the distance between the conv-weight gradients (IDC skips biases,
        norm parameters and the classifier)."""
        convs = [i for i, p in enumerate(net.parameters()) if p.dim() == 4]
        grads_real = self.class_gradients(net, real, batch_real, create_graph=False)
        grads_syn = self.class_gradients(net, syn, per_class, create_graph=True)
        return ops.match_dist([grads_real[i] for i in convs], [grads_syn[i] for i in convs],
                              metric=self.options["metric"], batched=True)

    def capped(self, syn: torch.Tensor, per_class: int) -> tuple:
        """At most batch_syn_max random decoded images of each class (the same positions for all)."""
        cap = self.options["batch_syn_max"]
        if per_class <= cap:
            return syn, per_class
        keep = torch.randperm(per_class, generator=self.generator)[:cap].to(syn.device)
        by_class = syn.unflatten(0, (len(syn) // per_class, per_class)).index_select(1, keep)
        return by_class.flatten(0, 1), cap

    def train_on_real(self, net, optimizer) -> None:
        """One epoch on `real_per_epoch` class-balanced real images: per-sample DSA and CutMix."""
        per_class = max(1, self.options["real_per_epoch"] // self.num_classes)
        sharded = self.shard.sharded
        if sharded:  # this rank's classes of the same draw
            images, labels = self.sampler.sample_range(per_class, self.shard.first, self.shard.end)
        else:
            images, labels = self.sampler.sample(per_class)
        net.train()
        order = torch.randperm(per_class * self.num_classes, generator=self.generator)
        if not sharded:
            order = host_to_device(order, images.device)
        for batch in order.split(self.options["batch_net"]):
            params = None  # drawn for the whole batch on every rank, so the random stream stays shared
            if self.strategy:
                params = ops.DSAParams.sample(len(batch), self.strategy, size=images.shape[2:], siamese=False,
                                              generator=self.generator, device=images.device)
            use_cutmix = self.options["cutmix"] and float(torch.rand((), generator=self.generator)) < \
                self.options["cutmix_prob"]
            optimizer.zero_grad(set_to_none=True)
            if sharded:
                self._sharded_real_step(net, images, labels, batch, params, use_cutmix, per_class)
            else:
                inputs, targets, other, kept = images[batch], labels[batch], None, 1.0
                if params is not None:
                    inputs = ops.dsa(inputs, params)
                if use_cutmix:
                    inputs, other, kept = cutmix(inputs, targets, self.options["cutmix_beta"], self.generator)
                real_loss(net(inputs), targets, other, kept, "mean").backward()
            optimizer.step()

    def _sharded_real_step(self, net, images, labels, batch, params, use_cutmix: bool, per_class: int) -> None:
        """A sharded rank's share of one real batch (`images`: its classes' rows, class-ordered):
        its rows' summed loss over the batch size, gradients summed across the ranks. For CutMix
        the augmented rows of every rank are assembled into the whole batch by an all-reduce
        (each rank fills its own positions), so every rank mixes with the same partners and
        makes the same random draws."""
        mine, rows = self.own_rows(batch, len(images))
        mine, rows = host_to_device(mine, images.device), host_to_device(rows, images.device)
        inputs, targets, other, kept = images[rows], labels[rows], None, 1.0
        if params is not None and len(mine):
            inputs = ops.dsa(inputs, params.select(mine))
        if use_cutmix:
            whole = inputs.new_zeros((len(batch), *inputs.shape[1:]))
            whole[mine] = inputs
            self.shard.sum_in_place([whole])
            whole_labels = host_to_device(batch // per_class, images.device)  # the batch is class-ordered
            mixed, pasted, kept = cutmix(whole, whole_labels, self.options["cutmix_beta"], self.generator)
            inputs, other = mixed[mine], pasted[mine]
        if len(mine):
            (real_loss(net(inputs), targets, other, kept, "sum") / len(batch)).backward()
        self.shard.sum_gradients(net)

    def step(self, synset, iteration):
        net = self.fresh_network()
        net_optimizer = torch.optim.SGD(net.parameters(), lr=self.options["lr_net"],
                                        momentum=self.options["net_momentum"],
                                        weight_decay=self.options["net_weight_decay"])
        batch_real, steps = self.options["batch_real"], self.options["inner_steps"]
        classes = (self.shard.first, self.shard.end) if self.shard.sharded else None
        total = torch.zeros((), device=self.device)
        for _ in range(steps):
            self.freeze_batchnorm(net)
            real, syn, per_class = matched_batches(self.sampler, synset, batch_real, self.strategy, self.generator,
                                                   classes)
            syn, per_class = self.capped(syn, per_class)
            loss = self.matching_loss(net, real, syn, batch_real, per_class)
            grad, = torch.autograd.grad(loss, synset.images)
            synset.images.grad = grad * self.pixel_scale
            self.optimizer.step()
            total += loss.detach()
            self.train_on_real(net, net_optimizer)
        with torch.no_grad():
            synset.images.copy_(torch.maximum(torch.minimum(synset.images, self.high), self.low))
        return {"loss": self.shard.sum(total) / (self.num_classes * steps)}
