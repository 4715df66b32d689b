"""Text translation: Marian and T5 encoder-decoders (seq2seq.py, search.py) and prompts for instruct models."""
