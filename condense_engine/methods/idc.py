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
"""
import torch
import torch.nn.functional as F

from condense_engine import ops
from condense_engine.methods.augment import cutmix, matched_batches
from condense_engine.methods.base import register
from condense_engine.methods.dc import DC
from condense_engine.methods.dm import multi_formation_init

METRICS = ("l1", "mse")


@register("idc")
class IDC(DC):
    class_sharded = False  # its network also trains on real data each step; one process only
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
        if factor < 1:
            raise ValueError(f"factor must be ≥ 1, got {factor}")
        self.sampler, self.generator, self.device = sampler, generator, device
        self.num_classes = dataset.num_classes
        self.channels, self.image_size = dataset.channels, tuple(dataset.image_size)
        self.strategy = self.options["dsa_strategy"] if self.options["dsa"] else None
        if factor > 1:
            multi_formation_init(synset, sampler, factor, self.ipc)
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
        by_class = syn.unflatten(0, (self.num_classes, per_class)).index_select(1, keep)
        return by_class.flatten(0, 1), cap

    def train_on_real(self, net, optimizer) -> None:
        """One epoch on `real_per_epoch` class-balanced real images: per-sample DSA and CutMix."""
        per_class = max(1, self.options["real_per_epoch"] // self.num_classes)
        images, labels = self.sampler.sample(per_class)
        net.train()
        order = torch.randperm(len(images), generator=self.generator).to(images.device)
        for batch in order.split(self.options["batch_net"]):
            inputs, targets = images[batch], labels[batch]
            if self.strategy:
                params = ops.DSAParams.sample(len(batch), self.strategy, size=inputs.shape[2:], siamese=False,
                                              generator=self.generator, device=inputs.device)
                inputs = ops.dsa(inputs, params)
            use_cutmix = self.options["cutmix"] and float(torch.rand((), generator=self.generator)) < \
                self.options["cutmix_prob"]
            if use_cutmix:
                inputs, other, kept = cutmix(inputs, targets, self.options["cutmix_beta"], self.generator)
                logits = net(inputs)
                loss = kept * F.cross_entropy(logits, targets) + (1 - kept) * F.cross_entropy(logits, other)
            else:
                loss = F.cross_entropy(net(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def step(self, synset, iteration):
        net = self.fresh_network()
        net_optimizer = torch.optim.SGD(net.parameters(), lr=self.options["lr_net"],
                                        momentum=self.options["net_momentum"],
                                        weight_decay=self.options["net_weight_decay"])
        batch_real, steps = self.options["batch_real"], self.options["inner_steps"]
        total = torch.zeros((), device=self.device)
        for _ in range(steps):
            self.freeze_batchnorm(net)
            real, syn, per_class = matched_batches(self.sampler, synset, batch_real, self.strategy, self.generator)
            syn, per_class = self.capped(syn, per_class)
            loss = self.matching_loss(net, real, syn, batch_real, per_class)
            grad, = torch.autograd.grad(loss, synset.images)
            synset.images.grad = grad * self.pixel_scale
            self.optimizer.step()
            total += loss.detach()
            self.train_on_real(net, net_optimizer)
        with torch.no_grad():
            synset.images.copy_(torch.maximum(torch.minimum(synset.images, self.high), self.low))
        return {"loss": total / (self.num_classes * steps)}
