"""`leanlm translate`: which path each input takes (instruct model, Marian/T5 folder, Whisper), and clear errors."""

from __future__ import annotations

import json

import pytest

from leanlm.cli.main import main


class FakeOutput:
    def __init__(self, text: str):
        self.text = text


class FakeLLM:
    def __init__(self):
        self.conversations = None

    def chat(self, conversations, params):
        self.conversations, self.params = conversations, params
        return [FakeOutput(f" bonjour {i}\n") for i in range(len(conversations))]


@pytest.fixture
def fake_llm(monkeypatch):
    llm = FakeLLM()
    seen = {}

    def load_llm(args):
        seen["model"] = args.model
        return llm

    monkeypatch.setattr("leanlm.cli.options.load_llm", load_llm)
    llm.seen = seen
    return llm


def test_text_goes_through_the_instruct_models_chat_template(fake_llm, capsys):
    assert main(["translate", "--to", "fr", "Good morning", "Thank you", "--model", "qwen2.5-coder-1.5b"]) == 0
    assert capsys.readouterr().out == "bonjour 0\nbonjour 1\n"
    assert fake_llm.seen["model"] == "qwen2.5-coder-1.5b"
    (first,), (second,) = fake_llm.conversations
    assert first["role"] == "user" and "into French" in first["content"] and first["content"].endswith("Good morning")
    assert second["content"].endswith("Thank you")
    assert fake_llm.params.temperature == 0.0 and fake_llm.params.max_tokens == 256


def test_language_names_and_source_language(fake_llm):
    assert main(["translate", "--to", "German", "--from", "fr", "Bonjour"]) == 0
    assert fake_llm.seen["model"] is None  # the default model
    assert "from French into German" in fake_llm.conversations[0][0]["content"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["translate", "Hello"], "--to fr"),
        (["translate", "--to", "klingon", "Hello"], "Unknown language 'klingon'"),
        (["translate", "--to", "fr", "   "], "empty"),
        (["translate", "--to", "fr", "--max-tokens", "0", "Hello"], "--max-tokens"),
        (["translate", "--to", "fr", "--num-beams", "0", "Hello"], "--num-beams"),
    ],
)
def test_argument_errors_name_the_fix(fake_llm, capsys, argv, message):
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert fake_llm.conversations is None  # nothing was loaded or run


def test_audio_goes_to_whispers_translate_task(monkeypatch, tmp_path):
    audio = tmp_path / "speech.wav"
    audio.write_bytes(b"")
    calls = []
    monkeypatch.setattr("leanlm.cli.transcribe.run", lambda args: calls.append(args) or 0)
    assert main(["translate", str(audio), "--num-beams", "2"]) == 0
    (args,) = calls
    assert args.task == "translate" and args.audio == [str(audio)] and args.model == "whisper-base"
    assert args.beam_size == 2 and args.format == "txt"


def test_audio_errors(monkeypatch, tmp_path, capsys):
    audio = tmp_path / "speech.wav"
    audio.write_bytes(b"")
    monkeypatch.setattr("leanlm.cli.transcribe.run", lambda args: pytest.fail("must not run"))
    assert main(["translate", "--to", "fr", str(audio)]) == 1
    assert "into English only" in capsys.readouterr().err
    assert main(["translate", str(audio), "some text"]) == 1
    assert "not both" in capsys.readouterr().err


def test_a_t5_folder_translates_directly(tmp_path, capsys, monkeypatch):
    """A T5 folder given as --model runs without the instruct path, prefixed with T5's task text."""
    transformers = pytest.importorskip("transformers")
    import torch

    monkeypatch.setattr("leanlm.cli.options.load_llm", lambda args: pytest.fail("a T5 folder needs no LLM"))
    words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(3, 64)] + ["translate", "English", "to", "French:"]
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=len(words), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, decoder_start_token_id=0
    )
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    _word_level_tokenizer(words).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))

    from leanlm.translate.seq2seq import load_seq2seq

    model = load_seq2seq(tmp_path)
    expected_ids = model.generate([model.tokenizer.encode("translate English to French: w5 w6 w7")], max_new_tokens=5)
    assert main(["translate", "--model", str(tmp_path), "--to", "fr", "--max-tokens", "5", "w5 w6 w7"]) == 0
    assert capsys.readouterr().out == model.tokenizer.decode(expected_ids[0]).strip() + "\n"


def _word_level_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.add_special_tokens(["<pad>", "</s>", "<unk>"])
    return tokenizer


@pytest.mark.slow
def test_the_default_instruct_model_translates_into_french(capsys):
    """SmolLM2-135M-Instruct (the default model) answers with some text; its French is not checked word for word."""
    assert main(["translate", "--to", "fr", "--max-tokens", "24", "--threads", "2", "Good morning, my friend."]) == 0
    out = capsys.readouterr().out.strip()
    assert out and out != "Good morning, my friend."
