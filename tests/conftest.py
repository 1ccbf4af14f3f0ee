import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
_shared_cache = os.path.join(ROOT, "..", "shared", "tiktoken_cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_shared_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_shared_cache)


import io  # noqa: E402
import tarfile  # noqa: E402

import pytest  # noqa: E402

POSITIVE = "wonderful superb moving brilliant delightful touching great charming".split()
NEGATIVE = "awful boring dull terrible weak clumsy tedious bad".split()
NEUTRAL = "the film story actor scene plot movie director camera music this was and with".split()


def write_tiny_imdb(path, n_train=40, n_test=20, n_unsup=20, words=60):
    """A small aclImdb_v1.tar.gz: each labelled review mixes neutral words with words of its sentiment."""
    import random
    rng = random.Random(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, label, n in (("train", "pos", n_train), ("train", "neg", n_train), ("test", "pos", n_test),
                                ("test", "neg", n_test), ("train", "unsup", n_unsup)):
            vocab = NEUTRAL + (POSITIVE if label == "pos" else NEGATIVE if label == "neg" else POSITIVE + NEGATIVE)
            for i in range(n):
                text = " ".join(rng.choice(vocab) for _ in range(words)).capitalize() + ".<br /><br />The end."
                info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_{7 if label == 'pos' else 2}.txt")
                data = text.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="session")
def tiny_imdb(tmp_path_factory):
    return write_tiny_imdb(tmp_path_factory.mktemp("imdb") / "aclImdb_v1.tar.gz")
