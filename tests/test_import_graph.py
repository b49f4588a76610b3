"""The package has no import circles, counting imports inside functions as well."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("house_metrics", os.path.join(ROOT, "tools", "house_metrics.py"))
house = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(house)


def _tolerated_triton_circle(circle):
    # EXCEPTION TO REMOVE: ops/_dispatch.py loads the Triton backends, whose modules import the
    # op modules for their autograd, which import ops/_dispatch.py. That circle is untied where
    # the Triton registration is reworked; delete this function (and its use below) then.
    return (
        all(m.startswith("liftplus_fast.ops.") for m in circle)
        and "liftplus_fast.ops._dispatch" in circle
        and any(m.startswith("liftplus_fast.ops.triton") for m in circle)
    )


def test_no_import_circles():
    circles = [c for c in house.import_circles(house.import_edges()) if not _tolerated_triton_circle(c)]
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
