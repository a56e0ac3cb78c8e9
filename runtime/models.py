"""Real architectures built from configs with random weights (no model hub is reachable from CI): a
diffusers FluxTransformer2DModel at several sizes, and example inputs for it."""

from __future__ import annotations

from typing import Any

import torch

# FLUX.1-dev's transformer config (diffusers), and smaller ones of the same architecture.
FLUX_SIZES: dict[str, dict[str, Any]] = {
    # for tests: every Linear small, K of the attention and MLP layers a multiple of 128
    "tiny": dict(patch_size=1, in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=64,
                 num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=128,
                 guidance_embeds=True, axes_dims_rope=(16, 24, 24)),
    # the CPU demo: big enough that quantized layers dominate the bytes
    "small": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
                  num_attention_heads=6, joint_attention_dim=512, pooled_projection_dim=256,
                  guidance_embeds=True, axes_dims_rope=(16, 24, 24)),
    "full": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                 guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
}

# (image tokens, text tokens) of a forward per size; full: a 1024x1024 image (64x64 latent patches)
FLUX_TOKENS: dict[str, tuple[int, int]] = {"tiny": (64, 16), "small": (256, 64), "full": (4096, 512)}


def build_flux(size: str = "tiny", dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               seed: int = 0) -> torch.nn.Module:
    """A FluxTransformer2DModel with `size`'s config and random weights (deterministic given `seed`)."""
    from diffusers import FluxTransformer2DModel

    if size not in FLUX_SIZES:
        raise ValueError(f"unknown FLUX size {size!r}; choose one of {', '.join(FLUX_SIZES)}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = FluxTransformer2DModel(**FLUX_SIZES[size])
    # nn.Module.to: diffusers' own .to() warns, on every build, that no module is kept in float32 ([]):
    # nothing the user can act on, and the cast is the same
    return torch.nn.Module.to(model, dtype).eval()


def flux_inputs(model: torch.nn.Module, image_tokens: int | None = None, text_tokens: int | None = None,
                batch: int = 1, seed: int = 1) -> dict[str, torch.Tensor]:
    """Keyword arguments of one FluxTransformer2DModel forward, random but deterministic given `seed`.
    Token counts default to the model's size (FLUX_TOKENS); the model must be one `build_flux` made or
    have the same config fields."""
    cfg = model.config
    default = next((FLUX_TOKENS[s] for s, c in FLUX_SIZES.items()
                    if c["joint_attention_dim"] == cfg.joint_attention_dim and c["in_channels"] == cfg.in_channels),
                   FLUX_TOKENS["tiny"])
    image_tokens = image_tokens or default[0]
    text_tokens = text_tokens or default[1]
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    side = max(1, int(image_tokens**0.5))
    img_ids = torch.zeros(image_tokens, 3)
    img_ids[:, 1] = torch.arange(image_tokens) // side
    img_ids[:, 2] = torch.arange(image_tokens) % side
    inputs = dict(
        hidden_states=randn(batch, image_tokens, cfg.in_channels),
        encoder_hidden_states=randn(batch, text_tokens, cfg.joint_attention_dim),
        pooled_projections=randn(batch, cfg.pooled_projection_dim),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_ids=img_ids.to(device=device, dtype=dtype),
        txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype),
        return_dict=False,
    )
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return inputs


# transformers LlamaConfig fields: Llama-3-8B's dimensions, and a tiny one of the same architecture for CPU
LLM_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
}


def build_llm(size: str = "tiny", dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
              seed: int = 0) -> torch.nn.Module:
    """A transformers LlamaForCausalLM with `size`'s config and random weights (deterministic given `seed`):
    built on the meta device (accelerate's init_empty_weights), then each parameter is materialized on
    `device` as it is drawn (normal, std 0.02; norm weights 1), so the model is never built twice. Needs
    transformers."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in LLM_SIZES:
        raise ValueError(f"unknown LLM size {size!r}; choose one of {', '.join(LLM_SIZES)}")
    device = torch.device(device)
    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) computed for real
        model = LlamaForCausalLM(LlamaConfig(**LLM_SIZES[size]))
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in list(model.named_parameters()):
        if param.dim() == 1:  # RMSNorm weights
            value = torch.ones(param.shape, device=device, dtype=dtype)
        else:
            value = torch.randn(param.shape, generator=generator, device=device, dtype=dtype).mul_(0.02)
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)
    return model.to(device).eval()


def parse_shape(spec: str) -> tuple[int, ...]:
    """`1x4096x512` -> (1, 4096, 512). The fields are positive integers separated by `x`."""
    try:
        dims = tuple(int(d) for d in spec.lower().strip().split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"shape {spec!r}: expected positive integers joined by 'x', such as 1x4096x512 (FLUX: "
                         f"batch x image tokens x text tokens) or 1x128 (an LLM: batch x sequence length)")
    return dims


def example_inputs(model: torch.nn.Module, spec: str, seed: int = 1) -> dict[str, Any]:
    """Random keyword arguments of one forward of `model` at the shape `spec`:
    FluxTransformer2DModel: `[BATCHx]IMAGE_TOKENSxTEXT_TOKENS`; a transformers model with a vocabulary (an LLM):
    `[BATCHx]SEQUENCE_LENGTH`."""
    dims = parse_shape(spec)
    config = getattr(model, "config", None)
    if type(model).__name__ == "FluxTransformer2DModel":
        if len(dims) not in (2, 3):
            raise ValueError(f"shape {spec!r}: a FLUX transformer takes [BATCHx]IMAGE_TOKENSxTEXT_TOKENS, e.g. "
                             f"1x4096x512")
        batch, image, text = dims if len(dims) == 3 else (1, *dims)
        return flux_inputs(model, image, text, batch=batch, seed=seed)
    if config is not None and getattr(config, "vocab_size", None):
        if len(dims) not in (1, 2):
            raise ValueError(f"shape {spec!r}: a language model takes [BATCHx]SEQUENCE_LENGTH, e.g. 1x128")
        batch, length = dims if len(dims) == 2 else (1, *dims)
        g = torch.Generator().manual_seed(seed)
        device = next(model.parameters()).device
        ids = torch.randint(0, config.vocab_size, (batch, length), generator=g).to(device)
        return {"input_ids": ids, "use_cache": False}
    raise ValueError(f"quantrt builds example inputs for FluxTransformer2DModel and transformers language models, "
                     f"not {type(model).__name__}; call qt.warmup([...]) from Python with your own inputs")
