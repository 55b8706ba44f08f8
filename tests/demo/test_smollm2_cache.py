"""The converted demo LM is cached once per version: same tensors as the GGUF conversion, rebuilt when its key
changes or its folder is incomplete, safe when several processes load it for the first time together.

Every test points FOCUSVLM_CACHE at its own tmp folder. The fast ones stand a tiny Llama in for the GGUF
conversion (``smollm2_lm_from_gguf``) and a small file for the GGUF; the slow one converts the real file.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from focusvlm.models.demo import cache as C
from focusvlm.models.demo import lm as L

WORDS = "what color is the shape ? red blue".split()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("FOCUSVLM_CACHE", str(root))
    return root


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF file (only its identity enters the key) and a counted stand-in conversion."""
    folder = tmp_path / "wheel"
    folder.mkdir()
    (folder / L.DEMO_GGUF).write_bytes(b"GGUF" + bytes(range(256)) * 16)
    monkeypatch.setattr(L, "_smollm2_dir", lambda: folder)
    calls = []

    def convert():
        calls.append(1)
        return L.tiny_test_lm(WORDS, seed=len(calls))

    monkeypatch.setattr(L, "smollm2_lm_from_gguf", convert)
    return folder / L.DEMO_GGUF, calls


def _published(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith("smollm2-135m-instruct-"))


def _leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith("."))


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_first_load_builds_once_with_one_message_then_reads_the_folder(cache, fake_gguf, capfd):
    _, calls = fake_gguf
    lm, tokenizer = L.smollm2_lm()
    err = capfd.readouterr().err
    folder = L.smollm2_cache_dir()
    assert err.count("focusvlm: converting the demo LM") == 1 and str(folder) in err
    assert calls == [1] and _published(cache) == [folder] and not _leftovers(cache)
    assert C.is_complete(folder) and (folder / "model.safetensors").is_file()
    record = json.loads((folder / C.COMPLETE_MARKER).read_text())
    assert record == json.loads(json.dumps(L.smollm2_cache_key()))  # what the folder was built from
    assert lm.config.model_type == "llama" and "<image>" in tokenizer.get_vocab()
    assert getattr(lm.config, "quantization_config", None) is None

    again, again_tokenizer = L.smollm2_lm()
    # warm: no conversion and no message (transformers' own "Loading weights" bar follows --no-progress)
    assert calls == [1] and "focusvlm" not in capfd.readouterr().err
    assert _same_weights(lm, again) and again_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert L.smollm2_lm(cache=False) is not None and calls == [1, 1]  # cache=False converts, touches nothing
    assert _published(cache) == [folder]


def test_the_key_names_the_versions_and_the_gguf_and_a_change_rebuilds(cache, fake_gguf, monkeypatch):
    import transformers

    import focusvlm

    gguf, calls = fake_gguf
    key = L.smollm2_cache_key()
    assert key["focusvlm"] == focusvlm.__version__ and key["transformers"] == transformers.__version__
    assert key["gguf"]["size"] == gguf.stat().st_size and key["format"] == L.SMOLLM2_CACHE_FORMAT
    L.smollm2_lm()
    first = L.smollm2_cache_dir()
    assert L.smollm2_cache_dir() == first and calls == [1]  # the key is stable

    folders = {first}
    for change in ("focusvlm", "transformers", "gguf"):
        if change == "focusvlm":
            monkeypatch.setattr(focusvlm, "__version__", focusvlm.__version__ + ".post1")
        elif change == "transformers":
            monkeypatch.setattr(transformers, "__version__", transformers.__version__ + ".dev0")
        else:  # same size, other bytes: a different file
            data = bytearray(gguf.read_bytes())
            data[10] ^= 0xFF
            gguf.write_bytes(bytes(data))
        L.smollm2_lm()
        assert L.smollm2_cache_dir() not in folders, change
        folders.add(L.smollm2_cache_dir())
    assert len(calls) == 4 and set(_published(cache)) == folders
    assert all(C.is_complete(f) for f in folders)


def test_a_folder_without_the_marker_is_rebuilt_not_read(cache, fake_gguf):
    _, calls = fake_gguf
    folder = L.smollm2_cache_dir()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{not json")  # what an interrupted writer would leave
    lm, _ = L.smollm2_lm()
    assert calls == [1] and C.is_complete(folder) and lm.config.model_type == "llama"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    assert _published(cache) == [folder] and not _leftovers(cache)


def test_a_damaged_published_folder_is_rebuilt(cache, fake_gguf, capfd):
    _, calls = fake_gguf
    L.smollm2_lm()
    folder = L.smollm2_cache_dir()
    (folder / "model.safetensors").write_bytes(b"truncated")
    lm, _ = L.smollm2_lm()
    assert calls == [1, 1] and lm.config.model_type == "llama" and C.is_complete(folder)
    assert "could not be read" in capfd.readouterr().err


def test_an_unwritable_cache_falls_back_to_converting(tmp_path, fake_gguf, monkeypatch, capfd):
    _, calls = fake_gguf
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FOCUSVLM_CACHE", str(blocker / "cache"))  # under a file: cannot be created
    lm, _ = L.smollm2_lm()
    assert calls == [1] and lm.config.model_type == "llama"
    assert "cannot cache the converted demo LM" in capfd.readouterr().err


def test_a_failed_write_uses_the_conversion_it_made(cache, fake_gguf, monkeypatch, capfd):
    _, calls = fake_gguf

    def disk_full(lm, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(L, "_save_plain_llama", disk_full)
    lm, _ = L.smollm2_lm()
    assert calls == [1] and lm.config.model_type == "llama"  # converted once, not again for the fallback
    assert "No space left" in capfd.readouterr().err and not list(cache.iterdir())  # nothing half-written left


def test_build_once_with_racing_builders_publishes_one_folder(tmp_path):
    folder = tmp_path / "cache" / "thing"
    barrier = threading.Barrier(2, timeout=30)
    results, errors = [], []

    def write(tmp: Path) -> None:
        (tmp / "data.txt").write_text(threading.current_thread().name)
        barrier.wait()  # both builders are past the completeness check before either publishes

    def build() -> None:
        try:
            results.append(C.build_once(folder, write, {"who": threading.current_thread().name}))
        except Exception as exc:  # noqa: BLE001 -- reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=build, name=f"builder-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == [False, True]
    assert C.is_complete(folder) and sorted(p.name for p in folder.parent.iterdir()) == ["thing"]
    winner = json.loads((folder / C.COMPLETE_MARKER).read_text())["who"]
    assert (folder / "data.txt").read_text() == winner  # one builder's files, never a mix
    assert C.build_once(folder, write) is False  # complete: nothing written


def test_stale_temporary_folders_are_swept(tmp_path):
    folder = tmp_path / "thing"
    stale, fresh = tmp_path / ".thing.tmp-dead", tmp_path / ".thing.tmp-live"
    for p in (stale, fresh):
        p.mkdir()
        (p / "model.safetensors").write_text("x")
    old = os.path.getmtime(stale) - C._STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    C.build_once(folder, lambda tmp: None)
    assert not stale.exists() and fresh.exists() and C.is_complete(folder)


_RACER = r"""
import sys, time
from pathlib import Path
from focusvlm.models.demo import lm as L

wheel, ready = Path(sys.argv[1]), Path(sys.argv[2])
L._smollm2_dir = lambda: wheel

def convert():
    # a file barrier: both processes are converting (past the completeness check) before either publishes
    (ready / sys.argv[3]).touch()
    deadline = time.time() + 120
    while len(list(ready.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.05)
    return L.tiny_test_lm("what color is the shape ? red blue".split(), seed=int(sys.argv[3]))

L.smollm2_lm_from_gguf = convert
lm, tokenizer = L.smollm2_lm()
print(float(lm.model.embed_tokens.weight.double().sum()), len(tokenizer))
"""


@pytest.mark.slow  # two fresh interpreters importing torch and transformers
def test_two_processes_loading_at_once_both_succeed_and_leave_one_folder(cache, fake_gguf, tmp_path):
    gguf, _ = fake_gguf
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "FOCUSVLM_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(gguf.parent), str(ready), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert len(list(ready.iterdir())) == 2  # both converted: the race really happened
    folders = _published(cache)
    assert len(folders) == 1 and C.is_complete(folders[0]) and not _leftovers(cache)
    # both processes read the one published folder (whichever conversion won), so they hold the same LM
    # (the last line: an installed DeepSpeed may log its accelerator on stdout first)
    assert outs[0][0].strip().splitlines()[-1] == outs[1][0].strip().splitlines()[-1]


@pytest.mark.slow  # converts the real GGUF (~40 s)
def test_cached_lm_is_the_gguf_conversion(cache, monkeypatch, capfd):
    """The cached LM gives the same logits, bit for bit, as transformers' direct GGUF conversion; the tokenizer
    read back encodes and decodes the same."""
    direct_lm, direct_tok = L.smollm2_lm_from_gguf()
    # the cache is built from this very conversion (not a second 40 s one), then read back from disk
    monkeypatch.setattr(L, "smollm2_lm_from_gguf", lambda: (copy.deepcopy(direct_lm), copy.deepcopy(direct_tok)))
    cached_lm, cached_tok = L.smollm2_lm()
    assert capfd.readouterr().err.count("converting the demo LM") == 1
    assert C.is_complete(L.smollm2_cache_dir())

    text = ("<|im_start|>user\n<image>\nWhat color is the shape? Answer with one word.<|im_end|>\n"
            "<|im_start|>assistant\n")
    ids = direct_tok(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, cached_tok(text, return_tensors="pt")["input_ids"])
    assert direct_tok.get_vocab() == cached_tok.get_vocab() and len(cached_tok) == 49153
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "chat_template"):
        assert getattr(direct_tok, attr) == getattr(cached_tok, attr), attr
    assert direct_tok.decode(ids[0]) == cached_tok.decode(ids[0])
    text_ids = ids[ids != cached_tok.convert_tokens_to_ids("<image>")][None]  # the unresized LM has no <image> row
    with torch.no_grad():
        assert torch.equal(direct_lm.eval()(text_ids).logits, cached_lm.eval()(text_ids).logits)
    assert _same_weights(direct_lm, cached_lm)
    assert cached_lm.lm_head.weight.data_ptr() == cached_lm.model.embed_tokens.weight.data_ptr()  # still tied
