"""DC and DSA: dataset condensation by gradient matching (methods.md §3–4).

DC (Zhao, Mopuri & Bilen, ICLR 2021) makes the synthetic images of each class produce the same
training gradient as real images of that class, on networks met along a training trajectory.
DSA (Zhao & Bilen, ICML 2021) is DC with a Siamese augmentation: the real and the synthetic
batch of a class get one identical random DSA transform before the gradients are taken.

One `step()` is one published outer iteration: a fresh randomly initialised network, then
`outer_loop` times {match the per-class gradients, update the images once (SGD, momentum 0.5);
unless it is the last time, train the network for `inner_loop` epochs on the synthetic set}.
So `iterations` counts published iterations (1000 by default) and `outer_loop`/`inner_loop`
follow the published table per IPC.

On GPUs the per-class gradients of all classes come from one vmapped forward/backward
(torch.func) instead of a loop over classes, and the distance of all classes and layers is one
`ops.match_dist` call. vmap runs each class's batch as its own forward, so this equals the
published per-class loop (BatchNorm is frozen in eval mode while matching, as published).

Under torchrun (without BatchNorm) the classes are sharded across the ranks
(`condense_engine.distributed`): each rank matches and updates its own classes, and the network
between image updates trains data-parallel on every rank's rows of each synthetic batch.
"""
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from condense_engine import ops
from condense_engine.distributed import ClassShard, rows_held
from condense_engine.methods.augment import matched_batches
from condense_engine.methods.base import Method, refuse_batchnorm_when_sharded, register
from condense_engine.models import get_model
from condense_engine.models.layers import ACTIVATION_CHANNELS, forward_chunk
from condense_engine.ops.gather import host_to_device

#: (outer_loop, inner_loop) per IPC, from the published get_loops.
PUBLISHED_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
#: Real images per class that set the BatchNorm statistics before each matching (published).
BATCHNORM_IMAGES_PER_CLASS = 16
#: Full-resolution activations a ConvNet block keeps per image for a (double) backward: conv
#: output, normalised, activated (the pooled one is a quarter), which sizes vmapped class groups.
SAVED_ACTIVATIONS_PER_IMAGE = 4


def default_class_chunk(device, per_class: int, image_shape, classes: int) -> int:
    """Classes per vmapped gradient pass when class_chunk is None: as many as keep the pass's
    saved activations within `forward_chunk`'s bound. On a GPU: every class of a synthetic set
    of IPC ≤ 50 at 32 px, 8 classes of CIFAR-10's real batches of 256, 2 of TinyImageNet's
    (all 200 in one pass would keep ~400 GiB)."""
    height, width = image_shape[-2:]
    per_image = SAVED_ACTIVATIONS_PER_IMAGE * ACTIVATION_CHANNELS * height * width * 4
    return forward_chunk(device, per_class * per_image, classes)


@register("dc")
class DC(Method):
    defaults = dict(
        iterations=1000,    # published iterations (each runs the whole outer loop)
        outer_loop=None,    # image updates per network; None: the published table for the IPC
        inner_loop=None,    # network epochs on the synthetic set between image updates
        lr_img=0.1,         # SGD lr on the synthetic pixels
        momentum=0.5,
        lr_net=0.01,        # plain SGD lr of the network's inner-loop training
        batch_real=256,     # real images per class per matching step
        batch_train=256,    # synthetic images per network training batch
        model="ConvNet",    # any get_model name
        metric="ours",      # ops.match_dist metric: "ours", "mse" or "cos"
        dsa=False,
        dsa_strategy=None,  # None: the published default for the data set
        init="real",        # "real" (as the driver sets it) or "noise" (N(0, 1), DC's published default)
        class_batching=None,  # "vmap" | "loop" | None (vmap on GPUs, loop on CPUs); see class_gradients
        class_chunk=None,   # classes per vmapped gradient pass (None: by memory, default_class_chunk)
    )
    overrides = [(None, [ipc], dict(outer_loop=outer, inner_loop=inner))
                 for ipc, (outer, inner) in PUBLISHED_LOOPS.items()]
    class_sharded = True

    def init(self, synset, dataset, sampler, generator, device):
        if self.options["outer_loop"] is None or self.options["inner_loop"] is None:
            raise ValueError(f"{self.name}: the published outer/inner loops exist only for IPC "
                             f"{sorted(PUBLISHED_LOOPS)}; for IPC {self.ipc} pass outer_loop= and inner_loop= "
                             f"(the authors used 50/10 or 20/25 above 50)")
        if self.options["init"] not in ("real", "noise"):
            raise ValueError(f"init must be 'real' or 'noise', got {self.options['init']!r}")
        if self.options["class_batching"] not in (None, "vmap", "loop"):
            raise ValueError(f"class_batching must be 'vmap', 'loop' or None, got {self.options['class_batching']!r}")
        self.sampler, self.generator, self.device = sampler, generator, device
        self.num_classes = dataset.num_classes
        self.channels, self.image_size = dataset.channels, tuple(dataset.image_size)
        self.take_shard(dataset)
        self.check_real_batch(sampler)
        self.strategy = None
        if self.options["dsa"]:
            self.strategy = self.options["dsa_strategy"] or ops.default_strategy(dataset.name)
        if self.options["init"] == "noise":
            noise = torch.randn(synset.images.shape, generator=generator)
            synset.images = noise.to(device=synset.images.device, dtype=synset.images.dtype)
        synset.images.requires_grad_(True)
        self.optimizer = torch.optim.SGD([synset.images], lr=self.options["lr_img"],
                                         momentum=self.options["momentum"])

    def fresh_network(self) -> torch.nn.Module:
        """A newly initialised network whose initial weights come from the method's generator."""
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = get_model(self.options["model"], self.channels, self.num_classes, self.image_size)
        return net.to(self.device).train()

    def take_shard(self, dataset) -> None:
        """This process's classes (all of them unless the driver set a shard)."""
        self.shard = self.shard or ClassShard.whole(dataset.num_classes)
        refuse_batchnorm_when_sharded(self.shard, self.options["model"], dataset)

    def class_gradients(self, net: torch.nn.Module, images: torch.Tensor, per_class: int,
                        create_graph: bool) -> list:
        """∇θ CE(net(images of class c), c) for every class c, as one (C, *shape) tensor per parameter.

        `images` are class-ordered, `per_class` per class, from the shard's first class on. With
        `create_graph` the result is differentiable w.r.t. `images`; otherwise it is computed
        without an outer graph.
        `class_batching` "vmap" computes all classes in one vmapped pass, "loop" one class at a
        time; None picks vmap on GPUs and the loop on CPUs, where vmap's decomposed norm
        backward measured about 2× slower than the loop.
        """
        classes = images.shape[0] // per_class
        first = self.shard.first if self.shard is not None else 0  # a sharded rank's classes start there
        labels = torch.arange(first, first + classes, device=images.device).repeat_interleave(per_class)
        mode = self.options["class_batching"] or ("vmap" if images.is_cuda else "loop")
        if mode == "loop":
            params = list(net.parameters())
            per_class_grads = []
            with torch.set_grad_enabled(True):
                for class_images, class_labels in zip(images.split(per_class), labels.split(per_class)):
                    loss = F.cross_entropy(net(class_images), class_labels)
                    per_class_grads.append(torch.autograd.grad(loss, params, create_graph=create_graph))
            return [torch.stack(grads) for grads in zip(*per_class_grads)]
        params = {name: p.detach() for name, p in net.named_parameters()}
        buffers = dict(net.named_buffers())

        def class_loss(weights, class_images, class_labels):
            return F.cross_entropy(functional_call(net, (weights, buffers), (class_images,)), class_labels)

        chunk = self.options["class_chunk"] or default_class_chunk(images.device, per_class, images.shape, classes)
        per_class_grad = vmap(grad(class_loss), in_dims=(None, 0, 0), chunk_size=chunk)
        with torch.set_grad_enabled(create_graph):
            grads = per_class_grad(params, images.reshape(classes, per_class, *images.shape[1:]),
                                   labels.reshape(classes, per_class))
        return [grads[name] for name in params]

    def matching_loss(self, net: torch.nn.Module, real: torch.Tensor, syn: torch.Tensor,
                      batch_real: int, per_class: int) -> torch.Tensor:
        """Σ over classes of the distance between the real and the synthetic class gradients."""
        grads_real = self.class_gradients(net, real, batch_real, create_graph=False)
        grads_syn = self.class_gradients(net, syn, per_class, create_graph=True)
        return ops.match_dist(grads_real, grads_syn, metric=self.options["metric"], batched=True)

    def freeze_batchnorm(self, net: torch.nn.Module) -> None:
        """Published BN handling: a real batch of every class updates the running statistics in
        train mode, then the BN layers switch to eval mode so matching uses them frozen."""
        norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        per_class = min(BATCHNORM_IMAGES_PER_CLASS, int(self.sampler.counts.min()))
        real, _ = self.sampler.sample(per_class)
        net.train()
        with torch.no_grad():
            net(real)
        for norm in norms:
            norm.eval()

    def train_network(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer, synset) -> None:
        """`inner_loop` epochs of CE training on the detached synthetic set, shuffled batches;
        DSA with independent per-sample parameters when the method uses DSA (as published).
        A class-sharded rank trains on its classes' rows of every batch (see _sharded_batch_step)."""
        if self.shard.sharded:
            images, labels = synset.materialize((self.shard.first, self.shard.end))
        else:
            images, labels = synset.materialize()
        images, labels = images.detach(), labels.detach()
        total = len(images) // self.shard.count * self.shard.num_classes if self.shard.sharded else len(images)
        net.train()
        for _ in range(self.options["inner_loop"]):
            order = torch.randperm(total, generator=self.generator)
            if not self.shard.sharded:  # a sharded rank picks its rows on the host
                order = host_to_device(order, images.device)
            for batch in order.split(self.options["batch_train"]):
                params = None  # drawn for the whole batch on every rank, so the random stream stays shared
                if self.strategy:
                    params = ops.DSAParams.sample(len(batch), self.strategy, size=images.shape[2:], siamese=False,
                                                  generator=self.generator, device=images.device)
                optimizer.zero_grad(set_to_none=True)
                if self.shard.sharded:
                    self._sharded_batch_step(net, images, labels, batch, params)
                else:
                    inputs = images[batch] if params is None else ops.dsa(images[batch], params)
                    F.cross_entropy(net(inputs), labels[batch]).backward()
                optimizer.step()

    def _sharded_batch_step(self, net, images, labels, batch, params) -> None:
        """The gradient of the whole batch's mean loss, on every rank: each rank backpropagates
        the summed loss of the batch's rows of its classes (`images` holds just those, from row
        first·per_class of the whole set), divided by the batch size, and the ranks all-reduce
        the sums. Per-sample DSA and instance norm keep every row's loss its own, so this equals
        the one-process step up to summation order."""
        mine, rows = self.own_rows(batch, len(images))
        if len(mine):
            rows = host_to_device(rows, images.device)
            inputs = images[rows] if params is None else ops.dsa(images[rows], params.select(
                host_to_device(mine, images.device)))
            (F.cross_entropy(net(inputs), labels[rows], reduction="sum") / len(batch)).backward()
        self.shard.sum_gradients(net)

    def own_rows(self, batch: torch.Tensor, held: int) -> tuple:
        """(positions in `batch` of this rank's rows, those rows in its own `held` class-ordered
        rows), for a CPU `batch` of rows of the whole class-ordered set (host tensors, no sync)."""
        return rows_held(batch, self.shard.first * (held // self.shard.count), held)

    def step(self, synset, iteration):
        net = self.fresh_network()
        net_optimizer = torch.optim.SGD(net.parameters(), lr=self.options["lr_net"])
        batch_real, outer_loop = self.options["batch_real"], self.options["outer_loop"]
        classes = (self.shard.first, self.shard.end) if self.shard.sharded else None
        total = torch.zeros((), device=self.device)
        for outer in range(outer_loop):
            self.freeze_batchnorm(net)
            real, syn, per_class = matched_batches(self.sampler, synset, batch_real, self.strategy, self.generator,
                                                   classes)
            loss = self.matching_loss(net, real, syn, batch_real, per_class)
            # Only the pixels' gradient: the network's parameters are leaves of this graph too.
            synset.images.grad, = torch.autograd.grad(loss, synset.images)
            self.optimizer.step()
            total += loss.detach()
            if outer < outer_loop - 1:
                self.train_network(net, net_optimizer, synset)
        # The published log: the matching loss per class and outer step (a device tensor: the
        # driver reads stats back at its own cadence).
        return {"loss": self.shard.sum(total) / (self.num_classes * outer_loop)}

    def gather(self, synset) -> None:
        self.gather_images_and_optimizer_state(synset, self.optimizer)

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])


@register("dsa")
class DSA(DC):
    """DC with Siamese DSA while matching and per-sample DSA while training the network."""

    defaults = dict(DC.defaults, dsa=True)
