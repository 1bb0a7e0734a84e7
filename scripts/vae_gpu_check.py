"""GPU check of the causal video VAE (stage of scripts/gpu_check.sh; never run on a GPU yet).

The published HunyuanVideo VAE config with random weights on CUDA: encode + decode of a 17x256x256
clip in fp32 and bf16 (time, peak memory, bf16 error against fp32), and which SDPA backend the
mid-block attention (one head of dim 512) can use. Prints one JSON line per measurement and writes
``vae_gpu.json`` into ``--out-dir``.

    python scripts/vae_gpu_check.py --out-dir OUT [--frames 17 --size 256]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", type=Path, default=Path("."))
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    from kandinsky_model import CausalVideoVAE

    torch.manual_seed(0)
    dev = torch.device("cuda")
    vae32 = CausalVideoVAE().to(dev).eval()
    g = torch.Generator(device=dev).manual_seed(1)
    video = torch.rand(1, 3, args.frames, args.size, args.size, device=dev, generator=g) * 2 - 1
    rows = []
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        vae = vae32 if dtype == torch.float32 else CausalVideoVAE(vae32.config).to(dev, dtype).eval()
        if dtype != torch.float32:
            vae.load_state_dict({k: v.to(dtype) for k, v in vae32.state_dict().items()})
        x = video.to(dtype)
        with torch.no_grad():
            vae.decode(vae.encode(x[:, :, :5, :64, :64]))  # warm-up (cuDNN algorithm choice)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            z = vae.encode(x)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            y = vae.decode(z)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
        outs[dtype] = (z.float(), y.float())
        rows.append({"dtype": str(dtype), "clip": [args.frames, args.size, args.size],
                     "encode_ms": round(1e3 * (t1 - t0), 1), "decode_ms": round(1e3 * (t2 - t1), 1),
                     "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                     "latent": list(z.shape), "frames": list(y.shape)})
        print(json.dumps(rows[-1]), flush=True)
    (z32, y32), (z16, y16) = outs[torch.float32], outs[torch.bfloat16]
    err = {"bf16_vs_fp32_rel_l2_latent": float((z16 - z32).norm() / z32.norm()),
           "bf16_vs_fp32_rel_l2_frames": float((y16 - y32).norm() / y32.norm())}
    print(json.dumps(err), flush=True)
    # which fused SDPA kernels accept the mid-block attention's head dim 512
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 1, 1024, 512, device=dev, dtype=torch.bfloat16)
    backends = {}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            backends[name] = "ok"
        except RuntimeError as e:
            backends[name] = f"refused: {str(e).splitlines()[0][:120]}"
    print(json.dumps({"sdpa_head_dim_512": backends}), flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "vae_gpu.json").write_text(json.dumps({"runs": rows, "error": err,
                                                          "sdpa_head_dim_512": backends}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
