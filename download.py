"""
Fetching a file once (the IMDb archive, GPT-2's weights): a timeout, a progress line with rate and ETA,
the size and sha256 checked whenever they are known, and one line saying what to do when it fails.
A large file on the Hugging Face hub names its own size and sha256 in the X-Linked-Size and
X-Linked-Etag headers of the redirect to its storage; they are read first and checked after.
"""
import hashlib
import os
import re
import sys
import time
import urllib.error
import urllib.request

from cli import UserError

TIMEOUT = 30  # seconds without an answer before a download fails


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # the redirect itself carries the hub's headers: keep it
        return None


def hub_checks(url):
    """(size, sha256) that the hub states for url in its redirect's headers, each None where it states none."""
    try:
        response = urllib.request.build_opener(NoRedirect).open(urllib.request.Request(url, method="HEAD"), timeout=TIMEOUT)
        headers = response.headers
    except urllib.error.HTTPError as e:  # the 302 itself, not followed
        headers = e.headers
    size, etag = headers.get("X-Linked-Size"), (headers.get("X-Linked-Etag") or "").strip('"')
    return (int(size) if size and size.isdigit() else None), (etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None)


def download(url, dest, what, size=None, sha256=None, by_hand=""):
    """url -> dest through dest.part, renamed into place only once whole and checked (size and sha256:
    the given ones, else the hub's). Any failure removes the part and raises a UserError naming url,
    what went wrong and `by_hand`, how to get the file without this download."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    part = dest + ".part"
    hasher, done, t0 = hashlib.sha256(), 0, time.time()
    try:
        if size is None and sha256 is None:
            size, sha256 = hub_checks(url)
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response, open(part, "wb") as f:
            total = size or int(response.headers.get("Content-Length") or 0)
            while chunk := response.read(1 << 20):
                f.write(chunk)
                hasher.update(chunk)
                done += len(chunk)
                rate = done / max(time.time() - t0, 1e-9)
                progress = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB | eta {(total - done) / max(rate, 1):.0f}s" if total else f"{done / 1e6:.1f} MB"
                print(f"\rdownloading {what}: {progress} | {rate / 1e6:.1f} MB/s", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    except (OSError, ValueError) as e:  # offline, refused, timed out, a bad URL
        if os.path.exists(part):
            os.remove(part)
        raise UserError(f"could not download {what} from {url} ({e}); {by_hand}") from None
    if (size is not None and done != size) or (sha256 is not None and hasher.hexdigest() != sha256):
        os.remove(part)
        raise UserError(f"the download of {what} from {url} is damaged ({done} bytes, sha256 {hasher.hexdigest()}; "
                        f"expected {size} bytes, sha256 {sha256}); run again, or {by_hand}")
    os.replace(part, dest)
