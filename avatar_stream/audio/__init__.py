"""Audio helpers with no session in them: decoding pushed speech, resampling, the live
speech gate, and text to speech."""
