"""Option checks shared by every registered method (condense_engine.methods.base)."""
import pytest

from condense_engine.methods import get_method, method_names
from condense_engine.methods.base import is_learning_rate


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
