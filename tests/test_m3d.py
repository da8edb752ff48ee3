"""M3D / ECHO: kernel-MMD distribution matching, multi-formation init, several updates per net."""
import pytest
import torch

import condense_engine as ce
from condense_engine import ops
from condense_engine.methods.dm import M3D
from condense_engine.models import ConvNetBank
from tests.toy_data import FAST, toy_dataset


@pytest.mark.parametrize("kernel", ["gaussian", "poly"])
def test_m3d_lowers_its_kernel_mmd(kernel):
    data = toy_dataset()
    options = dict(FAST, dsa=False, kernel=kernel, lr_img=1.0 if kernel == "gaussian" else 0.1)
    init = ce.distill(data, method="m3d", ipc=2, iterations=0, progress=False, **options)
    syn = ce.distill(data, method="m3d", ipc=2, iterations=25, progress=False, **options)
    real = torch.cat([data.normalized()[data.labels == c][:24] for c in range(3)])
    before = after = 0.0
    for seed in range(4):
        bank = ConvNetBank(1, channel=1, width=32, im_size=(12, 12), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            feats = [bank.embed(x)[0] for x in (real, init.images, syn.images)]
        target = feats[0].view(3, 24, -1)
        mmd = dict(kernel=kernel, degree=3, include_xx=False)
        before += float(ops.mmd(target, feats[1].view(3, 2, -1), **mmd))
        after += float(ops.mmd(target, feats[2].view(3, 2, -1), **mmd))
    assert after < before


def test_echo_is_an_alias():
    data = toy_dataset()
    syn = ce.distill(data, method="echo", ipc=1, iterations=1, progress=False, **FAST)
    assert syn.meta["method"] == "m3d"


def test_multi_formation_factor_two():
    data = toy_dataset(per_class=24)
    syn = ce.distill(data, method="m3d", ipc=2, iterations=2, progress=False, factor=2, **FAST)
    assert syn.factor == 2 and syn.images.shape == (6, 1, 12, 12)
    images, labels = syn.materialize()
    assert images.shape == (24, 1, 12, 12)
    assert labels.tolist() == [c for c in range(3) for _ in range(8)]
    with pytest.raises(ValueError, match="divide"):
        ce.distill(toy_dataset(size=13), method="m3d", ipc=1, iterations=1, progress=False, factor=2, **FAST)


def test_model_steps_reuses_the_network(monkeypatch):
    built = []
    original = ConvNetBank.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ConvNetBank, "__init__", counting)
    ce.distill(toy_dataset(), method="m3d", ipc=1, iterations=6, progress=False, model_steps=3, **FAST)
    assert len(built) == 2


def test_defaults_documented_and_overridable():
    method = M3D("mnist", 10)
    assert method.options["kernel"] == "gaussian" and method.options["factor"] == 1
    assert M3D("mnist", 10, kernel="poly", degree=2).kernel_options == dict(kernel="poly", include_xx=False, degree=2)
