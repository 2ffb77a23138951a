"""`download`: the public NIH cell_images.zip, checked by its sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tqdm import tqdm

from .folders import DataError

NIH_URL = "https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip"

# sha256 of the public cell_images.zip (NLM release, 353,452,851 bytes), as recorded by
# TensorFlow Datasets' url_checksums/malaria.txt
NIH_SHA256 = "0a949556b2414159b5100192609805376654c4266d8d187be9b1922fad43c668"


def download(dest: str | Path, url: str = NIH_URL, sha256: str | None = NIH_SHA256, timeout: float = 30,
             progress: bool = True) -> Path:
    """Fetch the NIH cell_images.zip, verify its sha256, unpack it into dest; returns the image folder."""
    import shutil
    import urllib.error
    import urllib.request
    import zipfile


    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    zpath = dest / "cell_images.zip"
    part = zpath.with_suffix(".zip.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            h = hashlib.sha256()
            with tqdm(total=total, unit="B", unit_scale=True, desc="download", disable=not progress) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise DataError(f"could not download {url}: {reason}. Are you offline? You can download the file "
                        f"by hand and unpack it into {dest}") from None
    if sha256 and h.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise DataError(f"checksum mismatch for {url}: got sha256 {h.hexdigest()}, expected {sha256}; "
                        f"the download is corrupt or the file changed upstream")
    part.replace(zpath)
    try:
        with zipfile.ZipFile(zpath) as z:
            for m in z.infolist():  # refuse paths that escape dest
                target = (dest / m.filename).resolve()
                if not str(target).startswith(str(dest.resolve())):
                    raise DataError(f"unsafe path in zip: {m.filename}")
            z.extractall(dest)
    except zipfile.BadZipFile as e:
        raise DataError(f"{zpath}: not a valid zip file ({e})") from None
    for junk in dest.rglob("Thumbs.db"):
        junk.unlink()
    folder = dest / "cell_images"
    if (folder / "cell_images").is_dir():  # some mirrors nest it twice
        shutil.rmtree(folder / "cell_images")
    return folder if folder.is_dir() else dest
