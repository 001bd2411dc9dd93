"""The bundled model's decoder GEMMs per weight form, by rows, in one run.

    python perf/bench_linears.py
    python perf/bench_linears.py --rows 1,16,32 --repeats 10

SmolLM2-135M's 30 layers of projections (qkv 960x576, o 576x576, gate_up 3072x576,
down 576x1536), distinct tensors per layer so they stream from memory as in a decode
step, bf16 activations; ms for all 30 layers. Forms: `F.linear` on bf16 weights
(what eager torch does), the same weights packed once for oneDNN
(`executor/packed.py`), int8 per-channel (`_weight_int8pack_mm`) and int4 with
groups of 32 (`_weight_int4pack_mm_for_cpu`), as `executor/quant.py` builds them.
The LM head (49152x576) is timed on its own, dense and packed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tgi_mp.executor.packed import PackedLinear
from tgi_mp.executor.quant import Int4Linear, Int8Linear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in)
LAYERS = 30


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", default="1,4,8,16,32,64,256")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    bf16 = torch.bfloat16
    weights = [[torch.randn(n, k).to(bf16) for n, k in SHAPES] for _ in range(LAYERS)]
    forms: dict[str, list[list[Callable[[torch.Tensor], torch.Tensor]]]] = {
        "bf16 F.linear": [[lambda x, w=w: F.linear(x, w) for w in layer] for layer in weights],
        "bf16 packed": [[PackedLinear(w, None) for w in layer] for layer in weights],
    }
    for name, cls in (("int8", Int8Linear), ("int4", Int4Linear)):
        forms[name] = []
        for layer in weights:
            mods = []
            for w in layer:
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(bf16)
                lin.weight.data.copy_(w)
                # The kernel itself at every size (the module switches above SMALL_BATCH rows).
                q = cls.from_linear(lin)
                mods.append(lambda x, q=q: _kernel(q, x))
            forms[name].append(mods)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{torch.get_num_threads()} threads; ms for the 30 layers' projections")
    print()
    print("| rows | " + " | ".join(forms) + " |")
    print("|---|" + "---|" * len(forms))
    for m in rows:
        inputs = {k: torch.randn(m, k).to(bf16) for _, k in SHAPES}
        cells = []
        for layers in forms.values():

            def run(layers=layers, inputs=inputs) -> None:
                for layer in layers:
                    for f, (_, k) in zip(layer, SHAPES, strict=True):
                        f(inputs[k])

            cells.append(f"{timed(run, args.repeats):.1f}")
        print(f"| {m} | " + " | ".join(cells) + " |")
    head = torch.randn(49152, 576).to(bf16)
    packed = PackedLinear(head, None)
    print()
    print("| LM head rows | bf16 F.linear | bf16 packed |")
    print("|---|---|---|")
    for m in (1, 32):
        x = torch.randn(m, 576).to(bf16)
        dense_ms = timed(lambda x=x: F.linear(x, head), 10 * args.repeats)
        packed_ms = timed(lambda x=x: packed(x), 10 * args.repeats)
        print(f"| {m} | {dense_ms:.2f} | {packed_ms:.2f} |")


def _kernel(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The quantized kernel itself, whatever the rows (the module switches above SMALL_BATCH)."""
    if isinstance(module, Int4Linear):
        return torch._weight_int4pack_mm_for_cpu(
            x, module.weight_int4, module.group, module.scale_zeros
        )
    return torch._weight_int8pack_mm(x, module.weight_int8, module.kernel_scales)


if __name__ == "__main__":
    main()
