"""The package list in pyproject.toml is written by hand: every sub-package must be on it, or a wheel (not the
editable install the tests use) would ship without it."""

from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "erw_fast").rglob("__init__.py")}
    found.add("erw_fast.kernels")  # installed from the top-level kernels/ directory (package-dir)
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_the_all_extra_and_the_makefile_install_every_optional_group():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"tb", "wandb"} <= set(extras)  # logging.tensorboard / logging.wandb
    [everything] = extras["all"]
    groups = set(everything.removeprefix("erw-fast[").removesuffix("]").split(","))
    assert groups == set(extras) - {"all"}
    makefile = (REPO / "Makefile").read_text()
    installed = makefile.split("-e '.[", 1)[1].split("]'", 1)[0].split(",")
    assert set(installed) == set(extras) - {"all"}
