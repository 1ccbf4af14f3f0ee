"""
Run here, before a GPU session: what the device call needs but cannot fetch, into .gpu/ (ignored; name it in
`carry`). The IMDb archive (57 MB) and the repository exceed what travels together, so the token cache made
from it travels instead (xz, 32 MB), with the archive's path, size and mtime, from which load_imdb names it.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache IMDB_ARCHIVE=../shared/imdb/aclImdb_v1.tar.gz python .ci/gpu/pack.py
"""
import json
import os
import shutil
import sys
import tarfile

sys.path.insert(0, ".")
import data  # noqa: E402

archive = os.path.abspath(data.find_archive())
data.load_imdb(archive)  # the cache, built once if missing
folder = f"imdb-{data._fingerprint(archive)}-full"
os.makedirs(".gpu", exist_ok=True)
with tarfile.open(".gpu/imdb_cache.tar.xz", "w:xz") as t:
    t.add(os.path.join("data", "cache", folder), arcname=folder)
st = os.stat(archive)
with open(".gpu/archive.json", "w") as f:
    json.dump({"path": archive, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "cache": folder}, f)
shutil.copytree(os.environ["TIKTOKEN_CACHE_DIR"], ".gpu/tiktoken_cache", dirs_exist_ok=True)
print(f"packed {folder} ({os.path.getsize('.gpu/imdb_cache.tar.xz') / 1e6:.0f} MB) and the BPE into .gpu/")
