"""Speech recognition and speech translation with Whisper: decoding, long-audio windows, subtitle formats."""
