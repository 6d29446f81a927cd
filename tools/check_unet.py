"""Builds small random UNet2DConditionModels with diffusers in configurations the committed fixtures do not cover
(odd latent sizes, no mid block, downsample_padding 0, centre-input, extra time activations, per-block lists...)
and saves, per variant, OUT/<name>/unet/{config.json,diffusion_pytorch_model.safetensors} and
OUT/<name>/reference.safetensors (sample, timestep, encoder_hidden_states, [timestep_cond], out).

    python tools/check_unet.py [OUT]     # OUT defaults to /tmp/sdstream-unet-check
    SDSTREAM_UNET_CHECK_DIR=OUT cargo test --test unet -- --ignored extra_variants
"""
import os
import sys

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

BASE = dict(
    block_out_channels=[8, 16, 16],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=32,
    attention_head_dim=2,
    sample_size=8,
)

VARIANTS = {
    # odd latent sizes: diffusers forwards explicit upsample sizes
    "odd_size": (dict(), (2, 4, 9, 7)),
    "odd_size_linear": (dict(use_linear_projection=True, attention_head_dim=[2, 4, 4]), (2, 4, 5, 11)),
    "no_mid_block": (dict(mid_block_type=None), (2, 4, 8, 8)),
    "pad0_center_acts": (
        dict(
            downsample_padding=0,
            center_input_sample=True,
            time_embedding_act_fn="silu",
            timestep_post_act="silu",
            flip_sin_to_cos=False,
            freq_shift=1,
            mid_block_scale_factor=1.414,
        ),
        (2, 4, 8, 8),
    ),
    "lists_kernels": (
        dict(
            layers_per_block=[1, 2, 1],
            transformer_layers_per_block=[2, 1, 1],
            cross_attention_dim=[32, 32, 32],
            attention_head_dim=[1, 2, 4],
            conv_in_kernel=1,
            conv_out_kernel=5,
            time_embedding_dim=24,
            time_cond_proj_dim=6,
            in_channels=5,
            out_channels=3,
        ),
        (2, 5, 12, 8),
    ),
    "four_blocks_odd": (
        dict(
            block_out_channels=[8, 8, 16, 16],
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"],
        ),
        (3, 4, 13, 10),
    ),
}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SDSTREAM_UNET_CHECK_DIR", "/tmp/sdstream-unet-check")
    torch.manual_seed(0)
    for name, (over, shape) in VARIANTS.items():
        cfg = dict(BASE, **over)
        model = UNet2DConditionModel(**cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        d = os.path.join(out, name)
        model.save_pretrained(os.path.join(d, "unet"), safe_serialization=True)
        b = shape[0]
        cross = cfg["cross_attention_dim"]
        cross = cross[0] if isinstance(cross, list) else cross
        inputs = {
            "sample": torch.randn(shape),
            "timestep": torch.tensor([999, 500, 21, 7][:b], dtype=torch.int64),
            "encoder_hidden_states": torch.randn(b, 77, cross),
        }
        cond = None
        if cfg.get("time_cond_proj_dim"):
            cond = torch.randn(b, cfg["time_cond_proj_dim"])
            inputs["timestep_cond"] = cond
        with torch.no_grad():
            o = model(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], timestep_cond=cond).sample
        save_file({**inputs, "out": o.contiguous()}, os.path.join(d, "reference.safetensors"))
        print(f"{name}: sample {tuple(shape)} -> out {tuple(o.shape)}")


if __name__ == "__main__":
    main()
