"""The inspect CLI prints the pipeline's statistics and draws rows with their text."""
import re
import subprocess
import sys

from PIL import Image
from tests.helpers import REPO_ROOT



def test_inspect_cli_prints_stats_and_writes_png(tmp_path):
    png = tmp_path / "rows.png"
    result = subprocess.run(
        [sys.executable, "-m", "data_pipelines.inspect",
         f"--config={REPO_ROOT}/data_pipelines/example_config.py",
         f"--config.data.tokenizer_cache_dir={tmp_path}", "--config.train.batch_size=4",
         "--batches=2", "--rows=3", f"--png={png}"],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True)
    out = result.stdout
    efficiency = re.search(r"packing efficiency: ([0-9.]+) \((\d+)/2048 positions\)", out)
    assert efficiency and 0.9 <= float(efficiency.group(1)) <= 1.0
    assert "skipped by reason: {}" in out and "'tokens': ((4, 256), 'int32')" in out
    with Image.open(png) as image:
        assert image.width > 100 and image.height > 3 * 64
