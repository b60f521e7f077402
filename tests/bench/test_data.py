import numpy as np
import pytest

from aro.bench.data import load_corpus, stdlib_files


def test_stdlib_loader_on_a_temporary_folder(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "site-packages" / "x").mkdir(parents=True)
    (root / "a.py").write_text("print('a')\n")
    (root / "pkg" / "b.py").write_text("x = 1\n")
    (root / "test" / "test_a.py").write_text("assert True\n")
    (root / "site-packages" / "x" / "c.py").write_text("y = 2\n")
    (root / "notes.txt").write_text("not python\n")
    files = stdlib_files(root)
    assert [f.relative_to(root).as_posix() for f in files] == ["a.py", "pkg/b.py"]


def test_default_corpus_is_the_stdlib(tmp_path):
    corpus = load_corpus(None, cache_dir=tmp_path)
    info = corpus.describe()
    assert info["source"] == "python-stdlib" and info["files"] > 100
    total = info["train_bytes"] + info["val_bytes"]
    assert abs(info["val_bytes"] / total - 0.1) < 0.01
    assert b"def " in bytes(corpus.train[:200000])


def test_folder_corpus_cleans_bom_and_crlf_and_splits_deterministically(tmp_path):
    data = tmp_path / "texts"
    data.mkdir()
    (data / "one.txt").write_bytes(b"\xef\xbb\xbf" + b"hello\r\nworld\r\n" * 500)
    (data / "two.txt").write_bytes(b"second file\n" * 500)
    (data / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)  # binary: skipped
    a = load_corpus(str(data), cache_dir=tmp_path / "cache")
    b = load_corpus(str(data), cache_dir=tmp_path / "cache")
    assert a.n_files == 2 and a.sha256 == b.sha256
    joined = bytes(a.train) + bytes(a.val)
    assert b"\r" not in joined and b"\xef\xbb\xbf" not in joined and b"\x00" not in joined
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    x1, y1 = a.batch(seed=3, step=7, batch_size=4, seq_len=16)
    x2, y2 = b.batch(seed=3, step=7, batch_size=4, seq_len=16)
    assert x1.equal(x2) and y1.equal(y2)
    assert x1[:, 1:].equal(y1[:, :-1])  # targets are inputs shifted by one
    assert not a.batch(seed=4, step=7, batch_size=4, seq_len=16)[0].equal(x1)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_corpus(str(tmp_path / "nope"), cache_dir=tmp_path)


@pytest.mark.parametrize("name", ["tinyshakespeare/input.txt", "warpeace/warpeace_input.txt"])
def test_shared_corpora_work_by_path(name, tmp_path):
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "shared" / "data" / name
    if not path.exists():
        pytest.skip("../shared/data is not beside this checkout")
    corpus = load_corpus(str(path), cache_dir=tmp_path)
    assert corpus.train.size + corpus.val.size > 1_000_000
    assert b"\r\n" not in bytes(corpus.train[:100000])
