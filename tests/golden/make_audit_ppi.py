"""Write tests/golden/audit_ppi_reference.json: PPI++ mean estimates and intervals computed by the
authors' package ``ppi-python`` (``ppi_py``) on fixed inputs, for tests/test_audit_golden.py.

Reproduce (ppi-python 0.2.3 from PyPI, the wheel's sha256 is WHEEL_SHA256):
    .venv/bin/pip install ppi-python==0.2.3
    .venv/bin/python tests/golden/make_audit_ppi.py
The inputs are stored in the file (rounded to 6 decimals), so the check does not depend on
numpy's random generator; the outputs are ppi_py's on exactly those stored inputs.
"""

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
from ppi_py import ppi_mean_ci, ppi_mean_pointestimate

OUT = Path(__file__).with_name("audit_ppi_reference.json")
WHEEL_SHA256 = "f20ea31f90af3339de0f4a48f556c281493e347f49a9fea3d0e164769fdf8b24"  # ppi_python-0.2.3-py3-none-any.whl


def case(name, seed, n, N, a, b, alpha):
    rng = np.random.default_rng(seed)
    f_lab = np.round(rng.beta(a, b, n), 6)
    y = (rng.random(n) < f_lab).astype(float)
    f_unl = np.round(rng.beta(a, b, N), 6)
    low, high = ppi_mean_ci(y, f_lab, f_unl, alpha=alpha)
    est = ppi_mean_pointestimate(y, f_lab, f_unl)
    return {
        "name": name,
        "alpha": alpha,
        "y": y.tolist(),
        "f_labelled": f_lab.tolist(),
        "f_unlabelled": f_unl.tolist(),
        "estimate": float(np.ravel(est)[0]),
        "low": float(np.ravel(low)[0]),
        "high": float(np.ravel(high)[0]),
    }


def main():
    cases = [
        case("informative_n120", 1, 120, 600, 4.0, 0.6, 0.05),
        case("weak_n60", 2, 60, 400, 2.0, 1.0, 0.1),
        case("confident_n200", 3, 200, 800, 9.0, 0.3, 0.05),
    ]
    data = {
        "reference": "ppi-python (ppi_py) " + version("ppi-python"),
        "wheel_sha256": WHEEL_SHA256,
        "functions": ["ppi_py.ppi_mean_ci", "ppi_py.ppi_mean_pointestimate"],
        "command": ".venv/bin/python tests/golden/make_audit_ppi.py",
        "cases": cases,
    }
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
