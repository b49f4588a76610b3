"""The package has no import circles, counting imports inside functions as well."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("house_metrics", os.path.join(ROOT, "tools", "house_metrics.py"))
house = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(house)


def test_no_import_circles():
    circles = house.import_circles(house.import_edges())
    assert circles == [], "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_checker_sees_a_circle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "liftplus_fast"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import x\n")
    (pkg / "sub" / "a.py").write_text("x = 1\n\ndef f():\n    from . import b\n    return b\n")
    (pkg / "sub" / "b.py").write_text("from .a import x\n")
    (pkg / "c.py").write_text("from .sub import a\n")
    edges = house.import_edges(str(tmp_path))
    assert ("liftplus_fast.sub.a", "liftplus_fast.sub.b", True, 4) in edges
    assert ("liftplus_fast.c", "liftplus_fast.sub.a", False, 1) in edges
    assert house.import_circles(edges) == [["liftplus_fast.sub.a", "liftplus_fast.sub.b"]]
