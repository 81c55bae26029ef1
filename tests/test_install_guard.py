"""geomcompile's subpackages installed from other folders (kernels/, policies/) must come from the
same checkout as the package itself: a second checkout on sys.path would otherwise silently run the
installed copy's kernels and policies."""
from pathlib import Path

import geomcompile
import geomcompile.kernels
import geomcompile.policies


def test_kernels_and_policies_come_from_the_same_checkout_as_the_package():
    root = Path(geomcompile.__file__).resolve().parent.parent
    for sub, folder in ((geomcompile.kernels, "kernels"), (geomcompile.policies, "policies")):
        where = Path(sub.__file__).resolve().parent
        installed_layout = where == root / "geomcompile" / folder          # a wheel: geomcompile/kernels
        checkout_layout = where == root / folder                           # this repository: ./kernels
        assert installed_layout or checkout_layout, (
            f"geomcompile.{folder} is loaded from {where}, but geomcompile from {root / 'geomcompile'}: "
            f"two checkouts are mixed (reinstall with `pip install -e .` from the one you run)")
