"""quantrt.models: the tiny FLUX and LLaMA models built from configs with random weights, and their inputs."""

import pytest
import torch
import torch.nn as nn

from quantrt.models import FLUX_TOKENS, build_flux, build_llm, example_inputs, flux_inputs, parse_shape


@pytest.mark.parametrize("spec, dims", [("1x4096x512", (1, 4096, 512)), (" 64X16 ", (64, 16)), ("7", (7,))],
                         ids=["three", "upper-case-and-spaces", "one"])
def test_shapes_parse(spec, dims):
    assert parse_shape(spec) == dims


@pytest.mark.parametrize("spec", ["", "1x", "0x64", "-1x2", "axb", "1.5x2"], ids=repr)
def test_bad_shapes_say_what_a_shape_is(spec):
    with pytest.raises(ValueError, match="positive integers joined by 'x'"):
        parse_shape(spec)


def test_tiny_flux_is_deterministic_and_takes_its_inputs():
    model = build_flux("tiny", dtype=torch.float32)
    again = build_flux("tiny", dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    inputs = flux_inputs(model)
    assert inputs["hidden_states"].shape[1] == FLUX_TOKENS["tiny"][0]
    assert inputs["encoder_hidden_states"].shape[1] == FLUX_TOKENS["tiny"][1]
    with torch.no_grad():
        out = model(**inputs)[0]
    assert out.shape == inputs["hidden_states"].shape and torch.isfinite(out).all()
    shaped = example_inputs(model, "2x16x8")
    assert shaped["hidden_states"].shape[:2] == (2, 16) and shaped["encoder_hidden_states"].shape[:2] == (2, 8)


def test_tiny_llm_inputs_are_token_ids():
    model = build_llm("tiny", dtype=torch.float32)
    assert all(p.device.type == "cpu" for p in model.parameters())
    inputs = example_inputs(model, "3x5")
    assert inputs["input_ids"].shape == (3, 5) and inputs["input_ids"].max() < model.config.vocab_size
    with pytest.raises(ValueError, match=r"\[BATCHx\]SEQUENCE_LENGTH"):
        example_inputs(model, "1x2x3")


def test_unknown_sizes_and_models_are_refused():
    with pytest.raises(ValueError, match="unknown FLUX size 'huge'; choose one of tiny"):
        build_flux("huge")
    with pytest.raises(ValueError, match="unknown LLM size 'huge'"):
        build_llm("huge")
    with pytest.raises(ValueError, match="not Linear"):
        example_inputs(nn.Linear(2, 2), "1x2")
