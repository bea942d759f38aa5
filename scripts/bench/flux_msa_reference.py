"""Reference speed of one SynCD group denoising step with diffusers' FLUX.1-dev and the
reference's dense-mask Masked Shared Attention, for comparison with `syncd-worker bench-msa`.

Random bf16 weights are created directly on the GPU (meta-device construction, then filled in
place), so the script starts in seconds and needs no checkpoint. Each step is one transformer
forward over a group of N images (unmasked sharing on the first step, the dense additive mask
of shape [N, heads, T + hw, T + N*hw] afterwards, exactly as the reference builds it) plus the
Euler update. Prints one JSON line: seconds per masked step (mean after two warm-up steps), the
peak GPU memory of the process sampled with nvidia-smi (plus torch's own peak allocation), and
the attention kernel torch picked for each call (`torch._fused_sdp_choice`).

    python scripts/bench/flux_msa_reference.py --size 1024 --steps 3            # dense-mask MSA
    python scripts/bench/flux_msa_reference.py --size 1024 --steps 3 --capture  # + AttentionStore
    python scripts/bench/flux_msa_reference.py --size 1024 --steps 3 --plain    # no sharing
"""

import argparse
import json
import os
import subprocess
import threading
import time

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
           num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
           guidance_embeds=True, axes_dims_rope=[16, 56, 56])


# torch's SDPBackend values, as `torch._fused_sdp_choice` returns them (math: the unfused kernel).
SDP_BACKENDS = {-1: "none", 0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


class MemoryProbe:
    def __init__(self):
        self.peak, self.stop = 0, False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        pid = str(os.getpid())
        while not self.stop:
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
                for line in out.splitlines():
                    fields = [f.strip() for f in line.split(",")]
                    if fields and fields[0] == pid:
                        self.peak = max(self.peak, int(fields[1]))
            except (OSError, ValueError):
                pass
            time.sleep(0.1)

    def finish(self):
        self.stop = True
        self.thread.join()
        return self.peak or None


def image_ids(h, w, device):
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


def dense_mask(masks, text_len, heads, dtype):
    n, hw = masks.shape
    blocks = torch.cat([masks] + [torch.roll(masks, shifts=i, dims=0) for i in range(1, n)], dim=1)
    row = torch.cat([torch.ones(n, text_len, device=masks.device, dtype=dtype), blocks.to(dtype)], dim=1)
    dense = torch.ones(n, text_len + hw, 1, device=masks.device, dtype=dtype) * row[:, None, :]
    dense[:, : text_len + hw, : text_len + hw] = 1
    dense[:, :text_len, text_len + hw:] = 0
    dense = dense.masked_fill(dense == 0, -65504.0)
    return dense[:, None].expand(-1, heads, -1, -1)


class Capture:
    def __init__(self, spans):
        self.spans, self.sum = spans, None

    def record(self, q, k, text_len):
        scale = q.shape[-1] ** -0.5
        sim = torch.einsum("bhid,bhjd->bhij", q[:, :, :text_len], k[:, :, : q.shape[2]]) * scale
        sim = sim[:, :, :text_len, text_len:].permute(0, 1, 3, 2).softmax(dim=-1).mean(1)
        maps = torch.stack([sim[i, :, s:e].sum(-1) for i, (s, e) in enumerate(self.spans)])
        self.sum = maps if self.sum is None else self.sum + maps


class DenseSharedAttention:
    """The reference's shared attention: rolled key blocks, stacked RoPE rows, dense mask."""

    def __init__(self, state, single):
        self.state, self.single = state, single

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        s = self.state
        n, text_len = s["n"], s["text_len"]
        end = hidden_states.shape[1]
        own = hidden_states[:, text_len:] if self.single else hidden_states
        full = torch.cat([hidden_states] + [torch.roll(own, shifts=i, dims=0) for i in range(1, n)], dim=1)
        heads = attn.heads
        q = attn.norm_q(attn.to_q(full[:, :end]).unflatten(-1, (heads, -1)))
        k = attn.norm_k(attn.to_k(full).unflatten(-1, (heads, -1)))
        v = attn.to_v(full).unflatten(-1, (heads, -1))
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (heads, -1)))
            ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (heads, -1)))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (heads, -1))
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, s["key_rope"], sequence_dim=1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if s["capture"] is not None:
            s["capture"].record(q, k, text_len)
        kernel = SDP_BACKENDS[torch._fused_sdp_choice(q, k, v, attn_mask=s["mask"])]
        s["kernels"][kernel] = s["kernels"].get(kernel, 0) + 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=s["mask"])
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is not None:
            t = encoder_hidden_states.shape[1]
            return attn.to_out[0](out[:, t: t + end]), attn.to_add_out(out[:, :t])
        return out[:, :end]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--group", type=int, default=3)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--foreground", type=float, default=0.35)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--capture", action="store_true")
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--config", help="a diffusers transformer config.json instead of FLUX.1-dev (smoke tests)")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = dict(DEV)
    if args.config:
        with open(args.config) as f:
            config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    probe = MemoryProbe()
    torch.manual_seed(0)

    start = time.perf_counter()
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model = model.to(dtype).to_empty(device=device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    synchronize()
    build_seconds = time.perf_counter() - start

    n, grid = args.group, args.size // 16
    tokens, text_len = grid * grid, args.text_tokens
    latents = torch.randn(n, tokens, config["in_channels"], device=device, dtype=dtype)
    text = torch.randn(n, text_len, config["joint_attention_dim"], device=device, dtype=dtype)
    pooled = torch.randn(n, config["pooled_projection_dim"], device=device, dtype=dtype)
    guidance = torch.full((n,), 3.5, device=device)
    img_ids = image_ids(grid, grid, device)
    txt_ids = torch.zeros(text_len, 3, device=device)
    masks = (torch.rand(n, tokens, device=device) < args.foreground).float()
    state = {"n": n, "text_len": text_len, "mask": None, "capture": None, "kernels": {},
             "key_rope": FluxPosEmbed(10000, config["axes_dims_rope"])(torch.cat([txt_ids, image_ids(n * grid, grid, device)]))}
    if not args.plain:
        model.set_attn_processor({name: DenseSharedAttention(state, name.startswith("single_transformer_blocks"))
                                  for name in model.attn_processors})

    # Two untimed steps, as in `syncd-worker bench-msa`: the unmasked one and the first masked one
    # (which also builds the dense mask, once per group).
    total = args.steps + 2
    step_seconds = []
    with torch.no_grad():
        for step in range(total):
            t = 1.0 - step / (total + 1.0)
            synchronize()
            begin = time.perf_counter()
            # The reference builds the dense mask once per group; it is rebuilt here only when
            # it changes (deformable masks change every step: then it is part of the step).
            if step > 0 and not args.plain and (state["mask"] is None or args.capture):
                state["mask"] = dense_mask(masks, text_len, config["num_attention_heads"], dtype)
            state["capture"] = Capture([(2, 4)] * n) if args.capture else None
            velocity = model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                             timestep=torch.full((n,), t, device=device, dtype=dtype), img_ids=img_ids,
                             txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
            latents = (latents.float() + (-0.02) * velocity).to(velocity.dtype)
            synchronize()
            if step > 1:
                step_seconds.append(time.perf_counter() - begin)
    peak = probe.finish()
    print(json.dumps({
        "implementation": "diffusers + reference dense-mask MSA" if not args.plain else "diffusers",
        "mode": "plain" if args.plain else ("msa+capture" if args.capture else "msa"),
        "torch": torch.__version__, "dtype": args.dtype,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "size": args.size, "group": n, "text_tokens": text_len,
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": build_seconds,
        "seconds_per_step": sum(step_seconds) / max(len(step_seconds), 1), "step_seconds": step_seconds,
        "peak_memory_mib": peak,
        "attention_kernels": state["kernels"] or None,
        "torch_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }))


if __name__ == "__main__":
    main()
