"""Upstream SoulX-FlashHead's real code, with tiny random weights in upstream's on-disk layout.

The tests find upstream's source through ``FLASHHEAD_SRC`` (``.ci/run`` passes
``../shared/upstream/SoulX-FlashHead`` where it exists); without it they skip, saying why.
The weights are random and small, made here with upstream's own model classes, so that
the engine's ``load_pipeline`` loads them exactly as it loads the real checkpoints:

- ``Model_Lite``: upstream's ``WanModelAudioProject`` (diffusers ``save_pretrained``). Its
  width is forced to 1536 (the audio projection's output feeds ``Linear(dim, dim)``); one
  layer with a 256-wide FFN is ~147M parameters, ~300 MB in bf16.
- ``VAE_LTX``: upstream's ``CausalVideoAutoencoder`` with the real 8x32x32 compression and
  128 latent channels (per-channel log-variance: encoding samples, as the real one does),
  8 base channels: ~0.4M parameters, saved as ``config.json`` + ``autoencoder.pth``.
- ``wav2vec2-base-960h``: transformers' ``Wav2Vec2Model`` with the real 12 layers x 768
  (upstream stacks all 12 hidden states) and the real conv strides (320 samples a feature),
  tiny FFN and conv widths; the real feature extractor settings (zero-mean, unit-variance).

For Pro, only loading is tested: ``Model_Pro`` is the same DiT for the Wan VAE's 16 latent
channels (4x8x8, 2x2 patches), and ``VAE_Wan/Wan2.1_VAE.pth`` is upstream's ``WanVAE_`` with
random weights at its real size, since upstream hard-codes its width (96 channels at full
resolution: 127M parameters, and one Pro step on these 2 cores would take minutes).

Built once per checkout under ``.cache/flashhead-tiny`` (ignored by git) and reused.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIMS = Path(__file__).resolve().parent / "upstream_shims"
CACHE = ROOT / ".cache" / "flashhead-tiny"
VERSION = 1  # bump when what is built changes

LITE_DIT = {
    "dim": 1536, "in_dim": 256, "ffn_dim": 256, "out_dim": 128, "text_dim": 16,
    "freq_dim": 256, "eps": 1e-6, "vae_stride": [8, 32, 32], "patch_size": [1, 1, 1],
    "num_heads": 12, "num_layers": 1, "has_image_input": False,
}
LTX_VAE = {
    "_class_name": "CausalVideoAutoencoder",
    "dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 128,
    "encoder_blocks": [["res_x", 1], ["compress_all", 1], ["compress_all", 1],
                       ["compress_all", 1]],
    "decoder_blocks": [["res_x", 1], ["compress_all", 1], ["compress_all", 1],
                       ["compress_all", 1]],
    "encoder_base_channels": 8, "decoder_base_channels": 8,
    "patch_size": 4, "norm_layer": "pixel_norm", "latent_log_var": "per_channel",
    "use_quant_conv": True, "causal_decoder": False, "timestep_conditioning": False,
}
PRO_DIT = {**LITE_DIT, "in_dim": 32, "out_dim": 16, "vae_stride": [4, 8, 8],
           "patch_size": [1, 2, 2]}
WAN_VAE = {"dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
           "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0}
WAV2VEC = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 64, "conv_dim": [16] * 7, "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 16, "do_stable_layer_norm": False,
    "feat_extract_norm": "group",
}


def upstream_src() -> str:
    """Upstream's checkout from ``FLASHHEAD_SRC``, or skip the calling test saying why."""
    src = os.environ.get("FLASHHEAD_SRC")
    if not src:
        pytest.skip("FLASHHEAD_SRC is not set: the tests on upstream FlashHead's real code "
                    "need its checkout (make test FLASHHEAD_SRC=/path/to/SoulX-FlashHead)")
    if not (Path(src) / "flash_head" / "src" / "pipeline").is_dir():
        pytest.skip(f"FLASHHEAD_SRC={src} holds no flash_head package")
    return src


def use_upstream(src: str) -> None:
    """Make upstream and, behind every real install, the test-only shims importable."""
    for path in (src, str(SHIMS)):
        if path not in sys.path:
            sys.path.append(path)


def tiny_checkpoints(src: str, model: str = "lite") -> tuple[str, str]:
    """``(checkpoint_dir, wav2vec_dir)`` of tiny weights for ``model``, built on first use."""
    use_upstream(src)
    checkpoints, wav2vec = CACHE / "SoulX-FlashHead-1_3B", CACHE / "wav2vec2-base-960h"
    _built("wav2vec", WAV2VEC, lambda: _build_wav2vec(wav2vec))
    if model == "lite":
        _built("lite", [LITE_DIT, LTX_VAE], lambda: (
            _build_dit(checkpoints / "Model_Lite", LITE_DIT),
            _build_ltx_vae(checkpoints / "VAE_LTX")))
    else:
        _built("pro", [PRO_DIT, WAN_VAE], lambda: (
            _build_dit(checkpoints / "Model_Pro", PRO_DIT),
            _build_wan_vae(checkpoints / "VAE_Wan" / "Wan2.1_VAE.pth")))
    return str(checkpoints), str(wav2vec)


def _built(part: str, config: object, build: Callable[[], object]) -> None:
    """Build ``part`` unless the cache holds it, made from this ``config``."""
    stamp = CACHE / f"built-{part}.json"
    want = {"version": VERSION, "config": config}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return
    import torch

    torch.manual_seed(0)
    build()
    stamp.write_text(json.dumps(want))


def _build_dit(folder: Path, config: dict[str, object]) -> None:
    import torch
    from flash_head.src.modules.flash_head_model import WanModelAudioProject

    model = WanModelAudioProject(**config).to(torch.bfloat16)
    model.save_pretrained(str(folder), safe_serialization=True)


def _build_ltx_vae(folder: Path) -> None:
    import torch
    from flash_head.ltx_video.models.autoencoders.causal_video_autoencoder import (
        CausalVideoAutoencoder,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vae = CausalVideoAutoencoder.from_config(dict(LTX_VAE))
    state = {k: v for k, v in vae.state_dict().items() if "per_channel_statistics" not in k}
    torch.save(state, folder / "autoencoder.pth")
    (folder / "config.json").write_text(json.dumps(LTX_VAE, indent=1))
    stats = {"columns": ["mean-of-means", "std-of-means"],
             "data": [[0.0, 1.0] for _ in range(LTX_VAE["latent_channels"])]}
    (folder / "per_channel_statistics.json").write_text(json.dumps(stats))


def _build_wan_vae(path: Path) -> None:
    import torch
    from flash_head.wan.modules.vae import WanVAE_

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(WanVAE_(**WAN_VAE).state_dict(), path)


def _build_wav2vec(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    Wav2Vec2Model(Wav2Vec2Config(**WAV2VEC)).save_pretrained(str(folder))
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0,
                             do_normalize=True, return_attention_mask=False
                             ).save_pretrained(str(folder))
