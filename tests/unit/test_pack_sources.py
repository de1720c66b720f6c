"""Packing every source format from tiny real files written in tmp_path (no downloads).

    .venv/bin/python -m pytest tests/unit/test_pack_sources.py -q

Fixture images carry their identity in their pixels (an id in the first pixel
for lossless formats, a class-specific grey level for JPEG), so a sample read
back from the shards can be checked against the file it came from whatever
order the packer wrote it in.
"""

import gzip
import json
import pickle
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from gentrain.data import shards
from gentrain.data.formats import SourceFormatError
from gentrain.data.index import load_index
from gentrain.data.pack import pack_source, parse_size
from gentrain.data.pipeline import eval_batches
from gentrain.data.sources import UnknownSourceError


def pack(source, out, **settings):
    settings.setdefault("progress", False)
    return pack_source(str(source), out, **settings)


def read_back(out, split):
    """(uint8 images N x H x W x C, labels) of a split, read through the real pipeline."""
    index = load_index(str(out))
    images, labels = [], []
    for batch in eval_batches(index, split, 64, rank=0, world_size=1):
        images.append((batch["image"] * 255).round().byte().permute(0, 2, 3, 1).numpy())
        labels += batch["label"].tolist()
    return (np.concatenate(images) if images else np.zeros((0,))), labels


def numbered_images(count, height, width, channels=1, first_id=0):
    """uint8 images whose first pixel is their id (unique while ids < 256)."""
    rng = np.random.default_rng(first_id)
    images = rng.integers(0, 256, size=(count, height, width, channels), dtype=np.uint8)
    images[:, 0, 0, :] = (np.arange(count) + first_id)[:, None]
    return images


def check_ids(images, labels, label_of_id):
    ids = images[:, 0, 0, 0].tolist()
    assert len(set(ids)) == len(ids)
    assert labels == [label_of_id[i] for i in ids]
    return sorted(ids)


# ---- MNIST IDX ---------------------------------------------------------------------------


def write_idx(path, array, compress):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)


def write_mnist(folder, compress, train=12, test=5):
    folder.mkdir(parents=True)
    suffix = ".gz" if compress else ""
    for prefix, count, first in (("train", train, 0), ("t10k", test, 100)):
        images = numbered_images(count, 6, 5, first_id=first)[..., 0]
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(count) + first) % 10, compress)
    return folder


@pytest.mark.parametrize("compress, name, classes", [
    (True, "fashion-mnist", ("T-shirt/top", "Trouser")), (False, "mnist", ("0", "1")),
])
def test_idx_folder_packs_both_splits(tmp_path, compress, name, classes):
    source = write_mnist(tmp_path / name, compress)
    index = pack(source, tmp_path / "out", per_shard=5)
    assert index["source_format"] == "idx" and index["kind"] == "image" and index["split_method"] == "source"
    assert index["shape"] == [1, 6, 5] and index["class_names"][:2] == list(classes)
    assert [index["splits"][s]["total"] for s in ("train", "test")] == [12, 5]
    assert index["splits"]["train"]["counts"] == [5, 5, 2]
    label_of_id = {i: i % 10 for i in list(range(12)) + list(range(100, 105))}
    assert check_ids(*read_back(tmp_path / "out", "train"), label_of_id) == list(range(12))
    assert check_ids(*read_back(tmp_path / "out", "test"), label_of_id) == list(range(100, 105))


def test_idx_resizes_with_image_size(tmp_path):
    index = pack(write_mnist(tmp_path / "mnist", False), tmp_path / "out", image_size=4)
    assert index["shape"] == [1, 4, 4] and index["image_size"] == 4
    images, _ = read_back(tmp_path / "out", "test")
    assert images.shape == (5, 4, 4, 1)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"\x00\x00\x08\x02" + raw[4:], r"magic number 0x00000802 is not 0x00000803"),
    (lambda raw: raw[:-7], r"header says 12 x 6 x 5 = 360 bytes of data but the file holds 353: it is truncated"),
    (lambda raw: raw[:6], r"IDX header is cut short"),
])
def test_damaged_idx_is_named_with_the_fault(tmp_path, damage, message):
    source = write_mnist(tmp_path / "mnist", False)
    images = source / "train-images-idx3-ubyte"
    images.write_bytes(damage(images.read_bytes()))
    with pytest.raises(SourceFormatError, match=message) as error:
        pack(source, tmp_path / "out")
    assert "train-images-idx3-ubyte" in str(error.value)


def test_idx_count_mismatch_and_missing_files(tmp_path):
    source = write_mnist(tmp_path / "mnist", True)
    write_idx(source / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8), True)
    with pytest.raises(SourceFormatError, match=r"holds 5 images but t10k-labels-idx1-ubyte.gz holds 4 labels"):
        pack(source, tmp_path / "out")
    (source / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SourceFormatError, match=r"lacks t10k-labels-idx1-ubyte\[.gz\]"):
        pack(source, tmp_path / "out")


# ---- CIFAR --------------------------------------------------------------------------------


def cifar_rows(count, first_id):
    images = numbered_images(count, 32, 32, 3, first_id)
    return images, images.transpose(0, 3, 1, 2).reshape(count, 3072)  # rows are channel-planar


def dump(path, payload):
    path.write_bytes(pickle.dumps(payload, protocol=2))


def py2_string(data: bytes) -> bytes:
    """A Python 2 `str` as cPickle writes it (SHORT_BINSTRING or BINSTRING)."""
    return (b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<I", len(data))) + data


def py2_int(value: int) -> bytes:
    return b"K" + bytes([value]) if value < 256 else b"J" + struct.pack("<i", value)


def py2_array(array: np.ndarray) -> bytes:
    """A uint8 ndarray as numpy 1.x under Python 2 pickled it (what the real CIFAR files hold)."""
    dtype = (b"cnumpy\ndtype\n" + py2_string(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + py2_string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    shape = b"(" + b"".join(py2_int(size) for size in array.shape) + b"t"
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + py2_string(b"b") + b"\x87R"
            + b"(K\x01" + shape + dtype + b"\x89" + py2_string(array.tobytes()) + b"tb")


def py2_pickle(batch: dict) -> bytes:
    """Protocol 2 as Python 2 wrote the CIFAR-10 batches: str keys, a numpy array, lists of ints."""
    items = b""
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            encoded = py2_array(value)
        elif isinstance(value, list):
            encoded = b"](" + b"".join(py2_int(v) if isinstance(v, int) else py2_string(v) for v in value) + b"e"
        else:
            encoded = py2_string(value)
        items += py2_string(key) + encoded
    return b"\x80\x02}(" + items + b"u."


def test_cifar10_batches_from_the_parent_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected = {}
    for number, name in enumerate([f"data_batch_{n}" for n in range(1, 6)] + ["test_batch"]):
        images, rows = cifar_rows(2 if name != "test_batch" else 3, 10 * number)
        labels = [(10 * number + i) % 10 for i in range(len(images))]
        (folder / name).write_bytes(py2_pickle({b"batch_label": b"x", b"data": rows, b"labels": labels}))
        expected.update({10 * number + i: image for i, image in enumerate(images)})
    names = [f"class{n}".encode() for n in range(10)]
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": names, b"num_vis": b"3072"}))
    index = pack(tmp_path, tmp_path / "out")
    assert index["source_format"] == "cifar10" and index["shape"] == [3, 32, 32]
    assert index["class_names"] == [f"class{n}" for n in range(10)]
    train, train_labels = read_back(tmp_path / "out", "train")
    ids = check_ids(train, train_labels, {i: i % 10 for i in expected})
    assert ids == [10 * b + i for b in range(5) for i in range(2)]
    for image in train:
        np.testing.assert_array_equal(image, expected[int(image[0, 0, 0])])
    assert index["splits"]["test"]["total"] == 3


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, count, first in (("train", 6, 0), ("test", 2, 50)):
        _, rows = cifar_rows(count, first)
        fine = [(first + i) % 100 for i in range(count)]
        dump(folder / name, {b"data": rows, b"fine_labels": fine, b"coarse_labels": [0] * count})
    fine_names = [f"fine{n}".encode() for n in range(100)]
    dump(folder / "meta", {b"fine_label_names": fine_names, b"coarse_label_names": [b"c"] * 20})
    index = pack(folder, tmp_path / "out")
    assert index["source_format"] == "cifar100" and index["num_classes"] == 100
    assert index["class_names"][51] == "fine51"
    test, labels = read_back(tmp_path / "out", "test")
    assert check_ids(test, labels, {50: 50, 51: 51}) == [50, 51]


def test_cifar_pickle_may_only_hold_arrays(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"cos\nsystem\n(S'echo owned'\ntR.")
    with pytest.raises(SourceFormatError, match=r"refusing to load os.system"):
        pack(folder, tmp_path / "out")


# ---- image folders -----------------------------------------------------------------------


def save_image(path, grey, size=(6, 4), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, grey if mode == "L" else (grey, grey, grey)).save(path)


def grey_level(label, number):
    return 60 * label + 20 + number  # JPEG keeps flat colours within a level or two


def image_folder(root, classes=("cat", "dog", "eel"), per_class=4):
    for label, name in enumerate(classes):
        for number in range(per_class):
            suffix = (".png", ".jpg", ".JPEG", ".webp")[number % 4]
            save_image(root / name / f"{number:03d}{suffix}", grey_level(label, number))
    (root / classes[0] / "notes.txt").write_text("not an image")
    return root


def labels_match_grey(images, labels):
    return all(int(round(image.mean())) // 60 == label for image, label in zip(images, labels))


def test_image_folder_with_class_subfolders(tmp_path):
    root = image_folder(tmp_path / "animals")
    save_image(root / "dog" / "gray.png", grey_level(1, 9), mode="L")  # the minority mode is converted
    index = pack(root, tmp_path / "out", test_fraction=0.25, per_shard=4)
    assert index["source_format"] == "image-folder" and index["split_method"] == "seeded"
    assert index["shape"] == [3, 4, 6] and index["class_names"] == ["cat", "dog", "eel"]
    assert [index["splits"][s]["total"] for s in ("train", "test")] == [10, 3]
    images, labels = read_back(tmp_path / "out", "train")
    test_images, test_labels = read_back(tmp_path / "out", "test")
    assert sorted(labels + test_labels) == [0] * 4 + [1] * 5 + [2] * 4
    assert labels_match_grey(np.concatenate([images, test_images]), labels + test_labels)


def test_image_folder_with_train_and_val_splits(tmp_path):
    root = tmp_path / "split"
    image_folder(root / "train", classes=("a", "b"), per_class=3)
    image_folder(root / "val", classes=("a", "b"), per_class=2)
    index = pack(root, tmp_path / "out")
    assert index["split_method"] == "source" and index["class_names"] == ["a", "b"]
    assert [index["splits"][s]["total"] for s in ("train", "test")] == [6, 4]
    images, labels = read_back(tmp_path / "out", "test")
    assert sorted(labels) == [0, 0, 1, 1] and labels_match_grey(images, labels)
    image_folder(root / "val", classes=("zebra",), per_class=1)
    with pytest.raises(SourceFormatError, match=r"class folders \['zebra'\] are not in"):
        pack(root, tmp_path / "again")


def test_majority_grey_folder_is_stored_as_l(tmp_path):
    root = tmp_path / "grey"
    for number in range(3):
        save_image(root / "only" / f"{number}.png", 100 + number, mode="L")
    save_image(root / "only" / "colour.png", 40)
    assert pack(root, tmp_path / "out", test_fraction=0.0)["shape"] == [1, 4, 6]


def test_differing_sizes_need_image_size(tmp_path):
    root = image_folder(tmp_path / "mixed", classes=("a",), per_class=2)
    save_image(root / "a" / "big.png", 30, size=(10, 16))
    with pytest.raises(SourceFormatError, match=r"a/000.png is 6x4 but a/big.png is 10x16; pass --image-size N"):
        pack(root, tmp_path / "out")
    index = pack(root, tmp_path / "out", image_size=3, test_fraction=0.0)
    assert index["shape"] == [3, 3, 3]
    images, _ = read_back(tmp_path / "out", "train")
    assert images.shape == (3, 3, 3, 3)


def test_truncated_jpeg_is_named(tmp_path):
    root = image_folder(tmp_path / "broken", classes=("a",), per_class=2)
    jpeg = root / "a" / "001.jpg"
    Image.fromarray(numbered_images(1, 64, 64, 3)[0]).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:2000])  # the header survives, most pixels do not
    with pytest.raises(SourceFormatError, match=r"cannot decode image .*a/001.jpg"):
        pack(root, tmp_path / "out", image_size=4)


# ---- .npz / .npy ---------------------------------------------------------------------------


def test_npz_with_x_and_y_is_split_by_test_fraction(tmp_path):
    images = numbered_images(20, 5, 7, 3)
    np.savez(tmp_path / "set.npz", x=images, y=np.arange(20) % 4, class_names=np.array(["w", "x", "y", "z"]))
    index = pack(tmp_path / "set.npz", tmp_path / "out", test_fraction=0.2, seed=3)
    assert index["source_format"] == "npz" and index["shape"] == [3, 5, 7] and index["class_names"] == list("wxyz")
    train, train_labels = read_back(tmp_path / "out", "train")
    test, test_labels = read_back(tmp_path / "out", "test")
    ids = check_ids(np.concatenate([train, test]), train_labels + test_labels, {i: i % 4 for i in range(20)})
    assert ids == list(range(20)) and len(test) == 4


def test_npz_with_keras_splits_and_channel_first_floats(tmp_path):
    train = numbered_images(6, 4, 4, 3)
    test = numbered_images(2, 4, 4, 3, first_id=50)
    np.savez(tmp_path / "k.npz", x_train=train.transpose(0, 3, 1, 2) / 255.0, y_train=np.arange(6) % 3,
             x_test=test, y_test=np.array([1, 2]))
    index = pack(tmp_path / "k.npz", tmp_path / "out")
    assert index["split_method"] == "source" and index["num_classes"] == 3
    images, labels = read_back(tmp_path / "out", "train")
    assert check_ids(images, labels, {i: i % 3 for i in range(6)}) == list(range(6))


def test_npz_with_unknown_keys_lists_them(tmp_path):
    np.savez(tmp_path / "odd.npz", pixels=np.zeros((2, 4, 4), np.uint8), answer=np.zeros(2))
    with pytest.raises(SourceFormatError, match=r"found keys \['answer', 'pixels'\]; expected images under"):
        pack(tmp_path / "odd.npz", tmp_path / "out")


def test_npy_is_images_with_label_zero(tmp_path):
    np.save(tmp_path / "faces.npy", numbered_images(10, 3, 3)[..., 0])
    index = pack(tmp_path / "faces.npy", tmp_path / "out", test_fraction=0.3)
    assert index["shape"] == [1, 3, 3] and index["class_names"] == ["0"]
    images, labels = read_back(tmp_path / "out", "train")
    assert len(images) == 7 and set(labels) == {0}


# ---- text ------------------------------------------------------------------------------------


def token_samples(out, split):
    index = json.loads((out / "index.json").read_text())
    samples = []
    for name in index["splits"][split]["shards"]:
        with tarfile.open(out / name) as archive:
            for member in archive.getmembers():
                assert member.name.endswith(".tokens")
                samples.append(archive.extractfile(member).read())
    return samples


def test_text_is_cut_into_byte_sequences(tmp_path):
    text = ("Größe über alles, 日本語 — text. " * 40).encode("utf-8")
    (tmp_path / "book.txt").write_bytes(text)
    index = pack(tmp_path / "book.txt", tmp_path / "out", seq_len=16, per_shard=20, test_fraction=0.1)
    chunks = len(text) // 16
    assert index["kind"] == "text" and index["seq_len"] == 16 and index["vocab_size"] == 256
    assert index["shape"] == [16] and index["split_method"] == "tail"
    train, test = token_samples(tmp_path / "out", "train"), token_samples(tmp_path / "out", "test")
    assert len(test) == round(chunks * 0.1) and len(train) + len(test) == chunks
    assert b"".join(train + test) == text[: chunks * 16]
    assert all(len(np.frombuffer(sample, np.uint8)) == 16 for sample in train)


def test_text_that_is_not_utf8_names_the_offset(tmp_path):
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 au lait" * 10)
    with pytest.raises(SourceFormatError, match=r"not UTF-8 text: bad byte 0xe9 at offset 3"):
        pack(tmp_path / "latin.txt", tmp_path / "out")


# ---- settings, parallel packing, resume ---------------------------------------------------------


def test_shard_size_parsing():
    assert parse_size("256MB") == 256_000_000 and parse_size("1GB") == 10**9
    assert parse_size("500kB") == 500_000 and parse_size("64MiB") == 64 * 2**20 and parse_size("4096") == 4096
    for bad in ("abc", "12 parsecs", "0MB", "-3GB", ""):
        with pytest.raises(ValueError, match=r"--shard-size .* is not a size: .*256MB"):
            parse_size(bad)


def test_shard_size_sets_samples_per_shard(tmp_path):
    source = write_mnist(tmp_path / "mnist", False, train=40)
    index = pack(source, tmp_path / "out", shard_size="20kB")
    mean_sample = 512 + 512 + 512 + 512  # png and cls members: a header and one padded block each
    assert index["per_shard"] == 20_000 // mean_sample
    assert index["splits"]["train"]["counts"][0] == index["per_shard"]
    with pytest.raises(ValueError, match="not both"):
        pack(source, tmp_path / "out", shard_size="1MB", per_shard=3)
    with pytest.raises(UnknownSourceError, match=r"unknown data source '.*nowhere'; known sources: digits"):
        pack(tmp_path / "nowhere", tmp_path / "out")


def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    root = image_folder(tmp_path / "animals", per_class=6)
    one = pack(root, tmp_path / "one", per_shard=3)
    two = pack(root, tmp_path / "two", per_shard=3, workers=2)
    assert one == two and len(one["splits"]["train"]["shards"]) > 2
    for name in one["splits"]["train"]["shards"] + one["splits"]["test"]["shards"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def counting_writes(monkeypatch, fail_after=None):
    written = []
    real = shards.write_shard

    def write(task):
        if fail_after is not None and len(written) == fail_after:
            raise KeyboardInterrupt  # as if the user stopped the pack here
        written.append(task.name)
        return real(task)

    monkeypatch.setattr(shards, "write_shard", write)
    return written


def test_interrupted_pack_resumes_with_the_missing_shards(tmp_path, monkeypatch):
    source, out = write_mnist(tmp_path / "mnist", True, train=20), tmp_path / "out"
    with monkeypatch.context() as patch:
        counting_writes(patch, fail_after=2)
        with pytest.raises(KeyboardInterrupt):
            pack(source, out, per_shard=4)
    assert not (out / "index.json").exists() and (out / shards.PROGRESS_NAME).is_file()
    written = counting_writes(monkeypatch)
    resumed = pack(source, out, per_shard=4)
    assert written == ["train-000002.tar", "train-000003.tar", "train-000004.tar", "test-000000.tar",
                       "test-000001.tar"]
    assert resumed == pack(source, tmp_path / "fresh", per_shard=4)
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".tar")) == ["index.json"]


def test_rerun_keeps_matching_shards_and_rewrites_damaged_ones(tmp_path, monkeypatch):
    source, out = write_mnist(tmp_path / "mnist", False, train=20), tmp_path / "out"
    first = pack(source, out, per_shard=4)
    # The finished pack's index holds the shard records (its progress log is gone by now).
    (out / "train-000001.tar").unlink()
    damaged = bytearray((out / "train-000003.tar").read_bytes())
    damaged[600] ^= 0xFF
    (out / "train-000003.tar").write_bytes(bytes(damaged))
    written = counting_writes(monkeypatch)
    assert pack(source, out, per_shard=4) == first
    assert written == ["train-000001.tar", "train-000003.tar"]
    written.clear()
    assert pack(source, out, per_shard=4) == first  # a finished pack resumes from its index
    assert written == []
    (out / "index.json").unlink()
    pack(source, out, per_shard=4)  # no index and no log: no record to trust, so all is rewritten
    assert len(written) == 7
    written.clear()
    pack(source, out, per_shard=5)  # other settings: nothing is kept
    assert len(written) == 5 and not (out / "train-000004.tar").exists()


def test_text_shards_read_back_as_token_batches(tmp_path):
    from gentrain.data.index import load_index
    from gentrain.data.pipeline import eval_batches

    text = "".join(f"line {i}: the quick brown fox. " for i in range(100))
    source = tmp_path / "corpus.txt"
    source.write_text(text, encoding="utf-8")
    pack_source(str(source), tmp_path / "packed", per_shard=10, seq_len=32, progress=False)
    index = load_index(str(tmp_path / "packed"))
    assert index.kind == "text" and index.shape == (32,)
    sequences = [bytes(row.tolist()) for split in ("train", "test")
                 for batch in eval_batches(index, split, 7, 0, 1) for row in batch["tokens"]]
    assert all(len(s) == 32 for s in sequences)
    assert sorted(sequences) == sorted(text.encode()[i:i + 32] for i in range(0, len(text) // 32 * 32, 32))
    from gentrain.registry import DataInfo

    info = DataInfo.of_index(index)  # what a job type is told: token sequences of 256 byte values
    assert (info.kind, info.shape, info.vocab_size, info.input_key) == ("tokens", (32,), 256, "tokens")
    batch = next(iter(eval_batches(index, "train", 7, 0, 1)))
    assert set(batch) == {"tokens", "key"} and str(batch["tokens"].dtype) == "torch.int64"
