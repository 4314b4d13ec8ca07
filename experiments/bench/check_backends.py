"""Every packed-attention backend available here against the dense masked SDPA reference.

    python experiments/bench/check_backends.py          # on a GPU: flash_attn / varlen / flex vs sdpa
Prints each backend's max abs error of the output and of the q/k/v gradients (bf16 inputs).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vlmtrain.models.attention import BACKENDS, varlen_causal_attention  # noqa: E402


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    lens = [700, 1500, 33, 2048, 5]
    cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
    T = sum(lens)
    q = torch.randn(T, 14, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(T, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(T, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(T, 14, 64, device=device, dtype=torch.bfloat16)

    def run(name):
        out = varlen_causal_attention(q, k, v, cu, max(lens), 0.125, backend=name)
        grads = torch.autograd.grad(out, (q, k, v), g)
        return out.float(), [x.float() for x in grads]

    ref, ref_grads = run("sdpa")
    for name, b in BACKENDS.items():
        if name == "sdpa":
            continue
        if not b.available(device):
            print(f"{name}: not available on {device}")
            continue
        out, grads = run(name)
        errs = [(out - ref).abs().max().item()] + [(a - r).abs().max().item() for a, r in zip(grads, ref_grads)]
        print(f"{name}: max abs err out {errs[0]:.3e}, dq {errs[1]:.3e}, dk {errs[2]:.3e}, dv {errs[3]:.3e}")


if __name__ == "__main__":
    main()
