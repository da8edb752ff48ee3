"""DD: the original dataset distillation by unrolled training (Wang et al. 2018; methods.md §2).

The set is split into S batches (`distill_steps`, each holding ipc/S images of every class). Each
iteration initialises fresh networks, trains them for T = S·`distill_epochs` plain SGD steps on
the batches in turn, step t at its own learned step size η_t, and takes the cross-entropy of the
trained network on a real batch as the loss; Adam (betas 0.5, 0.999) moves the pixels and the
step sizes (stored as softplus⁻¹(η) like the published code) down its gradient. The published
code walks the steps back with Hessian-vector products; `ops.unroll` does exactly that
(memory="exact": one step's activations whatever T is), or autograd through the unroll.

The student is LeNet on MNIST and Fashion-MNIST as published, and any other model of the
registry without batch-norm buffers on request (`models.functional_model`). Deviations: the
student elsewhere is a ConvNet (published: AlexCifarNet on CIFAR-10, which the engine lacks),
the real batch is class-balanced (published: a shuffled loader batch), and "400 epochs over
the loader, lr ×0.5 every 40" are written as iterations for each data set's size at batch
1024. The learned step sizes go into the set's meta ("step_lrs", with "distill_steps"), from
which `ce.evaluate(..., recipe="dd")` replays them on the same student (`learned_schedule`).

Under torchrun DD shards the classes (`condense_engine.distributed`) like trajectory matching:
every rank unrolls the same student from the same initialisation on all S batches, each step's
gradient (and in the reverse sweep its Hessian-vector product) summed from the ranks' own rows
(`ops.RowShare`); the real-batch loss and its gradient are summed from each rank's classes. A
rank's student compute falls with the number of ranks; memory="unrolled" runs as "exact", the
same gradient.
"""
import math

import torch
import torch.nn.functional as F

from condense_engine import ops
from condense_engine.distributed import ClassShard
from condense_engine.methods.base import Method, exact_when_sharded, refuse_batchnorm_when_sharded, register
from condense_engine.models import FunctionalNet, functional_model
from condense_engine.ops.trajectory import RowShare

INITS = ("noise", "real")
MEMORY = ("exact", "unrolled")


def xavier_params(student: FunctionalNet, generator: torch.Generator, device) -> torch.Tensor:
    """A freshly initialised student as published: Xavier-normal weights (gain 1), zero biases,
    unit norm scales, flattened. The `dd` evaluation recipe replays the learned steps from
    networks drawn the same way, as DD's "random init" numbers were measured."""
    pieces = []
    for name, shape in zip(student.names, student.shapes):
        if len(shape) > 1:
            fan_in = shape[1] * (torch.Size(shape[2:]).numel())
            fan_out = shape[0] * (torch.Size(shape[2:]).numel())
            std = (2.0 / (fan_in + fan_out)) ** 0.5
            pieces.append(torch.randn(shape, generator=generator) * std)
        elif name.endswith("bias"):
            pieces.append(torch.zeros(shape))
        else:
            pieces.append(torch.ones(shape))
    return torch.cat([p.reshape(-1) for p in pieces]).to(device)


def learned_schedule(synset) -> tuple[torch.Tensor, list]:
    """The step sizes a DD run learned and the rows each step trains on, from the set's meta:
    (T step sizes, T index batches) with T = distill_steps · distill_epochs, as in distillation.
    ValueError when the set holds no usable schedule (not made by DD, or damaged)."""
    meta = synset.meta
    if meta.get("method") != "dd" or "step_lrs" not in meta or "distill_steps" not in meta:
        raise ValueError(f"the dd recipe replays the step sizes a DD run learned, but this set was made by "
                         f"{meta.get('method', 'an unknown method')!r} and holds no learned schedule "
                         f"(meta 'step_lrs' and 'distill_steps')")
    lrs = torch.as_tensor(meta["step_lrs"], dtype=torch.float32).detach().cpu()
    steps, ipc = meta["distill_steps"], meta.get("ipc")
    if synset.factor != 1 or not isinstance(ipc, int) or len(synset.images) != ipc * synset.num_classes:
        raise ValueError(f"the dd recipe needs the set as DD stores it: ipc images of every class in class "
                         f"order, factor 1; this one holds {len(synset.images)} images of {synset.num_classes} "
                         f"classes with factor {synset.factor} (meta ipc {ipc!r})")
    in_class_order = torch.arange(synset.num_classes).repeat_interleave(ipc)
    if synset.labels.dim() != 1 or not torch.equal(synset.labels.detach().cpu().long(), in_class_order):
        raise ValueError("the dd recipe needs the set's hard labels in class order, as DD stores them")
    if (lrs.dim() != 1 or not len(lrs) or not isinstance(steps, int) or steps < 1 or ipc % steps
            or len(lrs) % steps):
        raise ValueError(f"the set's learned schedule is damaged: {tuple(lrs.shape)} step sizes for "
                         f"distill_steps={steps!r} at ipc={ipc}")
    if not bool(torch.isfinite(lrs).all()) or not bool((lrs > 0).all()):
        raise ValueError("the set's learned step sizes must be finite and positive")
    batches = DD.step_batches(synset.num_classes, ipc, steps, torch.device("cpu")) * (len(lrs) // steps)
    return lrs, batches


def learned_for(synset) -> str | None:
    """The student architecture a DD set's step sizes were learned for (None if not recorded)."""
    return (synset.meta.get("options") or {}).get("model") if synset.meta.get("method") == "dd" else None


def _passes(images: int, passes: int = 400, every: int = 40, batch: int = 1024) -> dict:
    """`iterations` and `decay_every` for `passes` loader passes over `images` at `batch`."""
    per_pass = -(-images // batch)
    return dict(iterations=passes * per_pass, decay_every=every * per_pass)


@register("dd")
class DD(Method):
    defaults = dict(
        **_passes(60000),   # MNIST / Fashion-MNIST: 400 passes of 59 batches = 23 600 iterations
        distill_steps=None,  # S, the batches the set is split into (published 10; None: min(10, ipc))
        distill_epochs=3,   # passes over the S batches per unroll (published 3)
        distill_lr=0.02,    # initial step size of every step (published default)
        lr_img=0.01,        # Adam lr on the pixels and the raw step sizes
        decay=0.5,          # StepLR factor every decay_every iterations
        batch_real=1024,    # real images per iteration for the loss (split evenly over classes)
        nets=1,             # fresh networks per iteration, gradients averaged (published code: 1)
        model="ConvNet",    # any registry model without batch norm; LeNet on MNIST as published
        init="noise",       # "noise": N(0, 1) pixels as published; "real": the driver's real images
        memory="exact",     # ops.unroll memory mode
    )
    class_sharded = True
    overrides = [
        (("cifar10", "cifar100"), None, dict(**_passes(50000), distill_lr=0.001)),  # README: 0.001 on CIFAR-10
        (("svhn",), None, _passes(73257)),
        (("tinyimagenet",), None, _passes(100000)),
        (("mnist", "fashion-mnist"), None, dict(model="LeNet")),  # DD's MNIST student
    ]

    def init(self, synset, dataset, sampler, generator, device):
        steps = self.options["distill_steps"] or min(10, self.ipc)
        if self.ipc % steps:
            raise ValueError(f"distill_steps={steps} must divide ipc={self.ipc}: each step's batch holds the same "
                             f"number of images of every class")
        if self.options["init"] not in INITS or self.options["memory"] not in MEMORY:
            raise ValueError(f"init must be one of {INITS} and memory one of {MEMORY}, got "
                             f"{self.options['init']!r} and {self.options['memory']!r}")
        per_step = self.options["batch_real"] // dataset.num_classes
        if per_step < 1:
            raise ValueError(f"batch_real={self.options['batch_real']} gives no real image per class "
                             f"({dataset.num_classes} classes)")
        self.shard = self.shard or ClassShard.whole(dataset.num_classes)
        refuse_batchnorm_when_sharded(self.shard, self.options["model"], dataset)
        self.check_real_batch(sampler, classes_sharing=dataset.num_classes)
        self.memory = exact_when_sharded(self.name, self.options["memory"], self.shard)
        self.sampler, self.generator, self.device = sampler, generator, device
        self.real_per_class = per_step
        self.real_total = per_step * dataset.num_classes
        self.student = functional_model(self.options["model"], dataset.channels, dataset.num_classes,
                                        dataset.image_size)
        # A sharded rank splits every batch into its own rows on the host: keep them there.
        batch_device = torch.device("cpu") if self.shard.sharded else device
        self.batches = (self.step_batches(dataset.num_classes, self.ipc, steps, batch_device)
                        * self.options["distill_epochs"])
        if self.options["init"] == "noise":
            synset.images = torch.randn(synset.images.shape, generator=generator).to(device)
        synset.images.requires_grad_(True)
        synset.meta["distill_steps"] = steps
        raw = math.log(math.expm1(float(self.options["distill_lr"])))  # softplus(raw) = distill_lr
        self.raw_lrs = torch.full((len(self.batches),), raw, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([synset.images, self.raw_lrs], lr=self.options["lr_img"],
                                          betas=(0.5, 0.999))

    @staticmethod
    def step_batches(classes: int, ipc: int, steps: int, device) -> list:
        """S index batches of a class-ordered set: batch s holds images s·m … (s+1)·m − 1 of
        every class (m = ipc / S)."""
        per_step = ipc // steps
        rows = torch.arange(classes * ipc).view(classes, steps, per_step)
        return [rows[:, s].reshape(-1).to(device) for s in range(steps)]

    def fresh_params(self) -> torch.Tensor:
        """A freshly initialised student drawn from the method's generator (`xavier_params`)."""
        return xavier_params(self.student, self.generator, self.device)

    def step(self, synset, iteration):
        for group in self.optimizer.param_groups:  # StepLR as a function of the iteration: resume-exact
            group["lr"] = self.options["lr_img"] * self.options["decay"] ** (iteration // self.options["decay_every"])
        # The draw for all classes, of which a sharded rank gathers only its own.
        real, real_labels = self.sampler.sample_range(self.real_per_class, self.shard.first, self.shard.end)
        lrs = F.softplus(self.raw_lrs.detach())
        rows = self.own_class_rows(synset)
        images, labels = synset.images.detach()[rows], synset.labels[rows]
        share = None
        if self.shard.sharded:
            share = RowShare(rows.start, rows.stop - rows.start, len(synset.images), self.shard.sum)

        def real_loss(params):
            """Cross-entropy of the trained student on the real batch (a sharded rank: its rows' part)."""
            logits = self.student.forward(real, params)
            return F.cross_entropy(logits, real_labels, reduction="sum") / self.real_total

        grad_images = torch.zeros_like(images)
        grad_lrs = torch.zeros_like(lrs)
        loss = torch.zeros((), device=self.device)
        nets = self.options["nets"]
        for _ in range(nets):
            result = ops.unroll(images, labels, lrs, self.fresh_params(), self.student, self.batches, real_loss,
                                memory=self.memory, share=share)
            grad_images += result.grad_images / nets
            grad_lrs += result.grad_lr / nets
            loss += result.loss / nets
        synset.images.grad = self.on_whole_set(synset, grad_images, synset.images)
        self.raw_lrs.grad = grad_lrs * torch.sigmoid(self.raw_lrs.detach())  # d softplus(raw) / d raw
        self.optimizer.step()
        # The step sizes beside the images (a device tensor: no sync), for an evaluation mid-run.
        synset.meta["step_lrs"] = F.softplus(self.raw_lrs.detach())
        return {"loss": loss, "lr_mean": lrs.mean()}

    def gather(self, synset) -> None:
        self.gather_images_and_optimizer_state(synset, self.optimizer)

    def finish(self, synset):
        synset.meta["step_lrs"] = F.softplus(self.raw_lrs.detach()).cpu().tolist()

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "raw_lrs": self.raw_lrs.detach().cpu()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            self.raw_lrs.copy_(state["raw_lrs"].to(self.raw_lrs.device))
