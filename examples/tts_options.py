"""The TTS options the framework examples share: espeak-ng on this machine, or any
OpenAI-compatible /v1/audio/speech endpoint, as avatar-stream's own TTS backends."""

from __future__ import annotations

import argparse
import os

from avatar_stream.audio.tts import TTS, EspeakTTS, OpenAITTS


def add_tts_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tts-url", help="an OpenAI-compatible /v1/audio/speech endpoint")
    parser.add_argument("--tts-model", default="tts-1")
    parser.add_argument("--tts-voice", default="alloy")
    parser.add_argument("--tts-api-key", default=os.environ.get("TTS_API_KEY"))
    parser.add_argument("--espeak-voice", default="en-us",
                        help="voice when no --tts-url is given")


def tts_backend(args: argparse.Namespace) -> TTS:
    if args.tts_url:
        return OpenAITTS(args.tts_url, args.tts_model, args.tts_voice, args.tts_api_key,
                         response_format="pcm")
    return EspeakTTS(args.espeak_voice)
