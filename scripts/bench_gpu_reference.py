"""Times the PyTorch reference's LMGen.step (PyPI moshi 0.2.13, CUDA graphs on) on random bf16
weights of PersonaPlex-7B's real shape. Run on the lent H100 by scripts/bench_gpu.sh, in the same
call as `parley bench`, so the two figures come from one machine. Prints one JSON line.

Not a unit test: it needs CUDA, torch and the moshi wheel (carried to the GPU machine).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # inductor compiles take minutes; graphs stay on


def main() -> int:
    import torch
    from moshi.models.lm import LMGen, LMModel
    from moshi.models.loaders import _lm_kwargs

    frames = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    dep_q = int(os.environ.get("REF_DEP_Q", "16"))
    device = torch.device("cuda")
    kwargs = dict(_lm_kwargs)
    kwargs["dep_q"] = dep_q
    kwargs.pop("depformer_causal", None)
    t0 = time.perf_counter()
    model = LMModel(device="meta", dtype=torch.bfloat16, **kwargs)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.fill_(1.0)
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.normal_(0.0, 1.0 / fan_in**0.5, generator=gen)
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.zero_()
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    load_s = time.perf_counter() - t0

    lm_gen = LMGen(model, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)
    n_in = model.n_q - model.dep_q
    times = []
    with torch.no_grad(), lm_gen.streaming(1):
        codes = torch.zeros(1, n_in, 1, dtype=torch.long, device=device)
        for i in range(frames + 20):
            torch.cuda.synchronize()
            t = time.perf_counter()
            lm_gen.step(codes)
            torch.cuda.synchronize()
            if i >= 20:  # warm-up includes the CUDA-graph capture
                times.append((time.perf_counter() - t) * 1000)
    times.sort()
    out = {
        "impl": "pytorch-moshi-0.2.13",
        "what": "LMGen.step (temporal + depformer, CUDA graphs)",
        "dep_q": dep_q,
        "params": n_params,
        "frames": frames,
        "p50_ms": statistics.median(times),
        "p95_ms": times[int(0.95 * (len(times) - 1))],
        "max_ms": times[-1],
        "build_s": load_s,
        "peak_gb": torch.cuda.max_memory_allocated() / 1024**3,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "cuda_graphs": os.environ.get("NO_CUDA_GRAPH", "") in ("", "0"),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
