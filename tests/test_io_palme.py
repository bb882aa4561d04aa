"""No output path ever deletes what it should not (`palme_hf.io_palme`, through the three scripts that write models:
`conversion/convert_zeta_palme.py`, `examples/train_captioner.py` and `examples/train_from_towers.py`): an empty
path, an output folder that is, holds or lies inside an input, and a link to a folder are handled before any work;
a run stopped by SIGTERM or killed leaves no temporary behind for long; and files that cannot be read or written are
named before the work starts."""

import os
import shutil
import subprocess
import sys
import textwrap

import PIL.Image
import pytest

from palme_hf.io_palme import (
    atomic_output_dir,
    check_output_dir,
    read_json_file,
    write_bytes_file,
    write_text_file,
)

from helpers import fixture_path, load_script, read_only_folder, save_tiny_towers

CHECKPOINT = fixture_path("palme_tiny_default", "checkpoint.pt")
KWARGS = fixture_path("palme_tiny_default", "kwargs.json")
# The smallest runs of the training scripts that still write a model.
CAPTIONER_RUN = [
    "--train-samples", "8", "--batch-size", "8", "--eval-samples", "2", "--image-size", "32", "--patch-size", "8",
    "--hidden-size", "32", "--num-layers", "1", "--robustness-samples", "0", "--logging-steps", "1",
]  # fmt: skip
TOWERS_RUN = ["--train-samples", "8", "--batch-size", "4", "--max-steps", "1", "--logging-steps", "1"]
WRITERS = ["convert_zeta_palme", "train_captioner", "train_from_towers"]


@pytest.fixture(scope="module")
def scripts():
    return {
        "convert_zeta_palme": load_script("conversion", "convert_zeta_palme.py"),
        "train_captioner": load_script("examples", "train_captioner.py"),
        "train_from_towers": load_script("examples", "train_from_towers.py"),
    }


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """(vision folder, text folder) of tiny towers."""
    return save_tiny_towers(tmp_path_factory.mktemp("towers"), "vit", "llama")


def run_writer(scripts, capsys, writer, output, *options) -> tuple[int, str]:
    """Runs `writer`'s main in this process with `output` as its output folder: (exit status, stderr and the error
    message)."""
    try:
        if writer == "convert_zeta_palme":
            argv = ["--checkpoint", CHECKPOINT, "--kwargs", KWARGS, "--output", output, *options]
            code, message = scripts[writer].main(argv), ""
        elif writer == "train_captioner":
            scripts[writer].main(["--output-dir", output, *CAPTIONER_RUN, *options])
            code, message = 0, ""
        else:
            scripts[writer].main(["--output-dir", output, *TOWERS_RUN, *options])
            code, message = 0, ""
    except SystemExit as exit:  # train_captioner: the code is the line `error: ...`, which Python prints
        code, message = (1, exit.code) if isinstance(exit.code, str) else (exit.code, "")
    except ValueError as error:  # train_from_towers's main; its command line prints `error: ...`
        code, message = 1, str(error)
    return code, message + capsys.readouterr().err


def writer_inputs(writer, towers) -> list[str]:
    """Options that give `writer` its inputs (train_captioner needs none: it makes synthetic data)."""
    if writer == "train_from_towers":
        return ["--vision-model", towers[0], "--text-model", towers[1]]
    return []


def tree(folder) -> dict:
    """Every file under `folder` with its contents."""
    return {
        os.path.relpath(os.path.join(path, name), folder): open(os.path.join(path, name), "rb").read()
        for path, _, names in os.walk(folder)
        for name in names
    }


@pytest.mark.parametrize("writer", WRITERS)
def test_an_empty_output_path_is_refused_and_the_current_folder_kept(
    writer, scripts, towers, tmp_path, monkeypatch, capsys
):
    """`--output-dir "$OUT"` with `OUT` unset once replaced the current folder, even without --overwrite."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("x")
    monkeypatch.chdir(work)
    for overwrite in ([], ["--overwrite"]):
        code, err = run_writer(scripts, capsys, writer, "", *writer_inputs(writer, towers), *overwrite)
        assert code == 1 and "The output folder is the empty path ''" in err
        assert os.listdir(work) == ["precious.txt"] and (work / "precious.txt").read_text() == "x"
        assert os.listdir(tmp_path) == ["work"]


def test_the_current_folder_and_its_parents_are_refused_as_output(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("x")
    monkeypatch.chdir(work)
    for output, where in ((".", "is the current folder"), (str(tmp_path), "is a folder holding the current folder")):
        with pytest.raises(ValueError, match=where):
            check_output_dir(output, overwrite=True)
        with pytest.raises(ValueError, match=where):
            with atomic_output_dir(output, overwrite=True):
                pass
    assert os.listdir(work) == ["precious.txt"]


def overlapping_inputs(writer, towers, tmp_path) -> list[tuple[list[str], str, str]]:
    """(options, output folder, the input named in the refusal) where the output is, holds or lies inside an input,
    for `writer`; the inputs are copies in `tmp_path`."""
    if writer == "convert_zeta_palme":
        inputs = tmp_path / "inputs"
        inputs.mkdir()
        checkpoint, kwargs = shutil.copy(CHECKPOINT, inputs), shutil.copy(KWARGS, inputs)
        options = ["--checkpoint", checkpoint, "--kwargs", kwargs]
        return [(options, str(inputs), f"a folder holding --checkpoint {checkpoint}")]
    if writer == "train_from_towers":
        vision, text = shutil.copytree(towers[0], tmp_path / "vision"), shutil.copytree(towers[1], tmp_path / "text")
        options = ["--vision-model", str(vision), "--text-model", str(text)]
        return [
            (options, str(vision), f"the same as --vision-model {vision}"),
            (options, str(tmp_path), f"a folder holding --vision-model {vision}"),
            (options, str(text / "out"), f"inside --text-model {text}"),
        ]
    data = tmp_path / "data"
    for split in ("train", "test"):
        (data / split).mkdir(parents=True)
        PIL.Image.new("RGB", (32, 32), "red").save(data / split / "00.png")
        (data / split / "metadata.jsonl").write_text('{"file_name": "00.png", "text": "a small red circle"}\n')
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    folders = ["--train-dir", str(data / "train"), "--eval-dir", str(data / "test")]
    return [
        (folders, str(data / "train"), f"the same as --train-dir {data / 'train'}"),
        (folders, str(data), f"a folder holding --train-dir {data / 'train'}"),
        (folders, str(data / "test" / "out"), f"inside --eval-dir {data / 'test'}"),
        (["--init-from", str(model)], str(model), f"the same as --init-from {model}"),
        (["--sample-images-dir", str(data / "train")], str(data), f"a folder holding --sample-images-dir {data}"),
    ]


@pytest.mark.parametrize("writer", WRITERS)
def test_overwrite_never_deletes_an_input(writer, scripts, towers, tmp_path, capsys):
    for options, output, refusal in overlapping_inputs(writer, towers, tmp_path):
        before = tree(tmp_path)
        code, err = run_writer(scripts, capsys, writer, output, *options, "--overwrite")
        assert code == 1 and f"The output folder {output} is {refusal}" in err, err
        assert tree(tmp_path) == before


@pytest.mark.slow  # trains (a step)
@pytest.mark.parametrize("writer", WRITERS)
def test_a_link_to_a_folder_stays_a_link_and_its_target_gets_the_result(writer, scripts, towers, tmp_path, capsys):
    target = tmp_path / "disk" / "model"
    target.mkdir(parents=True)
    (target / "previous.txt").write_text("the previous output")
    link = tmp_path / "model"
    link.symlink_to(target, target_is_directory=True)
    code, err = run_writer(scripts, capsys, writer, str(link), *writer_inputs(writer, towers))
    assert code == 1 and f"{link} is not empty; pass --overwrite" in err
    assert tree(target) == {"previous.txt": b"the previous output"}

    code, err = run_writer(scripts, capsys, writer, str(link), *writer_inputs(writer, towers), "--overwrite")
    assert code in (0, None), err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert "config.json" in os.listdir(target) and "previous.txt" not in os.listdir(target)
    assert sorted(os.listdir(tmp_path)) == ["disk", "model"] and os.listdir(tmp_path / "disk") == ["model"]


@pytest.mark.parametrize("writer", WRITERS)
def test_an_output_that_is_a_file_or_a_dangling_link_is_refused(writer, scripts, towers, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for output, kind in (("notes.txt", "not a folder"), ("dangling", "a link to nothing")):
        code, err = run_writer(scripts, capsys, writer, str(tmp_path / output), *writer_inputs(writer, towers))
        assert code == 1 and f"{tmp_path / output} exists and is {kind}" in err
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["dangling", "notes.txt"]


WRITE_THEN_WAIT = textwrap.dedent(
    """
    import sys, time
    from palme_hf.io_palme import atomic_output_dir

    with atomic_output_dir(sys.argv[1], overwrite=True) as folder:
        open(folder + "/half.bin", "wb").write(b"x" * 1000)
        print("writing", flush=True)
        time.sleep(60)
    """
)


@pytest.mark.slow  # a Python of its own
def test_sigterm_while_writing_removes_the_temporary_and_keeps_the_output(tmp_path):
    output = tmp_path / "model"
    output.mkdir()
    (output / "previous.txt").write_text("kept")
    process = subprocess.Popen(
        [sys.executable, "-c", WRITE_THEN_WAIT, str(output)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "writing\n"
    assert any(name.startswith(".model.tmp-") for name in os.listdir(tmp_path))
    process.terminate()  # SIGTERM
    assert process.wait(timeout=60) == 143
    assert "Traceback" not in process.stderr.read()
    assert os.listdir(tmp_path) == ["model"] and tree(output) == {"previous.txt": b"kept"}


def dead_process_id() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_of_killed_runs_are_removed_by_the_next_run(tmp_path, scripts, capsys):
    """What a run killed by SIGKILL leaves (`.NAME.tmp-PID-XXXXXXXX`) goes at the next write to the same output; the
    temporaries of running processes, and whatever is not ours, stay."""
    dead, alive = dead_process_id(), os.getpid()
    stale = tmp_path / f".model.tmp-{dead}-0123abcd"
    left = [f".model.tmp-{alive}-0123abcd", ".model.tmp-0123abcd", f".other.tmp-{dead}-0123abcd", ".model.tmp-mine"]
    for name in [stale.name, *left]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    assert run_writer(scripts, capsys, "convert_zeta_palme", str(tmp_path / "model"))[0] == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["model", *left])


def test_an_interrupted_swap_puts_the_previous_output_back(tmp_path, monkeypatch):
    output = tmp_path / "model"
    output.mkdir()
    (output / "previous.txt").write_text("kept")
    renames = []

    def interrupted_rename(source, destination):
        renames.append(source)
        if len(renames) == 2:  # Ctrl-C between moving the previous output aside and moving the new one in
            raise KeyboardInterrupt
        os.rename(source, destination)

    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(str(output), overwrite=True) as folder:
            open(os.path.join(folder, "new.txt"), "w").write("new")
            monkeypatch.setattr(os, "replace", interrupted_rename)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model"] and tree(output) == {"previous.txt": b"kept"}


def test_a_kwargs_file_that_is_not_utf8_is_named(tmp_path, scripts, capsys):
    """It ended in "'utf-8' codec can't decode byte 0xe9", naming no file."""
    path = tmp_path / "kwargs.json"
    path.write_bytes('{"name": "café"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path} is not UTF-8 text \\(byte 0xe9 at offset 13\\)"):
        read_json_file(str(path))
    argv = ["--checkpoint", CHECKPOINT, "--kwargs", str(path), "--output", str(tmp_path / "out")]
    assert scripts["convert_zeta_palme"].main(argv) == 1
    assert capsys.readouterr().err == f"error: {path} is not UTF-8 text (byte 0xe9 at offset 13).\n"


@pytest.mark.parametrize("writer", WRITERS)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(writer, scripts, towers, tmp_path, capsys):
    """train_from_towers.py once trained, failed at the final save and lost everything."""
    read_only = tmp_path / "read_only"
    (read_only / "existing").mkdir(parents=True)
    (tmp_path / "file").write_text("mine")
    cases = [
        (read_only / "new", f"the folder {read_only} is not writable"),
        (read_only / "existing", f"the folder {read_only} is not writable"),  # the finished result is renamed there
        (read_only / "deeper" / "new", f"the folder {read_only} is not writable"),
        (tmp_path / "file" / "new", f"cannot be made: {tmp_path / 'file'} is a file, not a folder"),
    ]
    with read_only_folder(read_only):
        for output, message in cases:
            code, err = run_writer(scripts, capsys, writer, str(output), *writer_inputs(writer, towers), "--overwrite")
            assert code == 1 and message in err, err
    assert tree(tmp_path) == {"file": b"mine"} and os.listdir(read_only) == ["existing"]


def test_files_are_written_whole_into_new_folders_and_replace_what_was_there(tmp_path):
    path = tmp_path / "new" / "folder" / "strip.png"
    write_bytes_file(str(path), b"\x89PNG\x00\xff")
    assert path.read_bytes() == b"\x89PNG\x00\xff"
    write_text_file(str(path), "caf\u00e9\n")
    assert path.read_bytes() == "caf\u00e9\n".encode("utf-8")
    assert os.listdir(path.parent) == ["strip.png"]  # no temporary file left beside it
