"""Resume rules and output folders: nothing of a finished run is replaced or mixed silently."""

import json
import os
import shutil
import stat

import pytest

import liftplus_fast as lf
from liftplus_fast.checkpoint import OutputWriteError, load_checkpoint
from liftplus_fast.run_folder import RESUME_FREE_OPTIONS, ResumeMismatchError, RunExistsError, resume_conflicts

from .conftest import TINY, list_run_args, make_list_dataset, snapshot


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_list_dataset(str(tmp_path_factory.mktemp("data")))


def run(root, **kw):
    return lf.fast_train(method=kw.pop("method", "lift+"), **list_run_args(root, **kw))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root):
    out = str(tmp_path_factory.mktemp("finished") / "run")
    return out, run(data_root, output_dir=out)


def test_resume_with_changed_schedule_is_refused_and_names_the_options(finished, data_root):
    out, _ = finished
    before = snapshot(out)
    with pytest.raises(ResumeMismatchError) as err:
        run(data_root, output_dir=out, resume=True, num_epochs=6, lr=0.5, momentum=0.0)
    msg = str(err.value)
    for part in ("num_epochs 1 -> 6", "lr 0.02 -> 0.5", "momentum 0.9 -> 0.0", "checkpoint.pth.tar"):
        assert part in msg, msg
    assert snapshot(out) == before  # config.json still records what ran


def test_resume_of_a_finished_run_trains_nothing_and_keeps_its_record(finished, data_root):
    out, result = finished
    saved_cfg = json.load(open(os.path.join(out, "config.json")))
    # tte may change on resume: it does not change what is trained.
    again = run(data_root, output_dir=out, resume=True, tte=True)
    assert again.history == []
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["num_epochs"] == saved_cfg["num_epochs"] == 1 and cfg["lr"] == saved_cfg["lr"]
    assert cfg["tte"] is True  # config.json records what ran, evaluation included


def test_finished_run_is_not_overwritten_without_overwrite(finished, data_root):
    out, _ = finished
    before = snapshot(out)
    with pytest.raises(RunExistsError, match=r"already holds a run .*--resume.*--overwrite"):
        run(data_root, output_dir=out, seed=3)
    assert snapshot(out) == before


def test_overwrite_that_fails_its_checks_leaves_the_old_run_whole(finished, data_root):
    out, _ = finished
    before = snapshot(out)
    with pytest.raises(ValueError, match="takes 32x32 images"):
        run(data_root, output_dir=out, overwrite=True, resolution=64)
    assert snapshot(out) == before


def test_overwrite_replaces_every_file_of_the_old_run(finished, data_root, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(finished[0], out)
    run(data_root, method="lp", output_dir=out, overwrite=True, loss_type="CE")
    cfg = json.load(open(os.path.join(out, "config.json")))
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    ckpt = load_checkpoint(out)
    assert cfg["method"] == "lp" and ckpt["config"]["method"] == "lp" and metrics["history"][0]["epoch"] == 1
    assert not any(".adaptformer." in k for k in ckpt["tuner"])  # the LIFT+ tuner is gone


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        lf.fast_train(method="lift+", output_dir=str(tmp_path), resume=True, overwrite=True, **dict(TINY, num_epochs=1))


def test_output_path_that_is_a_file(tmp_path):
    path = tmp_path / "out"
    path.write_text("keep me")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        lf.fast_train(method="lift+", output_dir=str(path), **dict(TINY, num_epochs=1))
    assert path.read_text() == "keep me"


def test_output_folder_that_cannot_be_written():
    # /sys refuses new files even to root: a real read-only folder on every Linux machine.
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no /sys")
    with pytest.raises(OutputWriteError, match=r"output folder '/sys/kernel' cannot be written"):
        lf.fast_train(method="lift+", output_dir="/sys/kernel", **dict(TINY, num_epochs=1))
    with pytest.raises(OutputWriteError, match=r"cannot be written"):
        lf.fast_train(method="lift+", output_dir="/sys/no_such_dir/run", **dict(TINY, num_epochs=1))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_by_permissions(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(OutputWriteError, match="cannot be written"):
            lf.fast_train(method="lift+", output_dir=str(out), **dict(TINY, num_epochs=1))
    finally:
        out.chmod(0o755)


def test_outputs_respect_the_umask(finished):
    out, _ = finished
    # The module fixture ran under the test process's umask.
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("config.json", "metrics.json", "checkpoint.pth.tar", "per_class_accuracy.png"):
        mode = stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode)
        assert mode == 0o666 & ~mask, (name, oct(mode))


def test_the_resume_rule_frees_only_options_that_do_not_change_training():
    cfg = lf.make_config("lift+", {"num_classes": 10}).to_dict()
    changed = dict(
        cfg, root="/elsewhere", num_workers=0, tte=True, seed=7, prec_train="fp32", v=dict(cfg["v"], adaptformer_dim=64)
    )
    names = [c[0] for c in resume_conflicts(cfg, changed)]
    assert names == ["prec_train", "seed", "v.adaptformer_dim"]
    assert {"num_epochs", "lr", "batch_size", "seed", "method"}.isdisjoint(RESUME_FREE_OPTIONS)


def test_resume_without_a_run_is_an_error_naming_the_folder(tmp_path):
    missing = tmp_path / "never_ran"
    with pytest.raises(FileNotFoundError, match=r"nothing to resume: the output folder '.*never_ran' does not exist"):
        lf.fast_train(method="lift+", output_dir=str(missing), resume=True, **dict(TINY, num_epochs=1))
    assert not missing.exists()  # not created by a refused resume
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("mine")
    no_checkpoint = r"nothing to resume in '.*empty': it has no checkpoint\.pth\.tar .*notes\.txt"
    with pytest.raises(FileNotFoundError, match=no_checkpoint):
        lf.fast_train(method="lift+", output_dir=str(empty), resume=True, **dict(TINY, num_epochs=1))
    assert sorted(os.listdir(empty)) == ["notes.txt"]  # no log, config or lock file left
    with pytest.raises(ValueError, match="resume needs the output folder"):
        lf.fast_train(method="lift+", output_dir=None, resume=True, **dict(TINY, num_epochs=1))


def test_resume_without_a_run_on_the_command_line_is_one_line(tmp_path, capsys):
    from liftplus_fast.cli import main

    out = tmp_path / "run"
    out.mkdir()
    code = main(
        ["train", "-d", "digits_lt", "-b", "tiny_vit", "--pretrained", "none", "--output-dir", str(out), "--resume"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nothing to resume in" in err[0] and str(out) in err[0], err


def test_a_restarted_torchrun_job_resumes_its_own_checkpoint(data_root, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")  # what torchrun gives its processes
    run(data_root, output_dir=out)
    assert load_checkpoint(out)["torchrun_job"] == "job-1"
    # A process of the same job, restarted by torchrun, runs the first command line again
    # (no --resume, even --overwrite): it continues the run instead of replacing it.
    again = run(data_root, output_dir=out, overwrite=True)
    assert again.history == []  # the finished run was continued (nothing left to train)
    assert "torchrun job job-1 restarted: resuming the run in" in open(os.path.join(out, "log.txt")).read()
    # Another job into the folder follows the folder rules.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")
    with pytest.raises(RunExistsError):
        run(data_root, output_dir=out)
    assert [h["epoch"] for h in run(data_root, output_dir=out, overwrite=True).history] == [1]
