"""The offline KV tools (`cachegen-vllm kv ...`) on a model of another geometry than the embedded one:
a small Llama with head_dim 128 and 8 KV heads, random weights, built by transformers."""

import pytest
import torch

from cachegen_vllm.offline import kvfile
from cachegen_vllm.serving.cli import main


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "prompt.txt"
    path.write_text(topics["assignment"])
    return path


def _same_bits(a, b):
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype", ["bfloat16", "fp8_e4m3"])
def test_extract_encode_decode_round_trips_a_file(llama_dir, text_file, tmp_path, dtype, capsys):
    kv_path, frames_path, back_path = tmp_path / "kv.safetensors", tmp_path / "kv.cgkv", tmp_path / "back.safetensors"
    main(
        [
            "kv",
            "extract",
            str(llama_dir),
            "--text",
            str(text_file),
            "--tokens",
            "300",
            "--dtype",
            dtype,
            "--out",
            str(kv_path),
        ]
    )
    geometry, kv = kvfile.load_kv(kv_path)
    assert (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim) == (2, 8, 128)
    assert kv[0][0].shape == (300, 8, 128) and kv[0][0].dtype == kvfile.CACHE_DTYPES[dtype]
    main(["kv", "encode", str(kv_path), "--profile", "lossless", "--out", str(frames_path)])
    main(["kv", "decode", str(frames_path), "--out", str(back_path)])
    _, back = kvfile.load_kv(back_path)
    assert all(_same_bits(a, b) for pair, other in zip(kv, back) for a, b in zip(pair, other))
    capsys.readouterr()
    main(["kv", "inspect", str(frames_path)])
    report = capsys.readouterr().out
    total = frames_path.stat().st_size - kvfile.PREAMBLE.size - len(llama_dir.name.encode())
    model, frames = kvfile.load_frames(frames_path)
    parts = kvfile.parts(model, frames)
    assert sum(parts.values()) == total and parts["key exponents"] > 0 and parts["value sign and mantissa"] > 0
    assert "key exponents" in report and f"{total} bytes" in report
    assert total < sum(k.nbytes + v.nbytes for k, v in kv)  # lossless and smaller


def test_a_lossy_profile_decodes_close_to_the_extracted_kv(llama_dir, text_file, tmp_path):
    kv_path, frames_path, back_path = tmp_path / "kv.safetensors", tmp_path / "kv.cgkv", tmp_path / "back.safetensors"
    main(["kv", "extract", str(llama_dir), "--text", str(text_file), "--tokens", "200", "--out", str(kv_path)])
    main(["kv", "encode", str(kv_path), "--profile", "default", "--out", str(frames_path)])
    main(["kv", "decode", str(frames_path), "--out", str(back_path)])
    (_, kv), (_, back) = kvfile.load_kv(kv_path), kvfile.load_kv(back_path)
    for (k, v), (k2, v2) in zip(kv, back):
        for a, b in ((k, k2), (v, v2)):
            assert (a.float() - b.float()).pow(2).mean() < 0.02 * a.float().pow(2).mean()
    model, frames = kvfile.load_frames(frames_path)
    parts = kvfile.parts(model, frames)
    assert parts["key codes"] > parts["key statistics"] > 0 and parts["key exact values"] > 0  # the sink tokens


def test_bad_files_are_refused_naming_what_is_wrong(llama_dir, text_file, tmp_path):
    kv_path, frames_path = tmp_path / "kv.safetensors", tmp_path / "kv.cgkv"
    main(["kv", "extract", str(llama_dir), "--text", str(text_file), "--tokens", "40", "--out", str(kv_path)])
    main(["kv", "encode", str(kv_path), "--profile", "raw", "--out", str(frames_path)])
    data = frames_path.read_bytes()
    cut = tmp_path / "cut.cgkv"
    cut.write_bytes(data[:-100])
    with pytest.raises(kvfile.KVFileError, match=r"cut.cgkv: byte \d+: a frame of \d+ bytes does not fit"):
        kvfile.load_frames(cut)
    with pytest.raises(kvfile.KVFileError, match=r"starts b'PK"):
        cut.write_bytes(b"PK\x03\x04" + data[4:])
        kvfile.load_frames(cut)
    with pytest.raises(kvfile.KVFileError, match=r"not a readable safetensors file"):
        kvfile.load_kv(frames_path)
    model, frames = kvfile.load_frames(frames_path)
    with pytest.raises(kvfile.KVFileError, match=r"layer 1: frames start at tokens \[\]"):
        kvfile.decode(model, frames[:1])


def test_an_auto_basis_profile_encodes_with_the_models_fitted_basis(llama_dir, text_file, tmp_path):
    kv_path, frames_path, back_path = tmp_path / "kv.safetensors", tmp_path / "kv.cgkv", tmp_path / "back.safetensors"
    main(["kv", "extract", str(llama_dir), "--text", str(text_file), "--tokens", "300", "--out", str(kv_path)])
    with pytest.raises(kvfile.KVFileError, match=r'^--model: the profile\'s basis is "auto"'):
        main(["kv", "encode", str(kv_path), "--profile", "basis", "--out", str(frames_path)])
    main(["kv", "encode", str(kv_path), "--profile", "basis", "--model", str(llama_dir), "--out", str(frames_path)])
    model, frames = kvfile.load_frames(frames_path)
    assert "key rans lanes" in kvfile.parts(model, frames)
    main(["kv", "decode", str(frames_path), "--out", str(back_path)])  # finds the fitted basis in the cache
    (_, kv), (_, back) = kvfile.load_kv(kv_path), kvfile.load_kv(back_path)
    for (k, v), (k2, v2) in zip(kv, back):
        for a, b in ((k, k2), (v, v2)):
            assert (a.float() - b.float()).pow(2).mean() < 0.05 * a.float().pow(2).mean()
