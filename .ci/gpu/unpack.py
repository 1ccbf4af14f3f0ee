"""On the device: the token cache under the name load_imdb gives it, beside a stand-in file of the archive's
path, size and mtime (the cache's fingerprint), so the run reads the cache and never the archive."""
import json
import os
import sys
import tarfile

sys.path.insert(0, ".")
import data  # noqa: E402

with open(".gpu/archive.json") as f:
    archive = json.load(f)
os.makedirs(os.path.dirname(archive["path"]), exist_ok=True)
if not os.path.exists(archive["path"]):
    with open(archive["path"], "wb") as f:
        f.truncate(archive["size"])
os.utime(archive["path"], ns=(archive["mtime_ns"], archive["mtime_ns"]))
with tarfile.open(".gpu/imdb_cache.tar.xz") as t:
    t.extractall(os.path.join("data", "cache"))
assert f"imdb-{data._fingerprint(archive['path'])}-full" == archive["cache"], "the stand-in does not match the cache"
print("token cache:", {k: len(v) for k, v in data.load_imdb(archive["path"]).items()}, "archive path:", archive["path"])
