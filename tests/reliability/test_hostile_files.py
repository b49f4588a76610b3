"""Every file the package reads is data: crafted contents are refused with an error naming the
file (and the option), and never make the package run code.

Each payload below that could run code tries to create a marker file; the tests assert the
error and that the marker does not exist. One control runs the layers payload through the
``eval`` with empty builtins that read these expressions once, to show the payload is real.
"""

import ast
import copy
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

import liftplus_fast as lf
from liftplus_fast.checkpoint import load_checkpoint, save_checkpoint
from liftplus_fast.cli import main
from liftplus_fast.data.cache_store import CacheError, index_path, read_index, write_index
from liftplus_fast.data.splits import read_inat_categories, read_list_file
from liftplus_fast.errors import ResumeMismatchError, UserInputError
from liftplus_fast.model import build_lift_model, load_clip
from liftplus_fast.model.tuner_files import CONFIG_NAME, TENSORS_NAME

from .conftest import TINY, list_run_args, make_list_dataset

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "liftplus_fast")


def escape(marker) -> str:
    """A classic escape from eval's empty builtins: it finds open() through a class's globals."""
    return (
        "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]"
        f".__init__.__globals__['__builtins__']['open']({str(marker)!r}, 'w').write('ran') and [0]"
    )


def pickle_payload(marker) -> bytes:
    """A pickle whose loading calls builtins.open(marker, 'w') (a REDUCE of a global)."""

    class Opener:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps({"tuner": {}, "epoch": Opener()}, protocol=2)


# --- no code from data anywhere in the package ----------------------------------------------

RUNS_CODE = {"eval", "exec", "compile", "__import__", "execfile", "breakpoint"}
UNSAFE_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("yaml", "full_load"),
    ("yaml", "load_all"),
    ("shelve", "open"),
    ("dill", "load"),
    ("dill", "loads"),
    ("jit", "load"),
    ("runpy", "run_path"),
    ("runpy", "run_module"),
    ("os", "system"),
    ("os", "popen"),
}


def unsafe_calls(source: str):
    """``(line, what)`` of every call in ``source`` that could run code from data."""
    tree = ast.parse(source)
    lazy_tables = {
        t.id
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
        for t in node.targets
        if isinstance(t, ast.Name)
        and all(isinstance(v, ast.Constant) and isinstance(v.value, str) for v in node.value.values)
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        kw = {k.arg: k.value for k in node.keywords}
        if isinstance(f, ast.Name) and f.id in RUNS_CODE:
            found.append((node.lineno, f.id))
        elif isinstance(f, ast.Attribute):
            owner = f.value.attr if isinstance(f.value, ast.Attribute) else getattr(f.value, "id", "")
            if (owner, f.attr) in UNSAFE_CALLS:
                found.append((node.lineno, f"{owner}.{f.attr}"))
            elif (owner, f.attr) == ("torch", "load"):
                safe = kw.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    found.append((node.lineno, "torch.load without weights_only=True"))
            elif f.attr == "load" and owner in ("np", "numpy"):
                unsafe = kw.get("allow_pickle")
                if unsafe is not None and not (isinstance(unsafe, ast.Constant) and unsafe.value is False):
                    found.append((node.lineno, "np.load with allow_pickle"))
        if getattr(f, "id", getattr(f, "attr", None)) == "import_module":
            arg = node.args[0] if node.args else None
            # Lazy attribute loading reads module names from a constant table of the module itself.
            table = isinstance(arg, ast.Subscript) and getattr(arg.value, "id", None) in lazy_tables
            if not table:
                found.append((node.lineno, "import_module of a computed name"))
    return found


def test_no_module_of_the_package_can_run_code_from_data():
    findings = []
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                source = open(path, encoding="utf-8").read()
                findings += [f"{os.path.relpath(path, PACKAGE)}:{line}: {what}" for line, what in unsafe_calls(source)]
    assert findings == [], findings


def test_the_scanner_finds_what_it_looks_for():
    src = (
        "_LAZY = {'a': '.a'}\n"
        "eval(x)\nexec(y)\npickle.loads(b)\nyaml.load(f)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
        "np.load(p, allow_pickle=True)\ntorch.jit.load(p)\nimport_module(name)\nimport_module(_LAZY[n])\n"
        "torch.load(p, weights_only=True)\nnp.load(p)\nmodel.eval()\nast.literal_eval(s)\nyaml.safe_load(f)\n"
    )
    assert [line for line, _ in unsafe_calls(src)] == [2, 3, 4, 5, 6, 7, 8, 9, 10]


# --- tuner folders: tuner_config.json and tuner.safetensors ---------------------------------


@pytest.fixture(scope="module")
def clip_and_tok():
    torch.manual_seed(0)
    return load_clip("tiny_vit")


@pytest.fixture
def tuner_folder(tmp_path, clip_and_tok):
    clip, tok = clip_and_tok
    cfg = lf.make_config(
        "lift+", {"num_classes": 3, "resolution": 32, "prec_train": "fp32", "classifier_init": "random"}
    )
    model = build_lift_model(copy.deepcopy(clip), cfg, [5, 3, 1], ["a", "b", "c"], tok)
    folder = tmp_path / "tuner"
    model.save_tuner(str(folder))
    return folder


def edit_config(folder, change):
    path = folder / CONFIG_NAME
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def load(folder, clip_and_tok):
    return lf.load_tuner(str(folder), copy.deepcopy(clip_and_tok[0]), clip_and_tok[1])


def test_the_escape_payload_runs_under_eval_with_empty_builtins(tmp_path):
    marker = tmp_path / "control"
    list(eval(escape(marker), {"__builtins__": {}}, {"range": range, "list": list}))  # noqa: S307
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("option", ["v.adaptformer_layers", "v.lora_layers", "l.pt_layers"])
def test_a_crafted_layers_expression_in_tuner_config_cannot_run_code(tuner_folder, clip_and_tok, tmp_path, option):
    marker = tmp_path / "ran"
    group, name = option.split(".")
    edit_config(tuner_folder, lambda c: c["config"][group].__setitem__(name, escape(marker)))
    with pytest.raises(UserInputError) as err:
        load(tuner_folder, clip_and_tok)
    msg = str(err.value)
    assert CONFIG_NAME in msg and f"option {option} must be" in msg and "__subclasses__" in msg, msg
    assert not marker.exists()


@pytest.mark.parametrize(
    "contents, match",
    [
        ("{not json", "is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
        ("[1, 2]", "is not a liftplus_fast tuner config"),
        (None, "unknown option"),
    ],
    ids=["not-json", "deeply-nested", "a-list", "unknown-option"],
)
def test_malformed_tuner_config_is_named(tuner_folder, clip_and_tok, contents, match):
    if contents is None:
        edit_config(tuner_folder, lambda c: c["config"].__setitem__("__class__", "x"))
    else:
        (tuner_folder / CONFIG_NAME).write_text(contents)
    with pytest.raises(UserInputError, match=match) as err:
        load(tuner_folder, clip_and_tok)
    assert CONFIG_NAME in str(err.value)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("classnames", ["a", 1, "c"], "classnames must be a list of 3 strings"),
        ("classnames", ["a"], "classnames must be a list of 3 strings"),
        ("cls_num_list", [5, -3, 1], r"cls_num_list must be a list of 3 integers >= 0"),
        ("num_classes", "3", "num_classes must be an integer >= 1"),
        ("num_classes", True, "num_classes must be an integer >= 1"),
        ("config", "lift+", "config .* must be a mapping"),
        ("feature_dim", -1, "feature_dim must be an integer >= 1"),
    ],
)
def test_tuner_config_fields_are_checked(tuner_folder, clip_and_tok, field, value, match):
    edit_config(tuner_folder, lambda c: c.__setitem__(field, value))
    with pytest.raises(UserInputError, match=match):
        load(tuner_folder, clip_and_tok)


def safetensors_bytes(tensors, metadata=None):
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


@pytest.mark.parametrize("damage", ["random", "huge-header", "wrong-shape", "missing-key", "extra-key", "nan", "int"])
def test_crafted_tuner_tensors_are_refused_naming_the_file(tuner_folder, clip_and_tok, damage):
    from safetensors.torch import load_file

    path = tuner_folder / TENSORS_NAME
    tensors = load_file(str(path))
    key = "classifier.weight"
    match = {"random": "could not read", "huge-header": "could not read"}.get(damage, key)
    if damage == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif damage == "huge-header":  # the header length field claims 2**60 bytes
        path.write_bytes((1 << 60).to_bytes(8, "little") + b"{}")
    else:
        if damage == "wrong-shape":
            tensors[key] = torch.zeros(4, 64)
        elif damage == "missing-key":
            del tensors[key]
            match = "missing keys"
        elif damage == "extra-key":
            tensors["image_encoder.blocks.0.__class__"] = torch.zeros(1)
            match = "unexpected keys"
        elif damage == "nan":
            tensors[key] = torch.full_like(tensors[key], float("nan"))
            match = "non-finite"
        elif damage == "int":
            tensors[key] = torch.zeros(tensors[key].shape, dtype=torch.int64)
            match = "not a float tensor"
        path.write_bytes(safetensors_bytes(tensors, {"format": "liftplus_fast.tuner/1"}))
    with pytest.raises(UserInputError, match=match) as err:
        load(tuner_folder, clip_and_tok)
    assert TENSORS_NAME in str(err.value)


# --- checkpoints ------------------------------------------------------------------------------


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint.pth.tar"
    # torch's zip layout around the crafted pickle, as torch.save writes it
    buf = io.BytesIO()
    torch.save({"tuner": {}}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, pickle_payload(marker) if item.filename.endswith("data.pkl") else data)
    with pytest.raises(ValueError, match="it holds Python objects other than tensors"):
        load_checkpoint(str(path))
    with pytest.raises(ValueError, match="it holds Python objects other than tensors"):
        lf.fast_train(method="lift+", test_only=True, model_dir=str(path), **TINY)
    assert not marker.exists()
    pickle.loads(pickle_payload(marker))  # control: a plain unpickler would have run it
    assert marker.exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = make_list_dataset(str(tmp_path_factory.mktemp("data")))
    out = str(tmp_path_factory.mktemp("run") / "run")
    lf.fast_train(method="lift+", output_dir=out, **list_run_args(root))
    return root, out


@pytest.mark.parametrize(
    "damage, match",
    [
        ("not-a-dict", "a tuner state dict maps parameter names to tensors"),
        ("int-keys", "a tuner state dict maps parameter names to tensors"),
        ("str-value", "'classifier.weight' holds str, not a float tensor"),
    ],
)
def test_a_checkpoint_whose_tuner_is_not_tensors_is_refused(finished_run, tmp_path, damage, match):
    root, out = finished_run
    state = load_checkpoint(out)
    if damage == "not-a-dict":
        state["tuner"] = "not a dict"
    elif damage == "int-keys":
        state["tuner"] = {i: v for i, v in enumerate(state["tuner"].values())}
    else:
        state["tuner"]["classifier.weight"] = "x"
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(state, str(path))
    with pytest.raises(UserInputError, match=match):
        lf.fast_train(method="lift+", test_only=True, model_dir=str(path), **list_run_args(root))


def test_a_crafted_option_in_a_resumed_checkpoint_is_compared_never_run(finished_run, tmp_path):
    import shutil

    root, out = finished_run
    run = str(tmp_path / "run")
    shutil.copytree(out, run)
    marker = tmp_path / "ran"
    ckpt = load_checkpoint(run)
    ckpt["config"]["v"]["adaptformer_layers"] = escape(marker)
    save_checkpoint(os.path.join(run, "checkpoint.pth.tar"), ckpt.pop("tuner"), **ckpt)
    with pytest.raises(ResumeMismatchError, match="v.adaptformer_layers"):
        lf.fast_train(method="lift+", output_dir=run, resume=True, **list_run_args(root))
    assert not marker.exists()


def test_config_json_is_an_output_never_read_on_resume(finished_run, tmp_path):
    import shutil

    root, out = finished_run
    run = str(tmp_path / "run")
    shutil.copytree(out, run)
    marker = tmp_path / "ran"
    cfg = json.load(open(os.path.join(run, "config.json")))
    cfg["v"]["adaptformer_layers"] = escape(marker)
    cfg["lr"] = "__import__('os')"
    json.dump(cfg, open(os.path.join(run, "config.json"), "w"))
    result = lf.fast_train(method="lift+", output_dir=run, resume=True, **list_run_args(root))
    assert result.history == [] and not marker.exists()
    assert json.load(open(os.path.join(run, "config.json")))["lr"] == 0.02  # rewritten from the run


def test_a_crafted_layers_option_on_the_command_line_is_refused(tmp_path, capsys):
    marker = tmp_path / "ran"
    argv = ["train", "-d", "digits_lt", "-b", "tiny_vit", "--pretrained", "none", "--output-dir", str(tmp_path / "o")]
    assert main(argv + ["v.adaptformer_layers", escape(marker)]) == 2
    err = capsys.readouterr().err
    assert "option v.adaptformer_layers must be" in err and not marker.exists()
    assert main(argv + ["mean", "[" * 100_000]) == 2  # nested too deep to read: a word, refused by the check
    assert "option mean must be three finite numbers" in capsys.readouterr().err


# --- cache index ------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path):
    root = make_list_dataset(str(tmp_path / "data"), n_classes=2, n_train=2, n_test=1)
    folder = str(tmp_path / "cache")
    lf.build_cache("imagenet_lt", root, folder, num_workers=0, progress=False, splits=("train",))
    return folder


@pytest.mark.parametrize(
    "damage, match",
    [
        ("pickled-array", "is not a readable cache index"),
        ("header-list", "is not a liftplus_fast cache index"),
        ("header-field", r"header field 'data_bytes' should be of type int; got '1e9'"),
        ("float-offsets", r"array 'offsets' is float64"),
        ("negative-offsets", "negative offsets"),
        ("labels", r"labels outside 0\.\.1"),
        ("nested-json", "is not a readable cache index"),
    ],
)
def test_a_crafted_cache_index_is_refused(cache, tmp_path, damage, match):
    marker = tmp_path / "ran"
    header, arrays = read_index(cache, "train")
    path = index_path(cache, "train")
    if damage == "pickled-array":

        class Opener:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        arrays["labels"] = np.array([Opener()], dtype=object)
        header_bytes = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        with open(path, "wb") as f:
            np.savez(f, header=header_bytes, **arrays)
    elif damage == "nested-json":
        with open(path, "wb") as f:
            np.savez(f, header=np.frombuffer(b"[" * 100_000, dtype=np.uint8), **arrays)
    else:
        if damage == "header-list":
            header = ["liftplus_fast.decode_once_cache"]
        elif damage == "header-field":
            header["data_bytes"] = "1e9"
        elif damage == "float-offsets":
            arrays["offsets"] = arrays["offsets"].astype(np.float64)
        elif damage == "negative-offsets":
            arrays["offsets"] = arrays["offsets"] - 10**6
        elif damage == "labels":
            arrays["labels"] = arrays["labels"] + 5
        write_index(path, arrays, header)
    with pytest.raises(CacheError, match=match):
        read_index(cache, "train")
    assert not marker.exists()


# --- list files and class names ---------------------------------------------------------------


def test_list_file_lines_are_data(tmp_path):
    lst = tmp_path / "train.txt"
    lst.write_text("img/a.png 0\nimg/b.png __import__('os').getcwd()\n")
    with pytest.raises(UserInputError, match=r"train\.txt:2: label .*__import__.* is not an integer"):
        read_list_file(str(lst))
    lst.write_text("img/a.png 99999999999999999999999\n")
    paths, labels, _ = read_list_file(str(lst))  # read as a number; the data set checks its range
    assert labels == [99999999999999999999999]


def test_a_list_file_label_out_of_range_is_named(tmp_path):
    root = make_list_dataset(str(tmp_path / "data"))
    with open(os.path.join(root, "train.txt"), "a") as f:
        f.write("img/train_0_0.png 7\n")
    with pytest.raises(UserInputError, match=r"train\.txt:13: label 7 is out of range for 3 classes"):
        lf.fast_train(method="lift+", **list_run_args(root))


@pytest.mark.parametrize(
    "contents, match",
    [
        ('{"name": "x"}', "is not a JSON list of categories"),
        ("[" * 100_000, "is not a JSON list of categories"),
        ('[{"name": "a"}, {"id": 1}]', r"category 1 has no 'name' string"),
        ('[{"name": "a"}, "b"]', r"category 1 has no 'name' string"),
    ],
)
def test_crafted_inaturalist_categories_are_named(tmp_path, contents, match):
    path = tmp_path / "categories.json"
    path.write_text(contents)
    with pytest.raises(UserInputError, match=match):
        read_inat_categories(str(path))
