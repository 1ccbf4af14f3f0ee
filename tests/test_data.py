"""IMDb loading: a tiny hand-built archive (and its extracted folder) read back to labelled, sorted,
cleaned reviews; the token cache; errors for missing, partial, corrupt and badly downloaded
archives; evaluation prefixes; and, when $IMDB_ARCHIVE is set, the real 25k / 25k / 50k archive."""
import hashlib
import io
import os
import tarfile

import numpy as np
import pytest

import data
from cli import UserError
from data import EOT, DataError

# member name -> raw text; reviews are listed out of order on purpose
REVIEWS = {
    "aclImdb/train/pos/10_8.txt": "Loved it.<br /><br />Would watch again. ",
    "aclImdb/train/neg/3_1.txt": "Terrible.<br/>Just terrible.",
    "aclImdb/train/pos/2_9.txt": "Caf\u00e9 scene \u2014 brilliant! \U0001F600 Na\u00efve & \u201cfun\u201d.",
    "aclImdb/train/neg/0_2.txt": "  Boring<br>film  ",
    "aclImdb/test/pos/7_10.txt": "A \u00abmasterpiece\u00bb of 1990s cinema. 10/10",
    "aclImdb/test/neg/1_4.txt": "Not great, not awful.\n",
    "aclImdb/train/unsup/11_0.txt": "Unlabelled eleven.",
    "aclImdb/train/unsup/100_0.txt": "Unlabelled one hundred.",
    "aclImdb/train/unsup/5_0.txt": "Unlabelled five.",
}
OTHER_FILES = {  # in the real archive too; none of them is a review
    "aclImdb/README": "Large Movie Review Dataset v1.0",
    "aclImdb/imdb.vocab": "the\nand\na\n",
    "aclImdb/imdbEr.txt": "0.0490972013402\n",
    "aclImdb/train/urls_pos.txt": "http://www.imdb.com/title/tt0453418/usercomments\n",
    "aclImdb/train/urls_unsup.txt": "http://www.imdb.com/title/tt0018515/usercomments\n",
    "aclImdb/train/labeledBow.feat": "9 0:9 1:1\n",
    "aclImdb/test/urls_neg.txt": "http://www.imdb.com/title/tt0406816/usercomments\n",
}
# by hand: sorted by (label, numeric review id), <br /> variants turned into newlines, stripped
EXPECTED = {
    "train": (["Boring\nfilm", "Terrible.\nJust terrible.",
               "Caf\u00e9 scene \u2014 brilliant! \U0001F600 Na\u00efve & \u201cfun\u201d.",
               "Loved it.\n\nWould watch again."], [0, 0, 1, 1]),
    "test": (["Not great, not awful.", "A \u00abmasterpiece\u00bb of 1990s cinema. 10/10"], [0, 1]),
    "unsup": (["Unlabelled five.", "Unlabelled eleven.", "Unlabelled one hundred."], [-1, -1, -1]),
}


def write_archive(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for folder in ("aclImdb", "aclImdb/train", "aclImdb/train/pos", "aclImdb/train/neg", "aclImdb/train/unsup",
                       "aclImdb/test", "aclImdb/test/pos", "aclImdb/test/neg"):
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, text in files.items():
            raw = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return str(path)


@pytest.fixture
def archive(tmp_path):
    return write_archive(tmp_path / "aclImdb_v1.tar.gz", {**OTHER_FILES, **REVIEWS})


def as_plain(reviews):
    return {split: (list(texts), labels.tolist()) for split, (texts, labels) in reviews.items()}


# ---------------------------------------------------------------------------- tokenizer
def test_gpt2_tokenizer_round_trips_imdb_text_including_unicode():
    enc = data.get_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == EOT == 50256
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's published ids
    for text in [t for texts, _ in EXPECTED.values() for t in texts] + [
            "This movie was <br /><br />awful... 1/10!!", "\u65e5\u672c\u8a9e\u306e\u30ec\u30d3\u30e5\u30fc \u00e9\u00e8\u00ea \u0416\u0437",
            "<|endoftext|> is plain text here", "tabs\tand  double  spaces\n\n"]:
        ids = enc.encode_ordinary(text)
        assert EOT not in ids
        assert enc.decode(ids) == text


# ---------------------------------------------------------------------------- reading reviews
def test_archive_reads_to_labelled_sorted_cleaned_reviews_ignoring_other_files(archive):
    reviews = data.read_reviews(archive, verify=False)
    assert as_plain(reviews) == EXPECTED
    assert all(labels.dtype == np.int64 for _, labels in reviews.values())


def test_extracted_folder_reads_the_same_as_the_archive(archive, tmp_path):
    folder = tmp_path / "extracted"
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    assert as_plain(data.read_reviews(str(folder / "aclImdb"), verify=False)) == EXPECTED
    assert as_plain(data.read_reviews(str(folder), verify=False)) == EXPECTED


def test_verify_rejects_a_partial_archive(archive):
    with pytest.raises(DataError, match="partial"):
        data.read_reviews(archive, verify=True)


def test_archive_without_reviews_raises_data_error(tmp_path):
    path = write_archive(tmp_path / "empty.tar.gz", OTHER_FILES)
    with pytest.raises(DataError, match="no IMDb reviews"):
        data.read_reviews(path, verify=False)


def test_random_bytes_archive_raises_data_error_saying_corrupt(tmp_path):
    path = tmp_path / "aclImdb_v1.tar.gz"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size=5000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="corrupt"):
        data.read_reviews(str(path), verify=False)
    with pytest.raises(DataError, match="corrupt"):
        data.load_imdb(str(path), cache_dir=str(tmp_path / "cache"), verify=False)


def test_a_truncated_archive_raises_data_error_saying_corrupt_or_still_yields_every_review(archive, tmp_path):
    """A partial download or copy must never be read as a smaller, valid-looking archive: cut anywhere,
    it is reported as corrupt, unless the cut only removed bytes after the last review."""
    raw = open(archive, "rb").read()
    cut_path = tmp_path / "cut.tar.gz"
    failures = {}  # kind of failure -> (first cut showing it, how many cuts)
    for cut in range(len(raw)):
        cut_path.write_bytes(raw[:cut])
        try:
            reviews = data.read_reviews(str(cut_path), verify=False)
            kind = None if as_plain(reviews) == EXPECTED else \
                f"read {sum(len(t) for t, _ in reviews.values())} of 9 reviews without an error"
        except DataError as e:
            kind = None if "corrupt" in str(e) else f"DataError without 'corrupt': {str(e)[-80:]}"
        except Exception as e:  # noqa: BLE001 - any other exception type is a traceback for the user
            kind = f"{type(e).__name__}: {e}"
        if kind:
            first, count = failures.get(kind, (cut, 0))
            failures[kind] = (first, count + 1)
    assert not failures, f"of {len(raw)} truncations: " + "; ".join(
        f"{count} cuts (first at {first} bytes): {kind}" for kind, (first, count) in failures.items())


# ---------------------------------------------------------------------------- tokens and cache
def test_load_imdb_tokenizes_every_review_followed_by_end_of_text(archive, tmp_path):
    enc = data.get_encoding()
    out = data.load_imdb(archive, cache_dir=str(tmp_path / "cache"), verify=False)
    assert set(out) == {"train", "test", "unsup"}
    for split, (texts, labels) in EXPECTED.items():
        s = out[split]
        assert len(s) == len(texts)
        assert s.labels.tolist() == labels
        assert s.tokens.dtype == np.uint16
        stream = [tok for text in texts for tok in enc.encode_ordinary(text) + [EOT]]  # built independently
        assert s.tokens.tolist() == stream
        for i, text in enumerate(texts):
            assert enc.decode(s.review(i).tolist()) == text
            assert s.tokens[s.offsets[i + 1] - 1] == EOT


def test_load_imdb_reuses_its_cache_on_a_second_call(archive, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    first = data.load_imdb(archive, cache_dir=cache, verify=False)

    def fail(*args, **kwargs):
        raise AssertionError("the archive was read again despite the cache")

    monkeypatch.setattr(data, "read_reviews", fail)
    monkeypatch.setattr(data, "get_encoding", fail)
    second = data.load_imdb(archive, cache_dir=cache, verify=False)
    for split in data.SPLITS:
        assert np.array_equal(second[split].tokens, first[split].tokens)
        assert np.array_equal(second[split].offsets, first[split].offsets)
        assert np.array_equal(second[split].labels, first[split].labels)


def test_load_imdb_cache_is_rebuilt_when_the_archive_changes(archive, tmp_path):
    cache = str(tmp_path / "cache")
    data.load_imdb(archive, cache_dir=cache, verify=False)
    write_archive(archive, {"aclImdb/test/pos/3_10.txt": "A different, longer archive now. Brand new."})
    out = data.load_imdb(archive, cache_dir=cache, verify=False)
    enc = data.get_encoding()
    assert len(out["train"]) == 0 and len(out["unsup"]) == 0
    assert enc.decode(out["test"].review(0).tolist()) == "A different, longer archive now. Brand new."


@pytest.mark.parametrize("damaged_file, flip", [("train.bin", False), ("train.json", False), ("test.offsets.npy", False),
                                               ("test.bin", True)],
                         ids=["truncated_tokens", "torn_metadata", "truncated_offsets", "flipped_tokens"])
def test_a_damaged_cache_is_rebuilt_from_the_archive(tiny_imdb, tmp_path, capsys, damaged_file, flip):
    cache = str(tmp_path / "cache")
    first = {split: s.tokens.tolist() for split, s in data.load_imdb(tiny_imdb, cache_dir=cache, verify=False).items()}
    (folder,) = [os.path.join(cache, f) for f in os.listdir(cache)]
    path = os.path.join(folder, damaged_file)
    with open(path, "r+b") as f:
        if flip:  # the same size, other bytes: a bad disk sector, a stray write
            f.seek(10)
            byte = f.read(1)
            f.seek(10)
            f.write(bytes([byte[0] ^ 0xFF]))
        else:  # cut in half, as a full disk or a copy that stopped would
            f.truncate(os.path.getsize(path) // 2)
    capsys.readouterr()
    second = data.load_imdb(tiny_imdb, cache_dir=cache, verify=False)
    assert "damaged" in capsys.readouterr().err
    assert {split: s.tokens.tolist() for split, s in second.items()} == first


def test_missing_path_raises_data_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv("IMDB_ARCHIVE", raising=False)
    missing = str(tmp_path / "nowhere" / "aclImdb_v1.tar.gz")
    with pytest.raises(DataError, match=f"not found at {missing}"):
        data.load_imdb(missing, cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------------------- finding and downloading
def test_find_archive_honours_the_path_argument_then_imdb_archive(tmp_path, monkeypatch):
    given, from_env = tmp_path / "given.tar.gz", tmp_path / "env.tar.gz"
    given.write_bytes(b"x")
    from_env.write_bytes(b"y")
    monkeypatch.setenv("IMDB_ARCHIVE", str(from_env))
    assert data.find_archive(str(given)) == str(given)
    assert data.find_archive(None) == str(from_env)
    monkeypatch.setenv("IMDB_ARCHIVE", str(tmp_path / "gone.tar.gz"))
    with pytest.raises(DataError, match=r"gone\.tar\.gz.*IMDB_ARCHIVE"):
        data.find_archive(None)


def test_find_archive_falls_back_to_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("IMDB_ARCHIVE", raising=False)
    monkeypatch.chdir(tmp_path)
    os.makedirs("data/aclImdb")
    assert data.find_archive(None) == os.path.join("data", "aclImdb")
    open(os.path.join("data", "aclImdb_v1.tar.gz"), "wb").close()
    assert data.find_archive(None) == os.path.join("data", "aclImdb_v1.tar.gz")


def test_download_of_wrong_size_raises_a_user_error_and_leaves_no_file(archive, tmp_path):
    dest = tmp_path / "dl" / "aclImdb_v1.tar.gz"
    with pytest.raises(UserError, match="damaged"):
        data.download_archive(str(dest), url="file://" + os.path.abspath(archive))
    assert os.listdir(tmp_path / "dl") == []  # neither dest nor dest.part


def test_download_of_right_size_but_wrong_sha256_raises_a_user_error_and_leaves_no_file(archive, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "IMDB_BYTES", os.path.getsize(archive))
    dest = tmp_path / "dl" / "aclImdb_v1.tar.gz"
    with pytest.raises(UserError, match="sha256"):
        data.download_archive(str(dest), url="file://" + os.path.abspath(archive))
    assert os.listdir(tmp_path / "dl") == []


def test_download_from_an_unreachable_url_raises_a_user_error_and_leaves_no_file(tmp_path):
    dest = tmp_path / "dl" / "aclImdb_v1.tar.gz"
    with pytest.raises(UserError, match="could not download the IMDb archive from .* copy aclImdb_v1.tar.gz here"):
        data.download_archive(str(dest), url="file://" + str(tmp_path / "no_such_file.tar.gz"))
    assert os.listdir(tmp_path / "dl") == []


def test_download_with_matching_size_and_sha256_lands_the_exact_bytes(archive, tmp_path, monkeypatch):
    raw = open(archive, "rb").read()
    monkeypatch.setattr(data, "IMDB_BYTES", len(raw))
    monkeypatch.setattr(data, "IMDB_SHA256", hashlib.sha256(raw).hexdigest())
    dest = tmp_path / "dl" / "aclImdb_v1.tar.gz"
    data.download_archive(str(dest), url="file://" + os.path.abspath(archive))
    assert dest.read_bytes() == raw
    assert os.listdir(tmp_path / "dl") == ["aclImdb_v1.tar.gz"]


# ---------------------------------------------------------------------------- prefixes
def hand_built_split(lengths, seed=0):
    """A TokenizedSplit built without load_imdb; review i starts with token 1000 + i."""
    rng = np.random.default_rng(seed)
    reviews = [[1000 + i] + rng.integers(0, 999, size=n - 1).tolist() for i, n in enumerate(lengths)]
    tokens = np.array([t for r in reviews for t in r + [EOT]], dtype=np.uint16)
    offsets = np.cumsum([0] + [len(r) + 1 for r in reviews]).astype(np.int64)
    return data.TokenizedSplit(tokens, offsets, np.zeros(len(reviews), np.int64)), reviews


def test_prefixes_are_starts_of_distinct_long_enough_reviews_with_lengths_2_to_8():
    lengths = [3, 12, 8, 40, 7, 1, 9, 25, 2, 30, 8, 15, 6, 11, 50, 10, 20, 5, 9, 33]
    split, reviews = hand_built_split(lengths)
    long_enough = {i for i, n in enumerate(lengths) if n >= 8}
    seen_lengths = set()
    for seed in range(30):
        prefixes = data.make_prefixes(split, 10, seed)
        assert len(prefixes) == 10
        sources = [p[0] - 1000 for p in prefixes]
        assert len(set(sources)) == 10 and set(sources) <= long_enough
        for p, i in zip(prefixes, sources):
            assert 2 <= len(p) <= 8
            assert p == reviews[i][:len(p)]
            assert all(isinstance(t, int) for t in p)
        seen_lengths.update(len(p) for p in prefixes)
    assert seen_lengths == set(range(2, 9))  # both ends of [2, 8] are drawn


def test_prefixes_are_deterministic_per_seed():
    split, _ = hand_built_split([20] * 50)
    assert data.make_prefixes(split, 12, seed=7) == data.make_prefixes(split, 12, seed=7)
    assert data.make_prefixes(split, 12, seed=7) != data.make_prefixes(split, 12, seed=8)


def test_asking_for_more_prefixes_than_long_reviews_raises_value_error():
    split, _ = hand_built_split([20, 3, 9, 4])
    with pytest.raises(ValueError, match="only 2 reviews"):
        data.make_prefixes(split, 3, seed=0)


# ---------------------------------------------------------------------------- the real archive
@pytest.fixture(scope="session")
def real_imdb(tmp_path_factory):
    path = os.environ.get("IMDB_ARCHIVE")
    if not path:
        pytest.skip("IMDB_ARCHIVE is not set")
    return data.load_imdb(path, cache_dir=str(tmp_path_factory.mktemp("imdb_cache")), verify=True)


def test_real_archive_holds_25k_train_25k_test_50k_unsup_reviews(real_imdb):
    assert {s: len(real_imdb[s]) for s in data.SPLITS} == {"train": 25_000, "test": 25_000, "unsup": 50_000}
    for split in ("train", "test"):
        assert np.bincount(real_imdb[split].labels).tolist() == [12_500, 12_500]
    assert set(real_imdb["unsup"].labels.tolist()) == {-1}
    for split in data.SPLITS:
        s = real_imdb[split]
        assert s.offsets[0] == 0 and s.offsets[-1] == len(s.tokens)
        assert np.count_nonzero(np.asarray(s.tokens) == EOT) == len(s)  # one end-of-text per review, none inside
        assert np.all(np.asarray(s.tokens)[s.offsets[1:] - 1] == EOT)


def test_real_archive_reviews_are_sorted_by_label_then_id(real_imdb):
    enc = data.get_encoding()
    # aclImdb/train/neg/0_3.txt, aclImdb/train/pos/0_9.txt and aclImdb/test/pos/0_10.txt
    assert enc.decode(real_imdb["train"].review(0).tolist()).startswith("Story of a man who has unnatural feelings for a pig.")
    assert enc.decode(real_imdb["train"].review(12_500).tolist()).startswith("Bromwell High is a cartoon comedy.")
    assert enc.decode(real_imdb["test"].review(12_500).tolist()).startswith("I went and saw this movie last night")
