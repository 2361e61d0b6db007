"""The package surface: the public names resolve, and the selection engine stays free of HF imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

import hf_epic


def test_public_names_resolve_and_match_the_lazy_map():
    assert set(hf_epic.__all__) == set(hf_epic._LAZY) | {"__version__"}
    for name in hf_epic.__all__:
        assert getattr(hf_epic, name) is not None, name


@pytest.mark.parametrize("module", ["hf_epic.selection", "hf_epic.native", "hf_epic.drop_rules"])
def test_selection_core_imports_without_hugging_face_libraries(module):
    code = (
        f"import sys, {module}; "
        "bad = [m for m in ('transformers', 'datasets', 'accelerate', 'evaluate', 'timm') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} pulled in: {out.stdout.strip()}"
