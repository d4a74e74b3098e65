"""The benchmarks run end to end at smoke size (their numbers are reported from the GPU box, never
asserted here): every row is a positive measured rate, and the fast paths' deviation from fp32
is what bf16 and memory layout can cause, no more."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'bench', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_throughput_smoke_on_cpu(tmp_path, real_weights):
    """(real_weights: the benchmark times the real Inception network, so the test is `slow`.)"""
    out = tmp_path / 'bench.json'
    result = _load('gpu_throughput').main(['--smoke', '--device', 'cpu', '--out', str(out)])
    rows = {(r['path'], r['variant']): r for r in result['rows']}
    assert all(r['img_per_s'] > 0 for r in result['rows'])
    assert rows[('forward', 'fp32')]['max_rel_deviation'] == 0
    assert 0 < rows[('forward', 'bf16')]['max_rel_deviation'] < 0.05
    assert rows[('forward', 'bf16+channels_last')]['max_rel_deviation'] < 0.05
    assert {'edm (NFE 35)', 'dpm_solver (NFE 20)', 'calibration estimate', 'training step', 'Inception features'} <= {p for p, _ in rows}
    assert result['device'] == 'CPU' and result['smoke'] and out.stat().st_size > 0
