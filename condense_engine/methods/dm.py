"""DM: dataset condensation with distribution matching (Zhao & Bilen, WACV 2023; methods.md §5).

Each iteration samples a fresh random ConvNet (frozen, never trained), embeds a real batch of
every class and the synthetic images of every class after one Siamese DSA transform per class,
and moves the synthetic pixels (SGD, momentum 0.5) to shrink Σ_c ‖mean φ(real_c) − mean φ(syn_c)‖².
All classes go through one forward pass (exactly equivalent for nets without BatchNorm; with
BatchNorm the batch statistics mix classes, as in the published BN branch).
"""
import torch

from condense_engine.methods.augment import siamese_dsa
from condense_engine.methods.base import Method, register
from condense_engine.models import ConvNetBank, convnet_config
from condense_engine.ops.dsa import default_strategy


@register("dm")
class DM(Method):
    defaults = dict(
        iterations=20000,   # published default
        lr_img=1.0,         # SGD lr on the synthetic pixels
        momentum=0.5,
        batch_real=256,     # real images per class per iteration
        model="ConvNet",    # embedding architecture (a ConvNet* name)
        nets=1,             # random networks per iteration (published: 1)
        dsa=True,
        dsa_strategy=None,  # None: the published default for the data set
    )
    overrides = [
        (("cifar10",), range(100, 1251), dict(lr_img=10.0)),  # DM README, IPC 100–1250
    ]

    def init(self, synset, dataset, sampler, generator, device):
        self.sampler, self.generator, self.device = sampler, generator, device
        self.num_classes = dataset.num_classes
        self.arch = dict(convnet_config(self.options["model"]), channel=dataset.channels,
                         im_size=dataset.image_size)
        self.strategy = None
        if self.options["dsa"]:
            self.strategy = self.options["dsa_strategy"] or default_strategy(dataset.name)
        synset.images.requires_grad_(True)
        self.optimizer = torch.optim.SGD([synset.images], lr=self.options["lr_img"],
                                         momentum=self.options["momentum"])

    def embed_loss(self, bank, real: torch.Tensor, syn: torch.Tensor, ipc: int) -> torch.Tensor:
        """Σ over classes (and mean over the bank's nets) of the squared mean-embedding gap."""
        with torch.no_grad():
            real_feats = bank.embed(real)
        syn_feats = bank.embed(syn)
        nets, classes = real_feats.shape[0], self.num_classes
        real_means = real_feats.view(nets, classes, -1, real_feats.shape[-1]).mean(2)
        syn_means = syn_feats.view(nets, classes, ipc, syn_feats.shape[-1]).mean(2)
        return ((real_means - syn_means) ** 2).sum() / nets

    def step(self, synset, iteration):
        batch_real = self.options["batch_real"]
        bank = ConvNetBank(self.options["nets"], generator=self.generator, **self.arch).to(self.device)
        bank.requires_grad_(False)
        real, _ = self.sampler.sample(batch_real)
        syn = synset.images
        if self.strategy:
            seeds = torch.randint(0, 2**31 - 1, (self.num_classes,), generator=self.generator).tolist()
            real = siamese_dsa(real, batch_real, seeds, self.strategy)
            syn = siamese_dsa(syn, self.ipc, seeds, self.strategy)
        loss = self.embed_loss(bank, real, syn, self.ipc)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach())}

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
