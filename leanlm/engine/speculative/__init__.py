"""Speculative decoding: drafters propose tokens, one engine step verifies them (sampling/speculative.py), and a
per-request tuner picks how many to draft, or none, from measured acceptance and step costs."""
