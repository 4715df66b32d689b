"""Whisper's pieces against references on tiny random weights: the model vs transformers'
WhisperForConditionalGeneration (whole pass, token steps, rows of different lengths), CTranslate2's own converter
output read by our model.bin reader, and the log-mel frontend vs faster-whisper's and transformers' extractors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leanlm.layers.log_mel import log_mel_spectrogram, mel_filters
from leanlm.models.whisper import WhisperConfig, build, load_whisper, state_dict_from_hf

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=120,
    num_mel_bins=16,
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=4,
    decoder_layers=2,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_source_positions=50,
    max_target_positions=40,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.WhisperConfig(**TINY)
    return transformers.WhisperForConditionalGeneration(config).eval()


def ours_from(hf) -> torch.nn.Module:
    config = WhisperConfig.from_hf_dict(hf.config.to_dict())
    return build(config, state_dict_from_hf(hf.state_dict(), config), torch.float32)


@torch.inference_mode()
def test_whole_pass_and_token_steps_match_transformers(hf_model):
    ours = ours_from(hf_model)
    mel = torch.randn(2, 16, 100)
    tokens = torch.randint(0, 120, (2, 9))
    expected = hf_model(input_features=mel, decoder_input_ids=tokens).logits
    encoder_output = ours.encode(mel)
    torch.testing.assert_close(encoder_output, hf_model.model.encoder(mel).last_hidden_state, atol=1e-5, rtol=1e-5)
    cache = ours.new_cache(ours.cross_kv(encoder_output), batch=2)
    steps = [ours.decode(tokens[:, :4], cache)] + [ours.decode(tokens[:, i : i + 1], cache) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_rows_of_different_lengths_each_get_their_solo_logits(hf_model):
    """Batch rows hold different prompt lengths; a batched step equals each row's solo step."""
    ours = ours_from(hf_model)
    mel = torch.randn(2, 16, 100)
    prompts = [torch.randint(0, 120, (1, 3)), torch.randint(0, 120, (1, 7))]
    nxt = torch.randint(0, 120, (2, 1))
    encoder_output = ours.encode(mel)
    cache = ours.new_cache(ours.cross_kv(encoder_output), batch=2)
    for row, prompt in enumerate(prompts):
        ours.decode(prompt, cache, rows=torch.tensor([row]))
    batched = ours.decode(nxt, cache)
    for row, prompt in enumerate(prompts):
        solo = hf_model(input_features=mel[row : row + 1], decoder_input_ids=torch.cat([prompt, nxt[row : row + 1]], 1))
        torch.testing.assert_close(batched[row, -1], solo.logits[0, -1], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_hf_folder_and_ctranslate2_conversion_load(hf_model, tmp_path):
    """The same tiny model saved by transformers, and converted by CTranslate2's own converter to model.bin."""
    hf_dir, ct2_dir = tmp_path / "hf", tmp_path / "ct2"
    hf_model.save_pretrained(hf_dir)
    mel = torch.randn(1, 16, 100)
    tokens = torch.randint(0, 120, (1, 5))
    expected = hf_model(input_features=mel, decoder_input_ids=tokens).logits
    from_folder = load_whisper(hf_dir)
    cache = from_folder.new_cache(from_folder.cross_kv(from_folder.encode(mel)), 1)
    torch.testing.assert_close(from_folder.decode(tokens, cache), expected, atol=1e-5, rtol=1e-5)

    ctranslate2 = pytest.importorskip("ctranslate2")
    tokenizer = _tiny_tokenizer(hf_dir)
    converter = ctranslate2.converters.TransformersConverter(str(hf_dir), load_as_float16=False)
    converter._load_tokenizer = lambda *a, **k: tokenizer  # noqa: SLF001 (no tokenizer files for random weights)
    converter.convert(str(ct2_dir), quantization="float32", force=True)
    from_ct2 = load_whisper(ct2_dir)
    cache = from_ct2.new_cache(from_ct2.cross_kv(from_ct2.encode(mel)), 1)
    torch.testing.assert_close(from_ct2.decode(tokens, cache), expected, atol=1e-5, rtol=1e-5)


def _tiny_tokenizer(folder):
    class Tokenizer:  # what the converter reads from a tokenizer: a vocabulary and the special tokens
        additional_special_tokens: list = []
        all_special_tokens: list = []

        def get_vocab(self):
            return {f"t{i}": i for i in range(TINY["vocab_size"])}

        def convert_ids_to_tokens(self, ids):
            return [f"t{i}" for i in ids]

    return Tokenizer()


def test_log_mel_matches_faster_whisper_and_transformers():
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(16_000 * 5) * 0.1).astype(np.float32)
    ours = log_mel_spectrogram(audio, padding=160).numpy()
    faster_whisper = pytest.importorskip("faster_whisper.feature_extractor")
    reference = faster_whisper.FeatureExtractor()(audio)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=1e-5)  # measured: 1e-6
    np.testing.assert_allclose(mel_filters(80).numpy(), faster_whisper.FeatureExtractor().mel_filters, atol=1e-7)
    hf = transformers.WhisperFeatureExtractor()
    np.testing.assert_allclose(mel_filters(80).numpy(), hf.mel_filters.T, atol=1e-7)
    np.testing.assert_allclose(
        mel_filters(128).numpy(), transformers.WhisperFeatureExtractor(feature_size=128).mel_filters.T, atol=1e-7
    )


def test_hf_names_round_trip(hf_model):
    from leanlm.models.whisper import state_dict_to_hf

    exported = state_dict_to_hf(ours_from(hf_model))
    reference = hf_model.state_dict()
    assert set(exported) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(exported[name], tensor, atol=0, rtol=0, msg=name)
