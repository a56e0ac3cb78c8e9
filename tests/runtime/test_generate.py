"""qt.generate after qt.compile(): transformers' decode steps run quantrt's compiled forward on a static KV
cache, one graph for every decode step, warmed ahead of serving and proven in strict mode (CPU, a tiny
Llama built from a config with random weights, the reference backend in fp32)."""

import pytest
import torch
import transformers

from quantrt import QuantConfig, QuantizedTransformer, RecompileError


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def quantized(seed: int = 0) -> QuantizedTransformer:
    return QuantizedTransformer.from_model(tiny_llama(seed), QuantConfig("int8wo", backend="reference"),
                                           progress=False)


GENERATE = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)


@pytest.fixture
def counted(monkeypatch):
    """How often the compiled forward runs."""
    from quantrt.compile import CompiledForward

    calls = []
    call = CompiledForward.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return call(self, *args, **kwargs)
    monkeypatch.setattr(CompiledForward, "__call__", counting)
    return calls


def test_compiled_generate_runs_the_decode_steps_through_one_graph(tmp_path, counted):
    prompt = torch.randint(0, 128, (1, 7))
    qt = quantized()
    with torch.no_grad():
        eager = qt.generate(prompt, **GENERATE)
    assert counted == []
    qt.compile(mode="default", cache_dir=tmp_path)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        compiled = qt.generate(prompt, **GENERATE)
    assert len(counted) == GENERATE["max_new_tokens"] - 1  # every decode step; the prefill is eager
    assert torch.equal(compiled, eager)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        qt.generate(torch.randint(0, 128, (1, 9)), **GENERATE)  # 9 + 6 tokens: the same cache bucket (16)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs == 1
    assert "__call__" not in vars(qt.model)  # the routing is undone


def test_warmup_generate_then_strict_generate_compiles_nothing_new(tmp_path):
    qt = quantized()
    qt.compile(mode="default", cache_dir=tmp_path, strict=True)
    report = qt.warmup_generate([9], batch_size=1, max_new_tokens=6)  # the cache bucket of 9 + 6: 16
    assert len(report) == 1 and report[0].status == "cold" and "input_ids=1x1" in report[0].shape
    assert len(qt._compiled.entry.load().shapes) == 1  # the decode step is in the cache entry
    with torch.no_grad():
        qt.generate(torch.randint(0, 128, (1, 7)), **GENERATE)  # 7 + 6 is in the warmed bucket: no error
        with pytest.raises(RecompileError, match="were not warmed"):
            qt.generate(torch.randint(0, 128, (2, 9)), **GENERATE)  # a batch of 2 was not


def test_warmup_generate_needs_a_decode_step():
    with pytest.raises(ValueError, match="at least 2"):
        quantized().warmup_generate([5], max_new_tokens=1)


def test_generate_of_a_model_without_one_says_so():
    qt = QuantizedTransformer.from_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), "int8wo", progress=False)
    with pytest.raises(AttributeError, match="has no generate"):
        qt.generate(torch.zeros(1, 64))


def test_the_static_cache_is_one_per_batch_and_length_bucket_and_reset():
    qt = quantized()
    qt.compile(mode="default", cache=False)
    first = qt._static_cache(torch.zeros(1, 7, dtype=torch.long), 6)
    assert qt._static_cache(torch.zeros(1, 9, dtype=torch.long), 6) is first  # 13 and 15 tokens: bucket 16
    assert qt._static_cache(torch.zeros(1, 11, dtype=torch.long), 6) is not first  # 17: bucket 32
    assert qt._static_cache(torch.zeros(2, 7, dtype=torch.long), 6) is not first
    assert first.get_max_length() == 16
