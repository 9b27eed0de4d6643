"""``reconkit evaluate`` gives fastmri.evaluate's numbers, per volume and mean, and reports bad files."""

from __future__ import annotations

import argparse
import csv
import errno
import io
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from fastmri import evaluate as fastmri_evaluate
from fastmri.data.transforms import center_crop

from reconkit.cli import evaluate as cli_evaluate
from reconkit.cli.main import main as reconkit_main
from reconkit.io import write_fastmri_h5


def _phantom(rng: np.random.Generator, slices: int, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    disc = ((yy - height / 2) ** 2 / (0.4 * height) ** 2 + (xx - width / 2) ** 2 / (0.35 * width) ** 2) < 1
    base = disc * (1.0 + 0.3 * np.sin(xx / 3.0))
    return (
        np.stack([base * (1 + 0.1 * s) + 0.05 * rng.random((height, width)) for s in range(slices)]).astype(np.float32)
        * 1e-4
    )


def _make_dirs(tmp_path, rng, shapes, key="reconstruction_rss"):
    target_dir, pred_dir = tmp_path / "target", tmp_path / "pred"
    target_dir.mkdir()
    for i, (slices, height, width, pred_height, pred_width) in enumerate(shapes):
        target = _phantom(rng, slices, height, width)
        with h5py.File(target_dir / f"file{i}.h5", "w") as f:
            f.create_dataset(key, data=target)
            f.attrs["acquisition"] = "CORPD_FBK"
        prediction = _phantom(rng, slices, pred_height, pred_width) + 2e-6 * rng.standard_normal(
            (slices, pred_height, pred_width)
        )
        write_fastmri_h5(pred_dir / f"file{i}.h5", prediction)
    return target_dir, pred_dir


def test_matches_fastmri_evaluate(tmp_path):
    rng = np.random.default_rng(0)
    # different slice counts; a wider prediction (cropped like fastmri does) and an odd-sized target
    target_dir, pred_dir = _make_dirs(tmp_path, rng, [(3, 40, 32, 40, 32), (2, 36, 30, 40, 34), (4, 33, 27, 33, 27)])
    scores, errors = cli_evaluate.evaluate_directories(target_dir, pred_dir)
    assert errors == []
    for score in scores:
        with h5py.File(target_dir / score.name) as t, h5py.File(pred_dir / score.name) as p:
            gt, pred = t["reconstruction_rss"][()], p["reconstruction"][()]
        size = (gt.shape[-1], gt.shape[-1])
        gt, pred = center_crop(gt, size), center_crop(pred, size)
        assert score.nmse == pytest.approx(float(fastmri_evaluate.nmse(gt, pred)), rel=1e-5)
        assert score.psnr == pytest.approx(float(fastmri_evaluate.psnr(gt, pred)), rel=1e-5)
        assert score.ssim == pytest.approx(float(fastmri_evaluate.ssim(gt, pred)[0]), rel=1e-5)
    args = argparse.Namespace(target_path=target_dir, predictions_path=pred_dir, acquisition=None, acceleration=None)
    reference = fastmri_evaluate.evaluate(args, "reconstruction_rss").means()
    mean = cli_evaluate.mean_score(scores)
    assert mean.nmse == pytest.approx(reference["NMSE"], rel=1e-5)
    assert mean.psnr == pytest.approx(reference["PSNR"], rel=1e-5)
    assert mean.ssim == pytest.approx(reference["SSIM"], rel=1e-5)


def test_acquisition_and_acceleration_filters_match_fastmri(tmp_path, capsys):
    rng = np.random.default_rng(1)
    target_dir, pred_dir = _make_dirs(tmp_path, rng, [(2, 32, 24, 32, 24)] * 4)
    for i, (acquisition, acceleration) in enumerate([("CORPD_FBK", 4), ("CORPDFS_FBK", 4), ("CORPD_FBK", 8),
                                                     ("AXT2", 4)]):  # fmt: skip
        with h5py.File(target_dir / f"file{i}.h5", "a") as f:
            f.attrs["acquisition"], f.attrs["acceleration"] = acquisition, acceleration
    for acquisition, acceleration, expected in [("CORPD_FBK", None, {0, 2}), (None, 4, {0, 1, 3}),
                                                ("CORPD_FBK", 8, {2}), ("AXFLAIR", None, set())]:  # fmt: skip
        scores, errors = cli_evaluate.evaluate_directories(target_dir, pred_dir, acquisition=acquisition,
                                                           acceleration=acceleration)  # fmt: skip
        assert errors == [] and {s.name for s in scores} == {f"file{i}.h5" for i in expected}
        if expected:
            args = argparse.Namespace(target_path=target_dir, predictions_path=pred_dir, acquisition=acquisition,
                                      acceleration=acceleration)  # fmt: skip
            reference = fastmri_evaluate.evaluate(args, "reconstruction_rss").means()
            assert cli_evaluate.mean_score(scores).ssim == pytest.approx(reference["SSIM"], rel=1e-5)
            assert cli_evaluate.mean_score(scores).psnr == pytest.approx(reference["PSNR"], rel=1e-5)
    # a fixed-length (bytes) acquisition string, as some writers store it, still matches its name (fastmri's
    # script compares bytes with str and would drop the file, so this part has no oracle)
    with h5py.File(target_dir / "file2.h5", "a") as f:
        f.attrs["acquisition"] = np.bytes_("CORPD_FBK")
    scores, errors = cli_evaluate.evaluate_directories(target_dir, pred_dir, acquisition="CORPD_FBK")
    assert errors == [] and {s.name for s in scores} == {"file0.h5", "file2.h5"}
    # an earlier run's CSV stayed when nothing matched (exit 1): a script reading it got the earlier run's scores
    csv_path = tmp_path / "metrics.csv"
    assert reconkit_main(["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir),
                          "--acquisition", "CORPD_FBK", "--csv", str(csv_path)]) == 0  # fmt: skip
    code = reconkit_main(["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir),
                          "--acquisition", "AXFLAIR", "--csv", str(csv_path)])  # fmt: skip
    assert code == 1 and "no .h5 / .hdf5 target files match the filters" in capsys.readouterr().err
    with open(csv_path) as handle:
        assert list(csv.DictReader(handle)) == []
    assert reconkit_main(["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir),
                          "--acquisition", "CORPD_FBK", "--acceleration", "4"]) == 0  # fmt: skip


def test_cli_table_csv_and_bad_files(tmp_path, capsys):
    rng = np.random.default_rng(1)
    target_dir, pred_dir = _make_dirs(tmp_path, rng, [(2, 32, 32, 32, 32), (2, 32, 32, 32, 32), (2, 32, 32, 32, 32)])
    (pred_dir / "file1.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 50)  # corrupt / truncated
    (pred_dir / "file2.h5").unlink()  # missing prediction
    (pred_dir / "extra.h5").write_bytes((pred_dir / "file0.h5").read_bytes())  # a prediction without a target
    csv_path = tmp_path / "metrics.csv"
    code = reconkit_main(
        ["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir), "--csv", str(csv_path)]
    )
    out, err = capsys.readouterr()
    assert code == 1
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 2
    assert any("file1.h5" in line and "corrupt" in line for line in error_lines)
    assert any("file2.h5" in line and "no prediction" in line for line in error_lines)
    assert "scored 1 of 3 volume(s); 2 failed" in err
    assert "note: 1 prediction file(s) without a target, not scored: extra.h5" in err
    assert "file0.h5" in out and "mean" in out
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    assert [r["volume"] for r in rows] == ["file0.h5", "mean"]
    score = cli_evaluate.score_volume(target_dir / "file0.h5", pred_dir / "file0.h5")
    assert float(rows[0]["ssim"]) == pytest.approx(score.ssim, rel=1e-6)
    assert float(rows[1]["psnr_db"]) == pytest.approx(score.psnr, rel=1e-6)


def test_csv_dash_is_stdout_alone(tmp_path, capsys, monkeypatch):
    """``--csv -`` wrote a file named ``-`` (gapfix audit): ``-`` is now stdout, holding the CSV alone (no table), the
    same bytes as the file; errors stay on stderr, and ``./-`` is still a file of that name."""
    rng = np.random.default_rng(1)
    target_dir, pred_dir = _make_dirs(tmp_path, rng, [(2, 32, 32, 32, 32), (2, 32, 32, 32, 32)])
    (pred_dir / "file1.h5").unlink()
    monkeypatch.chdir(tmp_path)
    args = ["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir), "--csv"]
    assert reconkit_main([*args, "-"]) == 1
    stdout_csv, err = capsys.readouterr()
    assert not (tmp_path / "-").exists()
    assert [row["volume"] for row in csv.DictReader(stdout_csv.splitlines())] == ["file0.h5", "mean"]
    assert "file1.h5" in err and "no prediction" in err
    assert reconkit_main([*args, "./-"]) == 1
    out, _ = capsys.readouterr()
    assert "fastMRI metrics per volume" in out and (tmp_path / "-").read_bytes() == stdout_csv.encode()
    text_only = io.StringIO()  # a notebook's stdout has no bytes underneath
    monkeypatch.setattr(sys, "stdout", text_only)
    assert reconkit_main([*args, "-"]) == 1
    assert text_only.getvalue() == stdout_csv


def test_csv_without_scored_volumes_keeps_the_band_columns_asked_for(tmp_path, capsys):
    """With --bands, a CSV of a run that scored nothing (no target matched, every volume failed) had the header
    without its nmse_band* columns, so a script reading them failed on a missing column rather than finding no rows
    (review41). The header now has the columns --bands asks for, in the file and on stdout."""
    target_dir, pred_dir = _make_dirs(tmp_path, np.random.default_rng(1), [(2, 32, 32, 32, 32)])
    csv_path = tmp_path / "metrics.csv"
    args = ["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir), "--bands", "3"]
    assert reconkit_main([*args, "--csv", str(csv_path)]) == 0
    header = csv_path.read_text(encoding="utf-8").splitlines()[0]
    assert header.endswith("nmse_band0,nmse_band1,nmse_band2")
    capsys.readouterr()
    assert reconkit_main([*args, "--acquisition", "AXFLAIR", "--csv", str(csv_path)]) == 1
    assert csv_path.read_text(encoding="utf-8").splitlines() == [header]
    capsys.readouterr()
    assert reconkit_main([*args, "--acquisition", "AXFLAIR", "--csv", "-"]) == 1
    assert capsys.readouterr().out.splitlines() == [header]


def test_csv_dash_with_a_plot_keeps_stdout_the_csv_alone(tmp_path, capsys):
    """With ``--csv - --plot FILE.png`` the figure's 'wrote' line goes to stderr: stdout stays the CSV alone."""
    target_dir, pred_dir = _make_dirs(tmp_path, np.random.default_rng(1), [(2, 32, 32, 32, 32)])
    figure = tmp_path / "scores.png"
    args = ["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir), "--csv", "-", "--plot", str(figure)]
    assert reconkit_main(args) == 0
    out, err = capsys.readouterr()
    assert [row["volume"] for row in csv.DictReader(out.splitlines())] == ["file0.h5", "mean"]
    assert f"wrote {figure}" in err and figure.stat().st_size > 0


def test_control_characters_in_file_names_are_printed_escaped(tmp_path, capsys):
    """ESC sequences in file names (a target scored, one without a prediction, a prediction without a target)
    reached the terminal as they were in the table, the error line and the note; they are printed escaped."""
    target_dir, pred_dir = _make_dirs(tmp_path, np.random.default_rng(2), [(2, 32, 32, 32, 32)])
    for folder in (target_dir, pred_dir):
        (folder / "file0.h5").rename(folder / "a\x1b[2J.h5")
    (target_dir / "b\x1b]8;;x\x07.h5").write_bytes((target_dir / "a\x1b[2J.h5").read_bytes())
    (pred_dir / "c\r.h5").write_bytes((pred_dir / "a\x1b[2J.h5").read_bytes())
    assert reconkit_main(["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir)]) == 1
    out, err = capsys.readouterr()
    assert not any(c in out + err for c in "\x1b\r\x07")
    assert "a\\x1b[2J.h5" in out and "no prediction for target b\\x1b]8;;x\\x07.h5" in err and "c\\r.h5" in err


def test_a_prediction_declaring_more_than_the_memory_is_one_error_line(tmp_path, capsys):
    """A prediction file of a few KB declaring petabytes (chunks never written) was allocated as declared; it is
    refused before reading, naming the file and sizes, and the other volumes are scored."""
    target_dir, pred_dir = _make_dirs(tmp_path, np.random.default_rng(3), [(2, 32, 32, 32, 32)] * 2)
    (pred_dir / "file1.h5").unlink()
    with h5py.File(pred_dir / "file1.h5", "w") as f:
        f.create_dataset("reconstruction", shape=(2, 2**24, 2**24), dtype=np.float32, chunks=(1, 64, 64))
    assert reconkit_main(["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir)]) == 1
    err = capsys.readouterr().err
    assert "file1.h5: reading 'reconstruction' (2, 16777216, 16777216) float32 takes 2.1e+06 GiB, more than" in err
    assert "scored 1 of 2 volume(s)" in err


def test_an_unexpected_error_fails_one_volume_and_the_others_are_scored(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(5)
    target_dir, pred_dir = _make_dirs(tmp_path, rng, [(2, 32, 32, 32, 32), (2, 32, 32, 32, 32)])
    real = cli_evaluate.score_volume

    def failing_for_file0(target_path, *args, **kwargs):
        if target_path.name == "file0.h5":
            raise KeyError("something unforeseen")
        return real(target_path, *args, **kwargs)

    monkeypatch.setattr(cli_evaluate, "score_volume", failing_for_file0)
    code = reconkit_main(["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir)])
    out, err = capsys.readouterr()
    assert code == 1
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "file0.h5" in line and "KeyError" in line and "something unforeseen" in line
    assert "file1.h5" in out and "scored 1 of 2 volume(s); 1 failed" in err


def test_a_prediction_that_is_a_group_or_a_broken_link_is_named_as_such(tmp_path, capsys):
    """Such a prediction file was reported under the target's name, with h5py's error ("Accessing a group is done
    with bytes or str" / "can't open file")."""
    target_dir, pred_dir = _make_dirs(tmp_path, np.random.default_rng(6), [(2, 32, 32, 32, 32)] * 3)
    with h5py.File(pred_dir / "file0.h5", "w") as f:
        f.create_group("reconstruction")
    with h5py.File(pred_dir / "file1.h5", "w") as f:
        f["reconstruction"] = h5py.ExternalLink("elsewhere.h5", "/reconstruction")
    assert reconkit_main(["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: {pred_dir / 'file0.h5'}: 'reconstruction' is a Group, expected a dataset",
        f"error: {pred_dir / 'file1.h5'}: 'reconstruction' is a link to elsewhere.h5:/reconstruction, which cannot be "
        "opened (missing file or object)",
    ]


def test_missing_or_file_folders_are_named_as_such(tmp_path, capsys):
    """A file given as --target / --predictions was reported as 'directory not found'."""
    target_dir, pred_dir = _make_dirs(tmp_path, np.random.default_rng(2), [(1, 16, 16, 16, 16)])
    one_file = target_dir / "file0.h5"
    for target, predictions, expected in (
        (one_file, pred_dir, f"{one_file}: target directory is not a directory (a folder of .h5 / .hdf5 files)"),
        (target_dir, pred_dir / "file0.h5", f"{pred_dir / 'file0.h5'}: predictions directory is not a directory"),
        (tmp_path / "nowhere", pred_dir, f"{tmp_path / 'nowhere'}: target directory not found"),
    ):
        code = reconkit_main(["evaluate", "--target", str(target), "--predictions", str(predictions)])
        assert code == 2 and f"reconkit evaluate: {expected}" in capsys.readouterr().err


def test_a_csv_that_cannot_be_written_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """``--csv`` naming a folder, or below a file, raised a traceback after every volume was scored; it is now
    refused before scoring, and a write that fails anyway (a full disk) is one line and exit code 1."""
    target_dir, pred_dir = _make_dirs(tmp_path, np.random.default_rng(6), [(1, 16, 16, 16, 16)])
    (tmp_path / "a_file").write_text("")
    args = ["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir), "--csv"]
    for csv_path, problem in (
        (tmp_path, "is a directory; give the CSV file to write"),
        (tmp_path / "a_file" / "m.csv", f"{tmp_path / 'a_file'} exists and is not a directory"),
    ):
        assert reconkit_main([*args, str(csv_path)]) == 2
        out, err = capsys.readouterr()
        assert err == f"reconkit evaluate: --csv {csv_path}: {problem}\n" and "file0.h5" not in out

    def disk_full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cli_evaluate, "write_metrics_csv", disk_full)
    assert reconkit_main([*args, str(tmp_path / "m.csv")]) == 1
    out, err = capsys.readouterr()
    assert "file0.h5" in out
    assert err == f"reconkit evaluate: --csv {tmp_path / 'm.csv'}: cannot write it: No space left on device\n"


def test_a_predictions_folder_that_cannot_be_listed_is_one_line(tmp_path, capsys, unlistable):
    """A predictions folder without read permission (its files still readable by name) was scored, then listing
    it for the orphan note raised a traceback."""
    target_dir, pred_dir = _make_dirs(tmp_path, np.random.default_rng(7), [(1, 16, 16, 16, 16)])
    unlistable(pred_dir)  # a chmod 311 folder
    assert reconkit_main(["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir)]) == 2
    assert capsys.readouterr().err == f"reconkit evaluate: {pred_dir}: cannot list the folder: Permission denied\n"


def test_hdf5_targets_and_predictions_are_scored_like_h5(tmp_path, capsys):
    """``reconkit reconstruct`` reads ``.hdf5`` inputs and writes ``h5/<name>.hdf5``; evaluate pairs them too."""
    rng = np.random.default_rng(3)
    target_dir, pred_dir = _make_dirs(tmp_path, rng, [(2, 32, 32, 32, 32), (2, 32, 32, 32, 32)])
    for folder in (target_dir, pred_dir):
        (folder / "file1.h5").rename(folder / "file1.hdf5")
    (pred_dir / "extra.hdf5").write_bytes((pred_dir / "file0.h5").read_bytes())
    code = reconkit_main(["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "file0.h5" in out and "file1.hdf5" in out
    assert "note: 1 prediction file(s) without a target, not scored: extra.hdf5" in err
    scores, errors = cli_evaluate.evaluate_directories(target_dir, pred_dir)
    assert [s.name for s in scores] == ["file0.h5", "file1.hdf5"] and errors == []


def test_a_blank_target_is_that_volume_s_error_not_a_nan_mean(tmp_path, capsys):
    """A target that is zero in the scored crop has no PSNR data range (fastmri: NMSE inf, PSNR -inf): that volume
    fails with its name, and the mean over the others stays a number."""
    rng = np.random.default_rng(7)
    target_dir, pred_dir = _make_dirs(tmp_path, rng, [(2, 24, 16, 24, 16)] * 2)
    with h5py.File(target_dir / "file1.h5", "a") as f:
        f["reconstruction_rss"][:, 4:20] = 0  # zero where the 16 x 16 crop looks; the rows outside keep a maximum
    assert reconkit_main(["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir)]) == 1
    out, err = capsys.readouterr()
    assert "file1.h5: 'reconstruction_rss' is at most 0 in the scored (16, 16) crop" in err
    assert "scored 1 of 2 volume(s); 1 failed" in err and "nan" not in out and "inf" not in out


def test_file_names_with_brackets_are_printed_as_they_are(tmp_path, capsys):
    """A name like ``scan[t2].h5`` is a volume name, not Rich markup: the tables print it whole."""
    rng = np.random.default_rng(6)
    target_dir, pred_dir = _make_dirs(tmp_path, rng, [(2, 16, 16, 16, 16)] * 2)
    for i, name in enumerate(["scan[t2].h5", "[bold]knee.h5"]):
        (target_dir / f"file{i}.h5").rename(target_dir / name)
        (pred_dir / f"file{i}.h5").rename(pred_dir / name)
    assert reconkit_main(["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir), "--bands", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("scan[t2].h5") == 2 and out.count("[bold]knee.h5") == 2


def test_a_narrow_terminal_wraps_volume_names(capsys, narrow_terminal):
    """A 40-column terminal cut each name to ``file…`` in the first table."""
    names = ["file_brain_AXFLAIR_200_6002462.h5", "file_brain_AXFLAIR_200_6002471.h5"]
    cli_evaluate.print_table([cli_evaluate.VolumeScore(name, 2, 0.01, 30.0, 0.9, (0.1, 0.2)) for name in names])
    volumes = narrow_terminal(capsys.readouterr().out)
    assert "\u2026" not in volumes and all(volumes.count(name) == 2 for name in names)


def test_band_nmse_columns(tmp_path, capsys):
    """--bands N: per-volume NMSE per k-space band after fastmri's crop; one band is the NMSE column itself, and a
    blurred prediction errs in the high bands far more than in the low ones."""
    rng = np.random.default_rng(2)
    target_dir, pred_dir = _make_dirs(tmp_path, rng, [(2, 40, 32, 44, 36), (3, 36, 36, 36, 36)])
    single, _ = cli_evaluate.evaluate_directories(target_dir, pred_dir, bands=1)
    for score in single:
        assert score.band_nmse == (pytest.approx(score.nmse, rel=1e-9),)
    with h5py.File(target_dir / "file1.h5") as f:
        target = f["reconstruction_rss"][()]
    blurred = (target + np.roll(target, 1, -1) + np.roll(target, -1, -1) + np.roll(target, 1, -2)
               + np.roll(target, -1, -2)) / 5
    write_fastmri_h5(pred_dir / "file1.h5", blurred)
    csv_path = tmp_path / "bands.csv"
    args = ["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir), "--bands", "4", "--csv", str(csv_path)]
    assert reconkit_main(args) == 0
    assert "b3" in capsys.readouterr().out
    with open(csv_path) as handle:
        rows = {row["volume"]: row for row in csv.DictReader(handle)}
    bands = [[float(rows[name][f"nmse_band{b}"]) for b in range(4)] for name in ("file0.h5", "file1.h5", "mean")]
    assert bands[1][3] > 100 * bands[1][0]  # blurring: an error of the edge of the spectrum
    assert bands[2] == pytest.approx(list(np.mean(bands[:2], axis=0)), rel=1e-6)
    assert reconkit_main(["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir), "--bands", "-1"]) == 2
    too_many = str(cli_evaluate.MAX_BANDS + 1)
    assert reconkit_main(["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir), "--bands", too_many]) == 2


def test_band_mean_leaves_out_volumes_without_the_band():
    """A tiny volume has no frequency in a narrow band (NaN there); the mean row is the mean of the volumes that
    have the band, not NaN for every volume's sake, and NaN only where no volume has it."""
    scores = [cli_evaluate.VolumeScore("big.h5", 4, 0.1, 30.0, 0.9, (0.01, 0.2, 0.4)),
              cli_evaluate.VolumeScore("tiny.h5", 1, 0.3, 20.0, 0.7, (0.03, float("nan"), float("nan"))),
              cli_evaluate.VolumeScore("mid.h5", 2, 0.2, 25.0, 0.8, (0.02, 0.4, float("nan")))]  # fmt: skip
    mean = cli_evaluate.mean_score(scores)
    assert mean.band_nmse == pytest.approx((0.02, 0.3, 0.4))
    alone = cli_evaluate.mean_score(scores[1:2]).band_nmse
    assert alone[0] == pytest.approx(0.03) and np.isnan(alone[1]) and np.isnan(alone[2])


def test_filters_on_bad_or_unlabelled_targets(tmp_path):
    """With a filter set the target is opened for its attrs: a corrupt target is one error line naming the file
    (the other volumes are still scored) and a target without the attr is left out, not an error."""
    rng = np.random.default_rng(3)
    target_dir, pred_dir = _make_dirs(tmp_path, rng, [(2, 32, 32, 32, 32)] * 3)  # acquisition CORPD_FBK, no accel.
    (target_dir / "file1.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 50)  # corrupt target
    scores, errors = cli_evaluate.evaluate_directories(target_dir, pred_dir, acquisition="CORPD_FBK")
    assert {s.name for s in scores} == {"file0.h5", "file2.h5"}
    assert len(errors) == 1 and "file1.h5" in errors[0]
    scores, errors = cli_evaluate.evaluate_directories(target_dir, pred_dir, acceleration=4)
    assert scores == [] and len(errors) == 1 and "file1.h5" in errors[0]


def test_single_coil_and_wrong_key(tmp_path, capsys):
    rng = np.random.default_rng(2)
    target_dir, pred_dir = _make_dirs(tmp_path, rng, [(2, 32, 32, 32, 32)], key="reconstruction_esc")
    assert (
        cli_evaluate.main(["--target", str(target_dir), "--predictions", str(pred_dir), "--challenge", "singlecoil"])
        == 0
    )
    assert cli_evaluate.main(["--target", str(target_dir), "--predictions", str(pred_dir)]) == 1
    assert "missing dataset 'reconstruction_rss' (it has 'reconstruction_esc': --challenge singlecoil?)" in (
        capsys.readouterr().err)  # the hint: without it, one bare error per volume


def test_help_has_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        reconkit_main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--predictions" in text and "--csv" in text and "example" in text and "reconkit evaluate --target" in text


def test_target_wider_than_tall_is_scored_whole(tmp_path):
    """fastmri's square crop (the target's width) cannot apply to h < w; such a volume is scored whole rather than
    refused ('cannot crop 24x40 to 40x40')."""
    rng = np.random.default_rng(3)
    target_dir, pred_dir = _make_dirs(tmp_path, rng, [(2, 24, 40, 24, 40)])
    scores, errors = cli_evaluate.evaluate_directories(target_dir, pred_dir)
    assert errors == []
    with h5py.File(target_dir / "file0.h5") as t, h5py.File(pred_dir / "file0.h5") as p:
        gt, pred = t["reconstruction_rss"][()].astype(np.float64), p["reconstruction"][()].astype(np.float64)
    assert scores[0].psnr == pytest.approx(float(fastmri_evaluate.psnr(gt, pred)), rel=1e-5)


def _figure_texts(monkeypatch) -> list[list[str]]:
    """Records the texts of every figure ``write_metrics_plot`` saves (one list per figure)."""
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    saved, savefig = [], Figure.savefig

    def recording(fig, *args, **kwargs):
        saved.append([t.get_text() for t in fig.findobj(Text) if t.get_text()])
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return saved


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_draws_the_scores_and_says_which_are_not_finite(tmp_path, capsys, monkeypatch):
    """--plot FILE.png: one PNG (2 panels, 3 with --bands) of a fixed size; a prediction equal to its target (PSNR
    inf, band NMSE 0) is not drawn and the figure says so; the title names both folders and the counts."""
    import matplotlib.image

    from reconkit.io.metrics_plot import DPI, PANEL_INCHES

    target_dir, pred_dir = _make_dirs(tmp_path, np.random.default_rng(4), [(2, 24, 24, 24, 24)] * 3)
    with h5py.File(target_dir / "file1.h5") as f:
        write_fastmri_h5(pred_dir / "file1.h5", f["reconstruction_rss"][()])
    (pred_dir / "file2.h5").unlink()  # one volume fails: counted in the title
    texts = _figure_texts(monkeypatch)
    plot = tmp_path / "figures" / "metrics.png"
    args = ["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir), "--plot", str(plot)]
    assert reconkit_main([*args, "--bands", "3"]) == 1
    assert f"wrote {plot}" in capsys.readouterr().out
    assert _png_size(plot) == (round(3 * PANEL_INCHES[0] * DPI), round(PANEL_INCHES[1] * DPI))
    assert matplotlib.image.imread(plot).shape[:2] == (round(PANEL_INCHES[1] * DPI), round(3 * PANEL_INCHES[0] * DPI))
    drawn = "\n".join(texts[-1])
    assert f"predictions {pred_dir}" in drawn and f"against target {target_dir}" in drawn
    assert "2 volume(s), 4 slices scored; 1 failed, not drawn; mean PSNR inf" in drawn
    assert "PSNR inf (no error: prediction equals target): 1 volume(s), not drawn:\n    file1.h5" in drawn
    assert "not drawn (log scale): 3 value(s) 0 (no error)" in drawn  # file1's three bands
    assert [p.name for p in plot.parent.iterdir()] == ["metrics.png"]  # atomic: no temporary file left
    assert reconkit_main(args) == 1  # without --bands: two panels
    assert _png_size(plot) == (round(2 * PANEL_INCHES[0] * DPI), round(PANEL_INCHES[1] * DPI))


def test_plot_of_one_or_many_volumes_keeps_its_size_and_a_short_legend(tmp_path, monkeypatch):
    """One volume, or hundreds: the same figure size, the band legend names at most HIGHLIGHTED volumes (+ the grey
    'others' and the mean), and names with '$' are drawn as they are (no mathtext)."""
    from reconkit.io import metrics_plot

    texts = _figure_texts(monkeypatch)
    rng = np.random.default_rng(0)
    rows = [(f"scan${i}$.h5", 2, 0.01, 30 + rng.standard_normal(), 0.9, *rng.uniform(1e-3, 1e-1, 4)) for i in range(200)]
    sizes = set()
    for count in (1, 200):
        path = metrics_plot.write_metrics_plot(tmp_path / f"{count}.png", rows[:count], ("mean", 1, 0.01, 30.0, 0.9,
                                               0.01, 0.02, 0.03, 0.04), "title")  # fmt: skip
        sizes.add(_png_size(path))
    assert len(sizes) == 1
    one, many = ("\n".join(t) for t in texts)
    assert "scan$0$.h5" in one and "mean of 1" in one
    assert "195 other volumes" in many and "mean of 200" in many
    assert sum(f"scan${i}$.h5" == t for t in texts[1] for i in range(200)) == metrics_plot.HIGHLIGHTED
    empty = metrics_plot.write_metrics_plot(tmp_path / "none.png", [], None, "no volume scored")
    assert _png_size(empty) == (round(2 * metrics_plot.PANEL_INCHES[0] * metrics_plot.DPI),
                                round(metrics_plot.PANEL_INCHES[1] * metrics_plot.DPI))  # fmt: skip


def test_a_plot_that_cannot_be_written_is_refused_before_scoring(tmp_path, capsys, monkeypatch):
    """--plot naming a folder, a file below a file, another format or the --csv file is refused (exit code 2) before
    any volume is scored; a write that fails anyway is one line and exit code 1, the CSV still written."""
    target_dir, pred_dir = _make_dirs(tmp_path, np.random.default_rng(6), [(1, 16, 16, 16, 16)])
    (tmp_path / "a_file").write_text("")
    args = ["evaluate", "--target", str(target_dir), "--predictions", str(pred_dir)]

    def not_called(*_args, **_kwargs):
        raise AssertionError("a volume was scored")

    with monkeypatch.context() as patch:
        patch.setattr(cli_evaluate, "score_volume", not_called)
        for extra, problem in (
            (["--plot", str(tmp_path)], f"--plot {tmp_path}: is a directory; give the PNG file to write"),
            (["--plot", str(tmp_path / "a_file" / "m.png")], f"--plot {tmp_path / 'a_file' / 'm.png'}: "
             f"{tmp_path / 'a_file'} exists and is not a directory"),
            (["--plot", str(tmp_path / "m.pdf")], f"--plot {tmp_path / 'm.pdf'}: writes a PNG file; give a name "
             "ending in .png"),
            (["--csv", str(tmp_path / "m.png"), "--plot", str(tmp_path / "m.png")], f"--csv and --plot name one "
             f"file, {tmp_path / 'm.png'}: the figure would replace the table"),
        ):  # fmt: skip
            assert reconkit_main([*args, *extra]) == 2
            assert capsys.readouterr().err == f"reconkit evaluate: {problem}\n"

    def disk_full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cli_evaluate, "write_metrics_plot", disk_full)
    csv_path, plot = tmp_path / "m.csv", tmp_path / "m.png"
    assert reconkit_main([*args, "--csv", str(csv_path), "--plot", str(plot)]) == 1
    out, err = capsys.readouterr()
    assert f"wrote {csv_path}" in out and csv_path.exists() and not plot.exists()
    assert err == f"reconkit evaluate: --plot {plot}: cannot write it: No space left on device\n"


def test_help_shows_the_plot_option_and_its_example(capsys):
    with pytest.raises(SystemExit):
        reconkit_main(["evaluate", "--help"])
    text = capsys.readouterr().out
    assert "--plot FILE.png" in text and "--bands 8 --plot out/metrics.png" in text


def test_evaluate_imports_matplotlib_only_to_draw():
    """matplotlib (about a second to import) came with reconkit.io's PNG writer on every ``reconkit evaluate``
    run, --help included; it is imported when a figure is drawn."""
    code = "import sys, reconkit.cli.evaluate; print(sorted(m for m in sys.modules if m.startswith('matplotlib')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
