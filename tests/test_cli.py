"""The command line: output a user reads, exit codes, no tracebacks."""

import re
import subprocess
import sys

import pytest

import effft
from effft.cli import run


def effft_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effft.cli", *args], capture_output=True, text=True, timeout=300)


def test_models_prints_every_variant_with_params_resolution_and_tags(capsys):
    assert run(["models"]) == 0
    out = capsys.readouterr().out
    for name in effft.list_models():
        assert name in out
    assert "5.3M" in out  # B0's 5.29M parameters
    assert "ra_in1k" in out and "ns_jft_in1k" in out


def test_unknown_command_is_an_argparse_error():
    result = effft_cli("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr and "Traceback" not in result.stderr


def test_bench_model_reports_both_implementations_and_their_ratio(capsys):
    assert run(["bench", "model", "--batch-size", "2", "--image-size", "32", "--rounds", "2", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "forward+backward" in out and "effft img/s" in out and "timm img/s" in out
    assert "BN folded" in out  # effft's inference model (predict, export) against timm's eager forward


@pytest.mark.slow  # torch.compile's first compilation of a whole network takes a minute on a small CPU
def test_bench_model_times_the_compiled_model_when_asked(capsys):
    assert run(["bench", "model", "--batch-size", "2", "--image-size", "32", "--rounds", "2", "--iters", "1",
                "--compile"]) == 0
    figures = re.findall(r"compiled\s*│\s*([\d.]+)\s*│\s*([\d.]+)\s*│\s*([\d.]+)", capsys.readouterr().out)
    assert len(figures) == 1 and min(float(f) for f in figures[0]) > 0  # effft, timm, their ratio


def test_bench_data_reports_files_and_cache(capsys):
    assert run(["bench", "data", "--large", "10", "--limit", "3", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "from cache" in out and "generated" in out


def test_error_messages_with_brackets_print_as_written(tmp_path, capsys):
    missing = tmp_path / "[not] here.yaml"
    assert run(["info", str(missing)]) == 2
    assert "[not] here.yaml" in capsys.readouterr().err


def test_bench_arguments_are_checked_before_any_work(capsys):
    import pytest

    for bad, name in [(["--batch-size", "0"], "--batch-size"), (["--image-size", "-5"], "--image-size"),
                      (["--rounds", "0"], "--rounds"), (["--device", "tpu"], "--device"), (["--limit", "x"], "--limit")]:
        with pytest.raises(SystemExit) as stop:
            run(["bench", "model", *bad])
        assert stop.value.code == 2
        assert name in capsys.readouterr().err
    assert run(["bench", "model", "--model", "efficientnet_b99"]) != 0
    err = capsys.readouterr().err
    assert "unknown model 'efficientnet_b99'" in err and "efficientnet_b7" in err


def test_an_os_error_on_a_users_path_is_one_message(monkeypatch, capsys):
    import effft.cli as cli

    def refuse(args):
        raise PermissionError(13, "Permission denied", "/data/locked/preds.csv")

    monkeypatch.setattr(cli, "_predict", refuse)
    assert run(["predict", "run", "images", "--out", "/data/locked/preds.csv"]) == 1
    err = capsys.readouterr().err
    assert "/data/locked/preds.csv: Permission denied" in err and "Traceback" not in err


def test_a_file_that_is_no_checkpoint_is_named_without_torchs_unsafe_advice(tmp_path, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(bytes(range(256)) * 4)
    for command in (["test", str(garbage)], ["export", str(garbage), "--format", "onnx"]):
        assert run(command) == 1
        err = capsys.readouterr().err
        assert f"cannot read checkpoint {garbage}: it is not a checkpoint" in err
        assert "weights_only" not in err and "Traceback" not in err


def test_a_medmnist_file_that_is_no_npz_is_named_without_numpys_pickle_advice(tmp_path):
    import pytest

    from effft.data.sources import medmnist
    from effft.errors import EffftError

    fake = tmp_path / "fake.npz"
    fake.write_text("not an archive")
    with pytest.raises(EffftError) as caught:
        medmnist.load(tmp_path, medmnist.Options(file="fake.npz"), channels=1)
    assert "it is not a NumPy .npz archive" in str(caught.value) and "pickle" not in str(caught.value)


def test_bench_sizes_the_machine_cannot_hold_are_refused_before_any_work(capsys):
    for part in ("model", "data"):
        assert run(["bench", part, "--image-size", "100000"]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert "--image-size 100000" in err and "of memory" in err and "free" in err and "Traceback" not in err
    assert run(["bench", "model", "--image-size", "2000", "--batch-size", "100000"]) == 1
    assert "--batch-size 100000" in capsys.readouterr().err


def test_quiet_and_verbose_are_taken_before_and_after_the_command():
    from effft.cli import build_parser

    parser = build_parser()
    for argv, quiet, verbose in [
        (["fit", "r.yaml"], False, False),
        (["-q", "fit", "r.yaml"], True, False),
        (["fit", "r.yaml", "--quiet"], True, False),
        (["fit", "r.yaml", "-v"], False, True),
        (["--verbose", "fit", "r.yaml", "-q"], True, True),
        (["info", "r.yaml", "-q"], True, False),
        (["models", "--verbose"], False, True),
    ]:
        args = parser.parse_args(argv)
        assert (args.quiet, args.verbose) == (quiet, verbose), argv
    result = effft_cli("info", "missing.yaml", "--quiet")  # argparse took the flag: the recipe is what fails
    assert result.returncode == 2 and "missing.yaml" in result.stderr and "unrecognized" not in result.stderr
