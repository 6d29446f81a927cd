#!/usr/bin/env python3
"""Generate the single-file checkpoint fixtures under tests/fixtures/single_file/ (tiny random-weight TEST
models written in the original CompVis/Stability "LDM" layout, as community SD 1.5 models ship).

Run from the repository root with the reference venv, after tools/make_fixtures.py made the models:

    /root/.cache/sdstream/venv-torch-2.11.0/bin/python tools/make_single_file_fixtures.py

Outputs:

* `sd1-tiny.safetensors`: the weights of tests/fixtures/models/sd1-tiny (UNet, VAE, CLIP text encoder)
  renamed to the LDM layout (`model.diffusion_model.*`, `first_stage_model.*` with 1x1-conv attention
  weights, `cond_stage_model.transformer.text_model.*`) by this script's own diffusers -> LDM mapping, plus the
  extra tensors real checkpoints carry and a loader must ignore (`model_ema.*`, `alphas_cumprod`, ...,
  `position_ids`). Its configs are sd1-tiny's folder.
* `sd2-tiny.safetensors`: tests/fixtures/models/sd2-tiny likewise, with the text encoder in SD 2.x's OpenCLIP
  layout (`cond_stage_model.model.*`, fused `in_proj`), one extra last resblock (SD 2.x conditions on the
  penultimate layer), `text_projection` and `logit_scale`. Its configs are sd2-tiny's folder.
* `variant-tiny/` (configs, tokenizer, scheduler; no weights) and `variant-tiny.safetensors`: a second UNet/VAE
  shape (blocks (8,16,24), attention on the first and last blocks only, layers_per_block 1,
  transformer_layers_per_block 2, linear proj_in/out, per-block head counts; a 3-level VAE with
  layers_per_block 2) so that the mapping is tested beyond one layout. Text encoder and tokenizer: sd1-tiny's.
* `lora/sd1_kohya_ldm.safetensors`, `lora/sd1_conv_kohya_ldm.safetensors`: tests/fixtures/lora's kohya LoRAs
  for sd1-tiny with the UNet modules renamed to their LDM names (`lora_unet_input_blocks_1_1_proj_in`,
  `lora_unet_input_blocks_1_0_in_layers_2`, `lora_unet_output_blocks_5_2_conv`, `lora_unet_time_embed_0`, ...).
  Checked: diffusers' `load_lora_weights(..., unet_config=...)` (its SGM-name remapping, which the SD pipeline only
  applies when given the UNet config) + `fuse_lora` gives the same fused weights as with the original files
  (except the upsampler of sd1-tiny's attention-less first up block, which diffusers' SGM remapping misplaces:
  compared without that layer).
* `reference/<case>.{json,safetensors,png}` + `reference/index.json`: what diffusers'
  `StableDiffusionPipeline.from_single_file(<file>, config=<folder>)` makes (same format as
  tests/fixtures/reference/<model>/pipeline).

Verification (the script fails if any check fails): `from_single_file` (diffusers' own LDM converter) must give
every UNet, VAE and text-encoder tensor bit-equal to the diffusers-layout original; for sd1-tiny and sd2-tiny,
the single-file pipeline must give bit-equal latents to the committed pipeline references (so the Rust test
reuses tests/fixtures/reference/<model> for them).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (helpers and the pipeline prompt; its main() is not run)
from diffusers import (  # noqa: E402
    AutoencoderKL,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

ROOT = mf.ROOT
MODELS = mf.MODELS_FIX
OUT = mf.FIX / "single_file"


# ------------------------------------------------------------------------------------------------
# diffusers -> LDM names, derived from the configs (the reverse of what src/models/single_file.rs does)
# ------------------------------------------------------------------------------------------------
RESNET_LEAVES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTN_LEAVES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def per_block(v, n):
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def unet_module_map(cfg) -> dict[str, tuple[str, str]]:
    """diffusers module prefix -> (LDM module prefix, leaf kind)."""
    n = len(cfg["down_block_types"])
    layers = per_block(cfg["layers_per_block"], n)
    m = {
        "time_embedding.linear_1": ("time_embed.0", "same"),
        "time_embedding.linear_2": ("time_embed.2", "same"),
        "conv_in": ("input_blocks.0.0", "same"),
        "conv_norm_out": ("out.0", "same"),
        "conv_out": ("out.2", "same"),
    }
    k = 1
    for i, ty in enumerate(cfg["down_block_types"]):
        for j in range(layers[i]):
            m[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{k}.0", "resnet")
            if "CrossAttn" in ty:
                m[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{k}.1", "same")
            k += 1
        if i != n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{k}.0.op", "same")
            k += 1
    m["mid_block.resnets.0"] = ("middle_block.0", "resnet")
    m["mid_block.attentions.0"] = ("middle_block.1", "same")
    m["mid_block.resnets.1"] = ("middle_block.2", "resnet")
    k = 0
    rlayers = layers[::-1]
    for i, ty in enumerate(cfg["up_block_types"]):
        for j in range(rlayers[i] + 1):
            m[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{k}.0", "resnet")
            idx = 1
            if "CrossAttn" in ty:
                m[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{k}.1", "same")
                idx = 2
            if i != n - 1 and j == rlayers[i]:
                m[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{k}.{idx}.conv", "same")
            k += 1
    return m


def vae_module_map(cfg) -> dict[str, tuple[str, str]]:
    n = len(cfg["block_out_channels"])
    m = {
        "encoder.conv_in": ("encoder.conv_in", "same"),
        "encoder.conv_out": ("encoder.conv_out", "same"),
        "encoder.conv_norm_out": ("encoder.norm_out", "same"),
        "decoder.conv_in": ("decoder.conv_in", "same"),
        "decoder.conv_out": ("decoder.conv_out", "same"),
        "decoder.conv_norm_out": ("decoder.norm_out", "same"),
        "quant_conv": ("quant_conv", "same"),
        "post_quant_conv": ("post_quant_conv", "same"),
    }
    for part in ("encoder", "decoder"):
        m[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", "vae_resnet")
        m[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", "vae_resnet")
        m[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", "vae_attn")
    for i in range(n):
        for j in range(cfg["layers_per_block"]):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", "vae_resnet")
        m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", "same")
        # the decoder's up blocks are stored in reverse order
        for j in range(cfg["layers_per_block"] + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}", "vae_resnet")
        m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{n - 1 - i}.upsample.conv", "same")
    return m


def to_ldm(state: dict, module_map: dict, prefix: str) -> dict:
    out = {}
    for name, t in state.items():
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            mod = ".".join(parts[:cut])
            if mod in module_map:
                break
        else:
            raise KeyError(f"no LDM name for {name}")
        ldm_mod, leaf_kind = module_map[mod]
        leaf = ".".join(parts[cut:])
        if leaf_kind == "resnet":
            head, _, tail = leaf.rpartition(".")
            leaf = RESNET_LEAVES[head] + "." + tail
        elif leaf_kind == "vae_resnet":
            leaf = leaf.replace("conv_shortcut", "nin_shortcut")
        elif leaf_kind == "vae_attn":
            head, _, tail = leaf.rpartition(".")
            leaf = VAE_ATTN_LEAVES[head] + "." + tail
            if head != "group_norm" and tail == "weight":
                t = t[:, :, None, None]  # LDM stores these as 1x1 convolutions
        out[f"{prefix}{ldm_mod}.{leaf}"] = t.contiguous()
    return out


OPEN_CLIP_LEAVES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def to_open_clip(te: dict, extra_layer_seed: int) -> dict:
    """transformers CLIP text model -> the OpenCLIP layout of SD 2.x (`cond_stage_model.model.*`): q/k/v fused
    into `in_proj_*`, plus what SD 2.x files carry besides: one more (last) resblock that SD 2.x skips (it uses
    the penultimate layer's output; diffusers' config has one layer fewer), `text_projection`, `logit_scale`."""
    p = "cond_stage_model.model."
    out = {
        p + "positional_embedding": te["text_model.embeddings.position_embedding.weight"],
        p + "token_embedding.weight": te["text_model.embeddings.token_embedding.weight"],
        p + "ln_final.weight": te["text_model.final_layer_norm.weight"],
        p + "ln_final.bias": te["text_model.final_layer_norm.bias"],
    }
    layers = sorted({int(k.split(".")[3]) for k in te if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        src = f"text_model.encoder.layers.{i}."
        dst = f"{p}transformer.resblocks.{i}."
        for ours, theirs in OPEN_CLIP_LEAVES.items():
            for t in ("weight", "bias"):
                out[f"{dst}{theirs}.{t}"] = te[f"{src}{ours}.{t}"]
        for t in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{t}"] = torch.cat(
                [te[f"{src}self_attn.{x}_proj.{t}"] for x in ("q", "k", "v")], 0
            )
    g = torch.Generator("cpu").manual_seed(extra_layer_seed)
    last = f"{p}transformer.resblocks.{layers[-1]}."
    extra = f"{p}transformer.resblocks.{layers[-1] + 1}."
    for k in [k for k in out if k.startswith(last)]:
        out[extra + k[len(last):]] = torch.randn(out[k].shape, generator=g)
    d = te["text_model.final_layer_norm.weight"].shape[0]
    out[p + "text_projection"] = torch.randn((d, d), generator=g)
    out[p + "logit_scale"] = torch.tensor(4.6052)
    return {k: v.contiguous() for k, v in out.items()}


def write_single_file(path: Path, unet: dict, unet_cfg, vae: dict, vae_cfg, te: dict, extras=True,
                      open_clip=False):
    ckpt = {}
    ckpt.update(to_ldm(unet, unet_module_map(unet_cfg), "model.diffusion_model."))
    ckpt.update(to_ldm(vae, vae_module_map(vae_cfg), "first_stage_model."))
    if open_clip:
        ckpt.update(to_open_clip(te, 6))
    else:
        for k, v in te.items():
            assert k.startswith("text_model."), k
            ckpt["cond_stage_model.transformer." + k] = v.contiguous()
    if extras:
        # What real checkpoints also carry (and a loader must ignore or tolerate).
        g = torch.Generator("cpu").manual_seed(5)
        if not open_clip:
            ckpt["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
        ckpt["betas"] = betas
        ckpt["alphas_cumprod"] = torch.cumprod(1 - betas, 0)
        ckpt["model_ema.decay"] = torch.tensor(0.9999)
        ckpt["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
        ckpt["model_ema.diffusion_modelinput_blocks00weight"] = torch.randn(
            unet["conv_in.weight"].shape, generator=g
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: ckpt[k] for k in sorted(ckpt)}, str(path))
    return ckpt


def load_dir(d: Path):
    unet = load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(str(d / "vae" / "diffusion_pytorch_model.safetensors"))
    te = load_file(str(d / "text_encoder" / "model.safetensors"))
    return unet, vae, te


def from_single_file(path: Path, config_dir: Path):
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_bit_equal(pipe, unet, vae, te, what):
    for comp, want in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        got = getattr(pipe, comp).state_dict()
        got = {k: v for k, v in got.items() if not k.endswith("position_ids")}
        if comp == "text_encoder" and not any(k.startswith("text_model.") for k in got):
            got = {"text_model." + k: v for k, v in got.items()}  # transformers >= 5.6 flattens CLIPTextModel
        want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
        assert set(got) == set(want), (what, comp, sorted(set(got) ^ set(want))[:5])
        for k in want:
            assert torch.equal(got[k], want[k]), (what, comp, k)
    mf.log(f"{what}: from_single_file gives every unet/vae/text_encoder tensor bit-equal")


# ------------------------------------------------------------------------------------------------
VARIANT_CASES = [
    dict(mode="txt2img", scheduler="ddim", guidance=7.5, steps=3, width=64, height=64, seed=501,
         negative_prompt=mf.PIPE_NEG),
    dict(mode="txt2img", scheduler="euler", guidance=1.0, steps=3, width=96, height=64, seed=502,
         negative_prompt=None),
    dict(mode="img2img", scheduler="lcm", guidance=7.5, steps=4, width=64, height=64, seed=503,
         negative_prompt=None, strength=0.6),
]


def variant_components():
    torch.manual_seed(7000)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 24),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=2,
        use_linear_projection=True,
        norm_num_groups=4,
    )
    torch.manual_seed(7001)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    # Random weights everywhere (diffusers zero-initialises some layers; make every tensor matter).
    g = torch.Generator("cpu").manual_seed(7002)
    with torch.no_grad():
        for m in (unet, vae):
            for name, p in m.named_parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
                else:
                    base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                    p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return unet.eval(), vae.eval()


def make_variant(input_img, input_rel):
    src = MODELS / "sd1-tiny"
    d = OUT / "variant-tiny"
    if d.exists():
        shutil.rmtree(d)
    unet, vae = variant_components()
    unet.save_config(str(d / "unet"))
    vae.save_config(str(d / "vae"))
    for sub in ("text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(src / sub, d / sub)
    (d / "text_encoder" / "model.safetensors").unlink()
    shutil.copy(src / "model_index.json", d / "model_index.json")
    (d / "README.md").write_text(
        "# variant-tiny: configs of a random-weight TEST model\n\n"
        "Configs only (no weights); the weights are in ../variant-tiny.safetensors (LDM single-file layout).\n"
        "Made by tools/make_single_file_fixtures.py. Its outputs mean nothing.\n"
    )
    unet_sd = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    vae_sd = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    te_sd = load_file(str(src / "text_encoder" / "model.safetensors"))
    path = OUT / "variant-tiny.safetensors"
    write_single_file(path, unet_sd, dict(unet.config), vae_sd, dict(vae.config), te_sd, extras=False)
    pipe = from_single_file(path, d)
    check_bit_equal(pipe, unet_sd, vae_sd, te_sd, "variant-tiny")
    references(pipe, input_img, input_rel)


@torch.no_grad()
def references(t2i, input_img, input_rel):
    out = OUT / "reference"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    i2i = StableDiffusionImg2ImgPipeline(**t2i.components)
    i2i.set_progress_bar_config(disable=True)
    base_cfg = t2i.scheduler.config
    names = []
    for c in VARIANT_CASES:
        pipe = t2i if c["mode"] == "txt2img" else i2i
        pipe.scheduler = mf.SCHED_CLASSES[c["scheduler"]].from_config(base_cfg)
        kw = dict(prompt=mf.PIPE_PROMPT, negative_prompt=c["negative_prompt"], num_inference_steps=c["steps"],
                  guidance_scale=c["guidance"])
        if c["mode"] == "txt2img":
            kw.update(width=c["width"], height=c["height"])
        else:
            kw.update(image=input_img, strength=c["strength"])

        pil, lat = mf.run_seeded(pipe, kw, c["seed"], ("pil", "latent"))
        pil = pil[0]
        name = f"variant_{c['mode']}_{c['scheduler']}_g{c['guidance']}"
        info = {
            "mode": c["mode"],
            "model": "variant-tiny (single file)",
            "prompt": mf.PIPE_PROMPT,
            "negative_prompt": c["negative_prompt"],
            "seed": c["seed"],
            "steps": c["steps"],
            "scheduler": c["scheduler"],
            "scheduler_class": type(pipe.scheduler).__name__,
            "guidance": c["guidance"],
            "width": c["width"],
            "height": c["height"],
        }
        if c["mode"] == "img2img":
            info["strength"] = c["strength"]
            info["input_image"] = input_rel
        mf.write_case(out, name, info, pil, {"latents": lat})
        names.append(name)
    mf.write_json(out / "index.json", names)
    mf.log(f"variant-tiny: {len(names)} reference cases")


@torch.no_grad()
def check_reuses_references(pipe, model):
    """The <model> single file holds the very same weights, so the <model> pipeline references apply."""
    ref = mf.REF / model / "pipeline"
    for name in ("txt2img_ddim_g7.5", "txt2img_euler_g7.5_neg"):
        case = json.loads((ref / f"{name}.json").read_text())
        pipe.scheduler = mf.SCHED_CLASSES[case["scheduler"]].from_config(pipe.scheduler.config)
        gen = torch.Generator("cpu").manual_seed(case["seed"])
        lat = pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"],
                   num_inference_steps=case["steps"], guidance_scale=case["guidance"], width=case["width"],
                   height=case["height"], generator=gen, output_type="latent").images
        want = load_file(str(ref / f"{name}.safetensors"))["latents"]
        assert torch.equal(lat, want), name
    mf.log(f"{model} single file: diffusers gives bit-equal latents to the committed {model} references")


# ------------------------------------------------------------------------------------------------
# kohya LoRAs with the UNet's LDM names
# ------------------------------------------------------------------------------------------------
LORA_SRC = mf.FIX / "lora"
LORA_OUT = OUT / "lora"


def ldm_kohya_names(unet_cfg, unet_state) -> dict[str, str]:
    """kohya module name in diffusers' spelling -> the same module in the LDM spelling, for every UNet weight."""
    m = unet_module_map(unet_cfg)
    out = {}
    for name in unet_state:
        if name.endswith(".weight"):
            (ldm,) = to_ldm({name: torch.zeros(1)}, m, "").keys()
            out[name[: -len(".weight")].replace(".", "_")] = ldm[: -len(".weight")].replace(".", "_")
    return out


def to_ldm_lora(src: Path, dst: Path, names: dict[str, str]):
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for k, v in tensors.items():
        if k.startswith("lora_unet_"):
            mod, rest = k[len("lora_unet_"):].split(".", 1)
            k = f"lora_unet_{names[mod]}.{rest}"
        out[k] = v
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: out[k] for k in sorted(out)}, str(dst), metadata=meta)


@torch.no_grad()
def fused(lora: Path, drop=()):
    pipe = StableDiffusionPipeline.from_pretrained(str(MODELS / "sd1-tiny"), torch_dtype=torch.float32)
    # diffusers remaps SGM/LDM block names (_maybe_map_sgm_blocks_to_diffusers) when `lora_state_dict` gets the
    # UNet config, which StableDiffusionPipeline.load_lora_weights only passes for SDXL: pass it here.
    sd = {k: v for k, v in load_file(str(lora)).items() if not any(d in k for d in drop)}
    pipe.load_lora_weights(sd, unet_config=pipe.unet.config)
    pipe.fuse_lora(lora_scale=1.0)
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items() if "lora" not in k}


def make_ldm_loras():
    if LORA_OUT.exists():
        shutil.rmtree(LORA_OUT)
    src = MODELS / "sd1-tiny"
    cfg = json.loads((src / "unet" / "config.json").read_text())
    names = ldm_kohya_names(cfg, load_file(str(src / "unet" / "diffusion_pytorch_model.safetensors")))
    for name in ("sd1_kohya", "sd1_conv_kohya"):
        dst = LORA_OUT / f"{name}_ldm.safetensors"
        to_ldm_lora(LORA_SRC / f"{name}.safetensors", dst, names)
        want = fused(LORA_SRC / f"{name}.safetensors")
        # diffusers' SGM-name remapping (_maybe_map_sgm_blocks_to_diffusers) puts the upsampler of a block
        # without attention (output_blocks.K.1.conv) into `attentions`; compare without that layer there.
        plain_up = [names[k] for k in names if k.startswith("up_blocks_0_upsamplers")]
        has_plain_up = any(p in k for p in plain_up for k in load_file(str(dst)))
        got = fused(dst, drop=plain_up if has_plain_up else ())
        if has_plain_up:
            want = fused(LORA_SRC / f"{name}.safetensors", drop=["up_blocks_0_upsamplers"])
        bad = [k for k in want if not torch.equal(want[k], got[k])]
        assert not bad, (name, bad[:5])
        n = sum(1 for k in load_file(str(dst)) if k.startswith("lora_unet_") and k.endswith("lora_down.weight"))
        mf.log(f"{dst.name}: diffusers' load_lora_weights + fuse_lora give the same weights as {name} "
               f"({n} UNet layers{', the plain-block upsampler left out there' if has_plain_up else ''})")


def main():
    mf.T0 = __import__("time").perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    src = MODELS / "sd1-tiny"
    unet, vae, te = load_dir(src)
    path = OUT / "sd1-tiny.safetensors"
    write_single_file(path, unet, json.loads((src / "unet" / "config.json").read_text()), vae,
                      json.loads((src / "vae" / "config.json").read_text()), te)
    pipe = from_single_file(path, src)
    check_bit_equal(pipe, unet, vae, te, "sd1-tiny")
    check_reuses_references(pipe, "sd1-tiny")

    src = MODELS / "sd2-tiny"
    unet, vae, te = load_dir(src)
    path = OUT / "sd2-tiny.safetensors"
    write_single_file(path, unet, json.loads((src / "unet" / "config.json").read_text()), vae,
                      json.loads((src / "vae" / "config.json").read_text()), te, open_clip=True)
    pipe = from_single_file(path, src)
    check_bit_equal(pipe, unet, vae, te, "sd2-tiny")
    check_reuses_references(pipe, "sd2-tiny")

    make_ldm_loras()

    input_path = mf.REF / "input_64.png"
    input_img = Image.open(input_path).convert("RGB")
    make_variant(input_img, input_path.relative_to(ROOT).as_posix())
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    mf.log(f"total size of {OUT.relative_to(ROOT)}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
