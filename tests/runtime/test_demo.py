"""quantrt.demo: the tiny FLUX model quantized with several schemes, a row per scheme (bytes, time, error)."""

from quantrt.demo import run_demo


def test_demo_on_the_tiny_model_prints_a_row_per_scheme(capsys):
    rows = run_demo("tiny", ["int8wo", "uint3wo", "fp6_e3m2"], device="cpu", repeats=1, backend="reference")
    out = capsys.readouterr().out
    assert [r.scheme for r in rows] == ["none (bfloat16)", "int8wo", "uint3wo", "fp6_e3m2"]
    for header in ("stored bytes", "resident bytes", "resident / bf16", "ms / forward", "rel. error"):
        assert header in out
    assert "[3/3] fp6_e3m2: quantizing" in out and "CPU timings are for orientation only" in out
    by_name = {r.scheme: r for r in rows}
    assert by_name["int8wo"].ratio_to_bf16 < 0.6 and by_name["uint3wo"].ratio_to_bf16 < 0.35
    assert 0 < by_name["int8wo"].relative_error < 0.03  # bf16 model: bf16 rounding on top of int8
    assert by_name["int8wo"].relative_error < by_name["uint3wo"].relative_error < 0.3
    assert all(r.ms_per_forward > 0 for r in rows)


def test_demo_names_the_layers_a_scheme_keeps_in_full_precision(capsys):
    """tiny FLUX's x_embedder has K = 64, which int4wo's group of 128 cannot take: the demo says so."""
    rows = run_demo("tiny", ["int4wo"], device="cpu", repeats=1, backend="reference")
    out = capsys.readouterr().out
    kept = rows[1].kept
    assert any(k.startswith("x_embedder (") and "group_size=128" in k for k in kept)
    assert f"int4wo kept {len(kept)} layer" in out and "x_embedder" in out
    assert rows[1].stored_bytes <= rows[1].resident_bytes
