"""The CPU peak used for MFU is cached per machine: a cache written on another machine
(another CPU model, core count or device split) is measured again, not trusted."""
import json

from tfusion.train import mfu


def test_cpu_peak_cache_is_keyed_by_machine(tmp_path, monkeypatch):
    cache = tmp_path / "peak.json"
    calls = []
    monkeypatch.setattr(mfu, "measure_matmul_flops", lambda: calls.append(1) or 123.0)
    cache.write_text(json.dumps({"flops": 5.0}))  # an old cache without its machine
    assert mfu.cpu_peak_flops(str(cache)) == 123.0 and len(calls) == 1
    assert json.loads(cache.read_text())["machine"] == mfu.cpu_identity()
    assert mfu.cpu_peak_flops(str(cache)) == 123.0 and len(calls) == 1  # reused
    cache.write_text(json.dumps({"flops": 7.0, "machine": "another CPU | 64 cores | 1 devices"}))
    assert mfu.cpu_peak_flops(str(cache)) == 123.0 and len(calls) == 2
