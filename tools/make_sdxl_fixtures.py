"""Generate the SDXL reference fixtures: a tiny random-weight TEST SDXL pipeline and what diffusers'
StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline make with it.

Run from the repository root with the reference venv (after tools/make_fixtures.py, whose tokenizer
and input image it reuses):

    /root/.cache/sdstream/venv-torch-2.11.0/bin/python tools/make_sdxl_fixtures.py

Writes tests/fixtures/models/sdxl-tiny and tests/fixtures/reference/sdxl-tiny (deterministic).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets the offline/quiet environment, seeds nothing)

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from diffusers import (  # noqa: E402
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

NAME = "sdxl-tiny"
MODEL_DIR = mf.MODELS_FIX / NAME
OUT = mf.REF / NAME

# SDXL base 1.0's scheduler config (EulerDiscreteScheduler, leading spacing, steps_offset 1).
SDXL_EULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def text_config(seed, vocab, pad, **kw):
    torch.manual_seed(seed)
    return CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=mf.MAX_LEN,
                          bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1,
                          pad_token_id=vocab[pad], **kw)


def components(seed, vocab):
    te = CLIPTextModel(text_config(seed, vocab, mf.EOS, hidden_size=32, intermediate_size=37,
                                   num_attention_heads=2, num_hidden_layers=3,
                                   hidden_act="quick_gelu", projection_dim=32)).eval()
    te2 = CLIPTextModelWithProjection(text_config(seed + 1, vocab, "!", hidden_size=40, intermediate_size=48,
                                                  num_attention_heads=2, num_hidden_layers=3,
                                                  hidden_act="gelu", projection_dim=24)).eval()
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16, 24),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        norm_num_groups=4,
        cross_attention_dim=32 + 40,
        attention_head_dim=(2, 2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 24,
    ).eval()
    torch.manual_seed(seed + 3)
    vae = mf.tiny_vae((8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, scaling_factor=0.13025,
                      force_upcast=True)
    sched = EulerDiscreteScheduler.from_config(SDXL_EULER_CONFIG)
    return te, te2, unet, vae, sched


def to_hub_layout(te_file: Path, cls, folder: Path):
    """transformers 5 saves CLIP text weights without the "text_model." prefix; SDXL's hub checkpoints
    (transformers 4.x) have it (and text_projection.weight at the top level). Rewrite, then check the
    rewritten file loads into an identical model."""
    sd = load_file(str(te_file))
    fixed = {}
    for k, v in sd.items():
        if k.startswith("text_model.") or k.startswith("text_projection."):
            fixed[k] = v
        else:
            fixed["text_model." + k] = v
    save_file(fixed, str(te_file), metadata={"format": "pt"})
    _, info = cls.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def save_model(vocab, merges):
    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    te, te2, unet, vae, sched = components(5000, vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=mf.EOS, model_max_length=mf.MAX_LEN)
    tok2 = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=mf.MAX_LEN)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=sched,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(str(MODEL_DIR), safe_serialization=True)
    to_hub_layout(MODEL_DIR / "text_encoder" / "model.safetensors", CLIPTextModel, MODEL_DIR / "text_encoder")
    to_hub_layout(MODEL_DIR / "text_encoder_2" / "model.safetensors", CLIPTextModelWithProjection,
                  MODEL_DIR / "text_encoder_2")
    mf.write_tokenizer(MODEL_DIR / "tokenizer", vocab, merges, mf.EOS)
    mf.write_tokenizer(MODEL_DIR / "tokenizer_2", vocab, merges, "!")
    (MODEL_DIR / "README.md").write_text(mf.TEST_MODEL_README.format(
        name=NAME, kind="SDXL-style pipeline (two CLIP text encoders, text_time UNet, VAE)"))


def load_pipe():
    pipe = StableDiffusionXLPipeline.from_pretrained(str(MODEL_DIR), torch_dtype=torch.float32,
                                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.force_zeros_for_empty_prompt
    return pipe


@torch.no_grad()
def model_references(pipe):
    # Both text encoders and the UNet with its added conditions, on fixed inputs.
    prompts = ["a photo of a cat sitting on a red chair", ""]
    t = {}
    for i, (tok, te) in enumerate(((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))):
        ids = mf.tokenize(tok, prompts)
        out = te(ids, output_hidden_states=True)
        t[f"te{i + 1}_input_ids"] = ids
        t[f"te{i + 1}_penultimate"] = out.hidden_states[-2]
        t[f"te{i + 1}_skip1"] = out.hidden_states[-3]
        if i == 1:
            t["te2_text_embeds"] = out.text_embeds
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompts[0], negative_prompt="a blurry photo",
                                                      do_classifier_free_guidance=True)
    t.update(prompt_embeds=emb, negative_prompt_embeds=neg, pooled=pooled, negative_pooled=neg_pooled)
    g = torch.Generator("cpu").manual_seed(77)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    ts = torch.tensor([999, 321], dtype=torch.int64)
    ehs = torch.cat([neg, emb])
    text_embeds = torch.cat([neg_pooled, pooled])
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [48.0, 80.0, 3.0, 5.0, 64.0, 96.0]])
    t.update(sample=sample, timestep=ts, encoder_hidden_states=ehs, text_embeds=text_embeds, time_ids=time_ids)
    t["unet_out"] = pipe.unet(sample, ts, encoder_hidden_states=ehs,
                              added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    mf.save_st(OUT / "model.safetensors", t)


def cases():
    c = [
        dict(mode="txt2img", scheduler="euler", guidance=1.0, steps=3, width=64, height=64, negative_prompt=None),
        # guidance without a negative prompt: diffusers' force_zeros_for_empty_prompt zeroes the negative side
        dict(mode="txt2img", scheduler="euler", guidance=5.0, steps=3, width=64, height=64, negative_prompt=None),
        dict(mode="txt2img", scheduler="euler", guidance=5.0, steps=3, width=64, height=64,
             negative_prompt=mf.PIPE_NEG),
        # an empty negative prompt is encoded, not zeroed
        dict(mode="txt2img", scheduler="ddim", guidance=5.0, steps=3, width=64, height=64, negative_prompt=""),
        dict(mode="txt2img", scheduler="lcm", guidance=1.0, steps=2, width=96, height=64, negative_prompt=None),
        dict(mode="txt2img", scheduler="euler", guidance=1.0, steps=2, width=64, height=64, negative_prompt=None,
             clip_skip=1),
        dict(mode="img2img", scheduler="euler", guidance=5.0, steps=4, width=64, height=64, negative_prompt=None,
             strength=0.6),
        dict(mode="img2img", scheduler="ddim", guidance=1.0, steps=4, width=64, height=64, negative_prompt=None,
             strength=0.5),
        # micro-conditioning: original size, crop and target size ((height, width), (top, left))
        dict(mode="txt2img", scheduler="euler", guidance=5.0, steps=2, width=64, height=64, negative_prompt=None,
             original_size=(96, 128), crops_coords_top_left=(8, 4), target_size=(64, 48)),
        # SDXL-Turbo's own scheduler (noise drawn in every step)
        dict(mode="txt2img", scheduler="euler_a", guidance=5.0, steps=3, width=64, height=64, negative_prompt=None),
        # --timestep-spacing: Euler built `from_config(config, timestep_spacing="trailing")`, as the
        # SDXL-Lightning and Hyper-SD model cards do (the config says "leading")
        dict(mode="txt2img", scheduler="euler", guidance=1.0, steps=2, width=64, height=64, negative_prompt=None,
             timestep_spacing="trailing"),
    ]
    for i, x in enumerate(c):
        x["seed"] = 500 + i
        name = f"{x['mode']}_{x['scheduler']}_g{x['guidance']}"
        if x["negative_prompt"] is not None:
            name += "_neg" if x["negative_prompt"] else "_emptyneg"
        if (x["width"], x["height"]) != (64, 64):
            name += f"_{x['width']}x{x['height']}"
        if x.get("clip_skip"):
            name += f"_skip{x['clip_skip']}"
        if x.get("original_size"):
            name += "_micro"
        if x.get("timestep_spacing"):
            name += f"_{x['timestep_spacing']}"
        x["name"] = name
    return c


@torch.no_grad()
def pipeline_references(pipe, input_img: Image.Image, input_rel: str):
    out = OUT / "pipeline"
    out.mkdir(parents=True)
    i2i = StableDiffusionXLImg2ImgPipeline(**pipe.components, force_zeros_for_empty_prompt=True,
                                           requires_aesthetics_score=False, add_watermarker=False)
    i2i.set_progress_bar_config(disable=True)
    base_cfg = pipe.scheduler.config
    names = []
    for c in cases():
        p = pipe if c["mode"] == "txt2img" else i2i
        over = {"timestep_spacing": c["timestep_spacing"]} if c.get("timestep_spacing") else {}
        p.scheduler = mf.SCHED_CLASSES[c["scheduler"]].from_config(base_cfg, **over)
        kw = dict(prompt=mf.PIPE_PROMPT, negative_prompt=c["negative_prompt"], num_inference_steps=c["steps"],
                  guidance_scale=c["guidance"], clip_skip=c.get("clip_skip"))
        for k in ("original_size", "crops_coords_top_left", "target_size"):
            if c.get(k):
                kw[k] = c[k]
        if c["mode"] == "txt2img":
            kw.update(width=c["width"], height=c["height"])
        else:
            kw.update(image=input_img, strength=c["strength"])

        pil, pt, lat = mf.run_seeded(p, kw, c["seed"], ("pil", "pt", "latent"))
        pil = pil[0]
        info = {k: c[k] for k in ("mode", "seed", "steps", "scheduler", "guidance", "width", "height",
                                  "negative_prompt")}
        info.update(model=NAME, prompt=mf.PIPE_PROMPT, scheduler_class=type(p.scheduler).__name__,
                    scheduler_config=mf.clean_config(p.scheduler.config))
        if c.get("clip_skip"):
            info["clip_skip"] = c["clip_skip"]
        for k in ("original_size", "crops_coords_top_left", "target_size"):
            if c.get(k):
                info[k] = list(c[k])
        if c["mode"] == "img2img":
            info.update(strength=c["strength"], input_image=input_rel)
        if over:
            info["timestep_spacing"] = c["timestep_spacing"]
        mf.write_case(out, c["name"], info, pil, {"latents": lat, "image": pt})
        names.append(c["name"])
    mf.write_json(out / "index.json", names)
    return names


def main():
    vocab, merges = mf.learn_bpe(mf.SAMPLE_TEXT, mf.N_MERGES)
    save_model(vocab, merges)
    pipe = load_pipe()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    model_references(pipe)
    input_path = mf.REF / "input_64.png"
    names = pipeline_references(pipe, Image.open(input_path).convert("RGB"), input_path.relative_to(mf.ROOT).as_posix())
    print(f"{NAME}: {len(names)} pipeline cases; {mf.dir_size(MODEL_DIR) / 1e6:.2f} MB model, "
          f"{mf.dir_size(OUT) / 1e6:.2f} MB references")
    # Appended last: the same model with both text encoders stored without `text_model.` (see make_fixtures).
    flat_dir = mf.MODELS_FIX / f"{NAME}-flat"
    mf.write_flat_layout_model(MODEL_DIR, flat_dir, {"text_encoder": CLIPTextModel,
                                                     "text_encoder_2": CLIPTextModelWithProjection})
    mf.same_image_both_layouts(MODEL_DIR, flat_dir, StableDiffusionXLPipeline, add_watermarker=False)


if __name__ == "__main__":
    main()
