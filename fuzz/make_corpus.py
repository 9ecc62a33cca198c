"""Writes the seed corpora of the fuzz harnesses: fuzz/corpus/<harness>/<seed>.

Each seed is a small valid input (or a near miss) that starts the fuzzer inside the format: numpy
writes the .npy and .npz files, levattn the stream states. Deterministic: running it again writes
the same bytes. Run with the project environment, where levattn is installed:

    .venv/bin/python fuzz/make_corpus.py
"""
import io
import pathlib
import shutil
import struct
import tempfile
import zipfile

import numpy as np

import levattn

ROOT = pathlib.Path(__file__).resolve().parent / "corpus"


def npy_bytes(array, version=None):
    out = io.BytesIO()
    if version is None:
        np.save(out, array)
    else:
        np.lib.format.write_array(out, array, version=version)
    return out.getvalue()


def npz_bytes(arrays, compressed=False):
    out = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(out, **arrays)
    return out.getvalue()


def small(shape, dtype=np.float32, seed=0):
    values = (np.arange(np.prod(shape, dtype=np.int64)) * 7 + seed) % 5 - 2
    return values.reshape(shape).astype(dtype)


def npy_seeds():
    yield "f4_2d", npy_bytes(small((4, 3)))
    yield "f8_2d", npy_bytes(small((3, 5), np.float64))
    yield "i8_1d", npy_bytes(np.arange(5, dtype=np.int64))
    yield "f4_3d", npy_bytes(small((2, 3, 4)))
    yield "f4_4d", npy_bytes(small((2, 1, 3, 2)))
    yield "f8_fortran", npy_bytes(np.asfortranarray(small((3, 4), np.float64)))
    yield "f4_fortran_3d", npy_bytes(np.asfortranarray(small((2, 3, 2))))
    yield "f4_empty", npy_bytes(np.zeros((0, 3), np.float32))
    yield "f4_v2", npy_bytes(small((2, 2)), version=(2, 0))
    yield "f4_v3", npy_bytes(small((2, 2)), version=(3, 0))
    yield "f8_nan_inf", npy_bytes(np.array([[np.nan, np.inf], [-np.inf, 1e300]]))
    yield "f4_bigendian", npy_bytes(small((2, 2), np.dtype(">f4")))
    yield "f2_unsupported", npy_bytes(small((2, 2), np.float16))
    yield "f4_truncated", npy_bytes(small((4, 3)))[:-5]
    yield "f4_0d", npy_bytes(np.float32(1.5))


def npz_seeds():
    a, b = small((3, 2)), small((4,), np.int64)
    yield "stored", npz_bytes({"q": a, "k": b})
    yield "deflated", npz_bytes({"q": a, "k": b}, compressed=True)
    yield "empty", npz_bytes({})
    yield "float64", npz_bytes({"x": small((2, 3, 2), np.float64)})
    with io.BytesIO() as out:
        with zipfile.ZipFile(out, "w") as z:
            z.writestr(zipfile.ZipInfo("notes.txt", date_time=(1980, 1, 1, 0, 0, 0)), "not an array")
        yield "not_npy_member", out.getvalue()


def stream_states():
    """States from a stream of keys (and values), as save() writes them, and their members."""
    with tempfile.TemporaryDirectory() as tmp:
        keys = small((40, 3)) + np.eye(40, 3, dtype=np.float32) * 3
        for name, dv, rows in (("keys_only", 0, 5), ("with_values", 2, 40), ("empty", 0, 0)):
            s = levattn.StreamingUniversalSet(3, 0.3, dv)
            if rows:
                s.push(keys[:rows], small((rows, dv)) if dv else None)
            path = pathlib.Path(tmp) / f"{name}.npz"
            s.save(str(path))
            yield name, path.read_bytes()


def state_records(npz):
    """An .npz as the stream-state harness reads its input: u16 name length, name, u32 image length, image."""
    out = bytearray()
    with zipfile.ZipFile(io.BytesIO(npz)) as z:
        for info in z.infolist():
            name = info.filename.removesuffix(".npy").encode()
            image = z.read(info)
            out += struct.pack("<H", len(name)) + name + struct.pack("<I", len(image)) + image
    return bytes(out)


TEXT_SPECS = [
    "full", "leverage:32", "leverage+eps:0.05+window:4+sinks:2", "topk:8", "random:16+seed:3",
    "window:16", "window+sinks:4", "cluster:4+probe:2+clusters:3+iterations:2", "leverage:4+residual:2",
    "leverage+eps:0.2+kernel:poly+p:4", "leverage:4+method:sketch+sketch:srht+sketch_size:16+sketch_seed:1",
    "leverage:3+budget_alpha:2+budget_exponent:0.5", "leverage:4+precision:bf16", "leverage:2+ridge:0.1+rank_rtol:1e-3",
    "leverage:4+method:sketch+gamma:0.3+jl_columns:4+delta:0.1", "topk:2+window:1", "cluster:2+eps:0.1",
]
# The first byte picks the parser of fuzz_text.cpp (byte % 12): 0 select, 1 kernel, 2 precision,
# 3 score method, 4 sketch kind, 5 normaliser, 6 heavy search, 7 reduce method, 8 dtype, 9 error
# kind, 10 and 11 the selection spec.
TEXT_NAMES = [(0, "leverage"), (1, "poly"), (1, "power"), (2, "bf16"), (3, "sketch"), (4, "srht"),
              (5, "sampled"), (6, "countsketch"), (7, "bss"), (8, "float64"), (9, "io")]


def text_seeds():
    for i, spec in enumerate(TEXT_SPECS):
        yield f"spec_{i:02d}", bytes([10]) + spec.encode()
    for parser, name in TEXT_NAMES:
        yield f"name_{parser}_{name}", bytes([parser]) + name.encode()


CLI_LINES = [
    ["info", "--json"],
    ["universal", "--keys", "k.npy", "--top-k", "3", "--json"],
    ["universal", "--keys", "k3.npy", "--eps", "0.5", "--out", "u.npz"],
    ["universal", "--inputs", "qkv.npz", "--top-k", "2", "--method", "sketch", "--sketch-size", "8"],
    ["heavy", "--queries", "q.npy", "--keys", "k.npy", "--eps", "0.2", "--out", "h.csv"],
    ["heavy", "--inputs", "qkv.npz", "--eps", "0.3", "--search", "countsketch", "--json"],
    ["attend", "--queries", "q.npy", "--keys", "k.npy", "--values", "v.npy", "--out", "o.npy",
     "--select", "leverage:2+window:1", "--save-selection", "s.npz", "--json"],
    ["attend", "--inputs", "qkv.npz", "--out", "o.npy", "--select", "cluster:2+probe:1", "--causal"],
    ["attend", "--queries", "nan.npy", "--keys", "k.npy", "--values", "v.npy", "--out", "q.npy"],
    ["evaluate", "--inputs", "qkv.npz", "--select", "leverage:2", "--select", "topk:2", "--json"],
    ["reduce", "--x", "x.npy", "--out", "y.npy", "--method", "svd"],
    ["planted", "--n", "8", "--d", "4", "--out-dir", "p"],
    ["stream", "--keys", "k.npy", "--values", "v.npy", "--eps", "0.5", "--block", "2", "--checkpoint", "c.npz"],
    ["stream", "--keys", "k.npy", "--eps", "0.5", "--resume", "state.npz", "--json"],
    ["stream", "--keys", "bad.npy", "--eps", "0.5"],
    ["bench", "--n", "64", "--d", "8"],
    ["demo", "--n", "64"],
    ["attend", "--help"],
]


def cli_seeds():
    for i, line in enumerate(CLI_LINES):
        yield f"line_{i:02d}_{line[0]}", "\n".join(line).encode()


def main():
    corpora = {
        "npy": npy_seeds(),
        "npz": list(npz_seeds()) + [(f"state_{n}", b) for n, b in stream_states()],
        "stream_state": [(n, state_records(b)) for n, b in stream_states()],
        "text": text_seeds(),
        "cli": cli_seeds(),
    }
    for harness, seeds in corpora.items():
        folder = ROOT / harness
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, data in seeds:
            (folder / name).write_bytes(data)
        print(f"{folder.relative_to(ROOT.parent.parent)}: {len(list(folder.iterdir()))} seeds")


if __name__ == "__main__":
    main()
