"""ops.embed_epilogue: the Triton kernels (interpreter on CPU) and the native CPU kernels against
the torch modules' composition, forward and gradients; input validation; and the use of the
epilogue by ConvNetBank, ConvNet and the evaluation protocol."""
import pytest
import torch
from torch import nn

from condense_engine import ops
from condense_engine._extension import has_native
from condense_engine.evaluate import train_and_test
from condense_engine.models import ConvNet, ConvNetBank
from condense_engine.models.layers import make_activation
from condense_engine.reference import embed as reference
from tests.hopper_compile import assert_compiles_for_hopper

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NATIVE_MISSING = has_native("embed_epilogue", DEVICE)
needs_native = pytest.mark.skipif(NATIVE_MISSING is not None, reason=str(NATIVE_MISSING))
#: The fused backends, each tested against the reference where it runs.
FUSED = ["triton", pytest.param("native", marks=needs_native)]


def _inputs(n, channels, height, width, dtype=torch.float32):
    """Conv-like input (offset and scaled per channel, so the mean matters) and affine params."""
    offsets = torch.linspace(-3.0, 3.0, channels, device=DEVICE).view(1, -1, 1, 1)
    x = (2.0 * torch.randn(n, channels, height, width, device=DEVICE) + offsets)
    weight = 1.0 + 0.5 * torch.randn(channels, device=DEVICE)
    bias = 0.5 * torch.randn(channels, device=DEVICE)
    return [t.to(dtype).requires_grad_() for t in (x, weight, bias)]


def _value_and_grads(x, weight, bias, upstream, backend, **options):
    out = ops.embed_epilogue(x, weight, bias, backend=backend, **options)
    return (out,) + torch.autograd.grad(out, (x, weight, bias), upstream.to(out.dtype))


def _assert_matches_reference(backend, x, weight, bias, rtol=1e-5, atol=1e-5, **options):
    with torch.no_grad():
        out_shape = ops.embed_epilogue(x, weight, bias, backend="torch", **options).shape
    upstream = torch.randn(out_shape, device=DEVICE)
    reference = _value_and_grads(x, weight, bias, upstream, "torch", **options)
    ours = _value_and_grads(x, weight, bias, upstream, backend, **options)
    for name, got, want in zip(("out", "grad_x", "grad_weight", "grad_bias"), ours, reference):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("shape,groups", [
    ((2, 6, 8, 8), 6),     # instance norm
    ((2, 8, 6, 4), 2),     # group norm, 4 channels per group
    ((3, 4, 7, 5), 4),     # odd H and W: the last row and column are dropped by the pool
    ((1, 6, 5, 6), 3),     # n = 1, odd H
    ((2, 4, 3, 3), 1),     # one group over all channels (layer-norm-like), 1×1 pooled output
])
@pytest.mark.parametrize("backend", FUSED)
def test_fused_matches_reference(backend, shape, groups):
    x, weight, bias = _inputs(*shape)
    _assert_matches_reference(backend, x, weight, bias, groups=groups)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("act", ["relu", "leakyrelu", "sigmoid", "swish"])
@pytest.mark.parametrize("pool", ["avgpool", "none"])
def test_fused_activations_and_pools(backend, act, pool):
    x, weight, bias = _inputs(2, 4, 5, 6)
    _assert_matches_reference(backend, x, weight, bias, groups=2, act=act, pool=pool)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_plane_larger_than_one_block(backend):
    """A 40×40 plane spans two of Triton's 1024-element blocks and two of the native
    statistics' blocks: the loops over blocks accumulate."""
    x, weight, bias = _inputs(1, 2, 40, 40)
    _assert_matches_reference(backend, x, weight, bias, groups=2, eps=1e-3)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups", [4, 2])
def test_fused_half_precision_inputs(backend, dtype, groups):
    x, weight, bias = _inputs(2, 4, 6, 6, dtype=dtype)
    _assert_matches_reference(backend, x, weight, bias, groups=groups, rtol=5e-2, atol=3e-2)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_large_mean_keeps_the_variance(backend):
    """A mean 10⁴ times the spread: sums of x would cancel in fp32; the shifted sums do not."""
    x, weight, bias = (t.detach() for t in _inputs(2, 3, 6, 6))
    big = x * 1e-2 + 100.0
    expected = reference.embed_epilogue(big.double(), weight.double(), bias.double(), groups=3,
                                        pool="none")
    ours = ops.embed_epilogue(big, weight, bias, groups=3, pool="none", backend=backend)
    assert expected.std() > 0.1
    torch.testing.assert_close(ours.double(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("act", ["relu", "leakyrelu", "sigmoid", "swish"])
def test_fused_nan_spreads_like_the_reference(backend, act):
    """A NaN in x spoils its (sample, group) in the output, through every activation, as in the
    torch modules: a spoilt synthetic pixel must reach the loss, where the driver stops."""
    x, weight, bias = (t.detach() for t in _inputs(2, 4, 6, 6))
    x[1, 2, 3, 4] = float("nan")
    expected = ops.embed_epilogue(x, weight, bias, groups=2, act=act, backend="torch")
    ours = ops.embed_epilogue(x, weight, bias, groups=2, act=act, backend=backend)
    assert torch.isnan(expected[1, 2:]).all() and not torch.isnan(expected[0]).any()
    assert torch.equal(torch.isnan(ours), torch.isnan(expected))


@needs_native
@pytest.mark.parametrize("act", ["relu", "leakyrelu", "sigmoid", "swish"])
@pytest.mark.parametrize("pool", [True, False])
def test_native_gradcheck(act, pool):
    """The native op in float64 (the op itself; ops.embed_epilogue takes float32 and below),
    gradients w.r.t. x, weight and bias against finite differences; odd H drops a row."""
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, dtype=torch.float64, generator=generator).requires_grad_()
                       for shape in ((2, 4, 5, 4), (4,), (4,)))
    ops.embed.register_native_autograd()
    assert torch.autograd.gradcheck(
        lambda x, weight, bias: torch.ops.condense.embed_epilogue(x, weight, bias, 2, 1e-5, act,
                                                                  0.01, pool)[0],
        (x, weight, bias))


@needs_native
def test_native_second_derivative_is_refused():
    """Differentiating the native backward raises rather than silently giving zero (gradient
    matching differentiates through its network's backward)."""
    x, weight, bias = _inputs(2, 4, 6, 6)
    out = ops.embed_epilogue(x, weight, bias, groups=4, act="swish", backend="native")
    grad_weight, = torch.autograd.grad(out.square().sum(), weight, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        grad_weight.sum().backward()


@needs_native
def test_native_does_not_depend_on_the_thread_count():
    """Each (sample, group) is one thread's work and the per-sample sums are added in a fixed
    order, so the result is the same for any number of threads."""
    x, weight, bias = _inputs(300, 16, 6, 6)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out = ops.embed_epilogue(x, weight, bias, groups=8, backend="native")
            results.append((out,) + torch.autograd.grad(out.sin().sum(), (x, weight, bias)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@needs_native
@pytest.mark.parametrize("call,match", [
    (lambda x, w, b: torch.ops.condense.embed_epilogue(x[0], w, b, 2, 1e-5, "relu", 0.01, True),
     "must be \\(n, C, H, W\\)"),
    (lambda x, w, b: torch.ops.condense.embed_epilogue(x, w, b, 3, 1e-5, "relu", 0.01, True), "groups"),
    (lambda x, w, b: torch.ops.condense.embed_epilogue(x, w[:2], b, 2, 1e-5, "relu", 0.01, True), "weight"),
    (lambda x, w, b: torch.ops.condense.embed_epilogue(x, w, b, 2, 1e-5, "gelu", 0.01, True), "act"),
    (lambda x, w, b: torch.ops.condense.embed_epilogue(x[:, :, :1], w, b, 2, 1e-5, "relu", 0.01, True),
     "H, W >= 2"),
    (lambda x, w, b: torch.ops.condense.embed_epilogue_backward(
        torch.zeros(2, 4, 3, 3), x, w, b, torch.zeros(4), torch.ones(4), 2, "relu", 0.01, True),
     "grad_out"),
    (lambda x, w, b: torch.ops.condense.embed_epilogue_backward(
        torch.zeros(2, 4, 2, 2), x, w, b, torch.zeros(3), torch.ones(4), 2, "relu", 0.01, True),
     "mean and rstd"),
])
def test_native_op_checks_its_arguments(call, match):
    """The op refuses bad arguments itself, for callers that skip ops.embed_epilogue's checks."""
    with pytest.raises(RuntimeError, match=match):
        call(torch.randn(2, 4, 5, 5), torch.ones(4), torch.zeros(4))


def test_reference_equals_the_torch_modules():
    x, weight, bias = (t.detach() for t in _inputs(2, 6, 7, 7))
    norm = nn.GroupNorm(3, 6).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
    for act in ("relu", "swish"):
        modules = nn.Sequential(norm, make_activation(act), nn.AvgPool2d(2, 2))
        out = ops.embed_epilogue(x, weight, bias, groups=3, act=act, backend="torch")
        assert torch.equal(out, modules(x))


@pytest.mark.parametrize("backend", FUSED)
def test_weight_gradient_only(backend):
    """x without grad: the weight and bias gradients still come out right."""
    x, weight, bias = _inputs(2, 4, 4, 4)
    x = x.detach()
    results = []
    for backend in ("torch", backend):
        out = ops.embed_epilogue(x, weight, bias, groups=4, act="swish", backend=backend)
        results.append(torch.autograd.grad(out.square().sum(), (weight, bias)))
    for got, want in zip(*results[::-1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _valid():
    return dict(x=torch.randn(2, 4, 6, 6), weight=torch.ones(4), bias=torch.zeros(4), groups=2)


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(4, 6, 6)), "x must be an"),
    (dict(x=torch.randn(2, 4, 6, 6, dtype=torch.float64)), "x must be float32"),
    (dict(x=torch.randn(0, 4, 6, 6)), "x must not be empty"),
    (dict(weight=torch.ones(3)), "weight must be a"),
    (dict(bias=torch.zeros(4, 1)), "bias must be a"),
    (dict(weight=torch.ones(4, dtype=torch.int64)), "weight must be floating"),
    (dict(groups=3), "groups"),
    (dict(groups=0), "groups"),
    (dict(groups=2.0), "groups"),
    (dict(eps=-1e-5), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(act="gelu"), "act must be"),
    (dict(pool="maxpool"), "pool must be"),
    (dict(x=torch.randn(2, 4, 1, 6)), "H, W ≥ 2"),
])
def test_bad_input(change, match):
    args = _valid()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ops.embed_epilogue(**args, backend="torch")


def test_triton_without_interpreter_or_gpu_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        ops.embed_epilogue(torch.randn(1, 2, 4, 4), torch.ones(2), torch.zeros(2), groups=2,
                           backend="triton")


@pytest.mark.parametrize("norm,act,pool", [("instancenorm", "relu", "avgpool"),
                                           ("groupnorm", "leakyrelu", "none")])
def test_bank_with_triton_epilogue_equals_plain_bank(norm, act, pool):
    nets = [ConvNet(3, 10, width=8, depth=2, norm=norm, act=act, pool=pool, im_size=(6, 6))
            for _ in range(2)]
    plain = ConvNetBank.from_nets(nets).to(DEVICE)
    fused = ConvNetBank.from_nets(nets).to(DEVICE)
    fused.epilogue_backend = "triton"
    x = torch.randn(3, 3, 6, 6, device=DEVICE, requires_grad=True)
    upstream = torch.randn(2, 3, plain.feature_dim, device=DEVICE)
    expected = plain.features(x).reshape(3, 2, -1).transpose(0, 1)
    ours = fused.embed(x)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(ours, (x,) + tuple(fused.parameters()), upstream)
    expected_grads = torch.autograd.grad(expected, (x,) + tuple(plain.parameters()), upstream)
    # One scale for all: a conv bias before instance norm has a zero gradient up to rounding.
    scale = max(want.abs().max().item() for want in expected_grads)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("norm,act,pool", [
    ("instancenorm", "relu", "avgpool"), ("groupnorm", "swish", "none"),
    ("instancenorm", "sigmoid", "avgpool"), ("groupnorm", "leakyrelu", "avgpool")])
def test_bank_with_torch_epilogue_is_bit_identical_to_its_modules(norm, act, pool):
    bank = ConvNetBank(3, 3, width=8, depth=2, norm=norm, act=act, pool=pool, im_size=(8, 8),
                       generator=torch.Generator().manual_seed(0), epilogue_backend="torch")
    x = torch.randn(4, 3, 8, 8)
    assert bank.fused_epilogue
    assert torch.equal(bank.embed(x), bank.features(x).reshape(4, 3, -1).transpose(0, 1))


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU's automatic choice")
@needs_native
def test_bank_on_cpu_runs_the_native_epilogue(monkeypatch):
    calls = []
    native = torch.ops.condense.embed_epilogue
    monkeypatch.setattr(torch.ops.condense, "embed_epilogue",
                        lambda *args: calls.append(args) or native(*args), raising=False)
    bank = ConvNetBank(2, 3, width=8, depth=2, im_size=(8, 8),
                       generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(bank.embed(x), bank.features(x).reshape(4, 2, -1).transpose(0, 1),
                               rtol=1e-5, atol=1e-6)
    assert len(calls) == 2  # one per block


@pytest.mark.parametrize("norm,pool,fusable", [("instancenorm", "avgpool", True),
                                               ("groupnorm", "none", True),
                                               ("batchnorm", "avgpool", False),
                                               ("instancenorm", "maxpool", False)])
def test_convnet_fused_epilogue_equals_its_modules(norm, pool, fusable):
    """ConvNet.use_fused_epilogue: the same logits and gradients (input and every parameter) as
    the modules; configurations it does not cover keep the modules."""
    torch.manual_seed(0)
    plain = ConvNet(1, 10, width=8, depth=2, norm=norm, pool=pool, im_size=(12, 12)).to(DEVICE)
    fused = ConvNet(1, 10, width=8, depth=2, norm=norm, pool=pool, im_size=(12, 12)).to(DEVICE)
    fused.load_state_dict(plain.state_dict())
    assert fused.use_fused_epilogue() is fusable
    x = torch.randn(5, 1, 12, 12, device=DEVICE, requires_grad=True)
    expected, ours = plain(x), fused(x)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x,) + tuple(plain.parameters()), upstream)
    grads = torch.autograd.grad(ours, (x,) + tuple(fused.parameters()), upstream)
    scale = max(want.abs().max().item() for want in expected_grads)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_evaluation_trains_a_convnet_with_the_fused_epilogue(monkeypatch):
    """The evaluation protocol's loop switches its ConvNet to the fused epilogue, and training
    still lowers the loss."""
    calls = []
    fused = ops.embed.embed_epilogue
    monkeypatch.setattr(ops.embed, "embed_epilogue",
                        lambda *args, **kwargs: calls.append(kwargs) or fused(*args, **kwargs))
    torch.manual_seed(0)
    net = ConvNet(1, 2, width=8, depth=2, im_size=(8, 8)).to(DEVICE)
    images = torch.randn(8, 1, 8, 8, device=DEVICE)
    images[4:] += 1.0
    labels = torch.tensor([0] * 4 + [1] * 4, device=DEVICE)
    test_set = type("Tiny", (), {})()
    monkeypatch.setitem(train_and_test.__globals__, "accuracy", lambda model, test: 0.0)
    first = torch.nn.functional.cross_entropy(net(images), labels).item()
    _, last = train_and_test(net, images, labels, test_set, epochs=30, lr=0.05, batch_size=8,
                             strategy=None, generator=torch.Generator().manual_seed(0))
    assert net.fused_epilogue and calls
    assert last < 0.5 * first


def test_kernels_compile_for_hopper():
    """The GPU build (not the interpreter) of every activation, both dtypes and pool modes."""
    builds = []
    for act, dtype, pool, rows in ((0, "fp32", True, 1), (1, "bf16", False, 32),
                                   (2, "bf16", True, 2), (3, "fp32", True, 8)):
        types = {"*pointer": "*fp32", "*scalar": "i32", "eps": "fp32", "slope": "fp32",
                 **{name: f"*{dtype}" for name in ("x_ptr", "out_ptr", "grad_out_ptr", "grad_x_ptr")}}
        builds += [("_epilogue_forward_kernel", types,
                    dict(ROWS=rows, BLOCK_IN=1024 // rows, BLOCK_OUT=16, ACT=act, POOL=pool)),
                   ("_epilogue_backward_kernel", types,
                    dict(ROWS=rows, BLOCK_IN=1024 // rows, ACT=act, POOL=pool))]
    assert_compiles_for_hopper("condense_engine.kernels.embed", builds)
