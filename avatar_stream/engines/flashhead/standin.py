"""A stand-in for upstream's ``FlashHeadPipeline``: TEST-ONLY, no weights, no GPU.

Selected with ``--checkpoint-dir standin``. It has upstream's method names, arguments,
attributes and tensor shapes (Soul-AILab/SoulX-FlashHead,
``flash_head/src/pipeline/flash_head_pipeline.py``), so the engine drives it exactly as it
drives the real pipeline, and its frames are a deterministic function of what it was given,
so tests can read back what the engine fed it:

- ``preprocess_audio`` returns ``[frames, 12, 768]`` features; feature ``[t, 0, 0]`` is the
  frame's index ``t`` in the audio given, ``[t, 0, 1]`` its loudness (RMS), ``[t, 0, 2:34]``
  32 of its samples;
- ``generate`` takes ``[1, 33, 5, 12, 768]`` and returns 33 frames ``[3, 33, 512, 512]`` in
  [-1, 1]: the reference photo, darkened in a band across the lower face in proportion to
  the frame's loudness (so a mouth-motion measure sees speech), with a tag strip along the
  top (16-pixel blocks, black or white) holding the frame's index in the chunk, the window
  index of its centre feature, and a 16-bit digest of its features, the motion state, the
  reference latent and the noise drawn from ``generator``;
- ``vae.encode`` pools frames to latents of upstream's shapes, so ``latent_motion_frames``
  (the cross-chunk state) depends on the frames it was made from.

None of this resembles what the model draws; only the interface is faithful. What it cannot
show, and what is therefore tested on upstream's real code (``tests/test_flashhead_upstream*``,
``FLASHHEAD_SRC``): bf16 weights, the LTX VAE's posterior sampled from the global RNG,
torch.compile's graphs and their guards, colour correction, wav2vec's normalised window,
and upstream's prints and device syncs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

LAYERS = 12  # wav2vec2-base hidden layers (upstream stacks hidden_states[1:])
DIM = 768
TAG_BLOCK = 16  # tag strip: one bit per 16x16 block along the top rows
TAG_BITS = {"chunk_index": (0, 6), "window_index": (6, 10), "digest": (16, 16)}
BAND_ROWS = (256, 448)  # the loudness band: rows of the lower face in a 512 reference crop
BAND_DEPTH = 0.6  # full loudness darkens the band to 40 %
LOUD_RMS = 0.1  # RMS that counts as full loudness


class StandinVAE:
    """Pools a video ``[1, 3, T, H, W]`` to a latent ``[C, 1 + (T - 1) // st, H / ss, W / ss]``,
    upstream's latent shapes for the LTX (Lite) and Wan (Pro) VAEs."""

    def __init__(self, channels: int, temporal: int, spatial: int, device: Any) -> None:
        self.channels, self.temporal, self.spatial = channels, temporal, spatial
        self.device = device
        self.encodes = 0

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.encodes += 1
        x = video[0].float()  # [3, T, H, W]
        picks = x[:, :: self.temporal]  # frames 0, st, 2 st, ... (a causal VAE's latent frames)
        pooled = F.avg_pool2d(picks.permute(1, 0, 2, 3), self.spatial)  # [t, 3, h, w]
        pooled = pooled.permute(1, 0, 2, 3)  # [3, t, h, w]
        scale = torch.arange(self.channels, device=x.device, dtype=x.dtype) / self.channels + 1.0
        return pooled[torch.arange(self.channels) % 3] * scale[:, None, None, None]


def _load_images(path: str) -> dict[str, torch.Tensor]:
    """Upstream's rule: a folder means every ``*.png`` in it, named by file stem."""
    import cv2

    files = sorted(Path(path).glob("*.png")) if os.path.isdir(path) else [Path(path)]
    images = {}
    for f in files:
        bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"cannot read reference image {f}")
        images[f.stem] = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return images


class StandinFlashHeadPipeline:
    """Upstream's ``FlashHeadPipeline`` interface; see the module docstring."""

    def __init__(
        self,
        checkpoint_dir: str,
        model_type: str,
        wav2vec_dir: str | None,
        device: Any = "cpu",
        param_dtype: torch.dtype = torch.float32,
        use_usp: bool = False,
        num_timesteps: int = 1000,
        use_timestep_transform: bool = True,
    ) -> None:
        if model_type not in ("lite", "pro"):
            raise ValueError(f"model_type must be lite or pro, not {model_type!r}")
        self.model_type = model_type
        self.device = torch.device(device)
        self.param_dtype = param_dtype
        lite = model_type == "lite"
        # Lite: LTX VAE (128 channels, 8x32x32 stride); Pro: Wan VAE (16 channels, 4x8x8)
        stride = (8, 32, 32) if lite else (4, 8, 8)
        self.config = SimpleNamespace(vae_stride=stride, out_dim=128 if lite else 16)
        self.vae = StandinVAE(self.config.out_dim, stride[0], stride[1], self.device)
        self.num_timesteps = num_timesteps
        self.generator = torch.Generator(device=self.device)
        self.cond_image_dict: dict[str, Any] = {}
        self.cond_image_tensor_dict: dict[str, torch.Tensor] = {}
        self.ref_img_latent_dict: dict[str, torch.Tensor] = {}
        self.person_name: str | None = None
        self.generate_calls = 0
        self.preprocess_calls = 0
        #: the last generate() call's input and motion state, for tests
        self.last_audio_embedding: torch.Tensor | None = None
        self.last_motion_in: torch.Tensor | None = None
        self.last_video: torch.Tensor | None = None

    # -- upstream's interface ---------------------------------------------------------

    @torch.no_grad()
    def prepare_params(
        self,
        cond_image_path_or_dir: str,
        target_size: tuple[int, int],
        frame_num: int,
        motion_frames_num: int,
        sampling_steps: int,
        seed: int | None = None,
        shift: float = 5.0,
        color_correction_strength: float = 0.0,
        use_face_crop: bool = False,
    ) -> None:
        self.cond_image_dict = _load_images(cond_image_path_or_dir)
        self.frame_num = frame_num
        self.motion_frames_num = motion_frames_num
        self.color_correction_strength = color_correction_strength
        self.target_h, self.target_w = target_size
        self.lat_h = self.target_h // self.config.vae_stride[1]
        self.lat_w = self.target_w // self.config.vae_stride[2]
        self.generator = torch.Generator(device=self.device).manual_seed(seed or 0)
        self.timesteps = [torch.tensor([t], device=self.device) for t in (1000, 750, 500, 250, 0)]
        self.cond_image_tensor_dict, self.ref_img_latent_dict = {}, {}
        for i, (name, image) in enumerate(self.cond_image_dict.items()):
            if tuple(image.shape[:2]) != (self.target_h, self.target_w):
                raise ValueError(f"the stand-in takes {target_size} images, got {image.shape}")
            tensor = image.permute(2, 0, 1)[None, :, None].to(self.device, self.param_dtype)
            tensor = (tensor / 255 - 0.5) * 2  # 1 C 1 H W in [-1, 1]
            self.cond_image_tensor_dict[name] = tensor
            self.ref_img_latent_dict[name] = self.vae.encode(tensor.repeat(1, 1, frame_num, 1, 1))
            if i == 0:
                self.reset_person_name(name)

    @torch.no_grad()
    def reset_person_name(self, person_name: str | None = None) -> None:
        if person_name is not None and person_name in self.cond_image_dict:
            self.person_name = person_name
        assert self.person_name is not None
        self.original_color_reference = self.cond_image_tensor_dict[self.person_name]
        self.ref_img_latent = self.ref_img_latent_dict[self.person_name]
        self.latent_motion_frames = self.ref_img_latent[:, :1].clone()

    @torch.no_grad()
    def preprocess_audio(self, speech_array: np.ndarray, sr: int = 16000, fps: int = 25
                         ) -> torch.Tensor:
        self.preprocess_calls += 1
        per = sr // fps
        n = int(len(speech_array) * fps / sr)
        frames = torch.as_tensor(np.asarray(speech_array[: n * per], np.float32)).reshape(n, per)
        emb = torch.zeros(n, LAYERS, DIM)
        emb[:, 0, 0] = torch.arange(n, dtype=torch.float32)
        emb[:, 0, 1] = frames.square().mean(dim=1).sqrt()
        emb[:, 0, 2:34] = frames[:, :: per // 32][:, :32]
        return emb.to(self.device)

    @torch.no_grad()
    def generate(self, audio_embedding: torch.Tensor) -> torch.Tensor:
        expected = (1, self.frame_num, 2 * 2 + 1, LAYERS, DIM)
        if tuple(audio_embedding.shape) != expected:
            raise ValueError(f"audio embedding {tuple(audio_embedding.shape)}, "
                             f"upstream takes {expected}")
        self.generate_calls += 1
        self.last_audio_embedding = audio_embedding.clone()
        self.last_motion_in = self.latent_motion_frames.clone()
        lat_t = (self.frame_num - 1) // self.config.vae_stride[0] + 1
        noise = torch.randn(self.config.out_dim, lat_t, self.lat_h, self.lat_w,
                            generator=self.generator, device=self.device)
        state = hashlib.blake2b(digest_size=16)
        for t in (self.latent_motion_frames, self.ref_img_latent, noise):
            state.update(t.float().cpu().numpy().tobytes())
        info = audio_embedding[0, :, :, 0, :34].float().cpu().numpy()  # [33, 5, 34]
        video = self.original_color_reference[0].float().repeat(1, self.frame_num, 1, 1)
        top, bottom = BAND_ROWS
        for i in range(self.frame_num):
            loud = min(float(info[i, 2, 1]) / LOUD_RMS, 1.0)
            video[:, i, top:bottom] = (video[:, i, top:bottom] + 1) * (1 - BAND_DEPTH * loud) - 1
            h = state.copy()
            h.update(info[i].tobytes())
            digest = int.from_bytes(h.digest()[:2], "little")
            _draw_tag(video[:, i], {"chunk_index": i, "window_index": int(info[i, 2, 0]),
                                    "digest": digest})
        m = self.motion_frames_num
        self.latent_motion_frames = self.vae.encode(video[None, :, -m:].to(self.param_dtype))
        self.last_video = video
        return video.to(torch.float32)


def _draw_tag(frame: torch.Tensor, values: dict[str, int]) -> None:
    """Write ``values`` as black/white blocks into the top rows of ``frame`` ([3, H, W])."""
    for name, (first, bits) in TAG_BITS.items():
        v = values[name]
        for b in range(bits):
            x = (first + b) * TAG_BLOCK
            frame[:, :TAG_BLOCK, x : x + TAG_BLOCK] = 1.0 if (v >> b) & 1 else -1.0


def read_tag(frame: np.ndarray) -> dict[str, int]:
    """Read the tag strip back from a uint8 frame ``(H, W, 3)`` (RGB, or luma ``(H, W)``)."""
    luma = frame if frame.ndim == 2 else frame.mean(axis=2)
    out = {}
    for name, (first, bits) in TAG_BITS.items():
        v = 0
        for b in range(bits):
            x = (first + b) * TAG_BLOCK
            block = luma[4 : TAG_BLOCK - 4, x + 4 : x + TAG_BLOCK - 4]
            v |= int(block.mean() > 128) << b
        out[name] = v
    return out


def band_level(frame: np.ndarray, reference: np.ndarray) -> float:
    """How much the loudness band is darkened relative to the reference (0 silent .. 1 loud)."""
    top, bottom = BAND_ROWS
    shown = frame[top:bottom].astype(np.float32).mean()
    ref = reference[top:bottom].astype(np.float32).mean()
    return float(np.clip((1 - shown / max(ref, 1.0)) / BAND_DEPTH, 0, 1))
