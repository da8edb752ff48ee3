"""Option checks shared by every registered method (condense_engine.methods.base)."""
import pytest
import torch

import condense_engine as ce
from condense_engine.methods import get_method, method_names
from condense_engine.methods.base import COUNT_OPTIONS, NON_NEGATIVE_OPTIONS, check_option, is_learning_rate


def _learning_rate_options():
    """(method, option) for every learning-rate option of every method, including those whose
    default is None (the method's own choice, e.g. IDC's lr_img)."""
    return [(name, option) for name in method_names() for option in get_method(name).defaults
            if is_learning_rate(option)]


def test_every_method_has_learning_rate_options_to_check():
    pairs = set(_learning_rate_options())
    assert {("dc", "lr_net"), ("dm", "lr_img"), ("dd", "distill_lr"), ("mtt", "lr_teacher"), ("idc", "lr_img")} <= pairs


@pytest.mark.parametrize("method, option", _learning_rate_options())
@pytest.mark.parametrize("value", [0.0, -1.0, -1])
def test_non_positive_learning_rate_is_refused_by_name(method, option, value):
    with pytest.raises(ValueError, match=f"option {option} is a learning rate and must be positive"):
        get_method(method)("mnist", 1, **{option: value})


@pytest.mark.parametrize("method, option", _learning_rate_options())
def test_positive_learning_rate_is_accepted(method, option):
    assert get_method(method)("mnist", 1, **{option: 0.5}).options[option] == 0.5


def _options_in(names):
    """(method, option) for every option of every method whose name is in `names`."""
    return [(name, option) for name in method_names() for option in get_method(name).defaults if option in names]


def test_the_range_lists_name_real_options():
    """A misspelt entry in COUNT_OPTIONS or NON_NEGATIVE_OPTIONS would check nothing."""
    named = {option for _, option in _options_in(COUNT_OPTIONS | NON_NEGATIVE_OPTIONS)}
    assert named == COUNT_OPTIONS | NON_NEGATIVE_OPTIONS


@pytest.mark.parametrize("method, option", _options_in(COUNT_OPTIONS))
def test_a_count_below_one_is_refused_by_name(method, option):
    with pytest.raises(ValueError, match=f"option {option} counts something and must be at least 1, got 0"):
        get_method(method)("mnist", 1, **{option: 0})


@pytest.mark.parametrize("method, option", _options_in(NON_NEGATIVE_OPTIONS))
def test_a_negative_value_is_refused_where_zero_is_allowed(method, option):
    value = get_method(method).defaults[option]
    zero = 0.0 if isinstance(value, float) else 0
    assert get_method(method)("mnist", 1, **{option: zero}).options[option] == zero
    with pytest.raises(ValueError, match=f"option {option} must not be negative"):
        get_method(method)("mnist", 1, **{option: zero - 1})


@pytest.mark.parametrize("method", method_names())
def test_every_default_and_published_override_passes_the_checks(method):
    cls = get_method(method)
    for options in [cls.defaults] + [values for _, _, values in cls.overrides]:
        for option, value in options.items():
            check_option(method, option, value, cls.defaults.get(option))


def _imbalanced(smallest=5):
    """Four 8×8 classes of 12 images, except class 2 with `smallest`."""
    counts = [12, 12, smallest, 12]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return torch.rand(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(0)), labels


@pytest.mark.parametrize("method, fits", [("dm", 5), ("m3d", 5), ("dc", 5), ("dsa", 5), ("idc", 5), ("dd", 20)])
def test_real_batch_larger_than_a_class_is_refused_before_the_first_step(method, fits):
    """The default batch_real draws more real images of every class than class 2 holds: the run
    stops in the method's init, naming the option and the largest value that fits (the first
    step would only say that a draw failed)."""
    with pytest.raises(ValueError, match=rf"method '{method}': batch_real=\d+ draws \d+ distinct real images of "
                                         rf"every class each step, but class 2 \('2'\) has only 5; "
                                         rf"pass batch_real={fits} or less"):
        ce.distill(_imbalanced(), method=method, ipc=1, iterations=1, device="cpu")


def test_real_batch_that_fits_the_smallest_class_runs():
    synset = ce.distill(_imbalanced(), method="dm", ipc=1, iterations=1, device="cpu", batch_real=5)
    assert synset.images.shape == (4, 1, 8, 8)


def test_a_run_of_no_iterations_draws_no_real_batch_and_is_not_refused():
    synset = ce.distill(_imbalanced(), method="dm", ipc=1, iterations=0, device="cpu")
    assert synset.images.shape == (4, 1, 8, 8)
