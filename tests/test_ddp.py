import socket
import subprocess
import sys
from pathlib import Path


def test_two_process_data_parallel_training_keeps_ranks_identical(tmp_path):
    out = tmp_path / "result"
    with socket.socket() as s:  # torchrun's static rendezvous needs a concrete port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={port}",
           str(Path(__file__).with_name("ddp_worker.py")), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0 = (tmp_path / "result.rank0").read_text().split()
    r1 = (tmp_path / "result.rank1").read_text().split()
    assert r0[0] == r1[0]  # same adapter weights on both ranks after 3 steps
    assert r0[1] == "True" and r0[2] == "3"
