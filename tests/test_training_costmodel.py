"""The report's cost model (training/costmodel.py): equations 1 and 2 by hand, the tiny config's memory
figure against a measured run on this machine (within 25 %), and the Video Lite / Pro stages printed
from the meta device."""
from __future__ import annotations

import pytest

from training.config import apply_overrides, get_config
from training.costmodel import S0_TOKENS, analytic, block_params, compare, main, memory, step_time, tokens_of


def test_equations_by_hand():
    # equation 1 at the reference point (d = d0, S = S0): (9 + 14 + 6) per block and sample
    assert step_time(1792, 1.0, 1, 1) == 29
    assert step_time(1792, 1.0, 32, 2) == 29 * 64
    assert step_time(896, 2.0, 1) == pytest.approx(0.5 * 2 * (9 + 28 + 3))
    d, dt, df = 1792, 512, 7168
    p = block_params(d, dt, df)
    assert p == 9 * 512 * 1792 + 8 * 1792 ** 2 + 2 * 7168 * 1792
    m = memory(d, dt, df, 32, 1000, 64, 1)
    assert m["state"] == 12 * 32 * p / 64 and m["grads"] == 4 * 32 * p / 64
    assert m["activations"] == 2 * 1000 * (32 * d + 18 * d + 2 * df)
    assert m["total"] == m["state"] + max(m["grads"], m["activations"])
    assert memory(d, dt, df, 32, 1000, 64, 0)["activations"] == 2 * 1000 * (18 * d + 2 * df)
    # S0 in tokens, and the Lite 10 s stage at 512 x 768: 61 x 32 x 48 tokens
    assert S0_TOKENS == 31 * 16 * 24
    assert tokens_of(get_config("video-lite-mr-10s"))[0] == 93_696
    # the Video Lite model: its blocks hold most of the 2B parameters
    a = analytic(get_config("video-lite-lr"), gpus=64)
    assert a["step_units"] == pytest.approx(928.0)
    assert 1.5e9 < a["params"] < 2.2e9


def test_lite_and_pro_print_the_report_configurations(capsys):
    out = main(["--config", "video-lite"])
    out.update(main(["--config", "video-pro", "--gpus", "64"]))
    text = capsys.readouterr().out
    assert len(out) == 9 and text.count("eq 2 memory per GPU") == 9
    for name, r in out.items():
        assert r["report"]["memory"]["total"] > 0 and r["report"]["step_units"] > 0, name
    off = main(["--config", "video-pro-hr-10s", "--offload", "--sp", "8"])["video-pro-hr-10s"]["report"]
    on = out["video-pro-hr-10s"]["report"]
    assert off["o"] == 0 and off["sp"] == 8 and off["memory"]["activations"] < on["memory"]["activations"] / 8


@pytest.mark.parametrize("overrides", [[], ["parallel.activation_checkpointing=True", "parallel.offload=True"]],
                         ids=["plain", "ac+offload"])
def test_tiny_memory_within_25_percent_of_measured(overrides):
    cfg = apply_overrides(get_config("tiny-cpu"), overrides)
    c = compare(cfg, steps=3)
    meas = c["measured"]
    assert meas["device"] == "cpu" and len(meas["rows"]) == 2
    assert 0.75 <= c["memory_ratio"] <= 1.25, (c["estimate"]["memory"], meas["peak_bytes"])
    assert meas["step_s"] > 0 and c["seconds_per_unit"] > 0


def test_cli_tiny_prints_side_by_side(capsys):
    main(["--config", "tiny-cpu", "--steps", "2"])
    text = capsys.readouterr().out
    assert "measured on this machine" in text and "side by side" in text and "ratio" in text
