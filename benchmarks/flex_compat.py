"""Workarounds for torch's FlexAttention, for our tests and benchmarks. Never applied on import: they
change process-wide torch behaviour, so code that wants one calls it explicitly."""
from __future__ import annotations


def flex_bwd_heuristic_tiles_at_most(block: int) -> None:
    """Let compiled Flex build its backward for ``block``-token masks.

    torch's flex backward lowering drops every heuristic config whose tiles do not divide the sparse block
    size *before* it applies ``kernel_options`` (pytorch/pytorch#176025). On sm90 in bf16/fp16 the only
    heuristic for head dims 64 and 128 has 128-wide tiles, so a 64-token mask leaves no choice and the
    backward (compiled together with a training forward) raises NoValidChoicesError whatever
    BLOCK_M1/N1/M2/N2 say. Clamping the heuristic tiles to ``block`` only lets the check pass: the tiles
    actually compiled still come from ``kernel_options``. A no-op where torch lacks this hook.
    """
    import dataclasses

    try:
        from torch._inductor.choices import InductorChoices
    except Exception:
        return
    orig = getattr(InductorChoices, "get_flex_attention_bwd_configs", None)
    if orig is None or getattr(orig, "_clamped_to", None) == block:
        return
    orig = getattr(orig, "_orig", orig)
    names = ("block_m1", "block_n1", "block_m2", "block_n2", "block_m", "block_n")

    def clamped(self, *args, **kwargs):
        out = []
        for c in orig(self, *args, **kwargs):
            if dataclasses.is_dataclass(c) and not isinstance(c, type):
                have = {f.name for f in dataclasses.fields(c)}
                c = dataclasses.replace(c, **{n: min(getattr(c, n), block) for n in names if n in have})
            out.append(c)
        return out

    clamped._clamped_to, clamped._orig = block, orig
    InductorChoices.get_flex_attention_bwd_configs = clamped
