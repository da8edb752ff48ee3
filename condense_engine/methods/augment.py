"""Siamese DSA over a class-ordered batch: one shared transform per class, batched across classes.

DM, M3D and DC augment the real and the synthetic images of a class with the same seed, so both
get one identical transform while different classes get different ones. Rather than one call per
class, the classes are grouped by the op group their seed picked and each group is augmented in
one call (at most six calls in the published mode "S").
"""
import dataclasses

import torch

from condense_engine.ops.dsa import DSAParams, dsa


def concat_params(params: list) -> DSAParams:
    """One DSAParams covering the samples of several DSAParams with the same op groups."""
    first = params[0]
    merged = {}
    for spec in dataclasses.fields(DSAParams):
        values = [getattr(p, spec.name) for p in params]
        merged[spec.name] = torch.cat(values) if isinstance(values[0], torch.Tensor) else getattr(first, spec.name)
    return DSAParams(**merged)


def siamese_dsa(images: torch.Tensor, per_class: int, seeds: list, strategy: str) -> torch.Tensor:
    """Augment class-ordered `images` ((len(seeds)·per_class, C, H, W)); class c uses seeds[c]."""
    size = tuple(images.shape[2:])
    params = [DSAParams.sample(per_class, strategy, size=size, siamese=True, seed=int(seed),
                               device=images.device) for seed in seeds]
    chunks = images.split(per_class)
    out = [None] * len(chunks)
    groups: dict = {}
    for index, p in enumerate(params):
        groups.setdefault(p.ops, []).append(index)
    for members in groups.values():
        batch = torch.cat([chunks[i] for i in members])
        augmented = dsa(batch, concat_params([params[i] for i in members])).split(per_class)
        for i, chunk in zip(members, augmented):
            out[i] = chunk
    return torch.cat(out)


def matched_batches(sampler, synset, batch_real: int, strategy: str | None, generator: torch.Generator) -> tuple:
    """`batch_real` real images of every class and the synthetic images, both class-ordered,
    after one shared Siamese DSA transform per class (none when `strategy` is None).

    Returns (real, syn, synthetic images per class); `syn` stays differentiable w.r.t. the set.
    """
    real, _ = sampler.sample(batch_real)
    syn, _ = synset.materialize()
    per_class = syn.shape[0] // synset.num_classes
    if strategy:
        seeds = torch.randint(0, 2**31 - 1, (synset.num_classes,), generator=generator).tolist()
        real = siamese_dsa(real, batch_real, seeds, strategy)
        syn = siamese_dsa(syn, per_class, seeds, strategy)
    return real, syn, per_class
