#!/usr/bin/env python3
"""Generate the committed reference fixtures for sdstream.

Run from the repository root with the reference venv:

    /root/.cache/sdstream/venv-torch-2.11.0/bin/python tools/make_fixtures.py

Everything is built from configs with random (seeded) weights; no hub access.
The script is deterministic and rewrites all of its outputs (see tools/README.md).
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import regex  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.set_verbosity_error()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
MODELS_FIX = FIX / "models"
REF = FIX / "reference"
BUNDLED = ROOT / "models"

MAX_LEN = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# --------------------------------------------------------------------------------------
# Scheduler configs of the real models (as in their hub scheduler_config.json).
# --------------------------------------------------------------------------------------
SD15_PNDM_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

SD_TURBO_EULER_CONFIG = {
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
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# SimianLuo/LCM_Dreamshaper_v7 scheduler/scheduler_config.json
LCM_CONFIG = {
    "_class_name": "LCMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj


def clean_config(cfg) -> dict:
    """A scheduler/model config as a plain dict with deterministic ordering
    (diffusers' `_use_default_values` comes from a set, so sort it)."""
    d = dict(cfg)
    if "_use_default_values" in d:
        d["_use_default_values"] = sorted(d["_use_default_values"])
    return {k: d[k] for k in sorted(d)}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(jsonable(obj), f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_st(path: Path, tensors: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.to(torch.float32)
        elif v.dtype != torch.bool:
            v = v.to(torch.int64)
        out[k] = v.contiguous().clone()
    save_file(out, str(path))


# --------------------------------------------------------------------------------------
# 1. Tokenizer: a tiny CLIP byte-level BPE learned from a small English sample.
# --------------------------------------------------------------------------------------
SAMPLE_TEXT = """
a photo of a cat sitting on a red chair, highly detailed, sharp focus, studio lighting
a beautiful landscape painting of mountains and a lake at sunset, oil on canvas
portrait of an old man with a beard, dramatic lighting, black and white photograph
an astronaut riding a horse on the moon, digital art, trending on artstation
a cute dog playing in the snow, warm colors, soft light, bokeh, 35mm film
masterpiece, best quality, ultra detailed, 8k, realistic, cinematic, award winning
a futuristic city at night with neon lights and flying cars, concept art, cyberpunk
a bowl of fruit on a wooden table, still life, impressionist painting by monet
the forest is full of tall green trees and the river flows through the valley
a small house by the sea, watercolor illustration, pastel colors, children's book
a close up photo of a flower with water drops, macro photography, morning light
a dragon flying over a medieval castle, fantasy art, epic, highly detailed scales
a woman wearing a blue dress standing in a field of sunflowers, summer afternoon
a robot reading a book in the library, warm light, cozy atmosphere, illustration
the quick brown fox jumps over the lazy dog and the cat watches from the window
there is a beautiful bird singing in the tree and the sky is clear and blue today
low quality, blurry, bad anatomy, worst quality, watermark, text, signature, ugly
a painting of people walking in the rain with umbrellas in the streets of paris
an ancient temple in the jungle covered with moss, light rays through the leaves
photograph of a coffee cup on a desk next to a laptop, shallow depth of field
a snowy mountain village with wooden houses and smoke rising from the chimneys
a portrait of a young girl with red hair and freckles, looking at the camera
a sailing ship on a stormy ocean with huge waves, dark clouds, lightning, drama
"""

CLIP_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
N_MERGES = 400


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (= GPT-2's) reversible byte -> unicode-char table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def learn_bpe(text: str, n_merges: int):
    b2u = bytes_to_unicode()
    base = list(b2u.values())
    vocab_list = base + [c + "</w>" for c in base]
    known = set(vocab_list)
    words = collections.Counter()
    for tok in CLIP_PAT.findall(" ".join(text.lower().split())):
        mapped = "".join(b2u[b] for b in tok.encode("utf-8"))
        words[tuple(mapped[:-1]) + (mapped[-1] + "</w>",)] += 1
    words = dict(words)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs = collections.Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        cands = [(-c, p) for p, c in pairs.items() if (p[0] + p[1]) not in known]
        if not cands:
            break
        _, best = min(cands)
        a, b = best
        merges.append(best)
        known.add(a + b)
        vocab_list.append(a + b)
        new_words = {}
        for w, c in words.items():
            out = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    assert len(vocab) == len(vocab_list)
    return vocab, merges


def write_tokenizer(dir_: Path, vocab, merges, pad_token: str) -> None:
    """Write the classic CLIPTokenizer layout (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) as found in the SD 1.5 / SD 2.x hub repos (no tokenizer.json)."""
    if dir_.exists():
        shutil.rmtree(dir_)
    dir_.mkdir(parents=True)
    with open(dir_ / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(dir_ / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")

    def added(content):
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    special = {
        "bos_token": added(BOS),
        "eos_token": added(EOS),
        "pad_token": pad_token if pad_token != EOS else EOS,
        "unk_token": added(EOS),
    }
    write_json(dir_ / "special_tokens_map.json", special)
    added_dec = {
        str(vocab[BOS]): {**added(BOS), "special": True},
        str(vocab[EOS]): {**added(EOS), "special": True},
    }
    cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": added_dec,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": MAX_LEN,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    write_json(dir_ / "tokenizer_config.json", cfg)


TRICKY_PROMPTS = [
    "",
    "a photo of a cat",
    "Hello, World!!! ... (what?) [test] {x} -- ok.",
    "1234567890 3.14 1,000,000 2nd 21st",
    "A PHOTO OF AN ASTRONAUT RIDING A HORSE",
    "   extra    spaces   between   words   ",
    "café ☕ naïve Ünïcödé 日本語 🐱",
    "it's a dog's life, don't worry, you'll see we've I'm they'd",
    "line one\nline two\ttabbed\r\nwindows line",
    ("a very long prompt about a beautiful landscape painting of mountains and a lake at sunset "
     "with many many details, highly detailed, sharp focus, studio lighting, trending on artstation, "
     "masterpiece, best quality, ultra detailed, 8k, realistic, cinematic, award winning photograph "
     "of a futuristic city at night with neon lights and flying cars and a dragon over the castle"),
    "<|endoftext|> special <|startoftext|> tokens inside",
    "masterpiece, (best quality:1.2), [[detailed]], hyphen-ated_words and/or @#$%^&* symbols",
]


def tokenize(tok, texts):
    return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


# --------------------------------------------------------------------------------------
# 2. Model builders
# --------------------------------------------------------------------------------------
def text_encoder(seed, vocab_size, pad_id, **kw):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=MAX_LEN,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=pad_id,
        **kw,
    )
    return CLIPTextModel(cfg).eval()


def tiny_vae(block_out_channels, layers_per_block, norm_num_groups, scaling_factor=0.18215, **kw):
    """A tiny 4-level AutoencoderKL (factor 8, 4 latent channels), drawn from torch's global generator."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        latent_channels=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        **kw,
    ).eval()


def sd1_components(seed, vocab, merges):
    tok_dir = None  # tokenizer object created by caller
    te = text_encoder(seed, len(vocab), vocab[EOS], hidden_size=32, intermediate_size=37,
                      num_attention_heads=2, num_hidden_layers=3, hidden_act="quick_gelu",
                      projection_dim=32)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        cross_attention_dim=32,
        attention_head_dim=4,
        use_linear_projection=False,
    ).eval()
    torch.manual_seed(seed + 2)
    vae = tiny_vae((8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    sched = PNDMScheduler.from_config(SD15_PNDM_CONFIG)
    return te, unet, vae, sched


def sd2_components(seed, vocab, merges):
    te = text_encoder(seed, len(vocab), vocab["!"], hidden_size=48, intermediate_size=64,
                      num_attention_heads=3, num_hidden_layers=2, hidden_act="gelu",
                      projection_dim=48)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 24, 24),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=48,
        attention_head_dim=[2, 4, 4],
        use_linear_projection=True,
        upcast_attention=True,
    ).eval()
    torch.manual_seed(seed + 2)
    vae = tiny_vae((8, 8, 16, 16), layers_per_block=2, norm_num_groups=8)
    sched = EulerDiscreteScheduler.from_config(SD_TURBO_EULER_CONFIG)
    return te, unet, vae, sched


def lcm_components(seed, vocab, merges):
    te = text_encoder(seed, len(vocab), vocab[EOS], hidden_size=32, intermediate_size=48,
                      num_attention_heads=4, num_hidden_layers=2, hidden_act="quick_gelu",
                      projection_dim=32)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        transformer_layers_per_block=[1, 2, 2],
        norm_num_groups=4,
        cross_attention_dim=32,
        attention_head_dim=2,
        use_linear_projection=False,
        time_cond_proj_dim=8,
    ).eval()
    torch.manual_seed(seed + 2)
    vae = tiny_vae((8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
    sched = LCMScheduler.from_config(LCM_CONFIG)
    return te, unet, vae, sched


def taesd(seed):
    torch.manual_seed(seed)
    return AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
        upsampling_scaling_factor=2,
    ).eval()


TEST_MODEL_README = """# {name}: random-weight TEST model

This is **not** a real Stable Diffusion model. It is a tiny, randomly initialised
{kind} generated by `tools/make_fixtures.py` (seeded, deterministic) in the diffusers
layout. Its outputs are noise-like images with no relation to the prompt.

It exists only so that tests and the CLI demo command can run end to end without
downloading multi-gigabyte weights. Do not use it for anything else.
"""


def save_sd_model(dir_: Path, te, unet, vae, sched, vocab, merges, pad_token):
    if dir_.exists():
        shutil.rmtree(dir_)
    tmp_tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=MAX_LEN)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tmp_tok, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(dir_), safe_serialization=True)
    # transformers 5 saves CLIPTextModel weights without the "text_model." prefix; real SD hub
    # checkpoints (saved by transformers 4.x) use "text_model.*" keys. Rewrite to the hub layout
    # (transformers 5 still loads it; checked in model_references).
    te_file = dir_ / "text_encoder" / "model.safetensors"
    sd = load_file(str(te_file))
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
    save_file(sd, str(te_file), metadata={"format": "pt"})
    te2, info = CLIPTextModel.from_pretrained(str(dir_ / "text_encoder"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        ids = torch.arange(MAX_LEN).unsqueeze(0) % len(vocab)
        assert torch.equal(te(ids)[0], te2.eval()(ids)[0])
    # replace transformers-5 tokenizer output (tokenizer.json only) with the classic CLIP layout
    write_tokenizer(dir_ / "tokenizer", vocab, merges, pad_token)
    # check: tokenizer loaded from vocab.json/merges.txt == in-memory tokenizer
    tok = CLIPTokenizer.from_pretrained(str(dir_ / "tokenizer"))
    assert tok.model_max_length == MAX_LEN, tok.model_max_length
    assert tok.pad_token == pad_token
    a = tokenize(tok, TRICKY_PROMPTS)
    b = tokenize(tmp_tok, TRICKY_PROMPTS)
    assert torch.equal(a, b), "reloaded tokenizer differs"
    return tok


# --------------------------------------------------------------------------------------
# 3. Reference outputs
# --------------------------------------------------------------------------------------
PROMPTS3 = [
    "a photo of a cat sitting on a red chair",
    "A beautiful landscape painting, mountains & a lake at sunset!",
    "",
]


def make_input_image() -> Image.Image:
    w = h = 64
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 40 + 180 * x / (w - 1)
    g = 60 + 150 * y / (h - 1)
    b = 200 - 120 * (x + y) / (w + h - 2)
    arr = np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    d.ellipse([10, 8, 34, 32], fill=(230, 200, 40))
    d.rectangle([36, 34, 56, 56], fill=(30, 60, 160))
    d.polygon([(8, 56), (22, 38), (34, 56)], fill=(200, 40, 60))
    return img


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    a = torch.from_numpy(np.asarray(img).astype(np.float32) / 127.5 - 1.0)
    return a.permute(2, 0, 1).unsqueeze(0).contiguous()


@torch.no_grad()
def model_references(name, model_dir: Path, tok, input_img: Image.Image):
    out = REF / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    te = CLIPTextModel.from_pretrained(str(model_dir / "text_encoder")).eval()
    unet = UNet2DConditionModel.from_pretrained(str(model_dir / "unet")).eval()
    vae = AutoencoderKL.from_pretrained(str(model_dir / "vae")).eval()

    # tokenizer
    ids = tokenize(tok, TRICKY_PROMPTS)
    write_json(out / "tokenizer.json",
               [{"text": t, "input_ids": ids[i].tolist()} for i, t in enumerate(TRICKY_PROMPTS)])

    # text encoder
    ids3 = tokenize(tok, PROMPTS3)
    te_out = te(ids3, output_hidden_states=True)
    last = te(ids3)[0]
    assert torch.allclose(last, te_out.last_hidden_state)
    pen = te_out.hidden_states[-2]
    save_st(out / "text_encoder.safetensors", {
        "input_ids": ids3,
        "last_hidden_state": last,
        "hidden_state_penultimate": pen,
        "hidden_state_penultimate_normed": getattr(te, "text_model", te).final_layer_norm(pen),
    })

    # unet
    g = torch.Generator("cpu").manual_seed(1234)
    sample = torch.randn(3, 4, 8, 8, generator=g)
    ts = torch.tensor([999, 500, 21], dtype=torch.int64)
    tsf = torch.tensor([999.0, 412.7, 3.25], dtype=torch.float32)
    ehs = last
    tensors = {"sample": sample, "timestep": ts, "encoder_hidden_states": ehs}
    kw = {}
    if unet.config.time_cond_proj_dim is not None:
        guidance = torch.tensor([1.5, 4.0, 8.0], dtype=torch.float32)
        tcond = StableDiffusionPipeline.get_guidance_scale_embedding(
            None, guidance - 1.0, embedding_dim=unet.config.time_cond_proj_dim)
        tensors["guidance"] = guidance
        tensors["timestep_cond"] = tcond
        kw["timestep_cond"] = tcond
    tensors["out"] = unet(sample, ts, encoder_hidden_states=ehs, **kw).sample
    tensors["timestep_float"] = tsf
    tensors["out_float"] = unet(sample, tsf, encoder_hidden_states=ehs, **kw).sample
    save_st(out / "unet.safetensors", tensors)

    # vae
    image = pil_to_tensor(input_img)
    dist = vae.encode(image).latent_dist
    g = torch.Generator("cpu").manual_seed(4321)
    latent_in = torch.randn(1, 4, 8, 8, generator=g)
    save_st(out / "vae.safetensors", {
        "image": image,
        "mean": dist.mean,
        "logvar": dist.logvar,
        "latent_in": latent_in,
        "decoded": vae.decode(latent_in).sample,
    })


@torch.no_grad()
def taesd_references(model_dir: Path, input_img):
    out = REF / "taesd-tiny"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    m = AutoencoderTiny.from_pretrained(str(model_dir)).eval()
    image = pil_to_tensor(input_img)
    g = torch.Generator("cpu").manual_seed(4321)
    latent_in = torch.randn(1, 4, 8, 8, generator=g)
    save_st(out / "taesd.safetensors", {
        "image": image,
        "latents": m.encode(image).latents,
        "latent_in": latent_in,
        "decoded": m.decode(latent_in).sample,
    })


# --------------------------------------------------------------------------------------
# 4. Schedulers
# --------------------------------------------------------------------------------------
SCHED_CLASSES = {"ddim": DDIMScheduler, "lcm": LCMScheduler, "euler": EulerDiscreteScheduler,
                 "euler_a": EulerAncestralDiscreteScheduler}
SCHED_SHAPE = (1, 4, 4, 4)


def custom_config(cls_key, spacing):
    cfg = dict(SD15_PNDM_CONFIG)
    cfg.pop("_class_name")
    cfg.pop("skip_prk_steps")
    cfg.update({"prediction_type": "v_prediction", "set_alpha_to_one": True, "timestep_spacing": spacing})
    if cls_key == "lcm":
        # LCMScheduler ignores timestep_spacing (and effectively set_alpha_to_one); vary its own knobs.
        cfg.update({
            "leading": {"original_inference_steps": 30, "timestep_scaling": 5.0},
            "trailing": {"original_inference_steps": 100, "timestep_scaling": 10.0, "prediction_type": "epsilon"},
            "linspace": {"original_inference_steps": 50, "timestep_scaling": 1.0},
        }[spacing])
    return cfg


@torch.no_grad()
def scheduler_case(name, cls_key, config, steps, out_dir: Path, spacing_override=None):
    cls = SCHED_CLASSES[cls_key]
    # `from_config(config, timestep_spacing=...)`: what sdstream's --timestep-spacing reproduces.
    over = {} if spacing_override is None else {"timestep_spacing": spacing_override}
    s = cls.from_config(config, **over)
    s.set_timesteps(steps)
    timesteps = s.timesteps.clone()
    info = {
        "class": cls.__name__,
        "config": clean_config(s.config),
        "steps": steps,
        "timesteps": timesteps.tolist(),
        "timesteps_dtype": str(timesteps.dtype).replace("torch.", ""),
        "init_noise_sigma": float(s.init_noise_sigma),
    }
    t = {"alphas_cumprod": s.alphas_cumprod.clone(), "timesteps": timesteps}
    if hasattr(s, "sigmas") and isinstance(getattr(s, "sigmas"), torch.Tensor):
        info["sigmas"] = s.sigmas.tolist()
        t["sigmas"] = s.sigmas.clone()
    g_sample = torch.Generator("cpu").manual_seed(2)
    g_model = torch.Generator("cpu").manual_seed(1)
    g_step = torch.Generator("cpu").manual_seed(0)
    sample = torch.randn(SCHED_SHAPE, generator=g_sample) * s.init_noise_sigma
    for i, ts in enumerate(s.timesteps):
        model_output = torch.randn(SCHED_SHAPE, generator=g_model)
        scaled = s.scale_model_input(sample, ts)
        res = s.step(model_output, ts, sample, generator=g_step)
        t[f"sample_{i}"] = sample
        t[f"model_output_{i}"] = model_output
        t[f"scaled_{i}"] = scaled
        t[f"prev_{i}"] = res.prev_sample
        if cls_key == "lcm":
            t[f"denoised_{i}"] = res.denoised
        sample = res.prev_sample

    # add_noise on a fresh scheduler (set_timesteps called, no step taken, begin_index None)
    s2 = cls.from_config(config, **over)
    s2.set_timesteps(steps)
    if cls_key in ("euler", "euler_a"):
        n = len(s2.timesteps)
        idx = sorted({0, n // 2, n - 1})
        an_ts = s2.timesteps[idx].clone()
    else:
        an_ts = torch.tensor([999, 500, 21, 0], dtype=torch.int64)
    g = torch.Generator("cpu").manual_seed(3)
    x0 = torch.randn((len(an_ts),) + SCHED_SHAPE[1:], generator=g)
    noise = torch.randn((len(an_ts),) + SCHED_SHAPE[1:], generator=g)
    t["add_noise_x0"] = x0
    t["add_noise_noise"] = noise
    t["add_noise_timesteps"] = an_ts
    t["add_noise_noised"] = s2.add_noise(x0, noise, an_ts)
    info["add_noise_timesteps"] = an_ts.tolist()
    if spacing_override is not None:
        info["base_config"] = clean_config(config)
        info["timestep_spacing_override"] = spacing_override
    write_json(out_dir / f"{name}.json", info)
    save_st(out_dir / f"{name}.safetensors", t)


def scheduler_references():
    out = REF / "schedulers"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    names = []
    bases = {"sd15": SD15_PNDM_CONFIG, "turbo": SD_TURBO_EULER_CONFIG, "lcm": LCM_CONFIG}
    for cls_key in SCHED_CLASSES:
        for base_key, cfg in bases.items():
            for steps in (1, 2, 4, 25):
                name = f"{cls_key}_{base_key}_s{steps}"
                scheduler_case(name, cls_key, cfg, steps, out)
                names.append(name)
        for spacing in ("leading", "trailing", "linspace"):
            for steps in (4, 25):
                name = f"{cls_key}_custom-{spacing}_s{steps}"
                scheduler_case(name, cls_key, custom_config(cls_key, spacing), steps, out)
                names.append(name)
    # Appended last: the config's spacing overridden, `Class.from_config(cfg, timestep_spacing=...)` (LCM takes the
    # option and ignores it), and the stream's 50-step LCM schedule with an override.
    for cls_key in SCHED_CLASSES:
        for base_key, spacing in (("sd15", "trailing"), ("sd15", "linspace"), ("turbo", "leading")):
            name = f"{cls_key}_{base_key}_s4_override-{spacing}"
            scheduler_case(name, cls_key, bases[base_key], 4, out, spacing_override=spacing)
            names.append(name)
    scheduler_case("lcm_lcm_s50_override-trailing", "lcm", LCM_CONFIG, 50, out, spacing_override="trailing")
    names.append("lcm_lcm_s50_override-trailing")
    write_json(out / "index.json", names)
    return names


# --------------------------------------------------------------------------------------
# 5. Pipelines
# --------------------------------------------------------------------------------------
PIPE_PROMPT = "a photo of a cat sitting on a red chair, highly detailed"
PIPE_NEG = "blurry, low quality, watermark"


def pipeline_cases(model_name):
    cases = []
    seed = 100
    if model_name == "lcm-tiny":
        scheds = ["lcm"]
    else:
        scheds = ["ddim", "lcm", "euler"]
    for sch in scheds:
        for guid in (1.0, 7.5):
            seed += 1
            neg = PIPE_NEG if (guid > 1 and sch == scheds[-1]) else None
            cases.append(dict(mode="txt2img", scheduler=sch, guidance=guid, steps=3 if sch != "lcm" else 2,
                              width=64, height=64, seed=seed, negative_prompt=neg))
    seed += 1
    cases.append(dict(mode="txt2img", scheduler=scheds[0], guidance=7.5, steps=2, width=96, height=64,
                      seed=seed, negative_prompt=None))
    for sch in scheds:
        for guid in ((1.0, 7.5) if model_name == "lcm-tiny" or sch == "euler" else (7.5,)):
            seed += 1
            cases.append(dict(mode="img2img", scheduler=sch, guidance=guid, steps=4, width=64, height=64,
                              seed=seed, negative_prompt=None, strength=0.6))
    # SD-Turbo's (and SDXL-Turbo's) own scheduler, EulerAncestralDiscreteScheduler: its steps draw noise from
    # the pipeline's generator. Appended last so the seeds of the cases above stay as they were.
    if model_name != "lcm-tiny":
        seed += 1
        cases.append(dict(mode="txt2img", scheduler="euler_a", guidance=1.0, steps=3, width=64, height=64,
                          seed=seed, negative_prompt=None))
        seed += 1
        cases.append(dict(mode="img2img", scheduler="euler_a", guidance=7.5, steps=4, width=64, height=64,
                          seed=seed, negative_prompt=None, strength=0.6))
    # --timestep-spacing: the scheduler built `from_config(config, timestep_spacing=...)`, a spacing other than the
    # model's own (sd1-tiny/lcm-tiny: leading; sd2-tiny: trailing). Appended last, as above.
    spacing = "leading" if model_name == "sd2-tiny" else "trailing"
    for sch in scheds + (["euler_a"] if model_name != "lcm-tiny" else []):
        seed += 1
        cases.append(dict(mode="txt2img", scheduler=sch, guidance=1.0 if sch in ("lcm", "euler_a") else 7.5,
                          steps=2 if sch == "lcm" else 3, width=64, height=64, seed=seed, negative_prompt=None,
                          timestep_spacing=spacing))
    if model_name != "lcm-tiny":
        seed += 1
        cases.append(dict(mode="img2img", scheduler="euler", guidance=7.5, steps=4, width=64, height=64,
                          seed=seed, negative_prompt=None, strength=0.6, timestep_spacing="linspace"))
    for c in cases:
        base = f"{c['mode']}_{c['scheduler']}_g{c['guidance']}"
        if c["negative_prompt"]:
            base += "_neg"
        if (c["width"], c["height"]) != (64, 64):
            base += f"_{c['width']}x{c['height']}"
        if c.get("timestep_spacing"):
            base += f"_{c['timestep_spacing']}"
        c["name"] = base
    return cases


def run_seeded(pipe, kw, seed, output_types):
    """The pipeline's images for each output type in turn, each run from a CPU generator seeded `seed`."""
    results = []
    for output_type in output_types:
        gen = torch.Generator("cpu").manual_seed(seed)
        results.append(pipe(**kw, generator=gen, output_type=output_type).images)
    return results


def write_case(out_dir: Path, name: str, info: dict, pil, tensors: dict) -> None:
    """One reference case: `<name>.json` (its parameters), `<name>.png` and `<name>.safetensors`."""
    write_json(out_dir / f"{name}.json", info)
    pil.save(out_dir / f"{name}.png")
    save_st(out_dir / f"{name}.safetensors", tensors)


@torch.no_grad()
def pipeline_references(model_name, model_dir: Path, input_img: Image.Image, input_rel: str):
    out = REF / model_name / "pipeline"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t2i = StableDiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    t2i.set_progress_bar_config(disable=True)
    i2i = StableDiffusionImg2ImgPipeline(**t2i.components)
    i2i.set_progress_bar_config(disable=True)
    base_cfg = t2i.scheduler.config
    names = []
    for c in pipeline_cases(model_name):
        pipe = t2i if c["mode"] == "txt2img" else i2i
        over = {"timestep_spacing": c["timestep_spacing"]} if c.get("timestep_spacing") else {}
        pipe.scheduler = SCHED_CLASSES[c["scheduler"]].from_config(base_cfg, **over)
        kw = dict(prompt=PIPE_PROMPT, negative_prompt=c["negative_prompt"], num_inference_steps=c["steps"],
                  guidance_scale=c["guidance"])
        if c["mode"] == "txt2img":
            kw.update(width=c["width"], height=c["height"])
        else:
            kw.update(image=input_img, strength=c["strength"])

        pil, pt, lat = run_seeded(pipe, kw, c["seed"], ("pil", "pt", "latent"))
        pil = pil[0]
        info = {
            "mode": c["mode"],
            "model": model_name,
            "prompt": PIPE_PROMPT,
            "negative_prompt": c["negative_prompt"],
            "seed": c["seed"],
            "steps": c["steps"],
            "scheduler": c["scheduler"],
            "scheduler_class": type(pipe.scheduler).__name__,
            "scheduler_config": clean_config(pipe.scheduler.config),
            "guidance": c["guidance"],
            "width": c["width"],
            "height": c["height"],
        }
        if c["mode"] == "img2img":
            info["strength"] = c["strength"]
            info["input_image"] = input_rel
        if over:
            info["timestep_spacing"] = c["timestep_spacing"]
        write_case(out, c["name"], info, pil, {"latents": lat, "image": pt})
        names.append(c["name"])
    write_json(out / "index.json", names)
    return names


# --------------------------------------------------------------------------------------
@torch.no_grad()
def verify_reload(dir_: Path):
    pipe = StableDiffusionPipeline.from_pretrained(str(dir_))
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a test", num_inference_steps=1, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert img.size == (64, 64)


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------
# 7. Text-encoder key layouts
# --------------------------------------------------------------------------------------
def flat_key(k: str) -> str:
    """A text-encoder tensor name in transformers 5's CLIPTextModel layout: no `text_model.` level
    (`text_projection.*` of CLIPTextModelWithProjection is at the top level in both layouts)."""
    return k[len("text_model."):] if k.startswith("text_model.") else k


def write_flat_layout_model(src: Path, dst: Path, classes: dict) -> None:
    """`dst`: the model folder `src` (text encoders in the hub layout `text_model.*`) with its text encoders
    (`classes`: folder -> transformers class) stored without the `text_model.` level, by renaming the keys of the
    very same tensors; every other entry is a relative symlink to `src`'s (no weights duplicated).

    Checked: transformers loads each renamed file to the same model (bit-equal outputs), transformers' own
    `save_pretrained` writes CLIPTextModel in this layout, and diffusers' pipeline on `dst` gives the same image
    as on `src`, bit for bit."""
    if dst.exists() or dst.is_symlink():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for entry in sorted(src.iterdir()):
        if entry.name not in classes:
            (dst / entry.name).symlink_to(os.path.relpath(entry, dst))
    ids = torch.arange(MAX_LEN).unsqueeze(0) % 900
    for folder, cls in classes.items():
        (dst / folder).mkdir()
        shutil.copyfile(src / folder / "config.json", dst / folder / "config.json")
        nested = load_file(str(src / folder / "model.safetensors"))
        assert all(k.startswith(("text_model.", "text_projection.")) for k in nested), "not the hub layout"
        flat = {flat_key(k): v for k, v in nested.items()}
        save_file(flat, str(dst / folder / "model.safetensors"), metadata={"format": "pt"})
        a = cls.from_pretrained(str(src / folder)).eval()
        b, info = cls.from_pretrained(str(dst / folder), output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        with torch.no_grad():
            oa, ob = a(ids, output_hidden_states=True), b.eval()(ids, output_hidden_states=True)
        assert torch.equal(oa[0], ob[0]) and torch.equal(oa.hidden_states[-2], ob.hidden_states[-2])
        # What this transformers writes for the class itself.
        tmp = dst / folder / "saved.tmp"
        b.save_pretrained(str(tmp), safe_serialization=True)
        written = set(load_file(str(tmp / "model.safetensors")))
        shutil.rmtree(tmp)
        if cls.__name__ == "CLIPTextModel" and int(transformers.__version__.split(".")[0]) >= 5:
            assert written == set(flat), f"transformers {transformers.__version__} writes another layout"
        assert written in (set(flat), set(nested)), sorted(written ^ set(flat))[:5]
        print(f"{dst.relative_to(ROOT)}/{folder}: {len(flat)} tensors without `text_model.`; transformers "
            f"{transformers.__version__} saves {cls.__name__} "
            f"{'the same way' if written == set(flat) else 'with `text_model.`'}", flush=True)


@torch.no_grad()
def same_image_both_layouts(src: Path, dst: Path, pipe_cls, **load_kw) -> None:
    """diffusers' pipeline on the flat-layout copy gives the very image of the original."""
    images = []
    for d in (src, dst):
        pipe = pipe_cls.from_pretrained(str(d), torch_dtype=torch.float32, **load_kw)
        pipe.set_progress_bar_config(disable=True)
        kw = dict(prompt=PIPE_PROMPT, negative_prompt=PIPE_NEG, num_inference_steps=2, guidance_scale=5.0,
                  height=64, width=64)
        images.append(run_seeded(pipe, kw, 11, ("pt",))[0])
    assert torch.equal(images[0], images[1]), (images[0] - images[1]).abs().max()
    print(f"{dst.relative_to(ROOT)}: diffusers gives the same image as {src.relative_to(ROOT)}", flush=True)


def main():
    global T0
    T0 = time.perf_counter()
    vocab, merges = learn_bpe(SAMPLE_TEXT, N_MERGES)
    log(f"tokenizer: vocab {len(vocab)}, merges {len(merges)}")

    input_img = make_input_image()
    REF.mkdir(parents=True, exist_ok=True)
    input_path = REF / "input_64.png"
    input_img.save(input_path)
    input_rel = input_path.relative_to(ROOT).as_posix()
    input_img = Image.open(input_path).convert("RGB")

    specs = [
        ("sd1-tiny", MODELS_FIX / "sd1-tiny", sd1_components, 1000, EOS),
        ("sd2-tiny", MODELS_FIX / "sd2-tiny", sd2_components, 2000, "!"),
        ("lcm-tiny", MODELS_FIX / "lcm-tiny", lcm_components, 3000, EOS),
        ("tiny-sd-test", BUNDLED / "tiny-sd-test", sd2_components, 9000, "!"),
    ]
    toks = {}
    for name, d, fn, seed, pad in specs:
        te, unet, vae, sched = fn(seed, vocab, merges)
        toks[name] = save_sd_model(d, te, unet, vae, sched, vocab, merges, pad)
        n_params = sum(p.numel() for m in (te, unet, vae) for p in m.parameters())
        log(f"saved {d.relative_to(ROOT)} ({n_params} params)")
    write_json_text = TEST_MODEL_README.format(name="tiny-sd-test", kind="SD 2.x-style pipeline (CLIP text encoder, UNet, VAE)")
    (BUNDLED / "tiny-sd-test" / "README.md").write_text(write_json_text)

    for name, d, seed in (("taesd-tiny", MODELS_FIX / "taesd-tiny", 4000),
                          ("tiny-taesd-test", BUNDLED / "tiny-taesd-test", 9100)):
        if d.exists():
            shutil.rmtree(d)
        taesd(seed).save_pretrained(str(d), safe_serialization=True)
        log(f"saved {d.relative_to(ROOT)}")
    (BUNDLED / "tiny-taesd-test" / "README.md").write_text(
        TEST_MODEL_README.format(name="tiny-taesd-test", kind="TAESD-style AutoencoderTiny"))

    # tokenizer sanity check
    tok = toks["sd1-tiny"]
    toks_cat = tok.tokenize("a photo of a beautiful cat, highly detailed")
    log(f"tokenize check: {toks_cat}")
    assert "photo</w>" in toks_cat and "beautiful</w>" in toks_cat, toks_cat
    ids = tokenize(tok, [""])[0].tolist()
    assert ids[0] == vocab[BOS] and ids[1] == vocab[EOS] and ids[2] == vocab[EOS]
    ids = tokenize(toks["sd2-tiny"], [""])[0].tolist()
    assert ids[0] == vocab[BOS] and ids[1] == vocab[EOS] and ids[2] == vocab["!"] == 0

    for name in ("sd1-tiny", "sd2-tiny", "lcm-tiny"):
        model_references(name, MODELS_FIX / name, toks[name], input_img)
        log(f"model references {name}")
    taesd_references(MODELS_FIX / "taesd-tiny", input_img)
    log("taesd references")

    names = scheduler_references()
    log(f"scheduler references: {len(names)} cases")

    for name in ("sd1-tiny", "sd2-tiny", "lcm-tiny"):
        n = pipeline_references(name, MODELS_FIX / name, input_img, input_rel)
        log(f"pipeline references {name}: {len(n)} cases")

    for d in (MODELS_FIX / "sd1-tiny", MODELS_FIX / "sd2-tiny", MODELS_FIX / "lcm-tiny", BUNDLED / "tiny-sd-test"):
        verify_reload(d)
    for d in (MODELS_FIX / "taesd-tiny", BUNDLED / "tiny-taesd-test"):
        AutoencoderTiny.from_pretrained(str(d))
    log("reload verification ok")

    # Appended last: the text encoders in transformers 5's key layout (no `text_model.`), the rest shared.
    for name in ("sd1-tiny", "sd2-tiny"):
        flat_dir = MODELS_FIX / f"{name}-flat"
        write_flat_layout_model(MODELS_FIX / name, flat_dir, {"text_encoder": CLIPTextModel})
        same_image_both_layouts(MODELS_FIX / name, flat_dir, StableDiffusionPipeline)

    total = dir_size(FIX) + dir_size(BUNDLED / "tiny-sd-test") + dir_size(BUNDLED / "tiny-taesd-test")
    log(f"total size of tests/fixtures + bundled test models: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
