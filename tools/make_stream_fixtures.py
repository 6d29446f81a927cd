#!/usr/bin/env python3
"""Reference fixtures for the sdstream stream engine (StreamDiffusion algorithm).

This is an explicit, step-by-step re-statement of the algorithm of
StreamDiffusion's ``StreamDiffusion`` class (streamdiffusion 0.1.1,
src/streamdiffusion/pipeline.py) and of its ``SimilarImageFilter``
(image_filter.py), written from reading them; see
tools/streamdiffusion_reference.md for the prose/formula description.

It writes, under tests/fixtures/stream/:
  frames/frame_XXX.png          synthetic 64x64 input frames (smoothly varying)
  <case>.json / <case>.safetensors   one stream run per case
  similar_filter.json           (inputs: frames/*.png)

and, unless --no-verify is given, checks every case against the real
``streamdiffusion`` package (pip install --no-deps streamdiffusion==0.1.1)
run on CPU with the same model, seed and inputs.

Run (from the repository root):
  /root/.cache/sdstream/venv-torch-2.11.0/bin/python tools/make_stream_fixtures.py
Options: --models-dir DIR (default tests/fixtures/models), --out DIR,
         --no-verify, --require-verify (fail if streamdiffusion is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
W = H = 64
NUM_FRAMES = 6
NUM_INFERENCE_STEPS = 50
SEED = 2
PROMPT = "a photo of a cat, best quality"
NEGATIVE_PROMPT = "blurry, low quality"
DTYPE = torch.float32

torch.set_grad_enabled(False)


# ----------------------------------------------------------------------------
# input frames
# ----------------------------------------------------------------------------
def make_frames(out_dir: Path) -> list[str]:
    """Smoothly varying synthetic RGB frames: gradient + moving blob + waves."""
    fdir = out_dir / "frames"
    fdir.mkdir(parents=True, exist_ok=True)
    yy, xx = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
    names = []
    for i in range(NUM_FRAMES):
        ph = i / 32.0  # small change per frame, like consecutive video frames
        cx, cy = 26 + 1.5 * i, 30 + 3 * np.sin(2 * np.pi * ph)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 9.0**2))
        r = 0.25 + 0.5 * xx / (W - 1) + 0.35 * blob
        g = 0.5 + 0.3 * np.sin(2 * np.pi * (yy / 32.0 + ph)) * (1 - blob)
        b = 0.7 - 0.4 * yy / (H - 1) + 0.1 * np.cos(2 * np.pi * (xx / 24.0 - ph))
        img = np.clip(np.stack([r, g, b], -1), 0, 1)
        arr = np.round(img * 255).astype(np.uint8)
        name = f"frames/frame_{i:03d}.png"
        Image.fromarray(arr, "RGB").save(out_dir / name, optimize=True)
        names.append(name)
    return names


def load_frame(path: Path) -> torch.Tensor:
    """PNG -> (1,3,H,W) float32 in [-1,1] (VaeImageProcessor.preprocess for a
    PIL image already at the target size: /255, then 2x-1)."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr[None]).permute(0, 3, 1, 2)  # NHWC memory like diffusers (see notes)
    return 2.0 * t - 1.0


# ----------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------
def is_sdxl(model_dir: Path) -> bool:
    return "text_encoder_2" in json.loads((model_dir / "model_index.json").read_text())


def load_models(model_dir: Path, vae_dir: Path | None):
    from diffusers import AutoencoderTiny, StableDiffusionPipeline, StableDiffusionXLPipeline

    if is_sdxl(model_dir):
        pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir), torch_dtype=DTYPE,
                                                         add_watermarker=False).to("cpu")
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(model_dir), torch_dtype=DTYPE, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        ).to("cpu")
    vae = pipe.vae
    if vae_dir is not None:
        vae = AutoencoderTiny.from_pretrained(str(vae_dir), torch_dtype=DTYPE).to("cpu").eval()
    return pipe, vae


def encode_prompt_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def text_embeds(pipe, ids: torch.Tensor) -> torch.Tensor:
    """CLIP last hidden state (what StableDiffusionPipeline.encode_prompt
    returns with clip_skip=None, no LoRA, no attention mask unless the text
    encoder config asks for one)."""
    te = pipe.text_encoder
    mask = None
    if getattr(te.config, "use_attention_mask", False):
        raise NotImplementedError("text encoder with use_attention_mask")
    return te(ids, attention_mask=mask)[0].to(DTYPE)


# ----------------------------------------------------------------------------
# LCM scheduler quantities (diffusers LCMScheduler, from the model's scheduler config)
# ----------------------------------------------------------------------------
def lcm_alphas_cumprod(cfg: dict) -> torch.Tensor:
    n = cfg.get("num_train_timesteps", 1000)
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif cfg.get("beta_schedule", "scaled_linear") == "scaled_linear":
        betas = torch.linspace(cfg.get("beta_start", 0.00085) ** 0.5, cfg.get("beta_end", 0.012) ** 0.5, n,
                               dtype=torch.float32) ** 2
    elif cfg["beta_schedule"] == "linear":
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float32)
    else:
        raise NotImplementedError(cfg["beta_schedule"])
    if cfg.get("rescale_betas_zero_snr", False):
        raise NotImplementedError("rescale_betas_zero_snr")
    return torch.cumprod(1.0 - betas, dim=0)


def lcm_timesteps(cfg: dict, num_inference_steps: int) -> list[int]:
    n_train = cfg.get("num_train_timesteps", 1000)
    orig = cfg.get("original_inference_steps", 50)
    k = n_train // orig
    origin = [(i + 1) * k - 1 for i in range(orig)][::-1]  # 999, 979, ..., 19 (descending)
    skipping = len(origin) // num_inference_steps
    assert skipping >= 1 and num_inference_steps <= orig
    idx = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return [origin[i] for i in idx]


def boundary_scalings(t: int, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    # computed as in diffusers: a long 0-d tensor times a python float -> float32
    st = torch.tensor(t, dtype=torch.long) * timestep_scaling
    sigma_data = 0.5
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


# ----------------------------------------------------------------------------
# the stream (explicit re-statement of StreamDiffusion, frame_buffer_size = 1)
# ----------------------------------------------------------------------------
class RefStream:
    def __init__(self, pipe, vae, t_index_list, cfg_type, mode, do_add_noise=True, use_denoising_batch=True):
        self.pipe, self.unet, self.vae = pipe, pipe.unet, vae
        self.t_list = list(t_index_list)
        self.n = len(self.t_list)
        self.cfg_type = cfg_type
        self.mode = mode
        self.do_add_noise = do_add_noise
        self.batch = use_denoising_batch
        self.vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.lh, self.lw = H // self.vae_scale, W // self.vae_scale
        self.batch_size = self.n if self.batch else 1

    def prepare(self, prompt, negative_prompt, guidance_scale, delta, seed):
        n = self.n
        self.gen = torch.Generator("cpu").manual_seed(seed)
        self.buffer = torch.zeros((n - 1, 4, self.lh, self.lw), dtype=DTYPE) if n > 1 else None
        self.guidance = 1.0 if self.cfg_type == "none" else float(guidance_scale)
        self.delta = float(delta)
        self.cfg_active = self.guidance > 1.0

        tok = self.pipe.tokenizer
        self.prompt_ids = encode_prompt_ids(tok, prompt)
        self.neg_ids = encode_prompt_ids(tok, negative_prompt)
        uses_uncond = self.cfg_active and self.cfg_type in ("full", "initialize")
        self.sdxl = hasattr(self.pipe, "text_encoder_2")
        if self.sdxl:
            # SDXL (not in StreamDiffusion 0.1.1; the natural extension its SDXL forks make): encode_prompt
            # with the negative prompt as a string (so it is encoded, never zeroed), and per UNet row the
            # pooled text embedding of that row's prompt plus the time ids (H, W, 0, 0, H, W).
            self.cond, neg, pooled, neg_pooled = self.pipe.encode_prompt(
                prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=True)
            self.uncond = neg if uses_uncond else None
        else:
            self.cond = text_embeds(self.pipe, self.prompt_ids)  # (1,77,D)
            self.uncond = text_embeds(self.pipe, self.neg_ids) if uses_uncond else None
        emb = self.cond.repeat(self.batch_size, 1, 1)
        if self.cfg_active and self.cfg_type == "full":
            emb = torch.cat([self.uncond.repeat(self.batch_size, 1, 1), emb], 0)
        elif self.cfg_active and self.cfg_type == "initialize":
            emb = torch.cat([self.uncond, emb], 0)
        self.embeds = emb
        self.added = None
        if self.sdxl:
            pool = pooled.repeat(self.batch_size, 1)
            if self.cfg_active and self.cfg_type == "full":
                pool = torch.cat([neg_pooled.repeat(self.batch_size, 1), pool], 0)
            elif self.cfg_active and self.cfg_type == "initialize":
                pool = torch.cat([neg_pooled, pool], 0)
            ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=DTYPE).repeat(pool.shape[0], 1)
            self.added = {"text_embeds": pool, "time_ids": ids}
            self.pooled = pooled

        scfg = dict(self.pipe.scheduler.config)
        self.alphas_cumprod = lcm_alphas_cumprod(scfg)
        self.timesteps = lcm_timesteps(scfg, NUM_INFERENCE_STEPS)
        self.sub_t = torch.tensor([self.timesteps[i] for i in self.t_list], dtype=torch.long)

        # random draw #1: init noise (batch_size,4,h,w)
        self.init_noise = torch.randn((self.batch_size, 4, self.lh, self.lw), generator=self.gen).to(DTYPE)
        self.stock = torch.zeros_like(self.init_noise)

        ts = scfg.get("timestep_scaling", 10.0)
        sc = [boundary_scalings(int(t), ts) for t in self.sub_t]
        self.c_skip = torch.stack([a for a, _ in sc]).view(n, 1, 1, 1).to(DTYPE)
        self.c_out = torch.stack([b for _, b in sc]).view(n, 1, 1, 1).to(DTYPE)
        ac = torch.stack([self.alphas_cumprod[int(t)] for t in self.sub_t])
        self.alpha = ac.sqrt().view(n, 1, 1, 1).to(DTYPE)
        self.beta = (1 - ac).sqrt().view(n, 1, 1, 1).to(DTYPE)

    # --- pieces ---
    def denoise(self, eps, x, alpha, beta, c_out, c_skip):
        f = (x - beta * eps) / alpha
        return c_out * f + c_skip * x

    def encode(self, img):
        rec = {}
        from diffusers import AutoencoderTiny

        if isinstance(self.vae, AutoencoderTiny):  # deterministic encoder, no draw
            lat = self.vae.encode(img.to(DTYPE)).latents
        else:
            dist = self.vae.encode(img.to(DTYPE)).latent_dist
            eps = torch.randn(dist.mean.shape, generator=self.gen, dtype=DTYPE)  # random draw per frame
            rec["vae_noise"] = eps
            lat = dist.mean + dist.std * eps
        lat = lat * self.vae.config.scaling_factor
        rec["encoded_latent"] = lat
        return lat, rec

    def decode(self, lat):
        return self.vae.decode(lat / self.vae.config.scaling_factor, return_dict=False)[0]

    def unet_guided(self, x, t, slot=None, control=None):
        """One UNet call + guidance; updates stock_noise for initialize.
        `slot` is None for the denoising batch (x has n rows) or the slot
        index for the non-batch path (x has 1 row). `control` (sdstream's
        ControlNet extension, not in StreamDiffusion): (per-slot control
        images (n,3,H,W) in [0,1], per-slot scales (n,)); the ControlNet runs
        on the same items as the UNet, each slot with its own frame's image."""
        g, cfg = self.guidance, self.cfg_type
        if self.cfg_active and cfg == "initialize":
            xin, tin = torch.cat([x[0:1], x], 0), torch.cat([t[0:1], t], 0)
            dup = lambda a: torch.cat([a[0:1], a], 0)  # noqa: E731
        elif self.cfg_active and cfg == "full":
            xin, tin = torch.cat([x, x], 0), torch.cat([t, t], 0)
            dup = lambda a: torch.cat([a, a], 0)  # noqa: E731
        else:
            xin, tin = x, t
            dup = lambda a: a  # noqa: E731
        extra = {}
        if control is not None:
            cimg, cscale = dup(control[0]), dup(control[1]).view(-1, 1, 1, 1)
            down, mid = self.controlnet(xin, tin, encoder_hidden_states=self.embeds, controlnet_cond=cimg,
                                        conditioning_scale=1.0, added_cond_kwargs=self.added, return_dict=False)
            extra = dict(down_block_additional_residuals=[d * cscale for d in down],
                         mid_block_additional_residual=mid * cscale)
        out = self.unet(xin, tin, encoder_hidden_states=self.embeds, added_cond_kwargs=self.added,
                        return_dict=False, **extra)[0]
        self.last_unet_out = out
        if self.cfg_active and cfg == "initialize":
            eps_c = out[1:]
            self.stock = torch.cat([out[0:1], self.stock[1:]], 0)
        elif self.cfg_active and cfg == "full":
            eps_u, eps_c = out.chunk(2)
        else:
            eps_c = out
        if self.cfg_active and cfg in ("self", "initialize"):
            eps_u = self.stock * self.delta
        if self.cfg_active and cfg != "none":
            eps = eps_u + g * (eps_c - eps_u)
        else:
            eps = eps_c
        return eps

    def step(self, image: torch.Tensor | None, control_image=None, controlnet_scale=1.0):
        rec = {}
        n = self.n
        control = None
        if getattr(self, "controlnet", None) is not None:
            # per-slot control images, shifted with the latent buffer; a frame without one gets scale 0
            first = control_image if control_image is not None else torch.zeros((1, 3, H, W), dtype=DTYPE)
            self.ctrl = torch.cat([first, self.ctrl[:-1]], 0)
            self.ctrl_active = torch.cat([torch.tensor([1.0 if control_image is not None else 0.0]),
                                          self.ctrl_active[:-1]], 0)
            control = (self.ctrl, (self.ctrl_active * controlnet_scale).to(DTYPE))
        if self.mode == "img2img":
            lat, r = self.encode(image)
            rec.update(r)
            x_in = self.alpha[0] * lat + self.beta[0] * self.init_noise[0]
        else:
            # txt2img: standard normal (1,4,h,w) used directly as x_t of slot 0
            x_in = torch.randn((1, 4, self.lh, self.lw), generator=self.gen).to(DTYPE)
        rec["x_t_in"] = x_in

        if self.batch:
            x = torch.cat([x_in, self.buffer], 0) if n > 1 else x_in
            if n > 1:
                self.stock = torch.cat([self.init_noise[0:1], self.stock[:-1]], 0)
            eps = self.unet_guided(x, self.sub_t, control=control)
            x0 = self.denoise(eps, x, self.alpha, self.beta, self.c_out, self.c_skip)
            if self.cfg_type in ("self", "initialize"):
                scaled = self.beta * self.stock
                dx = self.denoise(eps, scaled, self.alpha, self.beta, self.c_out, self.c_skip)
                one = torch.ones_like(self.alpha[0:1])
                dx = dx * torch.cat([self.alpha[1:], one], 0) / torch.cat([self.beta[1:], one], 0)
                self.stock = torch.cat([self.init_noise[1:], self.init_noise[0:1]], 0) + dx
            if n > 1:
                out = x0[-1:]
                if self.do_add_noise:
                    self.buffer = self.alpha[1:] * x0[:-1] + self.beta[1:] * self.init_noise[1:]
                else:
                    self.buffer = self.alpha[1:] * x0[:-1]
            else:
                out = x0
            rec["unet_out"] = self.last_unet_out
            rec["model_pred"] = eps
            rec["x0_batch"] = x0
            rec["stock_noise"] = self.stock.clone()
            if self.buffer is not None:
                rec["buffer"] = self.buffer.clone()
        else:
            # non-batch path: one UNet call per slot; init_noise is overwritten
            # with this frame's input; re-noising uses fresh N(0,1) draws
            self.init_noise = x_in
            x = x_in
            renoise = []
            for i in range(n):
                t = self.sub_t[i].view(1)
                eps = self.unet_guided(x, t, i)
                x0 = self.denoise(eps, x, self.alpha[i], self.beta[i], self.c_out[i], self.c_skip[i])
                if i < n - 1:
                    if self.do_add_noise:
                        z = torch.randn(x0.shape, generator=self.gen, dtype=DTYPE)
                        renoise.append(z)
                        x = self.alpha[i + 1] * x0 + self.beta[i + 1] * z
                    else:
                        x = self.alpha[i + 1] * x0
            out = x0
            if renoise:
                rec["renoise"] = torch.cat(renoise, 0)
        rec["latent_out"] = out
        rec["image_out"] = self.decode(out)
        return rec


# ----------------------------------------------------------------------------
# verification against the real streamdiffusion package
# ----------------------------------------------------------------------------
def _patch_cuda_timing():
    class _Ev:
        def __init__(self, *a, **k):
            pass

        def record(self, *a, **k):
            pass

        def elapsed_time(self, other):
            return 0.0

    torch.cuda.Event = _Ev
    torch.cuda.synchronize = lambda *a, **k: None


def run_real(pipe, vae, case, frame_paths, out_dir: Path):
    from streamdiffusion import StreamDiffusion

    _patch_cuda_timing()
    sd = StreamDiffusion(pipe, case["t_index_list"], torch_dtype=DTYPE, width=W, height=H,
                         do_add_noise=case["do_add_noise"], use_denoising_batch=case["use_denoising_batch"],
                         frame_buffer_size=1, cfg_type=case["cfg_type"])
    sd.vae = vae
    captured = []
    orig_decode = sd.decode_image
    sd.decode_image = lambda lat: (captured.append(lat.clone()), orig_decode(lat))[1]
    # like utils/wrapper.py: the generator is torch's global default generator
    # (torch.manual_seed(seed) returns it), so txt2img's torch.randn and the
    # non-batch randn_like draw from the same stream as init_noise.
    sd.prepare(case["prompt"], case["negative_prompt"], num_inference_steps=NUM_INFERENCE_STEPS,
               guidance_scale=case["guidance_scale"], delta=case["delta"],
               generator=torch.manual_seed(case["seed"]), seed=case["seed"])
    res = {"prepared": {
        "init_noise": sd.init_noise.clone(), "alpha_prod_t_sqrt": sd.alpha_prod_t_sqrt.flatten().clone(),
        "beta_prod_t_sqrt": sd.beta_prod_t_sqrt.flatten().clone(), "c_skip": sd.c_skip.flatten().clone(),
        "c_out": sd.c_out.flatten().clone(), "sub_timesteps": sd.sub_timesteps_tensor.clone(),
        "unet_prompt_embeds": sd.prompt_embeds.clone()}, "frames": []}
    for p in frame_paths:
        if case["mode"] == "img2img":
            img = sd(Image.open(out_dir / p).convert("RGB"))
        else:
            img = sd.txt2img(1)
        fr = {"image_out": img.clone(), "latent_out": captured[-1]}
        if case["use_denoising_batch"]:
            fr["stock_noise"] = sd.stock_noise.clone()
            if sd.x_t_latent_buffer is not None:
                fr["buffer"] = sd.x_t_latent_buffer.clone()
        res["frames"].append(fr)
    return res


def compare(name, ref, real, tol):
    worst = 0.0
    for k, v in real["prepared"].items():
        a = ref[k]
        assert a.shape == v.shape, (name, k, a.shape, v.shape)
        d = (a.double() - v.double()).abs().max().item()
        worst = max(worst, d)
        assert d <= tol, f"{name}: prepared {k} differs by {d}"
    for i, fr in enumerate(real["frames"]):
        for k, v in fr.items():
            a = ref[f"{k}_{i}"]
            assert a.shape == v.shape, (name, k, i, a.shape, v.shape)
            d = (a.double() - v.double()).abs().max().item()
            worst = max(worst, d)
            assert d <= tol, f"{name}: frame {i} {k} differs by {d}"
    return worst


# ----------------------------------------------------------------------------
# similarity filter
# ----------------------------------------------------------------------------
def ref_similar_filter(inputs, threshold, max_skip_frame, samples):
    """Explicit SimilarImageFilter.  `samples` are the random.uniform(0,1)
    values, one consumed per call except the first."""
    prev, skip_count, out = None, 0, []
    si = 0
    for x in inputs:
        if prev is None:
            prev = x.clone()
            out.append(dict(cos_sim=None, skip_prob=None, sample=None, skipped=False, skip_count=skip_count))
            continue
        a, b = prev.reshape(-1), x.reshape(-1)
        # float32, as torch.nn.CosineSimilarity(dim=0, eps=1e-6):
        # sum( a/max(|a|,eps) * b/max(|b|,eps) )
        cos = ((a / a.norm().clamp_min(1e-6)) * (b / b.norm().clamp_min(1e-6))).sum().item()
        sample = samples[si]
        si += 1
        skip_prob = 0.0 if threshold >= 1 else max(0.0, 1 - (1 - cos) / (1 - threshold))
        if skip_prob < sample:
            prev, skipped = x.clone(), False
        elif skip_count > max_skip_frame:
            skip_count, prev, skipped = 0, x.clone(), False
        else:
            skip_count, skipped = skip_count + 1, True
        out.append(dict(cos_sim=cos, skip_prob=skip_prob, sample=sample, skipped=skipped, skip_count=skip_count))
    return out


def make_similar_filter_fixture(out_dir: Path, frame_names, verify: bool):
    # extra inputs, also committed as PNG so every input goes through the same
    # PNG -> [-1,1] preprocessing: a lightly noised frame 0 and its inverse
    f0 = np.asarray(Image.open(out_dir / frame_names[0]).convert("RGB"))
    rng = np.random.default_rng(7)
    noisy = np.clip(f0.astype(np.int32) + rng.integers(-4, 5, size=f0.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy, "RGB").save(out_dir / "frames/filter_noisy_000.png", optimize=True)
    Image.fromarray(255 - f0, "RGB").save(out_dir / "frames/filter_inverted_000.png", optimize=True)
    paths = {f"frame_{i}": f for i, f in enumerate(frame_names)}
    paths["frame_0_noisy"] = "frames/filter_noisy_000.png"
    paths["inverted_0"] = "frames/filter_inverted_000.png"
    tensors = {k: load_frame(out_dir / p) for k, p in paths.items()}
    seqs = {
        # identical frames: cos = 1 -> skip_prob = 1 (> any sample): skip until
        # skip_count > max_skip_frame forces a frame through
        "identical": ["frame_0"] * 8,
        # very different frames (cos well below threshold) -> skip_prob = 0, never skip
        "dissimilar": ["frame_0", "inverted_0", "frame_0", "inverted_0", "frame_0"],
        # smooth sequence / light noise: 0 < skip_prob < 1, decided by the recorded samples
        "smooth": ["frame_0", "frame_1", "frame_1", "frame_2", "frame_3", "frame_3", "frame_4", "frame_5",
                   "frame_0_noisy", "frame_0"],
    }
    scenarios = []
    for sname, seq, thr, msf, seed in [
        ("identical_msf2", seqs["identical"], 0.98, 2, 0),
        ("identical_msf0", seqs["identical"], 0.98, 0, 0),
        ("identical_threshold1", seqs["identical"], 1.0, 2, 0),
        ("dissimilar", seqs["dissimilar"], 0.98, 10, 0),
        ("smooth_t0.98", seqs["smooth"], 0.98, 1, 3),
        ("smooth_t0.995", seqs["smooth"], 0.995, 10, 11),
    ]:
        random.seed(seed)
        samples = [random.uniform(0, 1) for _ in range(len(seq) - 1)]
        steps = ref_similar_filter([tensors[k] for k in seq], thr, msf, samples)
        for s in steps:  # keep decisions robust to float differences
            if s["skip_prob"] is not None and 0 < s["skip_prob"] < 1:
                assert abs(s["skip_prob"] - s["sample"]) > 1e-3, (sname, s)
        if verify:
            from streamdiffusion.image_filter import SimilarImageFilter

            f = SimilarImageFilter(thr, msf)
            random.seed(seed)
            for k, s in zip(seq, steps):
                r = f(tensors[k])
                assert (r is None) == s["skipped"], (sname, s)
                assert f.skip_count == s["skip_count"], (sname, s, f.skip_count)
        scenarios.append(dict(name=sname, threshold=thr, max_skip_frame=msf, python_random_seed=seed,
                              inputs=[paths[k] for k in seq], samples=samples, expected=steps))
    doc = {
        "description": "StreamDiffusion SimilarImageFilter. Inputs are PNG paths relative to this folder, "
                       "preprocessed like stream inputs to (1,3,64,64) float32 in [-1,1] (x/255*2-1). 'samples' are the random.uniform(0,1) values "
                       "consumed by calls 2..N (the first call draws nothing). expected[i] is the filter state after "
                       "call i: skipped = filter returned None; skip_count after the call; cos_sim/skip_prob "
                       "(null on the first call).",
        "eps": 1e-6,
        "scenarios": scenarios,
    }
    (out_dir / "similar_filter.json").write_text(json.dumps(doc, indent=1) + "\n")


# ----------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------
def case_list():
    cases = []
    t_lists = {1: [32], 2: [32, 45], 3: [20, 32, 45]}
    gs = {"none": 1.4, "full": 1.4, "self": 1.2, "initialize": 1.4}
    for n, tl in t_lists.items():
        for cfg in ("none", "full", "self", "initialize"):
            cases.append(dict(name=f"sd1_img2img_n{n}_{cfg}", model="sd1-tiny", vae=None, t_index_list=tl,
                              cfg_type=cfg, guidance_scale=gs[cfg], delta=0.8))
    cases.append(dict(name="sd1_img2img_n3_self_no_add_noise", model="sd1-tiny", vae=None, t_index_list=[20, 32, 45],
                      cfg_type="self", guidance_scale=1.2, delta=0.8, do_add_noise=False))
    cases.append(dict(name="sd2_img2img_n2_self", model="sd2-tiny", vae=None, t_index_list=[32, 45],
                      cfg_type="self", guidance_scale=1.2, delta=0.8))
    cases.append(dict(name="sd1_taesd_img2img_n2_initialize", model="sd1-tiny", vae="taesd-tiny",
                      t_index_list=[32, 45], cfg_type="initialize", guidance_scale=1.4, delta=0.8))
    # LCM-distilled UNet (time_cond_proj_dim set): StreamDiffusion never passes
    # timestep_cond, so the guidance-embedding branch is simply skipped
    cases.append(dict(name="lcm_img2img_n2_self", model="lcm-tiny", vae=None, t_index_list=[32, 45],
                      cfg_type="self", guidance_scale=1.2, delta=0.8))
    cases.append(dict(name="sd1_txt2img_n4_none", model="sd1-tiny", vae=None, t_index_list=[0, 16, 32, 45],
                      cfg_type="none", guidance_scale=1.0, delta=1.0, mode="txt2img"))
    # SDXL: no StreamDiffusion release runs it, so these are checked against this reference alone.
    cases.append(dict(name="sdxl_img2img_n2_full", model="sdxl-tiny", vae=None, t_index_list=[32, 45],
                      cfg_type="full", guidance_scale=1.4, delta=0.8))
    cases.append(dict(name="sdxl_img2img_n2_initialize", model="sdxl-tiny", vae=None, t_index_list=[32, 45],
                      cfg_type="initialize", guidance_scale=1.4, delta=0.8))
    cases.append(dict(name="sd1_txt2img_n3_none_nobatch", model="sd1-tiny", vae=None, t_index_list=[0, 16, 32],
                      cfg_type="none", guidance_scale=1.0, delta=1.0, mode="txt2img", use_denoising_batch=False))
    for c in cases:
        c.setdefault("mode", "img2img")
        c.setdefault("do_add_noise", True)
        c.setdefault("use_denoising_batch", True)
        c.update(seed=SEED, prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, width=W, height=H)
    return cases


def run_case(case, models_dir: Path, out_dir: Path, frame_names, verify: bool, cache: dict):
    key = (case["model"], case["vae"])
    if key not in cache:
        cache[key] = load_models(models_dir / case["model"], models_dir / case["vae"] if case["vae"] else None)
    pipe, vae = cache[key]
    n = len(case["t_index_list"])
    rs = RefStream(pipe, vae, case["t_index_list"], case["cfg_type"], case["mode"],
                   case["do_add_noise"], case["use_denoising_batch"])
    rs.prepare(case["prompt"], case["negative_prompt"], case["guidance_scale"], case["delta"], case["seed"])
    t = {
        "init_noise": rs.init_noise, "alpha_prod_t_sqrt": rs.alpha.flatten(), "beta_prod_t_sqrt": rs.beta.flatten(),
        "c_skip": rs.c_skip.flatten(), "c_out": rs.c_out.flatten(), "sub_timesteps": rs.sub_t,
        "alphas_cumprod": rs.alphas_cumprod, "timesteps": torch.tensor(rs.timesteps, dtype=torch.long),
        "prompt_ids": rs.prompt_ids[0].to(torch.long), "prompt_embeds": rs.cond,
    }
    if rs.uncond is not None:
        t["negative_prompt_ids"] = rs.neg_ids[0].to(torch.long)
        t["negative_prompt_embeds"] = rs.uncond
    full_embeds = rs.embeds
    frame_recs = []
    for i, fname in enumerate(frame_names):
        img = load_frame(out_dir / fname) if case["mode"] == "img2img" else None
        rec = rs.step(img)
        frame_recs.append(rec)
        for k, v in rec.items():
            t[f"{k}_{i}"] = v
    # keep the folder small: the decoded image only for the last frame
    # (every frame's image is still verified against streamdiffusion above)
    warm = n - 1 if case["use_denoising_batch"] else 0
    img_frames = [len(frame_names) - 1]
    verify_result = None
    if rs.sdxl:
        t["pooled_prompt_embeds"] = rs.pooled
    if verify and not rs.sdxl:
        real = run_real(pipe, vae, case, frame_names, out_dir)
        chk = dict(t)
        chk["unet_prompt_embeds"] = full_embeds
        verify_result = compare(case["name"], chk, real, tol=1e-6)
    for i in range(len(frame_names)):
        if i not in img_frames:
            del t[f"image_out_{i}"]
    save_file({k: v.detach().clone().contiguous() for k, v in t.items()}, str(out_dir / f"{case['name']}.safetensors"))
    meta = {k: case[k] for k in ("model", "vae", "seed", "t_index_list", "cfg_type", "guidance_scale", "delta",
                                 "prompt", "negative_prompt", "width", "height", "mode", "do_add_noise",
                                 "use_denoising_batch")}
    meta.update(
        model=f"tests/fixtures/models/{case['model']}",
        vae=f"tests/fixtures/models/{case['vae']}" if case["vae"] else None,
        frame_buffer_size=1,
        num_inference_steps=NUM_INFERENCE_STEPS,
        effective_guidance_scale=rs.guidance,
        vae_scaling_factor=float(vae.config.scaling_factor),
        frames=frame_names if case["mode"] == "img2img" else [None] * len(frame_names),
        num_frames=len(frame_names),
        warmup_frames=warm,
        image_out_frames=img_frames,
        image_out_range="raw VAE decoder output as StreamDiffusion.__call__ returns it: nominally [-1,1], not clamped",
        unet_batch=int(full_embeds.shape[0]),
        per_frame_tensors=sorted(set(frame_recs[0]) | set(frame_recs[-1])),
        verified_against_streamdiffusion=verify_result is not None,
        max_abs_diff_vs_streamdiffusion=verify_result,
    )
    (out_dir / f"{case['name']}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return verify_result


# ----------------------------------------------------------------------------
# ControlNet streams (sdstream's extension; StreamDiffusion 0.1.1 has no ControlNet)
# ----------------------------------------------------------------------------
def make_control_frames(out_dir: Path) -> list[str | None]:
    """A client-sent control image sequence: a white rectangle outline moving over black, none for frame 0
    (the client sends its first control image with frame 1)."""
    names = [None]
    for i in range(1, NUM_FRAMES):
        img = Image.new("RGB", (W, H), (0, 0, 0))
        from PIL import ImageDraw
        d = ImageDraw.Draw(img)
        d.rectangle([10 + 3 * i, 12, 40 + 3 * i, 50 - i], outline=(255, 255, 255), width=2)
        d.line([(0, 58 - 2 * i), (W - 1, 30 + i)], fill=(255, 255, 255), width=1)
        name = f"controlnet/control_{i:03d}.png"
        (out_dir / "controlnet").mkdir(parents=True, exist_ok=True)
        img.save(out_dir / name, optimize=True)
        names.append(name)
    return names


def controlnet_cases():
    scales = [1.0, 1.0, 1.0, 0.6, 0.6, 1.5]  # controlnet_scale changes live between frames
    cases = [
        dict(name="sd1_img2img_n2_self_controlnet_image", t_index_list=[32, 45], cfg_type="self",
             guidance_scale=1.2, delta=0.8),
        dict(name="sd1_img2img_n3_full_controlnet_image", t_index_list=[20, 32, 45], cfg_type="full",
             guidance_scale=1.4, delta=0.8),
        # SDXL with an SDXL ControlNet: the ControlNet gets each row's pooled text and time ids too.
        dict(name="sdxl_img2img_n2_full_controlnet_image", t_index_list=[32, 45], cfg_type="full",
             guidance_scale=1.4, delta=0.8, model="sdxl-tiny", controlnet="controlnet-sdxl-tiny"),
    ]
    for c in cases:
        c.setdefault("model", "sd1-tiny")
        c.setdefault("controlnet", "controlnet-tiny")
        c.update(vae=None, control="image", mode="img2img",
                 do_add_noise=True, use_denoising_batch=True, seed=SEED, prompt=PROMPT,
                 negative_prompt=NEGATIVE_PROMPT, width=W, height=H, controlnet_scales=scales)
    return cases


def run_controlnet_case(case, models_dir: Path, out_dir: Path, frame_names, control_names, cache: dict):
    from diffusers import ControlNetModel

    key = (case["model"], case["vae"])
    if key not in cache:
        cache[key] = load_models(models_dir / case["model"], None)
    pipe, vae = cache[key]
    n = len(case["t_index_list"])
    rs = RefStream(pipe, vae, case["t_index_list"], case["cfg_type"], case["mode"])
    rs.controlnet = ControlNetModel.from_pretrained(str(models_dir / case["controlnet"]), torch_dtype=DTYPE).eval()
    rs.prepare(case["prompt"], case["negative_prompt"], case["guidance_scale"], case["delta"], case["seed"])
    rs.ctrl = torch.zeros((n, 3, H, W), dtype=DTYPE)
    rs.ctrl_active = torch.zeros(n)
    t = {}
    for i, fname in enumerate(frame_names):
        img = load_frame(out_dir / fname)
        cimg = None
        if control_names[i] is not None:
            arr = np.asarray(Image.open(out_dir / control_names[i]).convert("RGB"), dtype=np.float32) / 255.0
            cimg = torch.from_numpy(arr[None]).permute(0, 3, 1, 2).contiguous()
        rec = rs.step(img, cimg, case["controlnet_scales"][i])
        t[f"latent_out_{i}"] = rec["latent_out"]
    t[f"image_out_{len(frame_names) - 1}"] = rec["image_out"]
    save_file({k: v.detach().clone().contiguous() for k, v in t.items()},
              str(out_dir / "controlnet" / f"{case['name']}.safetensors"))
    meta = {k: case[k] for k in ("seed", "t_index_list", "cfg_type", "guidance_scale", "delta", "prompt",
                                 "negative_prompt", "width", "height", "mode", "do_add_noise",
                                 "use_denoising_batch", "control", "controlnet_scales")}
    meta.update(model=f"tests/fixtures/models/{case['model']}", vae=None,
                controlnet=f"tests/fixtures/models/{case['controlnet']}", frames=frame_names,
                control_images=control_names, warmup_frames=n - 1, num_frames=len(frame_names))
    (out_dir / "controlnet" / f"{case['name']}.json").write_text(json.dumps(meta, indent=1) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", default=str(REPO / "tests/fixtures/models"))
    ap.add_argument("--out", default=str(REPO / "tests/fixtures/stream"))
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--require-verify", action="store_true")
    ap.add_argument("--only", default=None, help="substring filter on case names")
    args = ap.parse_args()
    out_dir, models_dir = Path(args.out), Path(args.models_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    verify = not args.no_verify
    if verify:
        try:
            import streamdiffusion  # noqa: F401
        except Exception as e:  # pragma: no cover
            if args.require_verify:
                raise
            print(f"streamdiffusion not importable ({e}); skipping verification", file=sys.stderr)
            verify = False

    frame_names = make_frames(out_dir)
    make_similar_filter_fixture(out_dir, frame_names, verify)
    cache = {}
    for case in case_list():
        if args.only and args.only not in case["name"]:
            continue
        d = run_case(case, models_dir, out_dir, frame_names, verify, cache)
        print(f"{case['name']}: " + (f"matches streamdiffusion (max abs diff {d:.3g})" if d is not None else "written"))
    control_names = make_control_frames(out_dir)
    for case in controlnet_cases():
        if args.only and args.only not in case["name"]:
            continue
        run_controlnet_case(case, models_dir, out_dir, frame_names, control_names, cache)
        print(f"{case['name']}: written (ControlNet: sdstream's own reference, no streamdiffusion to verify)")
    total = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    print(f"total size of {out_dir}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
