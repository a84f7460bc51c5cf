"""Resuming into a run's folder: metrics.csv that holds every phase once, the resume command, the version folder."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
from lightning.pytorch.loggers import CSVLogger

from thinktwice_pl.checkpointing import Progress
from thinktwice_pl.resume import Continuation, metrics_writer, resume_command, set_version, version_folder_of

OLD = """epoch,step,train/solve/loss,val/avg/solve/pass@1
,0,,0.25
0.0,0,0.5,
0.0,1,0.4,
0.0,2,0.3,
0.0,3,0.2,
,4,,0.5
0.0,4,0.1,
0.0,5,0.0"""  # the last line was cut short by a kill


def test_a_continued_metrics_file_keeps_the_checkpoints_phases_and_replaces_redone_rows(tmp_path: Path) -> None:
    (tmp_path / "metrics.csv").write_text(OLD)
    # a checkpoint after 4 phases; the run was killed after logging phases 4 and 5
    keep = Continuation("version_0", tmp_path, Progress(global_step=8, phases=4, model_hparams={})).keep
    writer = metrics_writer(str(tmp_path), keep)
    assert (tmp_path / "metrics.csv").read_text() == OLD, "nothing is rewritten before the resumed run logs"
    writer.log_metrics({"train/solve/loss": 0.11, "epoch": 0.0}, step=4)
    writer.save()
    writer.log_metrics({"val/avg/solve/pass@1": 0.75}, step=4)  # the validation after phase 4, run again
    writer.log_metrics({"train/solve/loss": 0.01, "train/refine/loss": 0.02, "epoch": 0.0}, step=5)
    writer.save()
    rows = pd.read_csv(tmp_path / "metrics.csv")
    assert rows["step"].tolist() == [0, 0, 1, 2, 3, 4, 4, 5]
    assert rows["train/solve/loss"].tolist()[1:6:] == [0.5, 0.4, 0.3, 0.2, 0.11]
    assert rows.loc[rows["val/avg/solve/pass@1"].notna(), "val/avg/solve/pass@1"].tolist() == [0.25, 0.75]
    assert "train/refine/loss" in rows.columns  # a new column: the header grows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"], "no temporary file left"


def test_a_fresh_writer_starts_empty_and_writes_every_save(tmp_path: Path) -> None:
    writer = metrics_writer(str(tmp_path))
    writer.log_metrics({"train/solve/loss": 1.0}, step=0)
    writer.save()
    writer.log_metrics({"train/refine/loss": 2.0}, step=1)
    writer.save()
    rows = pd.read_csv(tmp_path / "metrics.csv")
    assert rows["step"].tolist() == [0, 1] and rows["train/refine/loss"].tolist()[1] == 2.0


def test_resume_command_replaces_the_checkpoint_of_the_command_line(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "crash-step=6.ckpt"
    command = ["thinktwice", "fit", "--config", "my config.yaml", "--ckpt_path", "old.ckpt", "--ckpt_path=x.ckpt"]
    assert resume_command(command, ckpt) == (
        "thinktwice fit --config 'my config.yaml' --ckpt_path runs/tiny/version_0/checkpoints/crash-step=6.ckpt"
    )
    monkeypatch.setattr(sys, "argv", ["/x/site-packages/thinktwice_pl/__main__.py", "fit", "--config", "c.yaml"])
    assert resume_command(None, "/elsewhere/a.ckpt") == (
        f"{sys.executable} -m thinktwice_pl fit --config c.yaml --ckpt_path /elsewhere/a.ckpt"
    )


def test_the_version_folder_of_a_checkpoint_of_this_run(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path / "runs", name="tiny")
    trainer = SimpleNamespace(loggers=[logger], default_root_dir=str(tmp_path))
    inside = tmp_path / "runs" / "tiny" / "version_3" / "checkpoints" / "last.ckpt"
    assert version_folder_of(inside, trainer) == "version_3"
    assert version_folder_of(tmp_path / "runs" / "other" / "version_3" / "checkpoints" / "last.ckpt", trainer) is None
    assert version_folder_of(tmp_path / "elsewhere" / "last.ckpt", trainer) is None
    set_version([logger], "version_3")
    assert logger.version == 3 and logger.log_dir == str(tmp_path / "runs" / "tiny" / "version_3")
