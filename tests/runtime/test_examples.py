import pytest
import torch
import torch.nn as nn

from quantrt.examples import as_call, call_with, run_examples


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return len(self.calls)


@pytest.mark.parametrize("example, args, kwargs", [
    ({"x": 1, "y": 2}, (), {"x": 1, "y": 2}),
    ((1, 2), (1, 2), {}),
    ([1, 2], (1, 2), {}),
], ids=["dict-is-keywords", "tuple-is-positional", "list-is-positional"])
def test_examples_become_calls(example, args, kwargs):
    assert as_call(example) == (args, kwargs)
    model = Recorder()
    assert call_with(model, example) == 1 and model.calls == [(args, kwargs)]


def test_a_tensor_is_the_only_argument():
    x = torch.randn(2, 3)
    args, kwargs = as_call(x)
    assert len(args) == 1 and args[0] is x and kwargs == {}


def test_a_dict_example_is_copied_not_shared():
    example = {"x": 1}
    _, kwargs = as_call(example)
    kwargs["y"] = 2
    assert example == {"x": 1}


def test_anything_else_is_refused_naming_the_forms():
    with pytest.raises(TypeError, match="dict of keyword arguments, a tuple of positional arguments or a tensor, not int"):
        as_call(3)


def test_run_examples_counts_and_refuses_none():
    model = Recorder()
    assert run_examples(model, [(1,), {"x": 2}, torch.zeros(1)], "calibrate") == 3
    assert len(model.calls) == 3
    with pytest.raises(ValueError, match="calibrate needs at least one example input"):
        run_examples(model, [], "calibrate")
