"""Trajectory matching: MTT (methods.md §6), TESLA (§7) and DATM (§8).

Every iteration picks an expert from the buffer and a start epoch t, runs `syn_steps` student SGD
steps from the expert's epoch-t parameters on the synthetic images, and moves the images and the
learnable student lr (SGD, momentum 0.5) to bring the student to the expert's epoch t + M
parameters (`ops.trajectory_match`). TESLA is MTT with the constant-memory gradient and soft
labels from the target expert; DATM adds a growing start-epoch window, learned soft labels and
images initialised from correctly classified real samples.

The expert buffer (option `buffer`, a folder from `condense experts`) must match the data set,
its whitening and the model; `expert.check_compatible` says what differs.

Under torchrun MTT, TESLA and DATM shard the classes (`condense_engine.distributed`) in the
"exact" and "tesla" memory modes ("unrolled" runs as "exact", the same gradient): every rank
runs the same student from the same expert segment and each step's gradient (and, in "exact",
Hessian-vector product) is summed across the ranks, each computed on the rank's own synthetic
rows of the minibatch (`ops.RowShare`). So each rank's student activations shrink with the
ranks; every rank still holds the whole set's tensors, of which it updates only its rows
(images, TESLA's and DATM's labels), gathered with the set. DATM's threshold test sees the same
loss on every rank, but a loss within rounding of the threshold may be decided differently than
in one process, after which the runs part by more than rounding.
"""
import warnings

import torch
import torch.nn.functional as F

from condense_engine.distributed import ClassShard
from condense_engine.expert import check_compatible, load_experts
from condense_engine.methods.base import Method, exact_when_sharded, register
from condense_engine.ops.dsa import default_strategy
from condense_engine.ops.trajectory import MEMORY_MODES, RowShare, dsa_augment, trajectory_match

_TINY = ("tinyimagenet", "tiny", "tinyimagenet200")
_IMAGENET_SUBSETS = ("imagenette", "imagewoof", "imagefruit", "imagemeow", "imagesquawk", "imageyellow")
# Forward passes over many images (soft labels, init selection) run in chunks of this many.
_CHUNK = 256


def _row(steps, epochs, max_start, lr_img, lr_lr, lr_teacher, **extra) -> dict:
    return dict(syn_steps=steps, expert_epochs=epochs, max_start_epoch=max_start, lr_img=float(lr_img),
                lr_lr=lr_lr, lr_teacher=lr_teacher, **extra)


def _datm_row(steps, epochs, lr_img, lr_lr, batch, lr_y, threshold, window, expansion=None, **extra) -> dict:
    """One DATM config; window = (min, current max or None when it does not grow, max) start epoch."""
    low, current, high = window
    return dict(syn_steps=steps, expert_epochs=epochs, lr_img=float(lr_img), lr_lr=lr_lr, batch_syn=batch,
                lr_y=float(lr_y), threshold=threshold, min_start_epoch=low,
                current_max_start_epoch=high if current is None else current, max_start_epoch=high,
                sequential_generation=current is not None, expansion_end_epoch=expansion or 1, zca=True, **extra)


@register("mtt")
class MTT(Method):
    """Matching Training Trajectories (Cazenavette et al., CVPR 2022)."""

    defaults = dict(
        iterations=5000,
        buffer=None,          # expert buffer folder (required)
        memory="unrolled",    # "unrolled" (published), "exact"/"constant" (same gradient, flat memory), "tesla"
        syn_steps=20,         # student steps N per iteration
        expert_epochs=3,      # M: target = expert epoch t + M
        max_start_epoch=25,   # t ~ U{0, …, max_start_epoch − 1}
        lr_img=1000.0,
        lr_lr=1e-5,           # SGD lr of the learnable student lr
        lr_teacher=0.01,      # initial student lr
        momentum=0.5,         # of both optimisers, as published
        batch_syn=None,       # student minibatch; None = the whole synthetic set
        dsa=True,
        dsa_strategy=None,    # None: the published default for the data set
        model="ConvNet",      # must be the buffer's architecture
        zca=None,             # whether the published setting whitens the data (warned about on mismatch)
    )
    class_sharded = True
    # methods.md §6.3 (DC-Bench commands "provided by the original authors"; CIFAR-10 lr_teacher
    # 0.001 is unverified against the paper; lr_img of CIFAR-10 IPC10 is not the README typo).
    overrides = [
        (("cifar10",), (1,), _row(50, 2, 2, 100, 1e-7, 0.01, zca=True)),
        (("cifar10",), (10,), _row(30, 2, 20, 100, 1e-5, 0.001, zca=True)),
        (("cifar10",), (50,), _row(30, 2, 40, 1000, 1e-5, 0.001, zca=False)),
        (("cifar100",), (1,), _row(20, 3, 20, 1000, 1e-5, 0.01, zca=True)),
        (("cifar100",), (10,), _row(20, 2, 20, 1000, 1e-5, 0.01, zca=False)),
        (("cifar100",), (50,), _row(80, 2, 40, 1000, 1e-5, 0.01, batch_syn=125, zca=True)),
        (_TINY, (1,), _row(10, 2, 10, 10000, 1e-4, 0.01, model="ConvNetD4", zca=False)),
        (_TINY, (10,), _row(20, 2, 40, 10000, 1e-4, 0.01, batch_syn=200, model="ConvNetD4", zca=False)),
        (_TINY, (50,), _row(20, 2, 40, 10000, 1e-4, 0.01, batch_syn=300, model="ConvNetD4", zca=False)),
        (_IMAGENET_SUBSETS, (1,), _row(20, 2, 10, 1000, 1e-6, 0.01, model="ConvNetD5", zca=False)),
        (_IMAGENET_SUBSETS, (10,), _row(20, 2, 10, 100000, 1e-6, 0.01, batch_syn=20, model="ConvNetD5",
                                        zca=False)),
    ]

    def init(self, synset, dataset, sampler, generator, device):
        self.generator, self.device = generator, device
        self.memory = "exact" if self.options["memory"] == "constant" else self.options["memory"]
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES} or 'constant', got {self.options['memory']!r}")
        self.shard = self.shard or ClassShard.whole(dataset.num_classes)
        self.memory = exact_when_sharded(self.name, self.memory, self.shard)
        self.buffer = self._open_buffer(dataset)
        self.student = self.buffer.network()
        if self.shard.sharded and self.student.config["norm"] == "batchnorm":
            raise ValueError(f"{self.options['model']} uses BatchNorm, whose batch statistics mix classes: it "
                             f"cannot run class-sharded; use one process or an instance-norm ConvNet")
        self._check_window(*self.start_window_limits())
        self.augment = None
        if self.options["dsa"]:
            self.augment = dsa_augment(self.options["dsa_strategy"] or default_strategy(dataset.name))
        synset.images.requires_grad_(True)
        self.syn_lr = torch.tensor(float(self.options["lr_teacher"]), device=device, requires_grad=True)
        synset.lr = self.syn_lr.detach()  # shares storage: follows every optimiser step
        self.image_optimizer = torch.optim.SGD([synset.images], lr=self.options["lr_img"],
                                               momentum=self.options["momentum"])
        self.lr_optimizer = torch.optim.SGD([self.syn_lr], lr=self.options["lr_lr"], momentum=self.options["momentum"])

    def _open_buffer(self, dataset):
        path = self.options["buffer"]
        if not path:
            raise ValueError(f"method {self.name!r} needs buffer=<expert buffer folder>; train one with "
                             f"`condense experts --dataset {dataset.name} --out <folder>` or "
                             "condense_engine.expert.train_experts(..., out=<folder>)")
        buffer = load_experts(path)
        whitened = dataset.zca is not None
        check_compatible(buffer.meta, dataset, self.options["model"], whitened)
        published = self.options["zca"]
        if published is not None and bool(published) != whitened:
            warnings.warn(f"the published {self.name} setting for {dataset.name} IPC {self.ipc} "
                          f"{'uses' if published else 'does not use'} ZCA whitening but the data here "
                          f"{'are' if whitened else 'are not'} whitened; results will differ from the paper's")
        return buffer

    def start_window_limits(self) -> tuple:
        """(lowest, highest) start epoch any iteration may draw."""
        return 0, self.options["max_start_epoch"] - 1

    def start_window(self, iteration: int) -> tuple:
        """Start epochs drawn at this iteration: U{low, …, high − 1}."""
        return 0, self.options["max_start_epoch"]

    def _check_window(self, lowest: int, highest: int) -> None:
        reach = highest + self.options["expert_epochs"]
        if lowest < 0 or highest < lowest:
            raise ValueError(f"{self.name}: empty start-epoch window [{lowest}, {highest}]")
        if reach > self.buffer.num_epochs:
            raise ValueError(f"{self.name}: start epochs up to {highest} plus expert_epochs "
                             f"{self.options['expert_epochs']} need trajectories of {reach} epochs, but the "
                             f"buffer's experts have {self.buffer.num_epochs}; lower max_start_epoch or train "
                             "longer experts")

    def pick_segment(self, iteration: int) -> tuple:
        """(start epoch, θ_start, θ_target) of a random expert, on the device."""
        expert = int(torch.randint(len(self.buffer), (), generator=self.generator))
        low, high = self.start_window(iteration)
        epoch = int(torch.randint(low, high, (), generator=self.generator))
        trajectory = self.buffer[expert]
        start = trajectory[epoch].to(self.device, torch.float32)
        target = trajectory[epoch + self.options["expert_epochs"]].to(self.device, torch.float32)
        return epoch, start, target

    def student_labels(self, synset, target: torch.Tensor) -> torch.Tensor:
        """The labels the student trains on this iteration."""
        return synset.labels

    def match(self, synset, labels, start, target):
        """trajectory_match on the set (a sharded rank: on its rows, the others' summed in)."""
        seed = int(torch.randint(0, 2**31 - 1, (), generator=self.generator))
        batch = self.options["batch_syn"] or len(synset.images)
        images, share = synset.images.detach(), None
        if self.shard.sharded:
            rows = self.own_class_rows(synset)
            images, labels = images[rows], labels[rows]
            share = RowShare(rows.start, rows.stop - rows.start, len(synset.images), self.shard.sum)
        return trajectory_match(images, labels, self.syn_lr.detach(), start, target, self.student,
                                steps=self.options["syn_steps"], batch_size=int(batch), memory=self.memory,
                                augment=self.augment, seed=seed, share=share)

    def update(self, synset, result) -> None:
        """Set the gradients of images and lr from the match and step their optimisers."""
        synset.images.grad = self.on_whole_set(synset, result.grad_images.to(synset.images.dtype), synset.images)
        self.syn_lr.grad = result.grad_lr.to(self.syn_lr.dtype)
        self.image_optimizer.step()
        self.lr_optimizer.step()

    def step(self, synset, iteration):
        epoch, start, target = self.pick_segment(iteration)
        result = self.match(synset, self.student_labels(synset, target), start, target)
        self.update(synset, result)
        # Device tensors (syn_lr cloned: its optimiser updates it in place); the driver reads
        # stats back at its own cadence.
        return {"loss": result.loss.detach(), "syn_lr": self.syn_lr.detach().clone(), "start_epoch": float(epoch)}

    def gather(self, synset) -> None:
        self.gather_images_and_optimizer_state(synset, self.image_optimizer)

    def state_dict(self):
        return {"images": self.image_optimizer.state_dict(), "lr": self.lr_optimizer.state_dict(),
                "syn_lr": self.syn_lr.detach().cpu()}

    def load_state_dict(self, state):
        self.image_optimizer.load_state_dict(state["images"])
        self.lr_optimizer.load_state_dict(state["lr"])
        with torch.no_grad():
            self.syn_lr.copy_(state["syn_lr"])


def expert_logits(student, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Logits of the network with flat `params` on `images`, without a graph, in chunks."""
    with torch.no_grad():
        return torch.cat([student.forward(chunk, params) for chunk in images.split(_CHUNK)])


@register("tesla")
class TESLA(MTT):
    """TESLA (Cui et al., ICML 2023): MTT with constant memory and the target expert's soft labels.

    With `teacher_label` the student trains each iteration on softmax(expert logits at θ_target)
    of every synthetic image; the published code does this only for ImageNet (its other branch is
    broken), here it works on every data set. The set keeps the last iteration's soft labels.
    """

    defaults = dict(MTT.defaults, iterations=10000, memory="tesla", teacher_label=True)
    # TESLA's README commands; other settings inherit MTT's table.
    overrides = MTT.overrides + [
        (("cifar10",), (1,), _row(50, 2, 5, 1000, 1e-7, 0.01, zca=False)),
        (("cifar100",), (50,), _row(80, 2, 40, 1000, 1e-5, 0.01, batch_syn=125, zca=True)),
        (("imagenet", "imagenet1k"), (1,), _row(10, 3, 10, 10000, 1e-4, 0.01, batch_syn=100, model="ConvNetD4")),
    ]

    def init(self, synset, dataset, sampler, generator, device):
        super().init(synset, dataset, sampler, generator, device)
        self.synset = synset

    def student_labels(self, synset, target):
        """The target expert's softmax on the images (a sharded rank: on its rows; the others'
        rows come in with gather)."""
        if not self.options["teacher_label"]:
            return synset.labels
        rows = self.own_class_rows(synset)
        soft = F.softmax(expert_logits(self.student, synset.images.detach()[rows], target), dim=1)
        if self.shard.sharded:
            labels = synset.labels if synset.labels.dim() == 2 else soft.new_zeros(len(synset.images), soft.shape[1])
            labels[rows] = soft
            soft = labels
        synset.labels = soft
        return soft

    def gather(self, synset) -> None:
        super().gather(synset)
        if synset.labels.dim() == 2:
            self.shard.gather_classes(synset.labels, len(synset.labels) // self.shard.num_classes)

    def state_dict(self):
        return dict(super().state_dict(), labels=self.synset.labels.detach().cpu())

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.synset.labels = state["labels"].to(self.device)


@register("datm")
class DATM(MTT):
    """DATM (Guo et al., ICLR 2024): difficulty-aligned windows and learned soft labels.

    Start epochs are drawn from U{min_start_epoch, …, upper − 1}, where `upper` grows linearly
    from current_max_start_epoch to max_start_epoch over expansion_end_epoch iterations (with
    sequential_generation; else it is max_start_epoch). The labels are learnable logits,
    initialised from the experts' final logits on the init images (averaged over the experts that
    classify each image correctly), trained through softmax with SGD (lr_y, momentum 0.9); the
    set's labels are their softmax. With init "samples_predicted_correctly" the images start from
    real images that an expert's final parameters classify correctly (expert 0 first, the next
    experts when a class runs short; the first candidates fill any remainder). Iterations whose
    loss exceeds `threshold` change nothing. The paper's experts are GSAM-trained "flat" experts
    (`condense experts --optimizer gsam --epochs 100`, methods.md §8.1); SGD buffers also work.
    """

    defaults = dict(MTT.defaults, iterations=10000, syn_steps=80, expert_epochs=2, min_start_epoch=0,
                    current_max_start_epoch=10, max_start_epoch=20, expansion_end_epoch=1000,
                    sequential_generation=True, lr_img=100.0, lr_lr=1e-5, lr_teacher=0.01, batch_syn=100,
                    lr_y=2.0, momentum_y=0.9, threshold=1.0, init="samples_predicted_correctly",
                    label_experts=None)

    # methods.md §8.3 (DATM configs after the issue #7 fix); window = (min, current max, max).
    overrides = [
        (("cifar10",), (1,), _datm_row(80, 2, 100, 1e-7, 10, 5, 1.1, (0, None, 4))),
        (("cifar10",), (10,), _datm_row(80, 2, 100, 1e-5, 100, 2, 1.0, (0, 10, 20), 1000)),
        (("cifar10",), (50,), _datm_row(80, 2, 1000, 1e-5, 500, 2, 1.0, (0, 20, 40), 2000)),
        (("cifar10",), (500,), _datm_row(40, 2, 50, 1e-5, 1000, 10, 1.0, (40, None, 60))),
        (("cifar10",), (1000,), _datm_row(100, 2, 50, 1e-5, 1000, 10, 1.0, (40, None, 60))),
        (("cifar100",), (1,), _datm_row(40, 3, 1000, 1e-5, 1000, 10, 1.0, (0, 10, 20), 1000)),
        (("cifar100",), (10,), _datm_row(80, 2, 1000, 1e-5, 1000, 10, 1.0, (0, 30, 50), 2000)),
        (("cifar100",), (50,), _datm_row(80, 2, 1000, 1e-5, 1000, 10, 1.0, (20, None, 70), init="real")),
        (("cifar100",), (100,), _datm_row(80, 2, 50, 1e-5, 1000, 10, 1.0, (30, None, 70))),
        (_TINY, (1,), _datm_row(40, 2, 10000, 1e-4, 1000, 10, 1.0, (0, 15, 20), 2000, model="ConvNetD4")),
        (_TINY, (10,), _datm_row(40, 2, 100, 1e-4, 500, 10, 1.0, (10, None, 50), model="ConvNetD4")),
        (_TINY, (50,), _datm_row(20, 2, 100, 1e-4, 1000, 10, 1.0, (40, None, 70), model="ConvNetD4")),
    ]

    def init(self, synset, dataset, sampler, generator, device):
        if self.options["init"] not in ("samples_predicted_correctly", "real"):
            raise ValueError(f"init must be 'samples_predicted_correctly' or 'real', got {self.options['init']!r}")
        super().init(synset, dataset, sampler, generator, device)
        if self.options["init"] == "samples_predicted_correctly":
            with torch.no_grad():
                synset.images[self.own_class_rows(synset)] = self._correct_real_images(synset, sampler)
        self.label_logits = self._initial_logits(synset).requires_grad_(True)
        synset.labels = F.softmax(self.label_logits.detach(), dim=1)
        self.synset = synset
        self.label_optimizer = torch.optim.SGD([self.label_logits], lr=self.options["lr_y"],
                                               momentum=self.options["momentum_y"])

    def start_window_limits(self):
        low, current, final = (self.options[key] for key in
                               ("min_start_epoch", "current_max_start_epoch", "max_start_epoch"))
        if self.options["sequential_generation"] and not low < current <= final:
            raise ValueError(f"datm: the start-epoch window grows from current_max_start_epoch {current} to "
                             f"max_start_epoch {final} above min_start_epoch {low}, so it needs "
                             f"min_start_epoch < current_max_start_epoch ≤ max_start_epoch")
        return low, final - 1

    def start_window(self, iteration):
        low, final = self.options["min_start_epoch"], self.options["max_start_epoch"]
        if not self.options["sequential_generation"]:
            return low, final
        current = self.options["current_max_start_epoch"]
        grown = current + int((final - current) * iteration / self.options["expansion_end_epoch"])
        return low, max(low + 1, min(grown, final))

    def _final_params(self, expert: int) -> torch.Tensor:
        return self.buffer[expert][-1].to(self.device, torch.float32)

    def _correct_real_images(self, synset, sampler) -> torch.Tensor:
        """Per class of this rank, `ipc` real images classified correctly by an expert's final
        parameters. Each class's candidate order comes from its own generator, seeded from one
        draw, so a sharded rank's classes get the images they get in one process."""
        labels = synset.hard_labels
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        chosen = []
        for label in range(self.shard.first, self.shard.end):
            need = int((labels == label).sum())
            order = torch.Generator().manual_seed(seed + label)
            candidates = sampler.sample_class(label, int(sampler.counts[label]), order)
            remaining = torch.ones(len(candidates), dtype=torch.bool, device=candidates.device)
            picked = []
            for expert in range(len(self.buffer)):
                if need == 0:
                    break
                predicted = expert_logits(self.student, candidates, self._final_params(expert)).argmax(1)
                hits = ((predicted == label) & remaining).nonzero().flatten()[:need]
                remaining[hits] = False
                picked.append(hits)
                need -= len(hits)
            picked.append(remaining.nonzero().flatten()[:need])
            chosen.append(candidates[torch.cat(picked)])
        return torch.cat(chosen)

    def _initial_logits(self, synset) -> torch.Tensor:
        """Mean final-epoch logits over the experts that classify each image correctly (all if none do)."""
        images, labels = synset.images.detach(), synset.hard_labels
        count = self.options["label_experts"] or len(self.buffer)
        total = torch.zeros(len(images), synset.num_classes, device=self.device)
        correct_total = torch.zeros_like(total)
        correct_count = torch.zeros(len(images), 1, device=self.device)
        for expert in range(min(count, len(self.buffer))):
            logits = expert_logits(self.student, images, self._final_params(expert))
            correct = (logits.argmax(1) == labels).unsqueeze(1).float()
            total += logits
            correct_total += logits * correct
            correct_count += correct
        experts_used = min(count, len(self.buffer))
        return torch.where(correct_count > 0, correct_total / correct_count.clamp_min(1), total / experts_used)

    def step(self, synset, iteration):
        epoch, start, target = self.pick_segment(iteration)
        with torch.enable_grad():
            probabilities = F.softmax(self.label_logits, dim=1)
        result = self.match(synset, probabilities.detach().requires_grad_(True), start, target)
        skipped = float(result.loss) > self.options["threshold"]  # the same on every rank
        if not skipped:
            grad_labels = self.on_whole_set(synset, result.grad_labels, probabilities)
            self.label_logits.grad = torch.autograd.grad(probabilities, self.label_logits, grad_labels)[0]
            self.update(synset, result)
            self.label_optimizer.step()
            synset.labels = F.softmax(self.label_logits.detach(), dim=1)
        return {"loss": float(result.loss), "syn_lr": float(self.syn_lr.detach()), "start_epoch": float(epoch),
                "window_end": float(self.start_window(iteration)[1]), "skipped": float(skipped)}

    def gather(self, synset) -> None:
        """The images, their momentum, and every rank's rows of the learned label logits and
        their momentum; the labels follow the logits."""
        super().gather(synset)
        per_class = len(synset.images) // self.shard.num_classes
        self.shard.gather_classes(self.label_logits, per_class)
        for state in self.label_optimizer.state.values():
            if state.get("momentum_buffer") is not None:
                self.shard.gather_classes(state["momentum_buffer"], per_class)
        synset.labels = F.softmax(self.label_logits.detach(), dim=1)

    def state_dict(self):
        return dict(super().state_dict(), label_optimizer=self.label_optimizer.state_dict(),
                    label_logits=self.label_logits.detach().cpu())

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.label_optimizer.load_state_dict(state["label_optimizer"])
        with torch.no_grad():
            self.label_logits.copy_(state["label_logits"])
        self.synset.labels = F.softmax(self.label_logits.detach(), dim=1)
