"""
IMDb reviews (Maas et al. 2011) as GPT-2 tokens.

The Stanford archive aclImdb_v1.tar.gz is read as a stream (no extraction of its 100k files), or
an extracted aclImdb/ folder is walked. Splits: train (25k labelled), test (25k labelled),
unsup (50k unlabelled). Token ids are cached on disk as a uint16 memmap, one end-of-text token
after every review, so a second run starts in seconds.
"""
import functools
import gzip
import hashlib
import json
import os
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass

import numpy as np
import tiktoken

from checkpoint import atomic_write
from cli import UserError
from download import download

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_BYTES = 84_125_825
IMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
DEFAULT_ARCHIVE = os.path.join("data", "aclImdb_v1.tar.gz")
SPLITS = ("train", "test", "unsup")
FULL_COUNTS = {"train": 25_000, "test": 25_000, "unsup": 50_000}
LABELS = {"neg": 0, "pos": 1, "unsup": -1}
EOT = 50256  # <|endoftext|> in GPT-2's BPE


class DataError(UserError):
    """A problem with the user's data: the message says what is wrong and what to do."""


def get_encoding():
    try:
        return tiktoken.get_encoding("r50k_base")  # exactly GPT-2's BPE
    except Exception as e:  # tiktoken downloads it once; offline, that is a network error
        raise DataError(f"could not load the GPT-2 BPE ({type(e).__name__}); tiktoken downloads it once: go online, "
                        f"or point TIKTOKEN_CACHE_DIR at a folder that holds it") from None


# ---------------------------------------------------------------------------- GPT-2's tokenizer files
def byte_to_unicode():
    """GPT-2's printable stand-in for each byte in vocab.json and merges.txt: the printable Latin-1
    bytes stand for themselves, the other 68 take the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def bpe_parts(token, ranks):
    """The two tokens BPE merged into `token` (bytes): replay the merges of lower rank on its bytes,
    lowest rank first, as tiktoken encodes; what is left is the last merge's pair."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank >= ranks[token]:
            raise ValueError(f"token {token!r} is not a merge of two tokens of lower rank")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@functools.lru_cache(maxsize=None)  # seconds to rebuild; each RoBERTa folder's check and each export reads it
def tokenizer_files(encoding):
    """vocab.json {token string: id} and merges.txt (one "a b" pair a line, in rank order) of a tiktoken
    BPE whose ranks are the ids (GPT-2's r50k_base)."""
    ranks, to_text = encoding._mergeable_ranks, byte_to_unicode()

    def text(token):
        return "".join(to_text[b] for b in token)
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab.update(encoding._special_tokens)  # <|endoftext|>: 50256
    merges = [" ".join(text(part) for part in bpe_parts(token, ranks))
              for token, _ in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]
    return vocab, "#version: 0.2\n" + "\n".join(merges) + "\n"


def clean(text):
    return text.replace("<br />", "\n").replace("<br/>", "\n").replace("<br>", "\n").strip()


# ---------------------------------------------------------------------------- finding the archive
def find_archive(path=None):
    """--data PATH, else $IMDB_ARCHIVE, else data/aclImdb_v1.tar.gz or data/aclImdb/, else download."""
    for candidate, source in ((path, "--data"), (os.environ.get("IMDB_ARCHIVE"), "$IMDB_ARCHIVE")):
        if candidate:
            if not os.path.exists(candidate):
                raise DataError(f"IMDb archive not found at {candidate} (from {source}); "
                                f"pass the path of aclImdb_v1.tar.gz or an extracted aclImdb/ folder (download: {IMDB_URL})")
            return candidate
    for candidate in (DEFAULT_ARCHIVE, os.path.join("data", "aclImdb")):
        if os.path.exists(candidate):
            return candidate
    download_archive(DEFAULT_ARCHIVE)
    return DEFAULT_ARCHIVE


def download_archive(dest, url=IMDB_URL):
    """The IMDb archive from Stanford to dest, its size and sha256 checked (download.download)."""
    download(url, dest, "the IMDb archive", IMDB_BYTES, IMDB_SHA256,
             by_hand="if this machine is offline, copy aclImdb_v1.tar.gz here and pass --data PATH or set IMDB_ARCHIVE=PATH")


# ---------------------------------------------------------------------------- reading reviews
def _review_key(name):
    """aclImdb/<split>/<pos|neg|unsup>/<id>_<rating>.txt -> (split, label) or None for other files."""
    parts = name.replace("\\", "/").split("/")
    if len(parts) < 4 or not parts[-1].endswith(".txt") or parts[-3] not in ("train", "test") or parts[-2] not in LABELS:
        return None
    split = "unsup" if parts[-2] == "unsup" else parts[-3]
    return split, LABELS[parts[-2]], int(parts[-1].split("_")[0])


def _iter_files(path):
    """Yield (name, bytes) of every review file in a .tar.gz (streamed) or an extracted folder."""
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for f in files:
                full = os.path.join(root, f)
                if _review_key(full):
                    with open(full, "rb") as fh:
                        yield full, fh.read()
        return
    try:  # through gzip, which raises EOFError on any truncation (tarfile alone may stop early quietly)
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path) if gzipped else open(path, "rb")) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.isfile() and _review_key(member.name):
                    yield member.name, tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"the IMDb archive {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                        f"delete it and download it again from {IMDB_URL}") from None


def read_reviews(path, verify=True):
    """{split: (texts, labels)} with labels 1 = positive, 0 = negative, -1 = unlabelled.
    Sorted by (label, review id) so the order does not depend on how the archive was packed.
    verify: the archive must hold the full 25k / 25k / 50k reviews, 12.5k per label."""
    rows = {s: [] for s in SPLITS}
    for name, raw in _iter_files(path):
        split, label, review_id = _review_key(name)
        rows[split].append((label, review_id, clean(raw.decode("utf-8", errors="replace"))))
    if verify:
        for split, n in FULL_COUNTS.items():
            got = len(rows[split])
            labelled = [sum(r[0] == lab for r in rows[split]) for lab in (0, 1)]
            if got != n or (split != "unsup" and labelled != [n // 2, n // 2]):
                raise DataError(f"{path} holds {got} {split} reviews (neg/pos {labelled}), expected {n:,} "
                                f"split evenly: the archive is partial or not IMDb; download it again from {IMDB_URL}")
    elif not any(rows.values()):
        raise DataError(f"{path} holds no IMDb reviews (expected aclImdb/<split>/<pos|neg|unsup>/*.txt)")
    out = {}
    for split, r in rows.items():
        r.sort(key=lambda row: (row[0], row[1]))
        out[split] = ([row[2] for row in r], np.array([row[0] for row in r], dtype=np.int64))
    return out


# ---------------------------------------------------------------------------- tokens
@dataclass
class TokenizedSplit:
    tokens: np.ndarray  # (N,) uint16: every review followed by EOT
    offsets: np.ndarray  # (n_reviews + 1,) int64: review i is tokens[offsets[i]:offsets[i+1] - 1]
    labels: np.ndarray  # (n_reviews,) int64

    def __len__(self):
        return len(self.labels)

    def review(self, i):
        return self.tokens[self.offsets[i]:self.offsets[i + 1] - 1].astype(np.int64)


def _fingerprint(path):
    """Identifies the archive's contents for the token cache (name, size and mtime of each file)."""
    h = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_imdb(path=None, cache_dir=os.path.join("data", "cache"), verify=True):
    """{split: TokenizedSplit}, tokenized once and cached under cache_dir. A damaged cache is
    rebuilt from the archive, the source of truth."""
    path = find_archive(path)
    folder = os.path.join(cache_dir, f"imdb-{_fingerprint(path)}-{'full' if verify else 'any'}")
    if all(os.path.exists(os.path.join(folder, f"{s}.json")) for s in SPLITS):
        try:
            return {s: _open_split(os.path.join(folder, s)) for s in SPLITS}
        except (OSError, ValueError, EOFError) as e:  # json's and numpy's errors for torn files are ValueErrors
            print(f"the token cache in {folder} is damaged ({e}); rebuilding it from {path}", file=sys.stderr)
    _build_cache(path, folder, verify)
    return {s: _open_split(os.path.join(folder, s)) for s in SPLITS}


def _build_cache(path, folder, verify):
    """Per split: <split>.bin (uint16 tokens), .offsets.npy, .labels.npy, and last <split>.json,
    the sizes of the other three, by which _open_split finds a truncated file."""
    t0 = time.time()
    print(f"reading and tokenizing IMDb from {path} (once; cached in {folder})", file=sys.stderr)
    reviews = read_reviews(path, verify=verify)
    enc = get_encoding()
    os.makedirs(folder, exist_ok=True)
    for split, (texts, labels) in reviews.items():
        ids = enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = np.full(int(offsets[-1]), EOT, dtype=np.uint16)
        for i, x in enumerate(ids):
            tokens[offsets[i]:offsets[i + 1] - 1] = x
        base = os.path.join(folder, split)
        # each file appears whole (written aside, then renamed), so a killed run or a second
        # process tokenizing at the same time (torchrun) never leaves a torn cache
        atomic_write(base + ".bin", tokens.tofile)
        atomic_write(base + ".offsets.npy", lambda f: np.save(f, offsets))
        atomic_write(base + ".labels.npy", lambda f: np.save(f, labels))
        meta = {"bin_bytes": tokens.nbytes, "offsets": len(offsets), "reviews": len(labels),
                "sha256": _content_hash(tokens, offsets, labels)}
        atomic_write(base + ".json", lambda f: f.write(json.dumps(meta).encode()))  # written last
    print(f"tokenized IMDb in {time.time() - t0:.0f}s", file=sys.stderr)


def _open_split(base):
    """One split of the token cache, its files checked against their sizes in <split>.json: a file
    truncated on disk (or torn metadata) raises ValueError instead of feeding training short data."""
    with open(base + ".json", "rb") as f:
        meta = json.load(f)
    if not isinstance(meta, dict):
        raise ValueError(f"{base}.json is not a metadata object")
    offsets, labels = np.load(base + ".offsets.npy"), np.load(base + ".labels.npy")
    found = {"bin_bytes": os.path.getsize(base + ".bin"), "offsets": len(offsets), "reviews": len(labels)}
    if {k: meta.get(k) for k in found} != found:
        raise ValueError(f"{os.path.basename(base)} files hold {found}, their metadata says {meta}")
    tokens = np.memmap(base + ".bin", dtype=np.uint16, mode="r") if found["bin_bytes"] else np.zeros(0, np.uint16)
    if meta.get("sha256") != _content_hash(tokens, offsets, labels):  # flipped bytes of the right size
        raise ValueError(f"{os.path.basename(base)} files do not hold what their metadata's checksum says "
                         f"(damaged on disk, or written by an older version)")
    return TokenizedSplit(tokens, offsets, labels)


def _content_hash(tokens, offsets, labels):
    h = hashlib.sha256()
    for array in (tokens, offsets, labels):
        h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def make_prefixes(split, n, seed, min_len=2, max_len=8):
    """The paper's prompts: the first k tokens (k uniform in [min_len, max_len]) of n distinct
    reviews drawn with a fixed seed. Returns a list of token-id lists."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"prefix lengths must satisfy 1 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = np.random.default_rng(seed)
    eligible = np.flatnonzero(np.diff(split.offsets) - 1 >= max_len)  # reviews long enough for any k
    if n > len(eligible):
        raise ValueError(f"asked for {n} prefixes but only {len(eligible)} reviews have {max_len}+ tokens")
    picks = rng.choice(eligible, size=n, replace=False)
    lengths = rng.integers(min_len, max_len + 1, size=n)
    return [split.review(i)[:k].tolist() for i, k in zip(picks, lengths)]
