"""benchmarks/gpu.sh, the GPU run ready to go, on a machine without CUDA."""

import os
import subprocess
import sys
from pathlib import Path


def test_gpu_script_stops_at_its_cuda_check_with_one_clear_line():
    """benchmarks/gpu.sh without CUDA (hidden with CUDA_VISIBLE_DEVICES="" where there is one) stops before running
    anything, saying why and what to do; its --cpu-smoke mode runs the same commands tiny (checked by hand: slow)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr
    assert res.stderr.startswith("gpu.sh: CUDA is not available") and "--cpu-smoke" in res.stderr
    assert res.stdout == ""  # nothing ran
