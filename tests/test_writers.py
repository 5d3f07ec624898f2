"""Everything Verse writes to a user's disk goes through `verse.publish`: outputs get the umask's modes, nothing a
user owns is overwritten or deleted without --overwrite, a failed write leaves the destination exactly as it was
(file hashes before/after), the source is never the destination (resolved paths and inodes), FP8 casts copy no
file from outside the source, and model-parallel shards load back into the original model."""

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import verse
from verse import ModelArgs, ReasoningLLM
from verse.cli import main
from verse.errors import VerseError
from verse.interop.adapter import save_adapter
from verse.interop.fp8_cast import fp8_to_bf16
from verse.interop.gguf import save_gguf
from verse.interop.hf import save_pretrained
from verse.interop.parallel import save_model_parallel
from verse.peft import LoraArgs, apply_lora
from verse.train.checkpoint import save_checkpoint


def snapshot(path: Path) -> dict:
    """Every entry under `path` (links not followed): file -> sha256, link -> its target, directory -> 'dir'."""
    out = {}
    for entry in sorted([path, *path.rglob("*")]):
        rel = str(entry.relative_to(path))
        if entry.is_symlink():
            out[rel] = "-> " + os.readlink(entry)
        elif entry.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(entry.read_bytes()).hexdigest()
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def tiny_model(seed: int = 0, preset: str = "tiny", **overrides) -> ReasoningLLM:
    torch.manual_seed(seed)
    return ReasoningLLM(ModelArgs.from_preset(preset, dtype="float32", **overrides)).eval()


def mla_moe_model(seed: int = 0) -> ReasoningLLM:
    """bytegpt-tiny (MLA + alternating MoE) with a vocabulary two ranks can split; random router biases."""
    model = tiny_model(seed, "bytegpt-tiny", n_layers=3, vocab_size=256, router_bias_update_rate=0.0)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("bias"):
                buffer.normal_(0, 0.1)
    return model


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    save_pretrained(tiny_model(), tmp_path / "src")
    return tmp_path / "src"


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if ": error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def fp8_checkpoint(path: Path) -> None:
    """One FP8 weight with its block scale, a config.json and a README."""
    torch.manual_seed(0)
    path.mkdir()
    q = (torch.randn(128, 128) * 50).to(torch.float8_e4m3fn)
    save_file({"w.weight": q, "w.weight_scale_inv": torch.rand(1, 1) + 0.5, "norm.weight": torch.ones(128)},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": {}}))
    (path / "README.md").write_text("a model card")


# ---- 1. one publish helper: modes follow the umask, for every writer ----

@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def assert_modes(root: Path, mask: int) -> None:
    entries = [root, *root.rglob("*")] if root.is_dir() else [root]
    for entry in entries:
        if not entry.is_symlink():
            expected = (0o777 if entry.is_dir() else 0o666) & ~mask
            assert mode(entry) == expected, f"{entry}: {oct(mode(entry))} != {oct(expected)}"


def test_every_writer_publishes_with_the_umask_modes(tmp_path, umask, capsys):
    model = tiny_model()
    save_pretrained(model, tmp_path / "hf")
    save_gguf(model, tmp_path / "m.gguf")
    save_model_parallel(model, tmp_path / "mp", 2)
    fp8_checkpoint(tmp_path / "fp8")
    assert main(["fp8-to-bf16", str(tmp_path / "fp8"), str(tmp_path / "bf16")]) == 0
    step = save_checkpoint(tmp_path / "run", 1, model, {"step": 1, "m": torch.ones(3)})
    save_adapter(apply_lora(tiny_model(), LoraArgs(rank=2, alpha=4)), tmp_path / "adapter")
    for path in ("hf", "m.gguf", "mp", "bf16", "run/step-0000001", "adapter"):
        assert_modes(tmp_path / path, umask)
    # the files safetensors and tempfile create private are public like any other new file
    assert mode(tmp_path / "hf" / "model.safetensors") == 0o666 & ~umask
    assert mode(step / "train_state" / "state.safetensors") == 0o666 & ~umask
    assert mode(tmp_path / "bf16") == 0o777 & ~umask
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("renameat2", [True, False])
def test_publish_replaces_atomically_or_puts_the_old_content_back(tmp_path, monkeypatch, renameat2):
    import verse.publish as publish

    if not renameat2:  # the fallback for systems without renameat2: rename aside, rename in, put back on failure
        monkeypatch.setattr(publish, "_renameat2", lambda *args: False)
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(VerseError, match="exists"):
        with publish.staged(target) as tmp:  # replace not allowed
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with publish.staged(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    if not renameat2:
        real, calls = os.rename, []

        def failing_second_rename(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(5, "Input/output error")
            real(src, dst)

        monkeypatch.setattr(os, "rename", failing_second_rename)
        with pytest.raises(VerseError, match="Input/output error.*left as it was"):
            with publish.staged(target, replace=True) as tmp:
                (tmp / "newer.txt").write_text("newer")
        monkeypatch.setattr(os, "rename", real)
        assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- 2. + 4. non-empty destinations are refused without --overwrite; replacing is atomic ----

def test_convert_refuses_a_non_empty_directory_and_an_existing_gguf(hf_dir, tmp_path, capsys):
    other = tmp_path / "other"
    save_pretrained(tiny_model(seed=1), other)
    (other / "notes.txt").write_text("mine")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "config.json").mkdir()  # a user directory with an output file's name
    (tmp_path / "busy" / "config.json" / "keep.txt").write_text("mine")
    save_gguf(tiny_model(seed=2), tmp_path / "old.gguf")
    before = {name: snapshot(tmp_path / name) for name in ("other", "busy", "old.gguf")}
    for dst, extra in ((other, []), (tmp_path / "busy", []), (tmp_path / "old.gguf", []),
                       (other, ["--model-parallel", "2"]), (other, ["--to", "hf"])):
        code, err = run_cli(capsys, "convert", hf_dir, dst, *extra)
        assert code == 2 and "--overwrite" in one_error_line(err), err
    assert {name: snapshot(tmp_path / name) for name in before} == before


def test_model_parallel_into_an_existing_checkpoint_keeps_it_loadable(hf_dir, tmp_path, capsys):
    """#20 item 4: the shards' verse.json used to replace the checkpoint's own, breaking it."""
    other = tmp_path / "other"
    original = tiny_model(seed=1)
    save_pretrained(original, other)
    before = snapshot(other)
    code, err = run_cli(capsys, "convert", hf_dir, other, "--model-parallel", "2")
    assert code == 2 and "not empty" in one_error_line(err)
    assert snapshot(other) == before
    x = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        assert torch.equal(verse.load(other)(x), original(x))


def test_overwrite_replaces_the_destination_whole(hf_dir, tmp_path, capsys):
    dst = tmp_path / "dst"
    save_pretrained(tiny_model(seed=1), dst)
    (dst / "notes.txt").write_text("old")
    assert run_cli(capsys, "convert", hf_dir, dst, "--overwrite")[0] == 0
    assert snapshot(dst) == {k: v for k, v in snapshot(hf_dir).items()}  # exactly the new checkpoint
    assert run_cli(capsys, "convert", hf_dir, dst, "--model-parallel", "2", "--overwrite")[0] == 0
    assert sorted(p.name for p in dst.iterdir()) == ["model0-mp2.safetensors", "model1-mp2.safetensors",
                                                     "verse.json"]
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"old")
    assert run_cli(capsys, "convert", hf_dir, gguf, "--overwrite")[0] == 0
    assert gguf.read_bytes()[:4] == b"GGUF"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("target", ["dir", "mp", "gguf"])
def test_a_failed_conversion_leaves_the_destination_as_it_was(hf_dir, tmp_path, capsys, monkeypatch, target):
    dst = tmp_path / ("old.gguf" if target == "gguf" else "dst")
    if target == "gguf":
        dst.write_bytes(b"precious")
    else:
        save_pretrained(tiny_model(seed=1), dst)
        (dst / "notes.txt").write_text("mine")
    before = snapshot(dst)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    import gguf
    import verse.interop.hf
    import verse.interop.parallel

    if target == "gguf":
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full)
    else:
        monkeypatch.setattr(verse.interop.hf if target == "dir" else verse.interop.parallel, "save_file", disk_full)
    extra = ["--model-parallel", "2"] if target == "mp" else []
    code, err = run_cli(capsys, "convert", hf_dir, dst, "--overwrite", *extra)
    assert code == 2 and "No space left on device" in one_error_line(err) and "left as it was" in err
    assert snapshot(dst) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fp8_to_bf16_refuses_a_non_empty_destination_unless_overwrite(tmp_path, capsys):
    fp8_checkpoint(tmp_path / "fp8")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "config.json").write_text("user's")
    before = snapshot(dst)
    code, err = run_cli(capsys, "fp8-to-bf16", tmp_path / "fp8", dst)
    assert code == 2 and "--overwrite" in one_error_line(err)
    assert snapshot(dst) == before
    assert run_cli(capsys, "fp8-to-bf16", tmp_path / "fp8", dst, "--overwrite")[0] == 0
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_save_pretrained_rule(tmp_path):
    """New/empty directories and existing checkpoints (re-saved, other entries kept) are fine; any other non-empty
    directory needs overwrite=True, which replaces it whole."""
    model = tiny_model()
    (tmp_path / "empty").mkdir()
    save_pretrained(model, tmp_path / "empty")
    assert (tmp_path / "empty" / "verse.json").is_file()
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    before = snapshot(user)
    with pytest.raises(VerseError, match="not empty; pass --overwrite"):
        save_pretrained(model, user)
    with pytest.raises(VerseError, match="not empty; pass --overwrite"):
        model.save_pretrained(user)
    assert snapshot(user) == before
    step = tmp_path / "step"
    save_pretrained(tiny_model(seed=1), step)
    (step / "train_state").mkdir()
    (step / "train_state" / "state.json").write_text("{}")
    (step / "tokenizer.json").mkdir()  # a directory where the re-save would write a file: refused, kept
    with pytest.raises(VerseError, match="tokenizer.json: a directory"):
        save_pretrained(model, step, tokenizer=verse.load_tokenizer("byte"))
    (step / "tokenizer.json").rmdir()
    save_pretrained(model, step)
    assert (step / "train_state" / "state.json").read_text() == "{}"
    assert torch.equal(verse.load(step).embed.weight, model.embed.weight)
    save_pretrained(model, user, overwrite=True)
    assert not (user / "thesis.tex").exists() and (user / "verse.json").is_file()


def test_save_adapter_rule(tmp_path):
    """An adapter directory is re-saved (other entries kept); another non-empty directory needs overwrite=True."""
    args = LoraArgs(rank=2, alpha=4)
    model = apply_lora(tiny_model(), args)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(VerseError, match="not empty; pass --overwrite"):
        save_adapter(model, user, args)
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, args)
    (adapter / "README.md").write_text("card")
    save_adapter(model, adapter, args)
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors"]
    save_adapter(model, user, args, overwrite=True)
    assert not (user / "notes.txt").exists()


# ---- 3. the destination is never the source, inside it, or holding it ----

def test_destination_is_compared_by_resolved_path_and_inode(hf_dir, tmp_path, capsys):
    (tmp_path / "link").symlink_to(hf_dir)
    gguf = tmp_path / "g.gguf"
    save_gguf(tiny_model(), gguf)
    (tmp_path / "sub").mkdir()
    os.link(gguf, tmp_path / "hard.gguf")
    fp8_checkpoint(tmp_path / "fp8")
    before = {p: snapshot(p) for p in (hf_dir, gguf, tmp_path / "fp8")}
    cases = [
        (["convert", hf_dir, f"{hf_dir}/../{hf_dir.name}", "--overwrite"], "is the source"),
        (["convert", hf_dir, tmp_path / "link", "--overwrite"], "is the source"),
        (["convert", tmp_path / "link", hf_dir, "--overwrite"], "is the source"),
        (["convert", gguf, tmp_path / "sub" / ".." / "g.gguf", "--overwrite"], "is the source"),
        (["convert", gguf, tmp_path / "hard.gguf", "--overwrite"], "is the source"),
        (["convert", hf_dir, hf_dir / "inner"], "inside the source"),
        (["convert", hf_dir, tmp_path / "link" / "m.gguf"], "inside the source"),
        (["convert", gguf, tmp_path, "--overwrite"], "holds the source"),
        (["convert", hf_dir, tmp_path, "--model-parallel", "2", "--overwrite"], "holds the source"),
        (["fp8-to-bf16", tmp_path / "fp8", f"{tmp_path}/fp8/../fp8", "--overwrite"], "is the source"),
        (["fp8-to-bf16", tmp_path / "fp8", tmp_path / "fp8" / "out"], "inside the source"),
        (["fp8-to-bf16", tmp_path / "fp8", tmp_path, "--overwrite"], "holds the source"),
    ]
    for argv, needle in cases:
        code, err = run_cli(capsys, *argv)
        assert code == 2 and needle in one_error_line(err), (argv, err)
    assert {p: snapshot(p) for p in before} == before
    assert not (hf_dir / "inner").exists() and not (tmp_path / "fp8" / "out").exists()


# ---- 6. fp8-to-bf16 copies no file from outside the source ----

def test_fp8_to_bf16_skips_files_linking_outside_the_source(tmp_path, capsys):
    secret = tmp_path / "secret"
    secret.write_text("ssh-rsa PRIVATE")
    src = tmp_path / "fp8"
    fp8_checkpoint(src)
    (src / "README.md").unlink()
    (src / "README.md").symlink_to(secret)
    (src / "card.md").symlink_to("config.json")  # a link inside the source is fine
    code, err = run_cli(capsys, "fp8-to-bf16", src, tmp_path / "out")
    assert code == 0
    assert "skipped README.md" in err and "secret" not in err.replace(str(src), "")
    assert not (tmp_path / "out" / "README.md").exists()
    assert (tmp_path / "out" / "card.md").read_text() == (src / "config.json").read_text()
    assert all("PRIVATE" not in p.read_bytes().decode(errors="replace") for p in (tmp_path / "out").iterdir())


def test_fp8_to_bf16_reads_a_hugging_face_cache_snapshot(tmp_path):
    """In the Hub cache every file of `snapshots/REV` links to `../../blobs/SHA`: those are the source's own."""
    plain = tmp_path / "plain"
    fp8_checkpoint(plain)
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    for file in plain.iterdir():
        file.rename(repo / "blobs" / file.name)
        (snap / file.name).symlink_to(Path("..") / ".." / "blobs" / file.name)
    summary = fp8_to_bf16(snap, tmp_path / "out", progress=False)
    assert summary.skipped == [] and (tmp_path / "out" / "README.md").read_text() == "a model card"


# ---- 7. model-parallel shards load back ----

def test_model_parallel_shards_load_back_dense(tmp_path, capsys):
    """Dense Llama from transformers -> 2 ranks -> verse.load: transformers' logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert run_cli(capsys, "convert", tmp_path / "hf", tmp_path / "mp", "--model-parallel", "2")[0] == 0
    model = verse.load(tmp_path / "mp")
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=0)
    assert verse.load(tmp_path / "mp", dtype="bf16").embed.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("tied", [False, True])
def test_model_parallel_shards_load_back_mla_moe(tmp_path, capsys, tied):
    """MLA + MoE (experts split by rank) -> 2 ranks -> verse.load: the original model's logits, bit for bit."""
    original = mla_moe_model() if not tied else tiny_model(tie_embeddings=True)
    save_pretrained(original, tmp_path / "src")
    assert run_cli(capsys, "convert", tmp_path / "src", tmp_path / "mp", "--model-parallel", "2")[0] == 0
    loaded = verse.load(tmp_path / "mp")
    x = torch.randint(0, original.args.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))
    assert loaded.args.to_dict() == original.args.to_dict()
    (tmp_path / "mp" / "verse.json").unlink()
    code, err = run_cli(capsys, "generate", tmp_path / "mp", "--prompt", "hi")
    assert code == 2 and "verse.json" in one_error_line(err)
