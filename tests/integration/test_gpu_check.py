"""bench/gpu_check.py, the prepared run for a lent GPU machine, still runs here on the CPU."""

from bench.gpu_check import print_report, run


def test_gpu_check_runs_every_step_it_can_without_a_gpu(capsys):
    report = run(seconds=0.3, cpu_too=False, gpu_nonces=0, cpu_nonces=4)
    assert report.tier == "cpu_only" and not report.gpus
    assert report.serving["cpu"]["1"] > 0 and report.serving["cpu"]["64"] > 0
    assert report.proof_nonces_per_second["cpu"] > 0
    print_report(report)
    assert "NVML found no GPU" in capsys.readouterr().out
