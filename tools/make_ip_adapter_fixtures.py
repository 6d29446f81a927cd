#!/usr/bin/env python3
"""Generate the committed IP-Adapter fixtures for sdstream.

Run from the repository root with the reference venv, after tools/make_fixtures.py and
tools/make_sdxl_fixtures.py (it reads the tiny SD models those scripts write):

    /root/.cache/sdstream/venv-torch-2.11.0/bin/python tools/make_ip_adapter_fixtures.py

Outputs (deleted and rewritten, nothing else is touched): tests/fixtures/ip_adapter/

* `sd15/`, `sdxl/`: laid out as the hub's h94/IP-Adapter (`models/`, `sdxl_models/`): the adapters as
  `.safetensors` files in the original key layout (`image_proj.*`, `ip_adapter.<n>.to_k_ip.weight`, ...) with the
  CLIP vision encoder in `image_encoder/` beside them (`CLIPVisionModelWithProjection`, transformers'
  `save_pretrained`). Adapter files are fp16, as the hub's. For sd1-tiny (cross-attention 32) and sdxl-tiny (72): a plain adapter (`ImageProjection`,
  4 tokens) and a "plus" one (the Resampler, `IPAdapterPlusImageProjection`: 4 queries, width 64 = one head of
  64, depth 4, all fixed or implied by diffusers' loader), and for sd1-tiny both again in
  diffusers' key layout (`*.diffusers.safetensors`: the names the tensors have in diffusers' UNet after
  `load_ip_adapter`, `encoder_hid_proj.image_projection_layers.0.*` and `<attn2>.processor.to_k_ip.0.weight`).
* `reference/`: the encoder's preprocessing and outputs, the projections, raw UNet outputs with the adapter at
  several scales, and StableDiffusion(XL)Pipeline / ...Img2ImgPipeline outputs with `ip_adapter_image`
  (same format as the other pipeline references).

All weights are random (seeded): these are TEST adapters and TEST encoders whose outputs mean nothing.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets the offline / thread environment too)

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

from diffusers import (  # noqa: E402
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.models.embeddings import ImageProjection  # noqa: E402

ROOT = mf.ROOT
OUT = mf.FIX / "ip_adapter"
REF = OUT / "reference"

README = """# IP-Adapter fixtures: random-weight TEST adapters and TEST image encoders

Nothing here is a real IP-Adapter or a real CLIP vision encoder. Everything is tiny and randomly initialised by
`tools/make_ip_adapter_fixtures.py` (seeded, deterministic) for the tiny test models `sd1-tiny` and `sdxl-tiny`;
the outputs mean nothing. They exist only for the parity tests in `tests/ip_adapter.rs`.
"""

# (family, base model, encoder config, adapters: name -> (kind, resampler depth))
FAMILIES = {
    "sd15": dict(
        model="sd1-tiny",
        encoder=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2,
                     image_size=32, patch_size=8, projection_dim=24, hidden_act="gelu", seed=41),
        adapters={"ip-adapter_sd15-tiny": ("plain", 0), "ip-adapter-plus_sd15-tiny": ("plus", 4)},
        diffusers_copies=True,
    ),
    "sdxl": dict(
        model="sdxl-tiny",
        encoder=dict(hidden_size=40, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     image_size=24, patch_size=8, projection_dim=20, hidden_act="quick_gelu", seed=42),
        adapters={"ip-adapter_sdxl-tiny": ("plain", 0), "ip-adapter-plus_sdxl-tiny": ("plus", 4)},
        diffusers_copies=False,
    ),
}


def rand(shape, g, kind="weight"):
    if kind == "norm_weight":
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if kind == "latents":
        return torch.randn(shape, generator=g) / shape[-1] ** 0.5
    return 0.2 * torch.randn(shape, generator=g)


def make_encoder(dir_: Path, cfg: dict) -> CLIPVisionModelWithProjection:
    cfg = dict(cfg)
    seed = cfg.pop("seed")
    torch.manual_seed(seed)
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(layer_norm_eps=1e-5, **cfg)).eval()
    g = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            kind = "norm_weight" if ("norm" in name and name.endswith("weight")) else "weight"
            p.copy_(rand(p.shape, g, kind))
    enc.save_pretrained(str(dir_), safe_serialization=True)
    back = CLIPVisionModelWithProjection.from_pretrained(str(dir_)).eval()
    for (k, a), (_, b) in zip(enc.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    return back


def cross_attention_hidden_sizes(unet) -> list[int]:
    """The query width of every cross-attention processor, in diffusers' `attn_processors` order (the order the
    original key layout numbers them in: `ip_adapter.1`, `.3`, `.5`, ...)."""
    sizes = []
    for name in unet.attn_processors.keys():
        if name.endswith("attn2.processor"):
            module = unet.get_submodule(name[: -len(".processor")])
            sizes.append(module.to_q.out_features)
    return sizes


def original_state_dict(unet, encoder, kind: str, depth: int, seed: int) -> dict:
    """A random IP-Adapter in the original layout (what h94/IP-Adapter's files hold)."""
    g = torch.Generator("cpu").manual_seed(seed)
    cross = unet.config.cross_attention_dim
    sd = {}
    if kind == "plain":
        emb = encoder.config.projection_dim
        sd["image_proj.proj.weight"] = rand((4 * cross, emb), g)
        sd["image_proj.proj.bias"] = rand((4 * cross,), g)
        sd["image_proj.norm.weight"] = rand((cross,), g, "norm_weight")
        sd["image_proj.norm.bias"] = rand((cross,), g)
    else:
        emb, hidden, queries = encoder.config.hidden_size, 64, 4
        sd["image_proj.latents"] = rand((1, queries, hidden), g, "latents")
        sd["image_proj.proj_in.weight"] = rand((hidden, emb), g)
        sd["image_proj.proj_in.bias"] = rand((hidden,), g)
        sd["image_proj.proj_out.weight"] = rand((cross, hidden), g)
        sd["image_proj.proj_out.bias"] = rand((cross,), g)
        sd["image_proj.norm_out.weight"] = rand((cross,), g, "norm_weight")
        sd["image_proj.norm_out.bias"] = rand((cross,), g)
        for i in range(depth):
            p = f"image_proj.layers.{i}"
            for n in ("norm1", "norm2"):
                sd[f"{p}.0.{n}.weight"] = rand((hidden,), g, "norm_weight")
                sd[f"{p}.0.{n}.bias"] = rand((hidden,), g)
            sd[f"{p}.0.to_q.weight"] = rand((hidden, hidden), g)
            sd[f"{p}.0.to_kv.weight"] = rand((2 * hidden, hidden), g)
            sd[f"{p}.0.to_out.weight"] = rand((hidden, hidden), g)
            sd[f"{p}.1.0.weight"] = rand((hidden,), g, "norm_weight")
            sd[f"{p}.1.0.bias"] = rand((hidden,), g)
            sd[f"{p}.1.1.weight"] = rand((4 * hidden, hidden), g)
            sd[f"{p}.1.3.weight"] = rand((hidden, 4 * hidden), g)
    for j, h in enumerate(cross_attention_hidden_sizes(unet)):
        sd[f"ip_adapter.{2 * j + 1}.to_k_ip.weight"] = rand((h, cross), g)
        sd[f"ip_adapter.{2 * j + 1}.to_v_ip.weight"] = rand((h, cross), g)
    return sd


def save_half(path: Path, tensors: dict) -> None:
    """Adapter files are stored in fp16, as the hub's are (the values are drawn in fp32 and rounded once, so the
    fp32 models diffusers builds from them hold exactly these values)."""
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}, str(path))


def diffusers_state_dict(unet) -> dict:
    """The adapter's tensors as diffusers' UNet names them after `load_ip_adapter`."""
    return {k: v for k, v in unet.state_dict().items()
            if k.startswith("encoder_hid_proj.") or ".processor.to_k_ip." in k or ".processor.to_v_ip." in k}


def make_ip_image(w: int, h: int) -> Image.Image:
    """A small colourful picture, not square (so the encoder's resize and centre crop both act)."""
    img = Image.new("RGB", (w, h), (30, 60, 120))
    d = ImageDraw.Draw(img)
    d.ellipse([w * 0.1, h * 0.2, w * 0.7, h * 0.7], fill=(230, 180, 40))
    d.rectangle([w * 0.5, h * 0.5, w * 0.95, h * 0.9], fill=(200, 40, 90))
    d.line([(0, 0), (w - 1, h - 1)], fill=(250, 250, 250), width=2)
    return img


def pipelines(model: str):
    if model == "sdxl-tiny":
        t2i = StableDiffusionXLPipeline.from_pretrained(str(mf.MODELS_FIX / model), torch_dtype=torch.float32,
                                                        add_watermarker=False)
        i2i = StableDiffusionXLImg2ImgPipeline(**t2i.components, add_watermarker=False,
                                               requires_aesthetics_score=False)
    else:
        t2i = StableDiffusionPipeline.from_pretrained(str(mf.MODELS_FIX / model), torch_dtype=torch.float32)
        i2i = StableDiffusionImg2ImgPipeline(**t2i.components)
    for p in (t2i, i2i):
        p.set_progress_bar_config(disable=True)
    return t2i, i2i


PER_BLOCK = {"down": {"block_1": [0.0, 1.0]}, "up": {"block_0": [0.5, 1.0, 0.0]}, "mid": 0.8}


def pipeline_cases(family: str, adapter: str, kind: str):
    if family == "sd15" and kind == "plain":
        return [dict(mode="txt2img", scheduler="ddim", guidance=7.5, steps=3, scale=0.6),
                dict(mode="txt2img", scheduler="euler", guidance=1.0, steps=3, scale=1.0),
                dict(mode="img2img", scheduler="ddim", guidance=7.5, steps=4, scale=0.8, strength=0.6),
                dict(mode="txt2img", scheduler="ddim", guidance=7.5, steps=2, scale=PER_BLOCK)]
    if family == "sd15":
        return [dict(mode="txt2img", scheduler="ddim", guidance=7.5, steps=3, scale=0.7),
                dict(mode="img2img", scheduler="euler", guidance=1.0, steps=4, scale=1.0, strength=0.6)]
    if kind == "plain":
        return [dict(mode="txt2img", scheduler="euler", guidance=5.0, steps=3, scale=0.8)]
    return [dict(mode="txt2img", scheduler="euler", guidance=1.0, steps=3, scale=1.0),
            dict(mode="img2img", scheduler="euler", guidance=5.0, steps=4, scale=0.6, strength=0.6)]


@torch.no_grad()
def references(family: str, spec: dict, dir_: Path, ip_img: Image.Image, ip_rel: str, input_img, input_rel):
    model = spec["model"]
    out = REF / family
    out.mkdir(parents=True, exist_ok=True)
    seed = {"sd15": 800, "sdxl": 900}[family]
    names = []
    for adapter, (kind, _) in spec["adapters"].items():
        t2i, i2i = pipelines(model)
        t2i.load_ip_adapter(str(dir_), subfolder="", weight_name=f"{adapter}.safetensors",
                          low_cpu_mem_usage=False)
        i2i = (StableDiffusionXLImg2ImgPipeline(**t2i.components, add_watermarker=False,
                                                requires_aesthetics_score=False)
               if model == "sdxl-tiny" else StableDiffusionImg2ImgPipeline(**t2i.components))
        i2i.set_progress_bar_config(disable=True)
        unet = t2i.unet
        proj = unet.encoder_hid_proj.image_projection_layers[0]
        assert isinstance(proj, ImageProjection) == (kind == "plain")
        if spec["diffusers_copies"]:
            save_half(dir_ / f"{adapter}.diffusers.safetensors", diffusers_state_dict(unet))
        # Encoder and projection.
        fe = t2i.feature_extractor
        pixels = fe(ip_img, return_tensors="pt").pixel_values
        pixels_sq = fe(input_img, return_tensors="pt").pixel_values
        hidden_states = kind != "plain"
        cond, uncond = t2i.encode_image(ip_img, "cpu", 1, hidden_states)
        tensors = {"pixel_values": pixels, "pixel_values_input_64": pixels_sq, "image_embeds": cond,
                   "negative_image_embeds": uncond, "tokens": proj(cond), "negative_tokens": proj(uncond)}
        enc_out = t2i.image_encoder(pixels, output_hidden_states=True)
        tensors["encoder.image_embeds"] = enc_out.image_embeds
        tensors["encoder.penultimate"] = enc_out.hidden_states[-2]
        tensors["encoder.last_hidden_state"] = enc_out.last_hidden_state
        # Raw UNet outputs: per-item timesteps, [negative, positive] image embeddings, several scales.
        g = torch.Generator("cpu").manual_seed(seed)
        cross = unet.config.cross_attention_dim
        sample = torch.randn(2, 4, 8, 8, generator=g)
        ehs = torch.randn(2, 7, cross, generator=g)
        t = torch.tensor([999, 321], dtype=torch.int64)
        embeds = [torch.cat([uncond, cond], 0)[:, None]]
        added = {"image_embeds": embeds}
        tensors.update(sample=sample, encoder_hidden_states=ehs, timesteps=t)
        if model == "sdxl-tiny":
            width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            text_embeds = torch.randn(2, width, generator=g)
            time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [96.0, 32.0, 4.0, 8.0, 64.0, 64.0]])
            added.update(text_embeds=text_embeds, time_ids=time_ids)
            tensors.update(text_embeds=text_embeds, time_ids=time_ids)
        for label, scale in (("scale1", 1.0), ("scale0.5", 0.5), ("scale0", 0.0), ("per_block", PER_BLOCK)):
            t2i.set_ip_adapter_scale(scale)
            tensors[f"unet.{label}"] = unet(sample, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
        mf.save_st(out / f"{adapter}.safetensors", tensors)
        # Pipelines.
        base_cfg = t2i.scheduler.config
        for c in pipeline_cases(family, adapter, kind):
            seed += 1
            pipe = t2i if c["mode"] == "txt2img" else i2i
            pipe.scheduler = mf.SCHED_CLASSES[c["scheduler"]].from_config(base_cfg)
            pipe.set_ip_adapter_scale(c["scale"])
            kw = dict(prompt=mf.PIPE_PROMPT, num_inference_steps=c["steps"], guidance_scale=c["guidance"],
                      ip_adapter_image=ip_img)
            if c["mode"] == "txt2img":
                kw.update(width=64, height=64)
            else:
                kw.update(image=input_img, strength=c["strength"])
            pil, lat = mf.run_seeded(pipe, kw, seed, ("pil", "latent"))
            scale_name = "blocks" if isinstance(c["scale"], dict) else c["scale"]
            name = f"{adapter}_{c['mode']}_{c['scheduler']}_g{c['guidance']}_s{scale_name}"
            info = {
                "mode": c["mode"], "model": model, "prompt": mf.PIPE_PROMPT, "negative_prompt": None,
                "seed": seed, "steps": c["steps"], "scheduler": c["scheduler"], "guidance": c["guidance"],
                "width": 64, "height": 64,
                "ip_adapter": (dir_ / f"{adapter}.safetensors").relative_to(ROOT).as_posix(),
                "ip_image": ip_rel, "ip_scale": c["scale"], "ip_kind": kind,
            }
            if c["mode"] == "img2img":
                info["strength"] = c["strength"]
                info["input_image"] = input_rel
            mf.write_case(out, name, info, pil[0], {"latents": lat})
            names.append(name)
        if spec["diffusers_copies"]:
            # diffusers' own layout gives the same UNet: reload it into a fresh pipeline by hand and compare.
            t3, _ = pipelines(model)
            t3.load_ip_adapter(str(dir_), subfolder="", weight_name=f"{adapter}.safetensors",
                          low_cpu_mem_usage=False)
            sd = load_file(str(dir_ / f"{adapter}.diffusers.safetensors"))
            missing = t3.unet.load_state_dict(sd, strict=False)
            assert not missing.unexpected_keys, missing.unexpected_keys
            for k, v in sd.items():
                assert torch.equal(t3.unet.state_dict()[k], v), k
    return names


def main():
    import time
    mf.T0 = time.perf_counter()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    (OUT / "README.md").write_text(README)
    REF.mkdir(parents=True)
    ip_path = REF / "ip_image_40x56.png"
    make_ip_image(40, 56).save(ip_path)
    ip_img = Image.open(ip_path).convert("RGB")
    input_path = mf.REF / "input_64.png"
    input_img = Image.open(input_path).convert("RGB")
    index = {}
    for family, spec in FAMILIES.items():
        dir_ = OUT / family
        encoder = make_encoder(dir_ / "image_encoder", spec["encoder"])
        t2i, _ = pipelines(spec["model"])
        for i, (adapter, (kind, depth)) in enumerate(spec["adapters"].items()):
            sd = original_state_dict(t2i.unet, encoder, kind, depth, seed=spec["encoder"]["seed"] * 10 + i)
            save_half(dir_ / f"{adapter}.safetensors", sd)
        mf.log(f"{family}: encoder and adapters saved")
        index[family] = references(family, spec, dir_, ip_img, ip_path.relative_to(ROOT).as_posix(), input_img,
                                   input_path.relative_to(ROOT).as_posix())
        mf.log(f"{family}: {len(index[family])} pipeline cases")
    mf.write_json(REF / "index.json", index)
    mf.log(f"total size of the IP-Adapter fixtures: {mf.dir_size(OUT) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
