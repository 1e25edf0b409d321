"""train_hivg.py's --output_dir: checked before training, one run at a time, an earlier run kept unless the
new one continues it (--resume) or replaces it (--overwrite)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import train_hivg
from tests.test_train import REPO, data, flags, log_epochs, run_script  # noqa: F401 (data: a fixture)
from utils.output_dir import claim


def refused(capsys, argv, pattern):
    """train_hivg.main(argv) stops before training with exit status 2 and one error line matching `pattern`."""
    assert train_hivg.main(argv) == 2
    err = capsys.readouterr().err
    assert re.match(f"train_hivg.py: error: {pattern}", err) and err.count("\n") == 1, err


def test_an_output_dir_that_cannot_hold_a_run_is_one_line_before_training(data, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "odd" / "checkpoint.pth").mkdir(parents=True)
    proc = run_script(["train_hivg.py", *flags(data, tmp_path / "a_file", "--epochs", "1")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == (f"train_hivg.py: error: --output_dir {tmp_path / 'a_file'} is a file, not a folder; "
                                            "give an --output_dir you can write to")
    for out, message in ((Path("/proc"), "cannot be created or written"),  # unwritable, root included
                         (Path("/proc/hivg/out"), "cannot be created or written"),
                         (tmp_path / "odd", "checkpoint.pth is a folder where the run writes its checkpoint.pth "
                                            "file; move it away")):
        refused(capsys, flags(data, out, "--epochs", "1"), f"--output_dir {out}.*{message}")
    assert not (tmp_path / "odd" / "log.txt").exists()


def test_a_folder_in_use_by_a_running_run_is_refused_and_a_killed_run_leaves_no_lock(data, tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train_hivg.py", *flags(data, run, "--epochs", "500")], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert any(line.startswith("Hi LoRA stage 0") for line in first.stdout)   # it holds the folder now
        refused(capsys, flags(data, run, "--epochs", "1"), rf".*in use by a running training run \(process {first.pid}\)")
    finally:
        first.kill()
        first.wait()
    os.close(claim(run, "", overwrite=True))   # the kernel dropped the killed run's lock


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(data, tmp_path, capsys):
    short = ["--epochs", "1", "--epoch_samples", "8", "--vl_dim_feedforward", "64"]
    assert train_hivg.main(flags(data, tmp_path, *short)) == 0
    before = {name: (tmp_path / name).stat().st_mtime_ns for name in ("best_checkpoint.pth", "log.txt")}
    refused(capsys, flags(data, tmp_path, *short), f".*holds an earlier run .*--resume {tmp_path / 'checkpoint.pth'}.*--overwrite")
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in before} == before
    assert train_hivg.main(flags(data, tmp_path, *short, "--overwrite")) == 0
    assert log_epochs(tmp_path) == [0] and (tmp_path / "best_checkpoint.pth").stat().st_mtime_ns > before["log.txt"]
