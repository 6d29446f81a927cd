#!/usr/bin/env python3
"""Generate the LoRA fixtures under tests/fixtures/lora/ (tiny LoRAs for the tiny test models, and what
diffusers' StableDiffusionPipeline makes with them loaded and fused).

Run from the repository root with the reference venv, after tools/make_fixtures.py made the models:

    /root/.cache/sdstream/venv-torch-2.11.0/bin/python tools/make_lora_fixtures.py

LoRA files (every tensor drawn from a seeded generator, so the script is deterministic):

* `sd1_peft.safetensors`: diffusers/PEFT naming (`unet.<module>.lora_A.weight`, `text_encoder.<module>...`),
  rank 4, no alpha (alpha = rank): UNet attention (to_q/k/v/out.0), proj_in (1x1 conv), proj_out, ff; text
  encoder q/k/v/out_proj, fc1, fc2.
* `sd1_kohya.safetensors`: the same weights (stored in fp16; all LoRA values are fp16-exact) in the kohya naming (`lora_unet_..._to_q.lora_down.weight`,
  `.lora_up.weight`, `.alpha` = rank); diffusers gives the same images as with sd1_peft (checked here).
* `sd1_old.safetensors`: the same weights in diffusers' older namings (`attn1.processor.to_q_lora.down.weight`,
  `proj_in.lora.down.weight`, text encoder `lora_linear_layer`); same fused weights (checked here).
* `sd1_alpha.safetensors`: PEFT naming with rank 4 and diffusers' `lora_adapter_metadata` (UNet lora_alpha 8 with
  an alpha_pattern giving proj_out 2; text encoder lora_alpha 2), written by `save_lora_weights`.
* `sd1_conv_kohya.safetensors`: a kohya conv LoRA (LoCon-style `lora_down` conv weights) on resnet conv1/conv2
  (3x3), conv_shortcut (1x1), down/upsampler convs, conv_in/conv_out, time_emb_proj and time_embedding, rank 2,
  alpha 1.
* `sdxl_peft.safetensors`: for the SDXL test model sdxl-tiny, PEFT naming on the UNet, the text encoder and the
  second text encoder (`text_encoder_2.`); `sdxl_kohya.safetensors` holds the same weights in the kohya naming
  (`lora_unet_`, `lora_te1_`, `lora_te2_`), which diffusers loads to the same images (checked here).
* `tiny_sd_test_unet.safetensors`: a UNet LoRA for the bundled demo model models/tiny-sd-test, used by the browser
  end-to-end test (LoRA slider); its diffusers parity is the same code path as sd1_peft's.
* `lcm_kohya.safetensors`: an LCM-LoRA-like kohya LoRA on every linear and conv layer of lcm-tiny's UNet
  (rank 2, alpha 1). kohya and old-format files are stored in fp16.

References (`<case>.json`, `<case>.safetensors` with `latents`, `<case>.png`), listed in `index.json`.
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
from peft import LoraConfig  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

diffusers.utils.logging.set_verbosity_error()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "fixtures" / "models"
OUT = ROOT / "tests" / "fixtures" / "lora"
PROMPT = "a photo of a cat sitting on a red chair, highly detailed"
NEG = "blurry, low quality, watermark"
SCHED = {"ddim": DDIMScheduler, "lcm": LCMScheduler, "euler": EulerDiscreteScheduler}

UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TE_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
UNET_CONV = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def load(model: str) -> StableDiffusionPipeline:
    sdxl = "text_encoder_2" in json.loads((MODELS / model / "model_index.json").read_text())
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(MODELS / model), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def targets(module: torch.nn.Module, suffixes, exact=()) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, m in module.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if name in exact or any(name == s or name.endswith("." + s) for s in suffixes):
            out.append((name, m.weight))
    return sorted(out)


def make_lora(mods, rank: int, seed: int, amp: float = 0.6) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (down (rank, in[, k, k]), up (out, rank[, 1, 1])), sized so the delta is ~amp x the weight."""
    g = torch.Generator("cpu").manual_seed(seed)
    out = {}
    for name, w in mods:
        fan_in = w[0].numel()
        down_shape = (rank,) + tuple(w.shape[1:])
        up_shape = (w.shape[0], rank) + ((1, 1) if w.ndim == 4 else ())
        down = torch.randn(down_shape, generator=g) / fan_in**0.5
        up = torch.randn(up_shape, generator=g) * amp / rank**0.5
        # Values exactly representable in fp16, so the fp16 copies below hold the very same LoRA.
        out[name] = (down.half().float().contiguous(), up.half().float().contiguous())
    return out


def kohya(prefix: str, lora, alpha: float) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (down, up) in lora.items():
        k = prefix + name.replace(".", "_")
        sd[f"{k}.lora_down.weight"] = down.half()
        sd[f"{k}.lora_up.weight"] = up.half()
        sd[f"{k}.alpha"] = torch.tensor(float(alpha)).half()
    return sd


def peft(prefix: str, lora) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (down, up) in lora.items():
        sd[f"{prefix}{name}.lora_A.weight"] = down
        sd[f"{prefix}{name}.lora_B.weight"] = up
    return sd


def old_format(unet_lora, te_lora) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (down, up) in unet_lora.items():
        parent, _, last = name.rpartition(".")
        if name.endswith("to_out.0"):
            base = name[: -len(".to_out.0")] + ".processor.to_out_lora"
        elif last in ("to_q", "to_k", "to_v"):
            base = f"{parent}.processor.{last}_lora"
        else:
            base = f"{name}.lora"
        sd[f"unet.{base}.down.weight"] = down.half()
        sd[f"unet.{base}.up.weight"] = up.half()
    for name, (down, up) in te_lora.items():
        sd[f"text_encoder.{name}.lora_linear_layer.down.weight"] = down.half()
        sd[f"text_encoder.{name}.lora_linear_layer.up.weight"] = up.half()
    return sd


def save(name: str, sd, metadata=None):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(OUT / name), metadata=metadata or {"format": "pt"})


@torch.no_grad()
def run_case(case: dict, write=True):
    pipe = load(case["model"])
    for i, (file, scale) in enumerate(case["loras"]):
        pipe.load_lora_weights(str(OUT), weight_name=file, adapter_name=f"l{i}")
        pipe.fuse_lora(lora_scale=scale, adapter_names=[f"l{i}"])
        # Keep the fused weights, drop the adapter layers: the next LoRA fuses on top.
        pipe.unload_lora_weights()
    pipe.scheduler = SCHED[case["scheduler"]].from_config(pipe.scheduler.config)
    kw = dict(prompt=PROMPT, negative_prompt=case["negative_prompt"], num_inference_steps=case["steps"],
              guidance_scale=case["guidance"], width=64, height=64)

    def run(output_type):
        return pipe(**kw, generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type=output_type).images

    lat = run("latent")
    if write:
        run("pil")[0].save(OUT / f"{case['name']}.png")
        save_file({"latents": lat.float().contiguous()}, str(OUT / f"{case['name']}.safetensors"))
        with open(OUT / f"{case['name']}.json", "w") as f:
            json.dump({**case, "prompt": PROMPT}, f, indent=2)
            f.write("\n")
    return lat, pipe


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    sd1 = load("sd1-tiny")
    unet_mods = targets(sd1.unet, UNET_ATTN)
    # transformers 5 names CLIPTextModel's modules without `text_model.`; LoRA files (and sdstream's weights)
    # use the hub checkpoints' `text_model.` names.
    te_mods = [(n if n.startswith("text_model.") else f"text_model.{n}", w)
               for n, w in targets(sd1.text_encoder, TE_ATTN)]
    assert any("proj_in" in n for n, _ in unet_mods)

    u1, t1 = make_lora(unet_mods, 4, 1), make_lora(te_mods, 4, 2)
    save("sd1_peft.safetensors", {**peft("unet.", u1), **peft("text_encoder.", t1)})
    save("sd1_kohya.safetensors", {**kohya("lora_unet_", u1, 4), **kohya("lora_te_", t1, 4)})
    save("sd1_old.safetensors", old_format(u1, t1))

    u3, t3 = make_lora(unet_mods, 4, 3), make_lora(te_mods, 4, 4)
    def meta(**kw):
        # peft keeps target_modules as a set; a sorted list keeps the file byte-identical across runs.
        d = LoraConfig(**kw).to_dict()
        d["target_modules"] = sorted(d["target_modules"])
        return d

    unet_targets = sorted({n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0" for n, _ in unet_mods})
    StableDiffusionPipeline.save_lora_weights(
        str(OUT),
        unet_lora_layers=peft("", u3),
        text_encoder_lora_layers=peft("", t3),
        weight_name="sd1_alpha.safetensors",
        unet_lora_adapter_metadata=meta(r=4, lora_alpha=8, alpha_pattern={"proj_out": 2}, target_modules=unet_targets),
        text_encoder_lora_adapter_metadata=meta(r=4, lora_alpha=2, target_modules=list(TE_ATTN)),
    )

    conv_mods = targets(sd1.unet, UNET_CONV, exact=("conv_in", "conv_out", "time_embedding.linear_1"))
    assert any(w.ndim == 4 and w.shape[-1] == 3 for _, w in conv_mods)
    assert any(w.ndim == 4 and w.shape[-1] == 1 for _, w in conv_mods)
    save("sd1_conv_kohya.safetensors", kohya("lora_unet_", make_lora(conv_mods, 2, 5, amp=0.4), 1.0))

    lcm = load("lcm-tiny")
    # Not time_embedding.cond_proj: diffusers' kohya key conversion turns it into `time.embedding.cond.proj` and
    # silently drops it (sdstream fuses it). SD 1.5, what real LCM-LoRAs are for, has no cond_proj.
    lcm_mods = [(n, w) for n, w in targets(lcm.unet, (), exact=tuple(n for n, _ in lcm.unet.named_modules()))
                if "cond_proj" not in n]
    save("lcm_kohya.safetensors", kohya("lora_unet_", make_lora(lcm_mods, 2, 6, amp=0.3), 1.0))

    xl = load("sdxl-tiny")
    xl_unet = targets(xl.unet, UNET_ATTN)
    xl_te = [(n if n.startswith("text_model.") else f"text_model.{n}", w) for n, w in targets(xl.text_encoder, TE_ATTN)]
    xl_te2 = [(n if n.startswith("text_model.") else f"text_model.{n}", w)
              for n, w in targets(xl.text_encoder_2, TE_ATTN)]
    assert xl_te2 and not any("text_projection" in n for n, _ in xl_te2)
    xu, xt, xt2 = make_lora(xl_unet, 4, 7), make_lora(xl_te, 4, 8), make_lora(xl_te2, 4, 9)
    save("sdxl_peft.safetensors", {**peft("unet.", xu), **peft("text_encoder.", xt), **peft("text_encoder_2.", xt2)})
    save("sdxl_kohya.safetensors",
         {**kohya("lora_unet_", xu, 4), **kohya("lora_te1_", xt, 4), **kohya("lora_te2_", xt2, 4)})

    demo = StableDiffusionPipeline.from_pretrained(str(ROOT / "models" / "tiny-sd-test"), torch_dtype=torch.float32)
    save("tiny_sd_test_unet.safetensors", peft("unet.", make_lora(targets(demo.unet, UNET_ATTN), 2, 10, amp=1.0)))

    cases = [
        dict(name="peft_ddim_g7.5", model="sd1-tiny", loras=[["sd1_peft.safetensors", 1.0]], scheduler="ddim",
             guidance=7.5, steps=3, seed=201, negative_prompt=NEG),
        dict(name="peft_ddim_g7.5_scale0.5", model="sd1-tiny", loras=[["sd1_peft.safetensors", 0.5]],
             scheduler="ddim", guidance=7.5, steps=3, seed=201, negative_prompt=NEG),
        dict(name="peft_euler_g1.0", model="sd1-tiny", loras=[["sd1_peft.safetensors", 1.0]], scheduler="euler",
             guidance=1.0, steps=3, seed=202, negative_prompt=None),
        dict(name="alpha_lcm_g1.0_scale0.8", model="sd1-tiny", loras=[["sd1_alpha.safetensors", 0.8]],
             scheduler="lcm", guidance=1.0, steps=2, seed=203, negative_prompt=None),
        dict(name="conv_ddim_g7.5", model="sd1-tiny", loras=[["sd1_conv_kohya.safetensors", 1.0]],
             scheduler="ddim", guidance=7.5, steps=3, seed=204, negative_prompt=None),
        dict(name="two_euler_g7.5", model="sd1-tiny",
             loras=[["sd1_peft.safetensors", 1.0], ["sd1_conv_kohya.safetensors", 0.7]], scheduler="euler",
             guidance=7.5, steps=3, seed=205, negative_prompt=None),
        dict(name="lcm_tiny_lcm_g1.0", model="lcm-tiny", loras=[["lcm_kohya.safetensors", 1.0]], scheduler="lcm",
             guidance=1.0, steps=2, seed=206, negative_prompt=None),
        dict(name="sdxl_peft_euler_g5.0_scale0.8", model="sdxl-tiny", loras=[["sdxl_peft.safetensors", 0.8]],
             scheduler="euler", guidance=5.0, steps=3, seed=207, negative_prompt=NEG),
    ]
    base = None
    for c in cases:
        lat, _ = run_case(c)
        if c["name"] == "peft_ddim_g7.5":
            base = lat
        print(f"{c['name']}: |latents| {lat.abs().mean():.4f}", flush=True)

    # The kohya and old-format copies of sd1_peft give the same as sd1_peft in diffusers too.
    for other in ("sd1_kohya.safetensors", "sd1_old.safetensors"):
        lat, _ = run_case({**cases[0], "loras": [[other, 1.0]]}, write=False)
        diff = (lat - base).abs().max().item()
        assert diff < 1e-5, (other, diff)
        print(f"{other}: same as sd1_peft in diffusers (max diff {diff:.1e})")
    xl_case = next(c for c in cases if c["model"] == "sdxl-tiny")
    xl_base, _ = run_case(xl_case, write=False)
    lat, _ = run_case({**xl_case, "loras": [["sdxl_kohya.safetensors", 0.8]]}, write=False)
    diff = (lat - xl_base).abs().max().item()
    assert diff < 1e-5, ("sdxl_kohya", diff)
    print(f"sdxl_kohya.safetensors: same as sdxl_peft in diffusers (max diff {diff:.1e})")
    # Each part of the SDXL LoRA matters (the second text encoder's too).
    no_te2 = {k: v for k, v in load_file(str(OUT / "sdxl_peft.safetensors")).items()
              if not k.startswith("text_encoder_2.")}
    save("sdxl_no_te2.tmp.safetensors", no_te2)
    lat, _ = run_case({**xl_case, "loras": [["sdxl_no_te2.tmp.safetensors", 0.8]]}, write=False)
    (OUT / "sdxl_no_te2.tmp.safetensors").unlink()
    assert (lat - xl_base).abs().max() > 1e-3, "the second text encoder's LoRA changed nothing"
    # And the LoRA changes the picture (not a no-op), in both the UNet and the text encoder.
    plain, plain_pipe = run_case({**cases[0], "loras": []}, write=False)
    assert (plain - base).abs().max() > 1e-2
    _, fused = run_case({**cases[0], "loras": [["sd1_peft.safetensors", 1.0]]}, write=False)
    te_w = lambda p: p.text_encoder.state_dict()[  # noqa: E731
        [k for k in p.text_encoder.state_dict() if k.endswith("layers.0.self_attn.q_proj.weight")][0]]
    assert (te_w(fused) - te_w(plain_pipe)).abs().max() > 1e-3, "diffusers did not fuse the text encoder LoRA"

    with open(OUT / "index.json", "w") as f:
        json.dump([c["name"] for c in cases], f, indent=2)
        f.write("\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(list(OUT.iterdir()))} files, {total / 1e3:.0f} kB")
    assert total < 1_500_000


if __name__ == "__main__":
    sys.exit(main())
